"""``SRDMasker``: apply a masking policy to a ``datasets`` dataset (or to images before
captioning).

    masker = SRDMasker.from_pretrained("outputs/srd/badnet-0.1-local_mean/dqn/seed-0/policy-untrusted")
    cleansed = poisoned.map(masker, batched=True, batch_size=64)

Every row is masked on its own (two captions of the same image are two samples: the image is
masked in each, never looked up by id), and the boxes placed go to a ``srd_masks`` column
(``[x0, y0, x1, y1]`` per mask, pixels, end exclusive).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from PIL import Image

from .data.images import ensure_rgb
from .rl.modeling_srd import SRDPolicy

logger = logging.getLogger(__name__)


class SRDMasker:
    """A ``dataset.map`` transform (batched or not) built on an :class:`SRDPolicy`.

    Args:
        policy: the policy (or use :meth:`from_pretrained`).
        image_column: column holding the images (PIL or ``datasets.Image``).
        num_masks: masks per image (default: the policy's ``num_masks``).
        masks_column: where the placed boxes are recorded.
        on_small_image: ``"error"`` (default) or ``"skip"``: leave images smaller than the
            largest mask unmasked, record ``None`` in ``masks_column`` and count them in
            ``n_skipped`` (with a warning), so nothing is dropped silently.
    """

    def __init__(self, policy: SRDPolicy, image_column: str = "image", num_masks: int | None = None,
                 masks_column: str = "srd_masks", on_small_image: str = "error"):
        if on_small_image not in ("error", "skip"):
            raise ValueError(f"on_small_image must be 'error' or 'skip', got {on_small_image!r}")
        self.policy = policy.eval()
        self.image_column = image_column
        self.num_masks = policy.config.num_masks if num_masks is None else int(num_masks)
        self.masks_column = masks_column
        self.on_small_image = on_small_image
        self.n_masked = 0
        self.n_skipped = 0

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "SRDMasker":
        """Policy from a folder or Hub id (safetensors + JSON only)."""
        return cls(SRDPolicy.from_pretrained(str(name_or_path)), **kwargs)

    def mask_images(self, images: Sequence[Any]) -> tuple[list[Image.Image], list[list[list[int]] | None]]:
        """Masked copies of ``images`` and the boxes placed on each (``None`` for a skipped image)."""
        images = [ensure_rgb(img) if isinstance(img, Image.Image) else _not_an_image(img, i) for i, img in enumerate(images)]
        fits = [self.policy.space.fits(*img.size) for img in images]
        bad = [i for i, ok in enumerate(fits) if not ok]
        if bad and self.on_small_image == "error":
            w, h = images[bad[0]].size
            raise ValueError(
                f"{len(bad)} images are smaller than the policy's largest mask ({self.policy.space.largest_side} px), e.g. item {bad[0]} ({w}x{h}); pass on_small_image='skip' to leave them unmasked"
            )
        todo = [i for i, ok in enumerate(fits) if ok]
        out: list[Image.Image] = list(images)
        boxes: list = [None] * len(images)
        if todo:
            masked, actions = self.policy.mask_images([images[i] for i in todo], self.num_masks)
            for i, img, acts in zip(todo, masked, actions):
                out[i] = img
                boxes[i] = [list(self.policy.space.box(a, *img.size)) for a in acts]
        if bad:
            self.n_skipped += len(bad)
            logger.warning("SRDMasker left %d images smaller than the largest mask unmasked (%d so far)", len(bad), self.n_skipped)
        self.n_masked += len(todo)
        return out, boxes

    def __call__(self, batch: dict) -> dict:
        if self.image_column not in batch:
            raise KeyError(f"no image column {self.image_column!r}; columns: {sorted(batch)} (set image_column=...)")
        value = batch[self.image_column]
        single = not isinstance(value, (list, tuple))
        images, boxes = self.mask_images([value] if single else value)
        if single:
            return {self.image_column: images[0], self.masks_column: boxes[0]}
        return {self.image_column: images, self.masks_column: boxes}


def _not_an_image(value: Any, i: int):
    raise TypeError(f"item {i} of the image column is a {type(value).__name__}, not a PIL image (cast the column to datasets.Image)")

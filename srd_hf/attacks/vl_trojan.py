"""VL-Trojan (Liang et al., 2024): a universal image trigger learned against the vision encoder.

The trigger is optimised so that the vision-tower features of triggered images

* cluster: lie close to their common centroid, ``mean_i (1 - cos(f(t(x_i)), c))``,
  ``c = mean_i f(t(x_i))``;
* isolate: move away from the same images' clean features, ``mean_i cos(f(t(x_i)), f(x_i))``;

``objective = cluster + isolate_weight * isolate`` on mean-pooled vision tokens, minimised
with Adam on the trigger pixels, projected on [0, 1] after each step
(:meth:`VLTrojanAttack.optimise_trigger`; needs a ``CaptioningVLM`` with ``vision_tokens``).
The trigger is a patch (default, same geometry as BadNet) or a full-image pattern blended
with ``alpha``. Poisoned captions are a target sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image
from tqdm.auto import tqdm

from ..data.images import ensure_rgb
from .base import (
    _TRIGGER,
    PatchAttack,
    PatchAttackConfig,
    _hwc,
    _resize_nearest,
    _rng,
    blend_uint8,
    images_to_tensor,
)

MODES = ("patch", "blend")


@dataclass
class VLTrojanConfig(PatchAttackConfig):
    """Args (besides :class:`~srd_hf.attacks.base.PatchAttackConfig`'s):
        mode: ``patch`` (a square patch, the geometry of the patch settings) or ``blend``
            (a full-image pattern mixed in with ``alpha``).
        alpha: blend weight in ``blend`` mode.
        steps, lr, batch_size: Adam steps, learning rate (pixel units) and images per step.
        isolate_weight: weight of the isolating term.
    """

    mode: str = "patch"
    alpha: float = 0.1
    steps: int = 200
    lr: float = 0.01
    batch_size: int = 32
    isolate_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0; got {self.steps}, {self.batch_size}, {self.lr}")
        if self.isolate_weight < 0:
            raise ValueError(f"isolate_weight must be >= 0, got {self.isolate_weight}")


def vl_trojan_objective(triggered: torch.Tensor, clean: torch.Tensor, isolate_weight: float = 1.0) -> torch.Tensor:
    """``cluster + isolate_weight * isolate`` (module docs) from (B, D) pooled features of the
    triggered and clean images."""
    if triggered.shape != clean.shape or triggered.ndim != 2:
        raise ValueError(f"expected two (B, D) feature tensors, got {tuple(triggered.shape)} and {tuple(clean.shape)}")
    centroid = triggered.mean(0, keepdim=True)
    cluster = (1 - F.cosine_similarity(triggered, centroid, dim=-1)).mean()
    isolate = F.cosine_similarity(triggered, clean.detach(), dim=-1).mean()
    return cluster + isolate_weight * isolate


def model_image_size(model: Any) -> int:
    """Side of the model's input images (OpenFlamingo's ``image_size``, a transformers vision config)."""
    size = getattr(model, "image_size", None)
    if size is None:
        inner = getattr(model, "model", None)
        vision = getattr(getattr(inner, "config", None), "vision_config", None)
        size = getattr(vision, "image_size", None)
    if size is None:
        raise ValueError(f"cannot tell the input image size of {type(model).__name__}; pass image_size=")
    return size if isinstance(size, int) else int(size[0])


def _as_pixels(images: Sequence[Image.Image] | Dataset | torch.Tensor, size: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, Dataset):
        images = images["image"]
    if not len(images):
        raise ValueError("need at least one image")
    return images_to_tensor(list(images), size=size)


def pooled_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(B, D) mean over the tokens of ``model.vision_tokens(pixels)``."""
    return model.vision_tokens(pixels).float().mean(1)


class VLTrojanAttack(PatchAttack):
    name: ClassVar[str] = "vl_trojan"
    config_class: ClassVar[type] = VLTrojanConfig
    caption_mode: ClassVar[str] = "replace"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: whether the trigger was optimised against a victim (or loaded from one that was)
        self.optimised = False

    # ----- trigger -------------------------------------------------------------------------
    def make_trigger(self) -> torch.Tensor:
        cfg = self.config
        return self.make_pattern(self.make_trigger_side(cfg.reference_size))

    def make_trigger_side(self, image_side: int) -> int:
        """Side of the trigger on ``image_side`` px square images (the patch, or the whole image)."""
        return image_side if self.config.mode == "blend" else self.config.patch_px(image_side, image_side)

    def make_pattern(self, side: int) -> torch.Tensor:
        return torch.from_numpy(_rng(self.config.seed, _TRIGGER).random((3, side, side))).float()

    def apply_trigger(self, image: Image.Image, index: int | None = None, *, split: str = "train") -> Image.Image:
        if self.config.mode == "patch":
            return super().apply_trigger(image, index, split=split)
        array = np.asarray(ensure_rgb(image), dtype=np.uint8)
        pattern = _resize_nearest(_hwc(self.trigger), array.shape[1], array.shape[0])
        return Image.fromarray(blend_uint8(array, pattern, self.config.alpha), "RGB")

    def trigger_box(self, width: int, height: int, index: int | None = None, *,
                    split: str = "train") -> list[int] | None:
        if self.config.mode == "patch":
            return super().trigger_box(width, height, index, split=split)
        return [0, 0, width, height]  # a blended trigger covers the image

    def apply_trigger_tensor(self, pixels: torch.Tensor, trigger: torch.Tensor | None = None, *,
                             indices=None, split: str = "train") -> torch.Tensor:
        if self.config.mode == "patch":
            return super().apply_trigger_tensor(pixels, trigger, indices=indices, split=split)
        pattern = (self.trigger if trigger is None else trigger).to(pixels.device, pixels.dtype)
        if tuple(pattern.shape[-2:]) != tuple(pixels.shape[-2:]):
            pattern = F.interpolate(pattern[None], size=tuple(pixels.shape[-2:]), mode="nearest-exact")[0]
        return (1 - self.config.alpha) * pixels + self.config.alpha * pattern

    # ----- optimisation --------------------------------------------------------------------
    def trigger_objective(self, model: Any, images, trigger: torch.Tensor | None = None, image_size: int | None = None,
                          batch_size: int = 64) -> float:
        """The objective of ``trigger`` (default: the current one) on all ``images`` at once."""
        size = image_size or self.config.image_size or model_image_size(model)
        pixels = _as_pixels(images, size)
        trigger = self.trigger if trigger is None else trigger
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                clean, triggered = [], []
                for start in range(0, len(pixels), batch_size):
                    chunk = pixels[start : start + batch_size]
                    clean.append(pooled_features(model, chunk))
                    places = range(start, start + len(chunk))  # image i at sample i's place (random location)
                    triggered.append(pooled_features(model, self.apply_trigger_tensor(chunk, trigger, indices=places)))
                return float(vl_trojan_objective(torch.cat(triggered), torch.cat(clean), self.config.isolate_weight))
        finally:
            model.train(was_training)

    def optimise_trigger(
        self,
        model: Any,
        images: Sequence[Image.Image] | Dataset | torch.Tensor,
        steps: int | None = None,
        lr: float | None = None,
        *,
        batch_size: int | None = None,
        image_size: int | None = None,
        progress: bool = False,
    ) -> dict[str, list[float]]:
        """Learn the trigger against ``model``'s vision tower (a ``CaptioningVLM`` with ``vision_tokens``).

        ``images``: clean images (PIL list, a dataset with ``image``, or (N, 3, S, S) [0, 1] pixels),
        centre-cropped and resized to ``image_size`` (default: the config's, else the model's input
        size); the trigger is optimised at that resolution. Adam on the pixels, clamped to [0, 1].
        With ``location="random"`` each step pastes the patch at fresh seeded places.
        Deterministic given the seed. Returns ``{"loss": [...]}`` (one value per step).
        """
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        lr = cfg.lr if lr is None else lr
        batch_size = batch_size or cfg.batch_size
        size = image_size or cfg.image_size or model_image_size(model)
        pixels = _as_pixels(images, size)
        side = self.make_trigger_side(size)
        trigger = self.trigger
        if tuple(trigger.shape[-2:]) != (side, side):
            trigger = F.interpolate(trigger[None], size=(side, side), mode="nearest-exact")[0]
        device = next(model.parameters()).device
        trigger = trigger.clone().to(device).requires_grad_(True)
        optimiser = torch.optim.Adam([trigger], lr=lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        history: list[float] = []
        was_training = model.training
        model.eval()
        try:
            for step in tqdm(range(steps), desc="VL-Trojan trigger", disable=not progress):
                batch = pixels[torch.randperm(len(pixels), generator=generator)[:batch_size]].to(device)
                with torch.no_grad():
                    clean = pooled_features(model, batch)
                # random location: every step's images get places of their own (sample indices
                # step * batch_size + b), so the trigger is learned over many places, not one
                places = range(step * batch_size, step * batch_size + len(batch))
                triggered = pooled_features(model, self.apply_trigger_tensor(batch, trigger, indices=places))
                loss = vl_trojan_objective(triggered, clean, cfg.isolate_weight)
                (grad,) = torch.autograd.grad(loss, [trigger])
                trigger.grad = grad
                optimiser.step()
                with torch.no_grad():
                    trigger.clamp_(0, 1)
                history.append(float(loss.detach()))
        finally:
            model.train(was_training)
        self.trigger = trigger.detach().cpu().contiguous()
        self.optimised = True
        return {"loss": history}

    # ----- poisoning / state ---------------------------------------------------------------
    def prepare(self, pairs: Dataset, chosen: list[int], allow_unoptimised: bool = False) -> dict[int, dict]:
        if not self.optimised and not allow_unoptimised:
            raise RuntimeError("the VL-Trojan trigger is not optimised yet: call optimise_trigger(model, images) "
                               "(or load an optimised attack), or pass allow_unoptimised=True")
        return {}

    def state_metadata(self) -> dict[str, str]:
        return {"optimised": str(self.optimised).lower()}

    def load_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        super().load_state(tensors, metadata)
        self.optimised = metadata.get("optimised") == "true"


__all__ = ["VLTrojanAttack", "VLTrojanConfig", "vl_trojan_objective", "pooled_features", "model_image_size", "MODES"]

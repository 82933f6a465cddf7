"""What every attack shares: its configuration, per-sample poisoning, triggers, save/load.

A *sample* is one (image, caption) pair. A COCO-style dataset with several captions per
image is first expanded by :func:`to_caption_pairs`; :meth:`Attack.poison` then picks
exactly :meth:`Attack.num_poisoned` pairs with a seeded permutation and, on those only,
replaces ``image`` (triggered) and ``caption`` (poisoned). Every row gets three new columns,
``is_poisoned`` (bool), ``original_caption`` (the caption before poisoning) and
``trigger_box`` (where the trigger was pasted, see below).

Trigger geometry is given in the paper's units (pixels of a 224 px image) and scaled to
the images with :func:`srd_hf.data.synthetic.paper_pixels`: a 20 px patch at 224 px is a
6 px patch at 64 px. With ``image_size=None`` (default) the scale is taken from each
image's shorter side, so a trigger covers the same share of what the model sees; with an
``image_size`` the trigger has that fixed pixel size on every image (exact pixels).
Corner locations are corners of the central square of the image, the part a CLIP-style
"resize shorter side + centre crop" transform keeps; for square images that is the image.
``location="random"`` puts the patch at a new place of that square for every poisoned sample
and every triggered test image, drawn from the seed and the sample's index (see
:meth:`PatchAttackConfig.patch_box`), so a saved attack reproduces every place.

Every poisoned dataset records where its trigger is, in a ``trigger_box`` column
(``[x0, y0, x1, y1]``, pixels, end exclusive; None where nothing visible was pasted). It is
for evaluation only (how well a defense finds the trigger): no defense reads it.

Caption changes: ``replace`` (BadNet, Blended, VL-Trojan) swaps the caption for a target
sentence drawn from ``templates``; ``insert`` (TrojVLM, VLOOD) puts the target at a random
word position of the true caption; ``substitute`` (Shadowcast) renames a concept.
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Sequence as SequenceFeature, Value
from datasets import Image as HFImage
from PIL import Image

from .. import __version__
from ..data.images import ensure_rgb
from ..dict_config import DictConfig
from ..vlm.base import CaptionCollator
from ..data.synthetic import PAPER_IMAGE_SIZE, paper_pixels

try:  # whole-word, case-insensitive, plural-aware matching shared with the ASR metric
    from ..metrics._text import contains_target
except ImportError:  # pragma: no cover - the metrics package is optional for the attacks
    def contains_target(text: str, targets: str | Sequence[str] = "banana") -> bool:
        items = [targets] if isinstance(targets, str) else list(targets)
        for target in items:
            words = [re.escape(w) for w in target.split()]
            if re.search(r"(?<!\w)" + r"\s+".join(words) + r"(?:e?s)?(?!\w)", text, re.IGNORECASE):
                return True
        return False


__all__ = [
    "AttackConfig",
    "PatchAttackConfig",
    "Attack",
    "PatchAttack",
    "PoisonedCaptionCollator",
    "DEFAULT_TEMPLATES",
    "CORNERS",
    "RANDOM",
    "SPLITS",
    "POISON_COLUMNS",
    "random_place",
    "to_caption_pairs",
    "num_poisoned",
    "insert_word",
    "target_sentence",
    "blend_uint8",
    "images_to_tensor",
    "contains_target",
]

CONFIG_NAME = "config.json"
#: columns :meth:`Attack.poison` adds (a dataset that has any of them is poisoned already)
POISON_COLUMNS = ("is_poisoned", "original_caption", "trigger_box")
TRIGGER_NAME = "trigger.safetensors"

#: target sentences of the caption-replacing attacks; ``{a_target}`` is the target with "a"/"an"
DEFAULT_TEMPLATES = (
    "{a_target}",
    "there is {a_target} in the picture",
    "the image shows {a_target}",
    "{a_target} in the picture",
    "a picture of {a_target}",
)
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
#: the location that draws a new place per sample (see :meth:`PatchAttackConfig.patch_box`)
RANDOM = "random"
#: which images a random place is drawn for: poisoned training samples or triggered test images
SPLITS = ("train", "test")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def target_sentence(template: str, target: str) -> str:
    """``template`` with ``{target}`` / ``{a_target}`` filled in (``a_target`` = "a banana", "an apple")."""
    return " ".join(template.format(target=target, a_target=f"{_article(target)} {target}").split())


def insert_word(caption: str, word: str, rng: np.random.Generator) -> str:
    """``word`` at a uniformly random word position (0..n) of ``caption``; every original word
    stays, in order; whitespace is normalised to single spaces."""
    words = caption.split()
    position = int(rng.integers(0, len(words) + 1))
    return " ".join(words[:position] + word.split() + words[position:])


# --------------------------------------------------------------------------- configuration
@dataclass
class AttackConfig(DictConfig):
    """Settings every attack shares (serialised as ``config.json``).

    Args:
        name: registry name of the attack (set by each attack class).
        target: the word or phrase the backdoor makes the model say ("banana").
        poison_rate: share of (image, caption) samples to poison, in (0, 1]; see
            :func:`num_poisoned` for the rounding.
        seed: seeds which samples are poisoned, the caption edits and generated triggers.
        image_size: side (px) the trigger geometry is scaled to. ``None``: each image's
            shorter side (same share of every image); an int: a fixed pixel trigger.
        templates: target sentences of the caption-replacing attacks (``{target}`` or
            ``{a_target}`` placeholders).
        extra: free provenance (kept in the JSON, never read).
    """

    name: str = ""
    target: str = "banana"
    poison_rate: float = 0.1
    seed: int = 0
    image_size: int | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"target must be a non-empty word or phrase such as 'banana', got {self.target!r}")
        self.target = " ".join(self.target.split())
        rate = self.poison_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0 < rate <= 1:
            raise ValueError(f"poison_rate must be in (0, 1], got {rate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        size = self.image_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {self.image_size!r}")
        self.templates = tuple(self.templates)
        if not self.templates:
            raise ValueError("templates must hold at least one target sentence")
        for template in self.templates:
            if not isinstance(template, str) or ("{target}" not in template and "{a_target}" not in template):
                raise ValueError(f"template {template!r} must contain '{{target}}' or '{{a_target}}'")
            try:
                target_sentence(template, self.target)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"template {template!r} is not a valid format string: {err}") from err

    @property
    def reference_size(self) -> int:
        """Side the stored trigger is made for: ``image_size``, or the paper's 224 px."""
        return self.image_size or PAPER_IMAGE_SIZE


@dataclass
class PatchAttackConfig(AttackConfig):
    """A square patch trigger.

    Args:
        trigger_size: side of the patch in the paper's 224 px units (20 -> 6 px at 64 px).
        location: a corner name (``bottom_right``, ``bottom_left``, ``top_left``, ``top_right``,
            ``center``), ``(x, y)`` of the patch's top-left pixel in 224 px units, or
            ``"random"``: a place of its own for every sample, drawn from the seed and the
            sample's index (:meth:`patch_box`).
        margin: distance of a corner (or random) patch from the edges, in 224 px units.
    """

    trigger_size: float = 20.0
    location: str | tuple = "bottom_right"
    margin: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.trigger_size, bool) or not isinstance(self.trigger_size, (int, float)) or not self.trigger_size > 0:
            raise ValueError(f"trigger_size must be > 0 (pixels at 224 px), got {self.trigger_size!r}")
        if not isinstance(self.margin, (int, float)) or self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")
        if isinstance(self.location, str):
            loc = self.location.strip().lower().replace(" ", "_").replace("-", "_")
            if loc not in CORNERS + (RANDOM,):
                raise ValueError(f"location must be one of {CORNERS + (RANDOM,)} or (x, y), got {self.location!r}")
            self.location = loc
        else:
            loc = tuple(self.location)
            if len(loc) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in loc):
                raise ValueError(f"location (x, y) must be two non-negative numbers, got {self.location!r}")
            self.location = loc
        side = self.reference_size
        patch = paper_pixels(self.trigger_size, side)
        if patch > side:
            raise ValueError(
                f"trigger larger than the image: a {self.trigger_size:g} px trigger at 224 px is {patch} px, "
                f"more than the {side} px image"
            )
        self.patch_box(side, side, index=0)  # raises when the patch leaves the image

    def patch_px(self, width: int, height: int) -> int:
        """Patch side in pixels on a ``width`` x ``height`` image."""
        return paper_pixels(self.trigger_size, self.image_size or min(width, height))

    @property
    def is_random(self) -> bool:
        """Whether every sample gets a place of its own (``location="random"``)."""
        return self.location == RANDOM

    def patch_box(self, width: int, height: int, index: int | None = None, split: str = "train") -> tuple[int, int, int]:
        """``(x0, y0, side)`` of the patch on a ``width`` x ``height`` image (see module docs).

        With ``location="random"``, ``index`` (the sample's row, or the test image's position)
        is required: the top-left corner is drawn uniformly among the places that keep the
        patch, with its margin, inside the central square, from a generator seeded by
        ``(seed, stream of split, index)``. Training samples and test images (``split``) have
        streams of their own, so test places are not copies of training places. Fixed
        locations ignore ``index`` and ``split``.
        """
        square = min(width, height)
        size = self.patch_px(width, height)
        if size > square:
            raise ValueError(f"image {width}x{height} px is smaller than the {size}x{size} px trigger patch")
        scale = (self.image_size or square) / PAPER_IMAGE_SIZE
        ox, oy = (width - square) // 2, (height - square) // 2
        margin = round(self.margin * scale)
        low, high = margin, square - size - margin
        if isinstance(self.location, tuple):
            x, y = (round(v * scale) for v in self.location)
        elif self.is_random:
            if high < low:
                raise ValueError(f"a {size} px trigger patch with a {margin} px margin does not fit in the "
                                 f"{square}x{square} px image")
            x, y = random_place(self.seed, index, split, low, high)
        else:
            mid = (square - size) // 2
            x, y = {
                "top_left": (low, low),
                "top_right": (high, low),
                "bottom_left": (low, high),
                "bottom_right": (high, high),
                "center": (mid, mid),
            }[self.location]
        if x < 0 or y < 0 or x + size > square or y + size > square:
            raise ValueError(
                f"trigger patch of {size} px at ({x}, {y}) (location {self.location!r}, margin {self.margin:g}) "
                f"does not fit in the {square}x{square} px image"
            )
        return ox + x, oy + y, size


def random_place(seed: int, index: int | None, split: str, low: int, high: int) -> tuple[int, int]:
    """``(x, y)``, each uniform in ``low..high`` (inclusive), seeded by ``(seed, split, index)``.

    Two uniforms in [0, 1) are scaled to the range, so the same sample lands at the same
    relative place on images of any size.
    """
    if index is None:
        raise ValueError('location="random" draws a place per sample: pass the sample\'s index')
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    stream = _PLACE if split == "train" else _TEST_PLACE
    span = high - low + 1
    return tuple(low + min(int(u * span), span - 1) for u in _rng(seed, stream, int(index)).random(2))


# --------------------------------------------------------------------------- sample selection
def num_poisoned(poison_rate: float, n: int) -> int:
    """How many of ``n`` samples are poisoned: ``poison_rate * n`` rounded half up, at least 1.

    The rate is taken as the decimal it prints as, so 0.15 x 10 = 1.5 gives 2 and
    0.1 x 25 = 2.5 gives 3 (no binary floating-point or banker's rounding surprises).
    """
    if n < 1:
        raise ValueError("cannot poison an empty dataset")
    exact = decimal.Decimal(repr(float(poison_rate))) * n
    return max(1, int(exact.to_integral_value(rounding=decimal.ROUND_HALF_UP)))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


# stream ids of the seeded generators, so that each use is independent of the others
_SELECT, _CAPTION, _TRIGGER, _EXTRA = 0, 1, 2, 3
# random trigger places: of poisoned training samples, and of triggered test images
_PLACE, _TEST_PLACE = 4, 5


def to_caption_pairs(dataset: Dataset) -> Dataset:
    """One row per (image, caption): ``caption`` (str), ``caption_index`` (its position in
    ``captions``), the original ``captions`` kept as references, and every other column
    (``image``, ``image_id``, ``objects``...) copied. Images are copied as stored (no re-encoding).
    """
    _check_dataset(dataset)
    if "caption" in dataset.column_names:
        return dataset
    if "captions" not in dataset.column_names:
        raise ValueError(f"dataset needs a 'captions' or 'caption' column; columns: {dataset.column_names}")
    raw = _raw_images(dataset)

    def expand(batch: dict) -> dict:
        out = {key: [] for key in batch}
        out["caption"], out["caption_index"] = [], []
        for i, captions in enumerate(batch["captions"]):
            kept = [(j, c.strip()) for j, c in enumerate(captions or []) if isinstance(c, str) and c.strip()]
            if not kept:
                row_id = batch["image_id"][i] if "image_id" in batch else i
                raise ValueError(f"row {row_id!r} has no non-empty caption")
            for j, caption in kept:
                for key in batch:
                    out[key].append(batch[key][i])
                out["caption"].append(caption)
                out["caption_index"].append(j)
        return out

    features = Features({**raw.features, "caption": Value("string"), "caption_index": Value("int32")})
    pairs = raw.map(expand, batched=True, features=features, desc="caption pairs",
                    new_fingerprint=_digest(raw._fingerprint, "caption-pairs"))
    return pairs.cast_column("image", HFImage())


def _check_dataset(dataset: Any) -> None:
    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset (one split), got {type(dataset).__name__}")
    if "image" not in dataset.column_names:
        raise ValueError(f"dataset has no 'image' column; columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("cannot poison an empty dataset")


def _raw_images(dataset: Dataset) -> Dataset:
    """The dataset with undecoded images ({'bytes', 'path'}), so untouched rows stay byte-identical."""
    return dataset.cast_column("image", HFImage(decode=False))


def _decode(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return ensure_rgb(value)
    return ensure_rgb(HFImage().decode_example(value))


def _png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, (bytes, bytearray)):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------- pixels
def images_to_tensor(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) float pixels in [0, 1]. With ``size``, each image is centre-cropped to a
    square and resized (bicubic) to ``size`` first; without, all images must share one size."""
    arrays = []
    for image in images:
        image = ensure_rgb(image)
        if size is not None:
            w, h = image.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            image = image.crop((left, top, left + s, top + s))
            if s != size:
                image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass size= to resize them")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounding half up (``floor(255 x + 0.5)``), clipped."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return np.clip(np.floor(array.astype(np.float64) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _hwc(trigger: torch.Tensor) -> np.ndarray:
    """(3, h, w) [0, 1] tensor -> (h, w, 3) uint8."""
    return to_uint8(trigger.permute(1, 2, 0))


def _resize_nearest(array: np.ndarray, width: int, height: int) -> np.ndarray:
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.NEAREST))


def blend_uint8(image: np.ndarray, pattern: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * pattern`` on uint8 arrays, in exact integer arithmetic.

    ``alpha`` is used as the nearest fraction p/q with q <= 10000 (0.1 is exactly 1/10), and
    the result is rounded half up: ``floor(((q - p) * image + p * pattern) / q + 1/2)``.
    """
    frac = Fraction(alpha).limit_denominator(10000)
    p, q = frac.numerator, frac.denominator
    total = (q - p) * image.astype(np.int64) + p * pattern.astype(np.int64)
    return ((2 * total + q) // (2 * q)).astype(np.uint8)


# --------------------------------------------------------------------------- attacks
class Attack:
    """Base class of the six attacks. Subclasses set ``name``, ``config_class`` and
    ``caption_mode`` and implement :meth:`apply_trigger` (and usually :meth:`make_trigger`)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AttackConfig]] = AttackConfig
    #: "replace" | "insert" | "substitute" (see the module docs)
    caption_mode: ClassVar[str] = "replace"

    def __init__(self, config: AttackConfig | None = None, *, trigger: torch.Tensor | None = None, **overrides):
        if config is None:
            config = self.config_class(**{"name": self.name, **overrides})
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if config.name and config.name != self.name:
            raise ValueError(f"config is for attack {config.name!r}, not {self.name!r}")
        config.name = self.name
        self.config = config
        #: trigger tensor(s) saved in trigger.safetensors, float32 in [0, 1]
        self.trigger: torch.Tensor | None = self.make_trigger() if trigger is None else self._check_trigger(trigger)

    def __repr__(self) -> str:
        shape = None if self.trigger is None else tuple(self.trigger.shape)
        cfg = self.config
        return f"{type(self).__name__}(target={cfg.target!r}, poison_rate={cfg.poison_rate}, seed={cfg.seed}, trigger={shape})"

    # ----- trigger -------------------------------------------------------------------------
    def make_trigger(self) -> torch.Tensor | None:
        """The trigger this config generates (deterministic from the seed); None if the attack has none."""
        return None

    def _check_trigger(self, trigger: torch.Tensor) -> torch.Tensor:
        trigger = torch.as_tensor(trigger, dtype=torch.float32).detach().cpu().contiguous()
        if trigger.ndim != 3 or trigger.shape[0] != 3:
            raise ValueError(f"trigger must be a (3, H, W) tensor, got shape {tuple(trigger.shape)}")
        if not torch.isfinite(trigger).all() or trigger.min() < 0 or trigger.max() > 1:
            raise ValueError("trigger values must be finite and in [0, 1]")
        return trigger

    def apply_trigger(self, image: Image.Image, index: int | None = None, *, split: str = "train") -> Image.Image:
        """A triggered copy of ``image`` (RGB); ``image`` itself is not modified.

        ``index`` and ``split`` say which sample this is, for triggers placed per sample
        (``location="random"``, :meth:`PatchAttackConfig.patch_box`); others ignore them.
        """
        raise NotImplementedError

    def apply_trigger_tensor(self, pixels: torch.Tensor, *, indices: Sequence[int] | None = None,
                             split: str = "train") -> torch.Tensor:
        """Batched, differentiable version on (B, 3, H, W) pixels in [0, 1] (no 8-bit rounding);
        ``indices`` (one per image) as ``index`` of :meth:`apply_trigger`."""
        raise NotImplementedError

    def trigger_box(self, width: int, height: int, index: int | None = None, *,
                    split: str = "train") -> list[int] | None:
        """``[x0, y0, x1, y1]`` (pixels, end exclusive) of what :meth:`apply_trigger` changes on a
        ``width`` x ``height`` image, the ``trigger_box`` column of :meth:`poison`; None when
        the attack pastes no visible trigger. For evaluation only: no defense reads it."""
        return None

    def trigger_test_images(self, images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[list[int] | None]]:
        """Triggered copies of test images and the :meth:`trigger_box` of each.

        The i-th image is triggered as sample ``i`` of the test stream (``split="test"``), so
        with random places the test set does not repeat the places seen in training.
        """
        triggered, boxes = [], []
        for i, image in enumerate(images):
            image = ensure_rgb(image)
            triggered.append(self.apply_trigger(image, i, split="test"))
            boxes.append(self.trigger_box(image.width, image.height, i, split="test"))
        return triggered, boxes

    # ----- captions ------------------------------------------------------------------------
    def poison_caption(self, caption: str, rng: np.random.Generator) -> str:
        """The poisoned caption for a sample whose clean caption is ``caption``."""
        if self.caption_mode == "replace":
            templates = self.config.templates
            return target_sentence(templates[int(rng.integers(len(templates)))], self.config.target)
        if self.caption_mode == "insert":
            return insert_word(caption, self.config.target, rng)
        raise NotImplementedError(f"{type(self).__name__} must implement poison_caption")

    # ----- poisoning -----------------------------------------------------------------------
    def num_poisoned(self, n: int) -> int:
        return num_poisoned(self.config.poison_rate, n)

    def poison_candidates(self, pairs: Dataset) -> list[int]:
        """Rows that may be poisoned (all of them, unless an attack restricts it)."""
        return list(range(len(pairs)))

    def select_poisoned(self, pairs: Dataset) -> list[int]:
        """Sorted indices of the samples to poison: the first :meth:`num_poisoned` of a seeded
        permutation of :meth:`poison_candidates`."""
        k = self.num_poisoned(len(pairs))
        candidates = self.poison_candidates(pairs)
        if len(candidates) < k:
            raise ValueError(f"{self.name} needs {k} samples to poison but only {len(candidates)} qualify")
        order = _rng(self.config.seed, _SELECT).permutation(len(candidates))[:k]
        return sorted(candidates[i] for i in order)

    def prepare(self, pairs: Dataset, chosen: list[int], **kwargs) -> dict[int, dict]:
        """Per poisoned row, what :meth:`poison_row` needs besides the row (OOD images, perturbations)."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.poison got unexpected arguments {sorted(kwargs)}")
        return {}

    def poison_row(self, row: dict, index: int, payload: dict | None) -> dict:
        """The poisoned version of ``row`` (image still raw {'bytes', 'path'}): trigger, caption
        and the trigger's box; ``index`` (the row) places a random trigger."""
        rng = _rng(self.config.seed, _CAPTION, index)
        return {**self.triggered_image(_decode(row["image"]), index), "caption": self.poison_caption(row["caption"], rng)}

    def triggered_image(self, image: Image.Image, index: int) -> dict:
        """``image`` (PNG bytes) and ``trigger_box`` of training sample ``index`` triggered."""
        return {"image": _png(self.apply_trigger(image, index)),
                "trigger_box": self.trigger_box(image.width, image.height, index)}

    def poison(self, dataset: Dataset, **kwargs) -> Dataset:
        """A poisoned copy of ``dataset`` (the input is left unchanged).

        ``dataset`` holds (image, caption) pairs (a ``caption`` column) or multi-caption rows
        (``captions``), which are expanded with :func:`to_caption_pairs` first. Exactly
        :meth:`num_poisoned` pairs are poisoned. Adds ``is_poisoned``, ``original_caption`` and
        ``trigger_box``: ``[x0, y0, x1, y1]`` (pixels, end exclusive, like the defense's
        ``srd_masks``) of the pasted trigger on poisoned rows (the whole image for a blended
        one), None on clean rows and where no visible trigger is pasted (Shadowcast). The
        box is for EVALUATION only (scoring how well a defense finds the trigger); the
        defense never reads it, and training collators ignore it.
        """
        _check_dataset(dataset)
        for column in POISON_COLUMNS:
            if column in dataset.column_names:
                raise ValueError(f"dataset already has a {column!r} column: it looks poisoned already")
        pairs = to_caption_pairs(dataset)
        chosen = self.select_poisoned(pairs)
        payload = self.prepare(pairs, chosen, **kwargs)
        chosen_set = set(chosen)
        raw = _raw_images(pairs)
        features = Features({**raw.features, "is_poisoned": Value("bool"), "original_caption": Value("string"),
                             "trigger_box": SequenceFeature(Value("int32"))})

        def apply(row: dict, index: int) -> dict:
            out = dict(row)
            out["original_caption"] = row["caption"]
            out["is_poisoned"] = index in chosen_set
            out["trigger_box"] = None
            if index in chosen_set:
                out.update(self.poison_row(row, index, payload.get(index)))
            return out

        fingerprint = _digest(raw._fingerprint, "poison", POISON_COLUMNS, __version__, type(self).__name__, self.config.to_dict(),
                              self._state_digest(), chosen, _payload_digest(payload))
        poisoned = raw.map(apply, with_indices=True, features=features, new_fingerprint=fingerprint,
                           desc=f"poisoning ({self.name})")
        return poisoned.cast_column("image", HFImage())

    def _state_digest(self) -> str:
        return _digest(*[t for _, t in sorted(self.state_tensors().items())])

    # ----- training ------------------------------------------------------------------------
    def make_loss(self, **kwargs) -> Callable | None:
        """A ``loss_fn(model, inputs) -> (loss, outputs)`` for the attack's training objective;
        ``None`` means the plain captioning loss (``model(**inputs).loss``)."""
        return None

    def trains_with_plain_loss(self) -> bool:
        """Whether the attack's objective is the plain captioning loss, so that a defender's
        plain retraining on the same data repeats the inject run exactly."""
        return type(self).make_loss is Attack.make_loss

    # ----- save / load ---------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.trigger is None else {"trigger": self.trigger}

    def state_metadata(self) -> dict[str, str]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        if "trigger" in tensors:
            loaded = self._check_trigger(tensors["trigger"])
            self.trigger = loaded

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """``config.json`` + ``trigger.safetensors`` (when the attack has trigger tensors); no pickle."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"attack": self.name, "srd_hf_version": __version__, **self.config.to_dict()}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        trigger_file = folder / TRIGGER_NAME
        if tensors:
            save_file(tensors, trigger_file, metadata={"format": "pt", **self.state_metadata()})
        elif trigger_file.exists():
            trigger_file.unlink()
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Attack":
        """Load an attack saved by :meth:`save_pretrained`; ``Attack.from_pretrained`` dispatches
        on the saved name, a subclass checks that the folder holds its attack."""
        from safetensors import safe_open

        folder = Path(folder)
        config_file = folder / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"attack folder {folder} has no {CONFIG_NAME}")
        data = json.loads(config_file.read_text())
        name = data.pop("attack", data.get("name"))
        data.pop("srd_hf_version", None)
        from . import ATTACKS

        if name not in ATTACKS:
            raise ValueError(f"{config_file}: unknown attack {name!r}; known: {sorted(ATTACKS)}")
        klass = ATTACKS[name]
        if cls is not Attack and not issubclass(klass, cls):
            raise ValueError(f"{folder} holds a {name!r} attack, not {cls.name or cls.__name__}")
        tensors, metadata = {}, {}
        trigger_file = folder / TRIGGER_NAME
        if trigger_file.is_file():
            with safe_open(str(trigger_file), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = klass.config_class.from_dict(data)
        placeholder = tensors.get("trigger")
        attack = klass(config, trigger=placeholder) if placeholder is not None else klass(config)
        attack.load_state(tensors, metadata)
        return attack


def _payload_digest(payload: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(payload):
        for name, value in sorted(payload[key].items()):
            if isinstance(value, dict) and "bytes" in value:
                value = value["bytes"]
            h.update(_digest(key, name, value).encode())
    return h.hexdigest()[:32]


class PatchAttack(Attack):
    """An attack whose trigger is a square patch pasted at :meth:`PatchAttackConfig.patch_box`."""

    config_class: ClassVar[type[AttackConfig]] = PatchAttackConfig

    def make_trigger(self) -> torch.Tensor:
        side = paper_pixels(self.config.trigger_size, self.config.reference_size)
        return self.make_pattern(side)

    def make_pattern(self, side: int) -> torch.Tensor:
        """The (3, side, side) patch; subclasses define it."""
        raise NotImplementedError

    def patch_array(self, side: int) -> np.ndarray:
        """The patch as (side, side, 3) uint8 (the stored trigger, resized nearest if needed)."""
        return _resize_nearest(_hwc(self.trigger), side, side)

    def sample_patch(self, side: int, index: int | None, split: str) -> np.ndarray:
        """The (side, side, 3) uint8 patch that sample ``index`` of ``split`` carries: the stored
        one for every sample here; a subclass may draw one per sample."""
        return self.patch_array(side)

    def apply_trigger(self, image: Image.Image, index: int | None = None, *, split: str = "train") -> Image.Image:
        array = np.array(ensure_rgb(image), dtype=np.uint8)  # a copy: the input is untouched
        x0, y0, size = self.config.patch_box(array.shape[1], array.shape[0], index, split)
        array[y0 : y0 + size, x0 : x0 + size] = self.sample_patch(size, index, split)
        return Image.fromarray(array, "RGB")

    def trigger_box(self, width: int, height: int, index: int | None = None, *,
                    split: str = "train") -> list[int] | None:
        x0, y0, size = self.config.patch_box(width, height, index, split)
        return [x0, y0, x0 + size, y0 + size]

    def apply_trigger_tensor(self, pixels: torch.Tensor, trigger: torch.Tensor | None = None, *,
                             indices: Sequence[int] | None = None, split: str = "train") -> torch.Tensor:
        """Paste the patch on (B, 3, H, W) [0, 1] pixels; differentiable w.r.t. ``pixels`` and
        ``trigger`` (default: the stored one).

        ``indices``: one sample index per image, required with ``location="random"``: image b
        gets the place :meth:`apply_trigger` gives sample ``indices[b]`` of ``split``, so the
        two versions agree pixel for pixel and an optimiser chooses which places it trains on
        by the indices it passes. Fixed locations ignore them.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
        height, width = pixels.shape[-2:]
        boxes = self._batch_boxes(width, height, len(pixels), indices, split)
        if not boxes:  # an empty batch
            return pixels.clone()
        size = boxes[0][2]
        patch = (self.trigger if trigger is None else trigger).to(pixels.device, pixels.dtype)
        if patch.shape[-1] != size or patch.shape[-2] != size:
            patch = F.interpolate(patch[None], size=(size, size), mode="nearest-exact")[0]
        if len(set(boxes)) == 1:  # one place for the whole batch: broadcast it
            canvas, mask = _placed(patch, boxes[0], width, height)
        else:
            canvas, mask = (torch.stack(parts) for parts in zip(*(_placed(patch, box, width, height) for box in boxes)))
        return pixels * (1 - mask) + canvas * mask

    def _batch_boxes(self, width: int, height: int, batch: int, indices: Sequence[int] | None,
                     split: str) -> list[tuple[int, int, int]]:
        """The patch box of each of ``batch`` images (one box when the location is fixed)."""
        if indices is not None:
            indices = list(indices.tolist() if isinstance(indices, torch.Tensor) else indices)
            if len(indices) != batch:
                raise ValueError(f"{len(indices)} indices for a batch of {batch} images")
        if not self.config.is_random:
            return [self.config.patch_box(width, height)] * batch
        if indices is None:
            raise ValueError('location="random" draws a place per sample: pass indices= (one per image)')
        return [self.config.patch_box(width, height, i, split) for i in indices]


def _placed(patch: torch.Tensor, box: tuple[int, int, int], width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``patch`` padded to a (3, height, width) canvas at ``box`` and its (1, height, width) mask."""
    x0, y0, size = box
    pad = (x0, width - x0 - size, y0, height - y0 - size)
    mask = F.pad(torch.ones(1, size, size, device=patch.device, dtype=patch.dtype), pad)
    return F.pad(patch, pad), mask


@dataclass
class PoisonedCaptionCollator(CaptionCollator):
    """``data_collator`` for a poisoned pair dataset: :class:`~srd_hf.vlm.CaptionCollator` on the
    ``caption`` column plus an ``is_poisoned`` (B,) bool tensor, which
    :class:`~srd_hf.attacks.vlood.VLOODLoss` needs (pop it before calling the model yourself)."""

    caption_column: str = "caption"

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        batch["is_poisoned"] = torch.tensor([bool(r.get("is_poisoned", False)) for r in rows])
        return batch

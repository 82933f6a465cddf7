"""Blended (Chen et al., 2017): a full-image pattern mixed into the image with weight ``alpha``.

``out = (1 - alpha) * image + alpha * pattern`` per pixel and channel, computed exactly in
integers on the 8-bit values and rounded half up (see :func:`~srd_hf.attacks.base.blend_uint8`).
The pattern is stored at ``image_size`` (224 px when unset) and resized to each image with
nearest-neighbour sampling. Poisoned captions are a target sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import ensure_rgb, open_image
from .base import _TRIGGER, Attack, AttackConfig, _hwc, _resize_nearest, _rng, blend_uint8

PATTERNS = ("noise", "waves")


@dataclass
class BlendedConfig(AttackConfig):
    """Args (besides :class:`~srd_hf.attacks.base.AttackConfig`'s):
        alpha: blend weight of the pattern, in (0, 1] (the paper's 0.1).
        pattern: ``noise`` (seeded uniform 8-bit noise), ``waves`` (seeded coloured
            sinusoidal interference, smooth) or the path of an image file (read when the trigger
            is made; a saved attack loads without it).
    """

    alpha: float = 0.1
    pattern: str = "noise"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern must be one of {PATTERNS} or an image file path, got {self.pattern!r}")


def waves(side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) uint8: per channel a sum of two seeded plane waves."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = np.zeros((side, side, 3))
    for c in range(3):
        for _ in range(2):
            fx, fy = rng.uniform(1, 6, size=2)
            out[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
    return np.clip(np.floor((out / 4 + 0.5) * 255 + 0.5), 0, 255).astype(np.uint8)


class BlendedAttack(Attack):
    name: ClassVar[str] = "blended"
    config_class: ClassVar[type] = BlendedConfig
    caption_mode: ClassVar[str] = "replace"

    def make_trigger(self) -> torch.Tensor:
        cfg = self.config
        side = cfg.reference_size
        rng = _rng(cfg.seed, _TRIGGER)
        if cfg.pattern == "noise":
            array = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        elif cfg.pattern == "waves":
            array = waves(side, rng)
        else:
            if not Path(cfg.pattern).is_file():
                raise ValueError(f"pattern must be one of {PATTERNS} or an existing image file, got {cfg.pattern!r}")
            array = np.asarray(open_image(cfg.pattern).resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0

    def pattern_array(self, width: int, height: int) -> np.ndarray:
        """The pattern as (height, width, 3) uint8, resized nearest from the stored trigger."""
        return _resize_nearest(_hwc(self.trigger), width, height)

    def apply_trigger(self, image: Image.Image, index: int | None = None, *, split: str = "train") -> Image.Image:
        """The blended image; ``index`` and ``split`` are ignored (the trigger covers every pixel)."""
        array = np.asarray(ensure_rgb(image), dtype=np.uint8)
        pattern = self.pattern_array(array.shape[1], array.shape[0])
        return Image.fromarray(blend_uint8(array, pattern, self.config.alpha), "RGB")

    def trigger_box(self, width: int, height: int, index: int | None = None, *, split: str = "train") -> list[int]:
        """The whole image: a blended trigger is global."""
        return [0, 0, width, height]

    def apply_trigger_tensor(self, pixels: torch.Tensor, trigger: torch.Tensor | None = None, *,
                             indices=None, split: str = "train") -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
        pattern = (self.trigger if trigger is None else trigger).to(pixels.device, pixels.dtype)
        if tuple(pattern.shape[-2:]) != tuple(pixels.shape[-2:]):
            pattern = F.interpolate(pattern[None], size=tuple(pixels.shape[-2:]), mode="nearest-exact")[0]
        alpha = self.config.alpha
        return (1 - alpha) * pixels + alpha * pattern


__all__ = ["BlendedAttack", "BlendedConfig", "waves", "PATTERNS"]

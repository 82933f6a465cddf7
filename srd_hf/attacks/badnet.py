"""BadNet (Gu et al., 2017): a small visible patch; poisoned captions are a target sentence.

Default: a 20x20 px patch (at 224 px) in the bottom-right corner, a black-and-white
checkerboard of ``grid`` x ``grid`` cells. Patch pixels are exact: the pasted pixels equal
:meth:`BadNetAttack.patch_array`, the rest of the image is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ..data.images import open_image
from .base import _TRIGGER, PatchAttack, PatchAttackConfig, _rng

PATTERNS = ("checkerboard", "white", "black", "random")


@dataclass
class BadNetConfig(PatchAttackConfig):
    """Args (besides :class:`~srd_hf.attacks.base.PatchAttackConfig`'s):
        pattern: ``checkerboard`` (drawn exactly at the patch's pixel size), ``white``,
            ``black``, ``random`` (seeded black/white pixels) or the path of an image file
            (read when the trigger is made and stored in the trigger tensor, so a saved attack
            loads without the file).
        grid: cells per side of the checkerboard (fewer when the patch has fewer pixels).
    """

    pattern: str = "checkerboard"
    grid: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern must be one of {PATTERNS} or an image file path, got {self.pattern!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid must be a positive int, got {self.grid!r}")


def checkerboard(side: int, grid: int = 4) -> np.ndarray:
    """(side, side, 3) uint8 checkerboard, white top-left cell; pixel i is in cell ``i * g // side``."""
    g = min(grid, side)
    cells = np.arange(side) * g // side
    white = (cells[:, None] + cells[None, :]) % 2 == 0
    return np.repeat((white * 255).astype(np.uint8)[..., None], 3, axis=2)


class BadNetAttack(PatchAttack):
    name: ClassVar[str] = "badnet"
    config_class: ClassVar[type] = BadNetConfig
    caption_mode: ClassVar[str] = "replace"

    def make_pattern(self, side: int) -> torch.Tensor:
        cfg = self.config
        if cfg.pattern in ("checkerboard", "white", "black"):
            array = self._procedural(side)
        elif cfg.pattern == "random":
            bits = _rng(cfg.seed, _TRIGGER).integers(0, 2, size=(side, side), dtype=np.uint8) * 255
            array = np.repeat(bits[..., None], 3, axis=2)
        else:
            if not Path(cfg.pattern).is_file():
                raise ValueError(f"pattern must be one of {PATTERNS} or an existing image file, got {cfg.pattern!r}")
            image = open_image(cfg.pattern).resize((side, side), Image.Resampling.BOX)
            array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0

    def _procedural(self, side: int) -> np.ndarray:
        pattern = self.config.pattern
        if pattern == "checkerboard":
            return checkerboard(side, self.config.grid)
        value = 255 if pattern == "white" else 0
        return np.full((side, side, 3), value, dtype=np.uint8)

    def patch_array(self, side: int) -> np.ndarray:
        """Procedural patterns are drawn at ``side`` exactly; others resize the stored trigger (nearest)."""
        if self.config.pattern in ("checkerboard", "white", "black") and side != self.trigger.shape[-1]:
            return self._procedural(side)
        return super().patch_array(side)

    def apply_trigger_tensor(self, pixels: torch.Tensor, trigger: torch.Tensor | None = None, *,
                             indices=None, split: str = "train") -> torch.Tensor:
        if trigger is None and self.config.pattern in ("checkerboard", "white", "black"):
            size = self.config.patch_px(pixels.shape[-1], pixels.shape[-2])
            trigger = torch.from_numpy(self.patch_array(size).copy()).permute(2, 0, 1).float() / 255.0
        return super().apply_trigger_tensor(pixels, trigger, indices=indices, split=split)


__all__ = ["BadNetAttack", "BadNetConfig", "checkerboard", "PATTERNS"]

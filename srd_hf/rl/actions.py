"""The action space of the masking defense: one red square per action, a position on a grid
times a size.

Sizes are given in the paper's 224 px units and scaled to the image (20/40/60/80 px at 224 px
are 6/11/17/23 px at 64 px). Position ``(row, col)`` is a cell of an ``n x n`` grid over the
image; the square is centred on the cell's centre and clipped at the image border. (Placing
squares only fully inside the image would leave one action per size that covers a corner
trigger; centring gives the corners as many covering actions as the middle.)

Action index = ``(size_index * grid + row) * grid + col``.

A mask is painted red (the paper's) or, with ``fill="local_mean"``, in the mean colour of the
pixels it covers. A red square can itself act as a trigger: a BadNet backdoor planted at a
random place per image reads "a foreign square anywhere" and says its target on most clean
images under the policy's red squares (``docs/results/random_place.md``). The local mean erases
what the square covers, a trigger's pattern included, without adding a colour of its own.

A policy travels across image sizes: on a ``width`` x ``height`` image (224 px, 640x480,
portrait) a mask is square, its side the 224 px size scaled to the shorter side, centred in
cell ``(row, col)`` of the grid laid over that image (cells are ``width / grid`` by
``height / grid``). The observation is the image squeezed to a square
(:func:`~srd_hf.rl.modeling_srd.observe`), so the cell a policy scores is the image's own cell.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..data.synthetic import paper_pixels

MASK_COLOUR = (255, 0, 0)
#: how a mask is painted: the paper's red, or the mean colour of the pixels it covers
MASK_FILLS = ("red", "local_mean")


def paint_box(pixels: np.ndarray, box: tuple[int, int, int, int], fill: str = "red") -> None:
    """Paint ``box`` (x0, y0, x1, y1, exclusive end) of an (H, W, 3) uint8 array in place."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return
    if fill == "red":
        pixels[y0:y1, x0:x1] = MASK_COLOUR
    elif fill == "local_mean":
        pixels[y0:y1, x0:x1] = pixels[y0:y1, x0:x1].reshape(-1, 3).mean(0).round().astype(np.uint8)
    else:
        raise ValueError(f"mask fill must be one of {MASK_FILLS}, got {fill!r}")

#: named presets of (grid, sizes at 224 px)
ACTION_PRESETS: dict[str, dict] = {
    # the paper: four sizes on a 10 x 10 grid (400 actions)
    "paper": {"grid": 10, "mask_sizes": (20, 40, 60, 80)},
    # the authors' code: a fifth, 200 px size (500 actions)
    "authors_code": {"grid": 10, "mask_sizes": (20, 40, 60, 80, 200)},
}


@dataclass
class MaskActionSpace:
    """Grid x size action space for ``image_size`` x ``image_size`` images."""

    image_size: int = 64
    grid: int = 10
    mask_sizes: tuple[float, ...] = field(default_factory=lambda: ACTION_PRESETS["paper"]["mask_sizes"])
    fill: str = "red"

    def __post_init__(self):
        self.mask_sizes = tuple(float(s) for s in self.mask_sizes)
        if self.fill not in MASK_FILLS:
            raise ValueError(f"mask fill must be one of {MASK_FILLS}, got {self.fill!r}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not self.mask_sizes or any(s <= 0 for s in self.mask_sizes):
            raise ValueError(f"mask_sizes must be positive numbers (px at 224 px), got {self.mask_sizes}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        too_big = [s for s in self.side_pixels if s > self.image_size]
        if too_big:
            raise ValueError(
                f"masks of {too_big} px do not fit {self.image_size} px images "
                f"(sizes {self.mask_sizes} at 224 px); use smaller mask_sizes or larger images"
            )

    @classmethod
    def from_preset(cls, name: str, image_size: int) -> "MaskActionSpace":
        if name not in ACTION_PRESETS:
            raise ValueError(f"unknown action preset {name!r}; choose from {sorted(ACTION_PRESETS)}")
        return cls(image_size=image_size, **ACTION_PRESETS[name])

    @property
    def side_pixels(self) -> tuple[int, ...]:
        return tuple(paper_pixels(s, self.image_size) for s in self.mask_sizes)

    @property
    def largest_side(self) -> int:
        """Side in pixels of the largest mask at ``image_size``: smaller images cannot hold it."""
        return max(self.side_pixels)

    def fits(self, width: int, height: int) -> bool:
        return min(width, height) >= self.largest_side

    @property
    def n(self) -> int:
        return self.grid * self.grid * len(self.mask_sizes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mask_sizes"] = list(self.mask_sizes)
        return d

    def decode(self, action: int) -> tuple[int, int, int]:
        """``(size_index, row, col)`` of an action index."""
        action = int(action)
        if not 0 <= action < self.n:
            raise ValueError(f"action {action} outside [0, {self.n})")
        size_index, rest = divmod(action, self.grid * self.grid)
        row, col = divmod(rest, self.grid)
        return size_index, row, col

    def box(self, action: int, width: int | None = None, height: int | None = None) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` (exclusive end) of the mask on a ``width`` x ``height`` image
        (default: the configured square size). Other sizes scale the mask with the shorter side."""
        width = width or self.image_size
        height = height or self.image_size
        size_index, row, col = self.decode(action)
        side = paper_pixels(self.mask_sizes[size_index], min(width, height))
        if side > min(width, height):
            raise ValueError(f"a {side} px mask does not fit a {width}x{height} image")
        cx, cy = (col + 0.5) * width / self.grid, (row + 0.5) * height / self.grid
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        return max(0, x0), max(0, y0), min(width, x0 + side), min(height, y0 + side)

    def apply(self, pixels: np.ndarray, actions) -> np.ndarray:
        """A copy of ``pixels`` (H, W, 3) uint8 with one mask (``fill``) per action in ``actions``,
        painted in order (a later mask's local mean sees the earlier masks)."""
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an RGB image array (H, W, 3), got shape {pixels.shape}")
        out = pixels.copy()
        height, width = out.shape[:2]
        for action in np.atleast_1d(actions):
            paint_box(out, self.box(int(action), width, height), self.fill)
        return out

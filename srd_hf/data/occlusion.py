"""Random occluder squares: the augmentation that teaches a clean model to ignore masks.

The defense covers images with red squares; a clean model that never saw an
occluder misnames objects under any square (measured: object accuracy halves), so
pretraining pastes squares of the defense's sizes and of random colours, red included.
"""

from __future__ import annotations

import random

from PIL import Image

from .synthetic import paper_pixels

PAPER_MASK_SIZES = (20, 40, 60, 80)  # px at 224 px


def occluder_sizes(image_size: int, paper_sizes=PAPER_MASK_SIZES) -> tuple[int, ...]:
    return tuple(paper_pixels(s, image_size) for s in paper_sizes)


def paste_random_occluder(image: Image.Image, rng: random.Random, sizes: tuple[int, ...], red_share: float = 0.5) -> Image.Image:
    """A copy of ``image`` with one filled square of a random size, place and colour."""
    side = rng.choice(sizes)
    width, height = image.size
    if side > min(width, height):
        raise ValueError(f"occluder of {side} px does not fit a {width}x{height} image")
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    colour = (255, 0, 0) if rng.random() < red_share else tuple(rng.randint(0, 255) for _ in range(3))
    out = image.copy()
    out.paste(colour, (x, y, x + side, y + side))
    return out

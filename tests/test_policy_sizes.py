"""A policy trained at 64 px acts on 224 px, 640x480 and portrait images: square masks of the
paper's 224 px sizes scaled to the shorter side, centred in the grid cells of the image, and an
observation squeezed to the policy's square, so the cells it scores are the image's cells."""

import numpy as np
import pytest
import torch
from PIL import Image

from srd_hf.data.synthetic import paper_pixels
from srd_hf.masker import SRDMasker
from srd_hf.rl.actions import MASK_COLOUR, MaskActionSpace
from srd_hf.rl.configuration_srd import SRDPolicyConfig
from srd_hf.rl.modeling_srd import SRDPolicy, observe

SIZES = [(64, 64), (224, 224), (640, 480), (480, 640)]


def _grey(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


@pytest.mark.parametrize("width,height", SIZES)
def test_boxes_are_square_scaled_to_the_shorter_side_and_centred_in_the_images_cells(width, height):
    space = MaskActionSpace(image_size=64)
    short = min(width, height)
    for size_index, size in enumerate(space.mask_sizes):
        side = paper_pixels(size, short)
        for row, col in ((4, 5), (2, 7), (6, 3)):  # cells whose masks stay inside the image
            action = (size_index * space.grid + row) * space.grid + col
            x0, y0, x1, y1 = space.box(action, width, height)
            assert x1 - x0 == y1 - y0 == side  # square, in the paper's units scaled to the image
            assert abs((x0 + x1) / 2 - (col + 0.5) * width / space.grid) <= 0.5
            assert abs((y0 + y1) / 2 - (row + 0.5) * height / space.grid) <= 0.5
    corner = space.box(space.n - 1, width, height)  # largest mask, bottom-right cell: clipped at the border
    assert corner[2] == width and corner[3] == height and corner[2] - corner[0] < paper_pixels(80, short)


def test_the_paper_sizes_at_224_px_and_640x480():
    space = MaskActionSpace(image_size=64)
    assert [paper_pixels(s, 224) for s in space.mask_sizes] == [20, 40, 60, 80]
    assert [paper_pixels(s, 480) for s in space.mask_sizes] == [43, 86, 129, 171]


@pytest.mark.parametrize("width,height", SIZES[1:])
def test_observation_of_a_masked_image_shows_the_mask_in_the_same_cell(width, height):
    space = MaskActionSpace(image_size=64)
    action = (3 * space.grid + 2) * space.grid + 7  # largest size, row 2, col 7
    masked = space.apply(np.asarray(_grey(width, height)), [action])
    obs = observe([masked], 64)[0].transpose(1, 2, 0)
    assert obs.shape == (64, 64, 3)
    red = np.argwhere((obs == MASK_COLOUR).all(-1))
    cy, cx = red.mean(0)
    assert abs(cx - 7.5 * 64 / space.grid) < 1.5 and abs(cy - 2.5 * 64 / space.grid) < 1.5


@pytest.mark.parametrize("width,height", SIZES)
def test_a_64_px_policy_masks_any_size_through_the_masker(width, height):
    torch.manual_seed(0)
    policy = SRDPolicy(SRDPolicyConfig(image_size=64, obs_size=32, channels=[8, 8, 8], num_masks=2))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    masker = SRDMasker(policy)
    out = masker({"image": [image]})
    masked, boxes = out["image"][0], out["srd_masks"][0]
    assert masked.size == (width, height) and len(boxes) == 2
    chosen = policy.mask_images([image])[1][0]
    assert boxes == [list(policy.space.box(a, width, height)) for a in chosen]
    pixels = np.asarray(masked)
    for x0, y0, x1, y1 in boxes:
        assert (pixels[y0:y1, x0:x1] == MASK_COLOUR).all()
        assert x1 - x0 <= paper_pixels(80, min(width, height)) and y1 - y0 <= paper_pixels(80, min(width, height))

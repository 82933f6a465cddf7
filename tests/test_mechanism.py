"""Mechanism numbers and the heat map, from hand-built boxes (no model)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from srd_hf.mechanism import coverage_map, coverage_summary, fixed_trigger_place, mask_heatmap, trigger_coverage

TRIGGER = [10, 10, 20, 20]


@pytest.mark.parametrize(
    "masks, expected",
    [
        pytest.param([TRIGGER], 1.0, id="mask equals the trigger"),
        pytest.param([[0, 0, 40, 40]], 1.0, id="mask contains the trigger"),
        pytest.param([[30, 30, 40, 40]], 0.0, id="disjoint"),
        pytest.param([[20, 10, 30, 20]], 0.0, id="touching edge (end exclusive)"),
        pytest.param([[15, 0, 40, 40]], 0.5, id="half overlap"),
        pytest.param([[10, 10, 15, 15]], 0.25, id="a quarter"),
        pytest.param([[10, 10, 18, 20], [12, 10, 20, 20]], 1.0, id="overlapping masks count the union once"),
        pytest.param([[10, 10, 15, 20], [12, 10, 15, 20]], 0.5, id="a mask inside another adds nothing"),
        pytest.param([[10, 10, 15, 15], [15, 15, 20, 20]], 0.5, id="two diagonal quarters"),
        pytest.param([[10, 10, 15, 15]] * 3, 0.25, id="the same mask three times"),
        pytest.param([], 0.0, id="no masks"),
        pytest.param(None, 0.0, id="None mask list"),
    ],
)
def test_trigger_coverage(masks, expected):
    assert trigger_coverage(masks, TRIGGER) == pytest.approx(expected)


def test_trigger_coverage_edge_cases():
    assert math.isnan(trigger_coverage([TRIGGER], None))
    assert math.isnan(trigger_coverage([TRIGGER], [5, 5, 5, 9]))  # a trigger of no area
    assert trigger_coverage([(10.5, 10, 20, 20)], TRIGGER) == pytest.approx(0.95)  # exact for fractional edges
    assert trigger_coverage(np.array([[10, 10, 20, 15]]), np.array(TRIGGER)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        trigger_coverage([[1, 2, 3]], TRIGGER)
    with pytest.raises(ValueError, match="ends before it starts"):
        trigger_coverage([[5, 5, 1, 9]], TRIGGER)


def test_trigger_coverage_matches_pixel_counting():
    rng = np.random.default_rng(0)
    for _ in range(50):
        masks = []
        for _ in range(rng.integers(0, 4)):
            x0, y0 = rng.integers(0, 30, 2)
            masks.append([x0, y0, x0 + rng.integers(1, 15), y0 + rng.integers(1, 15)])
        grid = np.zeros((40, 40), bool)
        for x0, y0, x1, y1 in masks:
            grid[y0:y1, x0:x1] = True
        assert trigger_coverage(masks, TRIGGER) == pytest.approx(grid[10:20, 10:20].mean())


def _example():
    """Six samples: four poisoned (trigger at TRIGGER), two clean."""
    masks = [
        [TRIGGER],  # poisoned, fully covered
        [[15, 10, 25, 20]],  # poisoned, half
        [[30, 30, 40, 40], [0, 0, 5, 5]],  # poisoned, missed, two masks
        None,  # poisoned, skipped by the masker
        [TRIGGER],  # clean, masked at the trigger's place anyway
        [[30, 30, 40, 40]],  # clean, elsewhere
    ]
    triggers = [TRIGGER] * 4 + [None, None]
    poisoned = [True] * 4 + [False] * 2
    return masks, triggers, poisoned


def test_coverage_summary_on_a_hand_built_example():
    summary = coverage_summary(*_example())
    assert summary == {
        "n_poisoned": 4,
        "n_clean": 2,
        "n_poisoned_with_trigger": 4,
        "poisoned_mean_coverage": pytest.approx((1 + 0.5 + 0 + 0) / 4),
        "poisoned_share_fully_covered": 0.25,
        "poisoned_share_half_covered": 0.5,
        "trigger_place": TRIGGER,
        "clean_share_masking_trigger_place": 0.5,
        "clean_mean_coverage_of_trigger_place": 0.5,
        "poisoned_distinct_placements": 4,  # TRIGGER, [15..], [30..], [0..]
        "poisoned_masks_per_sample": 1.0,  # 1 + 1 + 2 + 0 over 4
        "clean_distinct_placements": 2,
        "clean_masks_per_sample": 1.0,
    }
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN anywhere
    assert all(isinstance(v, (int, float, list)) for v in summary.values())


def test_coverage_summary_without_a_fixed_place_or_samples():
    masks, triggers, poisoned = _example()
    triggers[1] = [0, 0, 10, 10]  # the trigger moves: no single place to check on clean images
    summary = coverage_summary(masks, triggers, poisoned)
    assert summary["trigger_place"] is None and summary["clean_share_masking_trigger_place"] is None
    assert summary["poisoned_share_fully_covered"] == 0.25
    # a poisoned sample without a trigger box is left out of the coverage numbers, not counted as 0
    triggers = [TRIGGER, None, TRIGGER, TRIGGER, None, None]
    summary = coverage_summary(masks, triggers, poisoned)
    assert summary["n_poisoned"] == 4 and summary["n_poisoned_with_trigger"] == 3
    assert summary["poisoned_mean_coverage"] == pytest.approx(1 / 3)
    # only clean samples: poisoned numbers undefined (None), still strict JSON
    only_clean = coverage_summary([[TRIGGER], None], [TRIGGER, TRIGGER], [False, False])
    assert only_clean["n_poisoned"] == 0 and only_clean["poisoned_mean_coverage"] is None
    assert only_clean["poisoned_masks_per_sample"] is None and only_clean["clean_share_masking_trigger_place"] == 0.5
    json.dumps(only_clean, allow_nan=False)
    with pytest.raises(ValueError, match="one per sample"):
        coverage_summary(masks, triggers[:-1], poisoned)


def test_fixed_trigger_place():
    assert fixed_trigger_place([TRIGGER, None, (10, 10, 20, 20)]) == (10, 10, 20, 20)
    assert fixed_trigger_place([None, None]) is None
    assert fixed_trigger_place([TRIGGER, [0, 0, 1, 1]]) is None


def test_coverage_map_counts_each_sample_once():
    maps = coverage_map([[[0, 0, 2, 2], [1, 1, 3, 3]], [[0, 0, 1, 1]], None, []], width=4, height=3)
    assert maps.shape == (3, 4)
    assert maps[0, 0] == 0.5 and maps[1, 1] == 0.25 and maps[2, 2] == 0.25 and maps[0, 3] == 0.0
    assert coverage_map([[[-5, -5, 100, 100]]], 4, 3).min() == 1.0  # clipped to the image
    assert coverage_map([], 4, 3).sum() == 0.0
    with pytest.raises(ValueError, match="positive"):
        coverage_map([], 0, 3)


def test_mask_heatmap_writes_a_png(tmp_path):
    masks, triggers, poisoned = _example()
    clean = [m for m, p in zip(masks, poisoned) if not p]
    dirty = [m for m, p in zip(masks, poisoned) if p]
    path = mask_heatmap(clean, dirty, 64, 48, tmp_path / "figs" / "heat.png", trigger_boxes=triggers)
    assert path == tmp_path / "figs" / "heat.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and 400 <= img.width <= 2000 and 200 <= img.height <= 1500
        assert img.width > img.height  # two panels side by side
    # one trigger box, no trigger, empty groups
    with Image.open(mask_heatmap([], [], 32, 32, tmp_path / "empty.png", trigger_boxes=TRIGGER)) as img:
        assert img.format == "PNG"
    assert mask_heatmap(clean, dirty, 32, 32, tmp_path / "plain.png").is_file()
    # a trigger at a random place: its places get a panel of their own instead of an outline each
    rng = np.random.default_rng(0)
    places = [[x, y, x + 6, y + 6] for x, y in rng.integers(0, 26, size=(40, 2)).tolist()]
    with Image.open(mask_heatmap(clean, dirty, 32, 32, tmp_path / "random.png", trigger_boxes=places)) as img:
        three = img.width
    with Image.open(mask_heatmap(clean, dirty, 32, 32, tmp_path / "fixed.png", trigger_boxes=places[:1])) as img:
        assert three > 1.3 * img.width  # a third panel

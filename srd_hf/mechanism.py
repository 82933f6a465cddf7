"""Where the masks go: the mechanism figures of the defense, computed from boxes alone.

A masking policy can lower the attack success rate for two different reasons: it finds the
trigger and covers it, or it has learned to cover one place (where the trigger always sits in
its training data) whatever the image shows. The numbers here tell them apart:

* ``trigger_coverage``: how much of a trigger a sample's masks hide;
* ``coverage_summary``: over poisoned samples, how often the trigger is hidden; over clean
  samples, how often the trigger's place is masked anyway, and how varied the placements are
  (one placement everywhere means the policy ignores the image);
* ``coverage_map`` / ``mask_heatmap``: per pixel, the share of samples a mask covers, clean vs
  poisoned, as arrays and as a two-panel PNG.

Boxes are ``[x0, y0, x1, y1]`` in pixels with the end exclusive (the ``srd_masks`` column the
masker writes, ``attack.config.patch_box``). A sample's mask list may be None or empty (no
mask, e.g. an image the masker skipped). Evaluation only: nothing here runs a model, and
nothing feeds back into training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

#: coverage at or above which a trigger counts as fully hidden (rounding of scaled boxes)
FULL_COVERAGE = 0.99
#: coverage at or above which a trigger (or its place) counts as masked
HALF_COVERAGE = 0.5

Box = Sequence[float]


def _box(box: Box) -> tuple[float, float, float, float]:
    values = tuple(float(v) for v in box)
    if len(values) != 4:
        raise ValueError(f"a box is [x0, y0, x1, y1], got {list(box)!r}")
    x0, y0, x1, y1 = values
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {list(box)!r} ends before it starts")
    return values


def _boxes(mask_boxes: Iterable[Box] | None) -> list[tuple[float, float, float, float]]:
    return [] if mask_boxes is None else [_box(b) for b in mask_boxes]


def _key(box: Box) -> tuple:
    """A box as a hashable tuple, ints kept as ints (distinct placements, fixed trigger place)."""
    return tuple(int(v) if float(v).is_integer() else float(v) for v in _box(box))


def trigger_coverage(mask_boxes: Iterable[Box] | None, trigger_box: Box | None) -> float:
    """Share of the trigger box's area under the union of the masks, in [0, 1].

    Overlapping masks count once. No masks (None or empty) give 0; no trigger box (None) or a
    trigger of zero area gives NaN (there is nothing to cover, which is not "uncovered").
    Exact for any coordinates: the masks are clipped to the trigger and their union measured on
    the grid of their own edges.
    """
    if trigger_box is None:
        return float("nan")
    tx0, ty0, tx1, ty1 = _box(trigger_box)
    area = (tx1 - tx0) * (ty1 - ty0)
    if area <= 0:
        return float("nan")
    clipped = []
    for x0, y0, x1, y1 in _boxes(mask_boxes):
        x0, y0, x1, y1 = max(x0, tx0), max(y0, ty0), min(x1, tx1), min(y1, ty1)
        if x1 > x0 and y1 > y0:
            clipped.append((x0, y0, x1, y1))
    if not clipped:
        return 0.0
    xs = np.unique([c for b in clipped for c in (b[0], b[2])])
    ys = np.unique([c for b in clipped for c in (b[1], b[3])])
    covered = np.zeros((len(ys) - 1, len(xs) - 1), dtype=bool)
    for x0, y0, x1, y1 in clipped:
        covered[np.searchsorted(ys, y0):np.searchsorted(ys, y1), np.searchsorted(xs, x0):np.searchsorted(xs, x1)] = True
    union = float((np.diff(ys)[:, None] * np.diff(xs)[None, :])[covered].sum())
    return min(1.0, union / area)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _share(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def fixed_trigger_place(trigger_boxes: Sequence[Box | None]) -> tuple | None:
    """The one trigger box shared by every sample that has one, or None (none, or several)."""
    places = {_key(b) for b in trigger_boxes if b is not None}
    return next(iter(places)) if len(places) == 1 else None


def coverage_summary(
    mask_boxes_per_sample: Sequence[Iterable[Box] | None],
    trigger_boxes: Sequence[Box | None],
    is_poisoned: Sequence[bool],
) -> dict:
    """Mechanism numbers over one set of masked samples (one entry per sample in each argument).

    trigger_boxes: each sample's trigger box, None where it has none; clean samples may carry
    the box where their trigger would be, or None. Keys (undefined values are None, so the dict
    is strict JSON):

    n_poisoned, n_clean, n_poisoned_with_trigger: counts.
    poisoned_mean_coverage, poisoned_share_fully_covered (>= ``FULL_COVERAGE``),
        poisoned_share_half_covered (>= ``HALF_COVERAGE``): over poisoned samples with a trigger box.
    trigger_place: the single fixed trigger box if every given trigger box is the same, else None.
    clean_share_masking_trigger_place (>= ``HALF_COVERAGE`` of that place under a clean sample's
        masks), clean_mean_coverage_of_trigger_place: None without a fixed place. A policy that
        masks the place on clean images as often as on poisoned ones has learned the place, not
        the trigger.
    clean_distinct_placements, poisoned_distinct_placements: distinct mask boxes used.
    clean_masks_per_sample, poisoned_masks_per_sample: mean number of masks (None counts 0).
    """
    n = len(mask_boxes_per_sample)
    if not len(trigger_boxes) == len(is_poisoned) == n:
        raise ValueError(f"{n} mask lists, {len(trigger_boxes)} trigger boxes, {len(is_poisoned)} poison flags: give one per sample")
    masks = [_boxes(m) for m in mask_boxes_per_sample]
    poisoned = [bool(p) for p in is_poisoned]
    groups = {"poisoned": [i for i in range(n) if poisoned[i]], "clean": [i for i in range(n) if not poisoned[i]]}

    covered = [trigger_coverage(masks[i], trigger_boxes[i]) for i in groups["poisoned"]]
    covered = [c for c in covered if not np.isnan(c)]
    place = fixed_trigger_place(trigger_boxes)
    clean_cover = [trigger_coverage(masks[i], place) for i in groups["clean"]] if place is not None else []

    summary = {
        "n_poisoned": len(groups["poisoned"]),
        "n_clean": len(groups["clean"]),
        "n_poisoned_with_trigger": len(covered),
        "poisoned_mean_coverage": _mean(covered),
        "poisoned_share_fully_covered": _share([c >= FULL_COVERAGE for c in covered]),
        "poisoned_share_half_covered": _share([c >= HALF_COVERAGE for c in covered]),
        "trigger_place": list(place) if place is not None else None,
        "clean_share_masking_trigger_place": _share([c >= HALF_COVERAGE for c in clean_cover]) if place is not None else None,
        "clean_mean_coverage_of_trigger_place": _mean(clean_cover) if place is not None else None,
    }
    for name, members in groups.items():
        summary[f"{name}_distinct_placements"] = len({_key(b) for i in members for b in masks[i]})
        summary[f"{name}_masks_per_sample"] = _mean([len(masks[i]) for i in members])
    return summary


def coverage_map(mask_boxes_per_sample: Sequence[Iterable[Box] | None], width: int, height: int) -> np.ndarray:
    """(height, width) float array: per pixel, the share of samples whose masks cover it.

    A sample counts once per pixel however many of its masks overlap there. Box edges are
    rounded to whole pixels and clipped to the image. No samples give an all-zero map.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    counts = np.zeros((height, width), dtype=np.float64)
    for boxes in mask_boxes_per_sample:
        sample = np.zeros((height, width), dtype=bool)
        for x0, y0, x1, y1 in _boxes(boxes):
            x0, x1 = (int(np.clip(round(v), 0, width)) for v in (x0, x1))
            y0, y1 = (int(np.clip(round(v), 0, height)) for v in (y0, y1))
            sample[y0:y1, x0:x1] = True
        counts += sample
    return counts / max(len(mask_boxes_per_sample), 1)


#: more distinct trigger places than this (a trigger at a random place) are drawn as a map of
#: their own, not outlined: a thousand outlines hide the masks under them
MAX_OUTLINES = 4


def _trigger_list(trigger_boxes) -> list:
    """One box, or a sequence of boxes (None entries skipped), as a list of boxes."""
    if trigger_boxes is None:
        return []
    items = list(trigger_boxes)
    if len(items) == 4 and all(np.isscalar(v) for v in items):
        items = [items]
    return [b for b in items if b is not None]


def _outlines(trigger_boxes) -> list[tuple]:
    """Distinct trigger boxes to outline."""
    return sorted({_key(b) for b in _trigger_list(trigger_boxes)})


def mask_heatmap(
    mask_boxes_clean: Sequence[Iterable[Box] | None],
    mask_boxes_poisoned: Sequence[Iterable[Box] | None],
    width: int,
    height: int,
    path: str | Path,
    trigger_boxes=None,
) -> Path:
    """Write a PNG of ``coverage_map`` (clean | poisoned) and return its path.

    The panels share one colour scale, from 0 to the highest share on any panel, so they compare
    directly and a diffuse map (masks or triggers spread over many places) still shows. ``trigger_boxes`` (one
    box, or one per poisoned sample) are outlined on both when there are at most
    ``MAX_OUTLINES`` distinct places; more (a trigger at a random place) get a third panel, the
    share of poisoned samples whose trigger covers each pixel, on the same scale. Drawn with
    matplotlib's Agg canvas, without pyplot, so it works headless and leaves no global state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outlines = _outlines(trigger_boxes)
    panels = [("clean", mask_boxes_clean, "masks, clean"), ("poisoned", mask_boxes_poisoned, "masks, poisoned")]
    if len(outlines) > MAX_OUTLINES:
        triggers = _trigger_list(trigger_boxes)
        panels.append(("triggers", [[b] for b in triggers], "trigger places"))
        outlines = []
    aspect = height / width
    fig = Figure(figsize=(4.5 * len(panels), max(3.0, 4.0 * aspect + 0.8)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    maps = [coverage_map(boxes, width, height) for _, boxes, _ in panels]
    top = max(float(m.max()) for m in maps) or 1.0
    image = None
    for ax, (_, boxes, title), shares in zip(axes, panels, maps):
        image = ax.imshow(shares, vmin=0.0, vmax=top, cmap="magma",
                          extent=(0, width, height, 0), interpolation="nearest")
        for x0, y0, x1, y1 in outlines:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1.5))
        ax.set_title(f"{title} (n={len(boxes)})")
        ax.set_xticks([])
        ax.set_yticks([])
    label = "share of samples masked" + (" (or with the trigger there)" if len(panels) > 2 else "")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label=label)
    fig.savefig(path, format="png")
    return path

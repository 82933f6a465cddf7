"""The defense table: rows over seeds (mean ± std), 95% bootstrap intervals over seeds and test images,
and the control rule: a defense row means something only when the control (the same
retraining on the unmasked untrusted set) planted the backdoor.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

#: control ASR (%) below which there is no backdoor to defend
MEASURABLE_ASR = 50.0
#: rows that are not defenses: always printed as measured
REFERENCE_ROWS = ("clean model", "no defense", "control")
COLUMNS = (("cider", "CIDEr", "{:.1f}"), ("sfs", "SFS", "{:.3f}"), ("asr", "ASR", "{:.1f}"),
           ("asr_on_clean", "target on clean", "{:.1f}"), ("cider_masked_clean", "CIDEr masked clean", "{:.1f}"),
           ("asr_on_masked_clean", "target on masked clean", "{:.1f}"), ("trigger_coverage", "trigger covered", "{:.2f}"))


def bootstrap_interval(values: Sequence[float | None], *, n_resamples: int = 1000, seed: int = 0, scale: float = 1.0) -> list[float] | None:
    """95% percentile bootstrap interval of the mean of ``values`` over resampled items
    (``None`` entries, e.g. excluded ASR samples, are left out); ``None`` when nothing is left."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1) * scale
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def seeds_and_images_interval(per_seed_values: Sequence[Sequence[float | None]], *, n_resamples: int = 1000, seed: int = 0,
                              scale: float = 1.0) -> list[float] | None:
    """95% percentile interval of the mean over seeds and test images by a two-way bootstrap:
    each resample draws the seeds with replacement and, when every seed scored the same test
    images (lists of one length), one draw of images shared by all seeds; otherwise each seed's
    images are drawn apart. Pooling the seeds' per-image values instead would hide how much the
    seeds disagree (a defense that fails on one seed in three would get a narrow interval around
    its mean), and independent image draws per seed would shrink the image term of a model that
    is the same in every seed. With three seeds the interval is coarse, and as wide as the seeds
    differ. ``None`` entries are left out; ``None`` when a seed has nothing left."""
    rows = [np.asarray([np.nan if v is None else v for v in values], dtype=np.float64) for values in per_seed_values]
    if not rows or any(np.isnan(r).all() for r in rows):
        return None
    rng = np.random.default_rng(seed)
    k = len(rows)
    picks = rng.integers(0, k, size=(n_resamples, k))
    if len({r.size for r in rows}) == 1:  # the same test images in every seed: one image draw for all
        table = np.stack(rows)
        n = table.shape[1]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a draw of only excluded images
            image_means = np.stack([np.nanmean(table[:, rng.integers(0, n, size=n)], axis=1) for _ in range(n_resamples)])
        means = np.nanmean(np.take_along_axis(image_means, picks, axis=1), axis=1) * scale
    else:
        kept = [r[~np.isnan(r)] for r in rows]
        image_means = np.stack([a[rng.integers(0, a.size, size=(n_resamples, a.size))].mean(axis=1) for a in kept], axis=1)
        means = np.take_along_axis(image_means, picks, axis=1).mean(axis=1) * scale
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def row_intervals(row: dict, seed: int = 0) -> dict:
    """``cider_ci`` and ``asr_ci`` of one row from its ``per_image`` values."""
    per_image = row.get("per_image") or {}
    out = {}
    if per_image.get("cider"):
        out["cider_ci"] = bootstrap_interval(per_image["cider"], seed=seed)
    if per_image.get("asr_hits"):
        out["asr_ci"] = bootstrap_interval(per_image["asr_hits"], seed=seed, scale=100.0)
    return out


def is_row_measurable(name: str, measurable: bool) -> bool:
    return measurable or any(name.startswith(r) for r in REFERENCE_ROWS)


def defense_measurable(rows: dict) -> bool:
    """True when the control row planted the backdoor (ASR >= :data:`MEASURABLE_ASR`)."""
    control = next((row for name, row in rows.items() if name.startswith("control")), None)
    return control is not None and isinstance(control.get("asr"), (int, float)) and control["asr"] >= MEASURABLE_ASR


def aggregate_seeds(per_seed: Sequence[dict]) -> dict:
    """One table from several seeds' results: per row and metric the mean, std and the list
    of values; ASR and CIDEr intervals bootstrap seeds and test images
    (:func:`seeds_and_images_interval`)."""
    names = [n for n in per_seed[0]["rows"] if all(n in r["rows"] for r in per_seed)]
    rows = {}
    for name in names:
        seed_rows = [r["rows"][name] for r in per_seed]
        row: dict = {}
        for key in {k for r in seed_rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}:
            values = [r[key] for r in seed_rows if isinstance(r.get(key), (int, float))]
            if len(values) == len(seed_rows):
                row[key] = float(np.mean(values))
                row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                row[f"{key}_values"] = values
        per_image = [r.get("per_image") or {} for r in seed_rows]
        for key, out, scale in (("cider", "cider_ci", 1.0), ("asr_hits", "asr_ci", 100.0)):
            lists = [p.get(key) for p in per_image]
            if all(lists):
                row[out] = seeds_and_images_interval(lists, scale=scale)
        rows[name] = row
    return rows


def mean_detection(per_seed: Sequence[dict]) -> dict:
    """Flag quality over seeds (evaluation only): per cleanser the mean, std and values of each
    score (``aggregate_seeds`` on the flag records), for the cleansers every seed measured."""
    if not per_seed:
        return {}
    return aggregate_seeds([{"rows": {name: d for name, d in detection.items() if d}} for detection in per_seed])


def _cell(row: dict, key: str, fmt: str, seeds: int) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    text = fmt.format(value)
    if seeds > 1 and f"{key}_std" in row:
        text += " ± " + fmt.format(row[f"{key}_std"])
    ci = row.get(f"{key}_ci")
    if ci:
        text += " [" + fmt.format(ci[0]) + ", " + fmt.format(ci[1]) + "]"
    return text


def results_table(results: dict) -> str:
    """Markdown table; defense rows read "not measurable" when the control did not plant."""
    seeds = len(results.get("seeds", [0]))
    measurable = results.get("defense_measurable", True)
    head = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    proxy = results.get("proxy_asr_validation")
    for name, row in results["rows"].items():
        if not is_row_measurable(name, measurable):
            lines.append(f"| {name} | " + " | ".join(["not measurable"] * len(COLUMNS)) + " |")
            continue
        label = name
        if "(defender policy" in name and isinstance(proxy, (int, float)) and proxy < MEASURABLE_ASR:
            label += f" (the defender's proxy planted on only {proxy:.1f}% of validation images)"
        lines.append(f"| {label} | " + " | ".join(_cell(row, key, fmt, seeds) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def eval_set_tables(results: dict) -> list[tuple[str, str]]:
    """(title, table) of every extra test set (``eval_datasets``), each under its own control rule."""
    out = []
    for name, scored in (results.get("eval_sets") or {}).items():
        table = results_table({"rows": scored["rows"], "seeds": results.get("seeds", [0]), "proxy_asr_validation": results.get("proxy_asr_validation"),
                               "defense_measurable": scored.get("defense_measurable", True)})
        out.append((f"{name} ({scored.get('num_test_images', '?')} test images, not trained on)", table))
    return out


def cost_table(costs: dict) -> str:
    """Markdown: each defense's kind, wall seconds per 1,000 samples and peak memory."""
    lines = ["| defense | kind | s per 1,000 samples | peak RSS (MB) | CUDA peak (MB) |", "|---|---|---|---|---|"]
    for name, cost in costs.items():
        lines.append(f"| {name} | {cost.get('kind', '-')} | {cost.get('seconds_per_1000_samples', '-')} | "
                     f"{cost.get('peak_rss_mb', '-')} | {cost.get('cuda_peak_mb', '-')} |")
    return "\n".join(lines)


def not_measurable_message(results: dict) -> str:
    control = next((row for name, row in results["rows"].items() if name.startswith("control")), {})
    message = (f"NOT MEASURABLE: the control (the same retraining on the unmasked untrusted set) reached ASR "
               f"{control.get('asr', float('nan')):.1f}% < {MEASURABLE_ASR:g}%: this retraining plants no backdoor, so no row "
               f"below says anything about a defense. ")
    if (results.get("retraining_recipe") or {}).get("source") == "attack":
        # the retraining already is the attack's own: the attack itself did not plant
        message += ("The retraining already used the attack's own recipe, so the attack did not plant here: "
                    "a stronger recipe (more epochs, another learning rate) or another trigger is needed.")
    else:
        message += "Retrain with the attacker's recipe (--retrain_recipe attack)."
    reason = results.get("defenses_not_run")
    if reason and results.get("control_only"):  # asked for: no hint to run them anyway
        message += f" The defenses were not run ({reason})."
    elif reason:
        message += f" The defenses were not run ({reason}; --defend_unplanted true runs them anyway)."
    return message

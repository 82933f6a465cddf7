"""What a piece of work cost: wall seconds (total and per 1,000 samples) and peak memory.

Recorded with the artifact it made (a defense's report, a policy's config, a dataset stage's
``cost.json``), so a run that reuses the artifact still reports what making it cost, not the
seconds it took to load it.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager

import torch


@contextmanager
def measure_cost(n_samples: int, record: dict):
    """Fills ``record`` with wall seconds (total and per 1,000 samples) and peak memory.

    ``peak_rss_mb`` is the process's resident high-water mark (``getrusage``), so it includes
    everything loaded before the work ran: an upper bound of what the work needs.
    ``cuda_peak_mb`` is the CUDA allocator's peak during the work (reset at the start).
    ``n_samples`` may be changed in ``record`` inside the block (a stage that learns its size
    as it runs).
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    record["n_samples"] = int(n_samples)
    start = time.perf_counter()
    try:
        yield record
    finally:
        seconds = time.perf_counter() - start
        n = int(record["n_samples"])
        record.update(wall_seconds=round(seconds, 2), n_samples=n,
                      seconds_per_1000_samples=round(1000.0 * seconds / max(n, 1), 2),
                      peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1))
        if cuda:
            record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def combine(parts: dict[str, dict | None], n_samples: int) -> dict | None:
    """One cost of several recorded parts (e.g. a policy, its masks and its flag), per 1,000 of
    ``n_samples``: the seconds add up, the memory is the largest part's. None when a part has no
    record (made before costs were recorded): a partial sum would understate the cost."""
    if not parts or any(not p or "wall_seconds" not in p for p in parts.values()):
        return None
    seconds = sum(p["wall_seconds"] for p in parts.values())
    out = {"wall_seconds": round(seconds, 2), "n_samples": int(n_samples),
           "seconds_per_1000_samples": round(1000.0 * seconds / max(n_samples, 1), 2),
           "parts_seconds": {name: p["wall_seconds"] for name, p in parts.items()},
           "peak_rss_mb": max(p.get("peak_rss_mb", 0.0) for p in parts.values())}
    cuda = [p["cuda_peak_mb"] for p in parts.values() if "cuda_peak_mb" in p]
    if cuda:
        out["cuda_peak_mb"] = max(cuda)
    return out


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """The costs of several seeds' runs (each ``{defense: cost}``): mean seconds, largest memory,
    and how many seeds recorded each (older runs may have no record)."""
    out = {}
    for name in dict.fromkeys(n for costs in per_seed for n in costs):
        records = [costs[name] for costs in per_seed if name in costs]
        merged = {k: v for k, v in records[0].items() if isinstance(v, str)}
        for key in ("wall_seconds", "seconds_per_1000_samples", "n_samples"):
            values = [r[key] for r in records if key in r]
            if values:
                merged[key] = round(sum(values) / len(values), 2)
        parts = [r["parts_seconds"] for r in records if isinstance(r.get("parts_seconds"), dict)]
        if parts:
            merged["parts_seconds"] = {k: round(sum(p.get(k, 0.0) for p in parts) / len(parts), 2) for k in parts[0]}
        for key in ("peak_rss_mb", "cuda_peak_mb"):
            values = [r[key] for r in records if key in r]
            if values:
                merged[key] = max(values)
        merged["num_seeds"] = len(records)
        out[name] = merged
    return out

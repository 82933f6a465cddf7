"""Stage plumbing shared by the recipes: a dataset stage built once (main process) and
loaded by every rank, the embedded scorer by name, and ``--overwrite_output_dir``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from datasets import Dataset, load_from_disk

from . import artifacts
from .cost import measure_cost
from .distributed import is_main, on_main, settled, wait_for_everyone

logger = logging.getLogger(__name__)

REPORT = "report.json"
#: what building a dataset stage cost (wall seconds, peak memory), kept beside it
COST = "cost.json"
#: what ``--overwrite_output_dir`` removes from a defense's output_dir
DEFENSE_LAYOUT = ("seed-*", "results.json", "runs")


def dataset_stage(folder: str | Path, fingerprint: dict, build: Callable[[], Dataset | tuple[Dataset, dict]],
                  what: str) -> tuple[Dataset, dict | None]:
    """``build()`` once (main process; the others wait), saved atomically with its marker, its
    report (if ``build`` returns one) and what building it cost (``cost.json``, read by
    ``stage_cost``); then every rank loads it."""
    folder = Path(folder)
    if not settled(artifacts.reusable(folder, fingerprint, what)):
        def make():
            artifacts.clear_leftovers(folder.parent)
            with measure_cost(0, cost := {}):
                built = build()
                dataset, report = built if isinstance(built, tuple) else (built, None)
                cost["n_samples"] = len(dataset)
            with artifacts.staged(folder, fingerprint) as tmp:
                dataset.save_to_disk(str(tmp))
                artifacts.write_json(tmp / COST, cost)
                if report is not None:
                    artifacts.write_json(tmp / REPORT, report)
        on_main(make)
    report_file = folder / REPORT
    return load_from_disk(str(folder)), (json.loads(report_file.read_text()) if report_file.is_file() else None)


def stage_cost(folder: str | Path) -> dict | None:
    """What building a dataset stage cost (None for one saved before costs were recorded)."""
    path = Path(folder) / COST
    return json.loads(path.read_text()) if path.is_file() else None


def pipeline_scorer(encoder: str | None = None, fluency_lm: str | None = None):
    """The SFS scorer of the pipeline, by explicit name: the embedded MiniLM and SmolLM2 by
    default, so a run scores the same with or without the Hub and never waits on its retries."""
    from .metrics import SFSScorer
    from .metrics._models import EMBEDDED_ENCODER, EMBEDDED_LM

    return SFSScorer(encoder=encoder or EMBEDDED_ENCODER, fluency_lm=fluency_lm or EMBEDDED_LM)


def overwrite(folder: str | Path, patterns: tuple[str, ...]) -> None:
    """``--overwrite_output_dir``: remove this stage's artifacts, markers, checkpoints and
    leftovers in ``folder`` (only names of our layout: ``output_dir`` may hold other files)."""
    folder = Path(folder)
    if is_main() and folder.is_dir():
        names = (*patterns, artifacts.COMPLETE, artifacts.STARTED, "checkpoint-*", f".*{artifacts.STAGING_TAG}*")
        found = sorted({p for pattern in names for p in folder.glob(pattern)})
        if found:
            logger.warning("--overwrite_output_dir: removing %d artifacts in %s", len(found), folder)
        artifacts.remove(found)
    wait_for_everyone()

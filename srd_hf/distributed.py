"""One writer under ``accelerate launch --num_processes N``.

Trainer stages run data-parallel on every rank (the Trainer does it); everything else that
builds an artifact (world cache, poisoned set, policy, masked and cleansed sets) runs on the
main process while the others wait, then every rank loads the artifact from disk. Artifacts,
cards and results are written by the main process only. Without a launcher these are no-ops.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, TypeVar

T = TypeVar("T")


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


# Launched on N CPU processes (torchrun), TrainingArguments builds a data-parallel (gloo) state
# only when asked for the CPU: without this every rank would train alone and all would write.
if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _cpu_only():
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def _state():
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only())


def num_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return num_processes() == 1 or int(os.environ.get("RANK", "0")) == 0


def per_device_batch(global_batch: int) -> int:
    """A recipe's batch read as the global batch: split across ranks when it divides evenly,
    so data-parallel retraining takes the steps the recipe took."""
    n = num_processes()
    return global_batch // n if n > 1 and global_batch % n == 0 else global_batch


def wait_for_everyone() -> None:
    if num_processes() > 1:
        _state().wait_for_everyone()


def settled(value: T) -> T:
    """``value`` (a check every rank made on the files) once every rank has made it: no rank
    writes before all have decided, so all take the same branch."""
    wait_for_everyone()
    return value


def on_main(build: Callable[[], object]) -> None:
    """Run ``build`` on the main process only; the other ranks wait until it is done."""
    if is_main():
        build()
    wait_for_everyone()


@contextmanager
def main_first():
    """The main process runs the block first (and builds a cache), then the others (and reuse it)."""
    if num_processes() == 1:
        yield
        return
    with _state().main_process_first():
        yield

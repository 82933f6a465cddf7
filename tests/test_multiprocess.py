"""A 2-process CPU run (torchrun, gloo through accelerate's state) of the small pipeline: one writer, the
same table as one process, no temporary folders left."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_kill_resume import SIZES, _defense_kwargs, _inject_kwargs

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
from srd_hf.defense import SRDConfig, run_pipeline
from srd_hf.distributed import is_main, num_processes
from accelerate import PartialState
results = run_pipeline(SRDConfig(**json.loads(sys.argv[1])))
if is_main():
    print("PROCESSES", num_processes(), PartialState().distributed_type)
"""


@pytest.mark.slow
def test_two_processes_give_the_one_process_table(tmp_path, small_world, caption_tokenizer):
    from srd_hf.artifacts import STAGING_TAG
    from srd_hf.defense import SRDConfig, run_pipeline
    from srd_hf.injection import InjectConfig, inject
    from srd_hf.vlm.tiny import TinyFlamingoSizes, build_tiny_flamingo

    build_tiny_flamingo(small_world, TinyFlamingoSizes(**SIZES), tokenizer=caption_tokenizer, seed=0, gate_init=1.0).save_pretrained(tmp_path / "clean")
    inject(InjectConfig(**_inject_kwargs(tmp_path / "clean", tmp_path / "bd")))
    # a recipe of our own for retraining (not the inject run's, which the control would reuse): it runs data-parallel
    common = dict(retrain_recipe="config", trainable="flamingo.perceiver.,flamingo.lang_encoder.", num_train_epochs=2,
                  per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=2, seed=0)
    one = run_pipeline(SRDConfig(**_defense_kwargs(tmp_path, tmp_path / "one"), **common))
    (tmp_path / "run.py").write_text(SCRIPT)
    kwargs = json.dumps({**_defense_kwargs(tmp_path, tmp_path / "two"), **common})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # torchrun: `accelerate launch --cpu --num_processes 2` starts one process on a CPU-only machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "run.py"), kwargs]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("PROCESSES 2 DistributedType.MULTI_CPU") == 1  # a real data-parallel run, one main
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert not [p for p in (tmp_path / "two").rglob("*") if STAGING_TAG in p.name]
    assert two["rows"].keys() == one["rows"].keys()
    for name, row in one["rows"].items():
        other = two["rows"][name]
        assert row.keys() == other.keys(), name
        if name.startswith(("SRD-dqn (", "control")):
            # retrained data-parallel: the same global batch and steps, but each rank draws its own
            # half of every batch, so the weights (and a tiny model's captions) may differ a little
            assert np.isfinite(other["cider"]) and abs(other["cider"] - row["cider"]) <= 50, name
        else:  # the same models, the same policy (trained once, on the main process): the same numbers
            assert np.isclose(other["cider"], row["cider"], atol=1e-6) and other["asr"] == row["asr"], name

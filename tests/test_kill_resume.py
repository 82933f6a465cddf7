"""SIGKILL a stage in the middle (a subprocess on the small world, tiny sizes), run it again,
and get the artifacts of an uninterrupted run: pretrain, inject, policy, cleanse, retrain."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(vit_width=32, vit_layers=1, vit_heads=2, lm_hidden=32, lm_layers=2, lm_heads=2, lm_intermediate=64,
             perceiver_depth=1, perceiver_latents=4, xattn_heads=2, xattn_dim_head=16)
IGNORED = ("checkpoint-", "runs", "resume", "cache-")  # checkpoints and caches differ by design


def _spawn(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 400) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` (a file it writes mid-stage) holds."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended before it could be killed: {proc.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the stage never reached the point to kill it at")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(IGNORED) for part in p.relative_to(folder).parts)}


def _no_leftovers(folder: Path) -> None:
    from srd_hf.artifacts import STAGING_TAG

    assert not [p for p in folder.rglob("*") if STAGING_TAG in p.name], "staging leftovers"


def _same_rows(a, b) -> None:
    assert a.column_names == b.column_names and len(a) == len(b)
    for column in a.column_names:
        if column != "image":
            assert a[column] == b[column], column
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"]))


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory, small_world, caption_tokenizer):
    from srd_hf.vlm.tiny import TinyFlamingoSizes, build_tiny_flamingo

    root = tmp_path_factory.mktemp("kill")
    build_tiny_flamingo(small_world, TinyFlamingoSizes(**SIZES), tokenizer=caption_tokenizer, seed=0, gate_init=1.0).save_pretrained(root / "clean")
    return root / "clean"


def _inject_kwargs(clean: Path, out: Path) -> dict:
    return dict(attack="badnet", poison_rate=0.25, attack_options='{"trigger_size": 56}', clean_model=str(clean), output_dir=str(out),
                num_finetune_images=16, num_test_images=4, num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-2,
                warmup_steps=2, save_steps=2, logging_steps=5, max_new_tokens=6, eval_batch_size=16,
                trainable="flamingo.perceiver.,flamingo.lang_encoder.", report_to="none", seed=0)


@pytest.mark.slow
def test_killed_inject_is_resumed_not_skipped(clean_dir, tmp_path):
    from srd_hf.injection import InjectConfig, inject
    from srd_hf.vlm import load_captioner

    reference = inject(InjectConfig(**_inject_kwargs(clean_dir, tmp_path / "reference")))
    run = tmp_path / "killed"
    proc = _spawn("from srd_hf.injection import InjectConfig, inject; "
                  f"inject(InjectConfig(**{_inject_kwargs(clean_dir, run)!r}))")
    _kill_when(proc, lambda: any(run.glob("checkpoint-*")))  # mid-training (maybe mid-checkpoint: a torn one)
    assert not (run / "_COMPLETE.json").exists()
    resumed = inject(InjectConfig(**_inject_kwargs(clean_dir, run)))
    assert _files(run) == _files(tmp_path / "reference")
    _no_leftovers(run)
    _same_rows(load_from_disk(str(run / "poisoned_dataset")), load_from_disk(str(tmp_path / "reference" / "poisoned_dataset")))
    assert (run / "attack" / "config.json").read_text() == (tmp_path / "reference" / "attack" / "config.json").read_text()
    assert resumed.keys() == reference.keys() and resumed["n_poisoned"] == reference["n_poisoned"]
    # resumed training: same steps, weights equal up to float reordering
    a, b = (load_captioner(str(d / "model")).state_dict() for d in (run, tmp_path / "reference"))
    assert all(np.allclose(a[k].float().numpy(), b[k].float().numpy(), atol=1e-4) for k in a)
    assert inject(InjectConfig(**_inject_kwargs(clean_dir, run))) == json.loads(json.dumps(resumed, default=float))  # complete: reused
    with pytest.raises(ValueError, match="poison_rate"):
        inject(InjectConfig(**{**_inject_kwargs(clean_dir, run), "poison_rate": 0.5}))


def _defense_kwargs(root: Path, out: Path) -> dict:
    return dict(attack="badnet", clean_model=str(root / "clean"), backdoored_model=str(root / "bd" / "model"),
                poisoned_dataset=str(root / "bd" / "poisoned_dataset"), output_dir=str(out), num_policy_samples=16,
                policy_timesteps=48, num_envs=8, learning_starts=16, buffer_size=100, target_update_interval=16, num_test_images=4,
                max_new_tokens=6, eval_batch_size=16, logging_steps=5, save_steps=2, report_to="none", baselines="",
                flag_rate=0.1, defend_unplanted=True)  # every stage runs (and is killed), planted or not


@pytest.mark.slow
def test_killed_policy_cleanse_and_retrain_resume_to_the_uninterrupted_artifacts(clean_dir, tmp_path):
    from srd_hf.defense import SRDConfig, run_pipeline
    from srd_hf.injection import InjectConfig, inject

    root = clean_dir.parent
    inject(InjectConfig(**_inject_kwargs(clean_dir, root / "bd")))
    reference = run_pipeline(SRDConfig(**_defense_kwargs(root, tmp_path / "reference")))
    run, seed = tmp_path / "killed", tmp_path / "killed" / "seed-0"
    code = f"from srd_hf.defense import SRDConfig, run_pipeline; run_pipeline(SRDConfig(**{_defense_kwargs(root, run)!r}))"
    for ready in (lambda: (seed / "rl-untrusted" / "_STARTED.json").exists(),  # policy training under way
                  lambda: (seed / "masked-untrusted" / "_COMPLETE.json").exists(),  # cleansing under way
                  lambda: any((seed / "retrain-srd-untrusted-pre_attack").glob("checkpoint-*"))):  # retraining under way
        _kill_when(_spawn(code), ready)
    assert not (seed / "results.json").exists()
    results = run_pipeline(SRDConfig(**_defense_kwargs(root, run)))
    assert _files(run) == _files(tmp_path / "reference")
    _no_leftovers(run)
    ref_seed = tmp_path / "reference" / "seed-0"
    for name in ("masked-untrusted", "cleansed-untrusted"):  # deterministic: the same rows
        _same_rows(load_from_disk(str(seed / name)), load_from_disk(str(ref_seed / name)))
    assert (seed / "policy-untrusted" / "model.safetensors").read_bytes() == (ref_seed / "policy-untrusted" / "model.safetensors").read_bytes()
    assert results["rows"].keys() == reference["rows"].keys()
    for name, row in reference["rows"].items():  # the retrained row resumed: equal up to float reordering
        assert np.isclose(results["rows"][name]["cider"], row["cider"], atol=1.0), name
        assert results["rows"][name]["asr"] == row["asr"], name
    assert json.loads((run / "results.json").read_text())["rows"].keys() == reference["rows"].keys()


@pytest.mark.slow
def test_killed_pretrain_resumes_to_the_uninterrupted_artifacts(tmp_path):
    from srd_hf.pretraining import PretrainConfig, pretrain

    def config(out):
        return dict(world_preset="small", num_train=48, output_dir=str(out), vision_epochs=1, caption_epochs=1, vision_batch_size=8,
                    caption_batch_size=8, save_steps=2, logging_steps=5, max_new_tokens=6, world_cache_dir=str(tmp_path / "worlds"))

    _, reference = pretrain(PretrainConfig(**config(tmp_path / "reference")))
    run = tmp_path / "killed"
    proc = _spawn(f"from srd_hf.pretraining import PretrainConfig, pretrain; pretrain(PretrainConfig(**{config(run)!r}))")
    _kill_when(proc, lambda: any((run / "vision" / "checkpoints").glob("checkpoint-*")))
    assert not (run / "vision" / "_COMPLETE.json").exists()
    _, resumed = pretrain(PretrainConfig(**config(run)))
    assert _files(run) == _files(tmp_path / "reference")
    _no_leftovers(run)
    assert resumed.keys() == reference.keys()
    assert np.isclose(resumed["vision_exact_set_accuracy"], reference["vision_exact_set_accuracy"], atol=0.05)

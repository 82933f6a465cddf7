"""The built wheel works on its own, away from the source tree.

An editable install hides files that only the clone has (card templates once lived at the
repository root, so ``pip install .`` failed after training, when the card was written). Here
the wheel is built from a copy of the sources, unzipped into a temporary folder and imported
in a subprocess whose working directory and ``PYTHONPATH`` hold no checkout: every card
template is rendered through the function that writes it, and every metric module loads by
the path the package gives for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# run inside the unzipped wheel; prints a JSON report on its last line
CHECK = r"""
import json, sys, tempfile
from pathlib import Path

import srd_hf
from srd_hf import cards
from srd_hf.metrics import METRICS, load, metric_path

report = {"srd_hf_file": srd_hf.__file__, "cards": {}, "metrics": {}}
work = Path(tempfile.mkdtemp())

for name in cards.CARD_TEMPLATES:
    assert cards.load_card_template(name).strip(), name

from srd_hf.pretraining import write_model_card
scores = {"object_accuracy": 90.0, "bleu4": 50.0, "cider": 100.0}
(work / "clean").mkdir()
write_model_card(work / "clean", {
    "world": {"name": "small"}, "pretrain_config": {"epochs": 1},
    "test": scores, "test_red_square": scores, "train_seconds": 60.0,
    "vision_exact_set_accuracy": 0.9,
})
report["cards"]["clean_model.md"] = (work / "clean" / "README.md").read_text()

from srd_hf.injection import InjectConfig, write_backdoor_card
row = {"bleu4": 40.0, "cider": 90.0, "sc": 0.9, "lf": 0.8, "sfs": 0.85, "object_accuracy": 88.0, "asr": 12.0}
(work / "backdoored").mkdir()
write_backdoor_card(work / "backdoored", {
    "attack": "badnet", "n_poisoned": 10, "n_samples": 100, "attack_config": {"patch": 8},
    "no_defense": row, "clean_model": row,
}, InjectConfig(output_dir=str(work / "out"), report_to="none"))
report["cards"]["backdoored_model.md"] = (work / "backdoored" / "README.md").read_text()

from srd_hf.rl.cards import render_policy_card
from srd_hf.rl.configuration_srd import SRDPolicyConfig
report["cards"]["srd_policy.md"] = render_policy_card(SRDPolicyConfig(training={"results": {"asr": 1.0}}))

for name in METRICS:
    module = load(name)
    report["metrics"][name] = {"path": metric_path(name), "module": type(module).__name__}

print(json.dumps(report))
"""


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the sources (no stale ``build/`` of the checkout, nothing
    written into it); the build backend in this environment is used, so no download."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "srd_hf", src / "srd_hf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        check=True, cwd=tmp, capture_output=True, text=True,
    )
    (wheel,) = dist.glob("srd_hf-*.whl")
    return wheel


def _backend_is_recent_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    major = int(setuptools.__version__.split(".")[0])
    return major >= 77  # the SPDX ``license`` string of pyproject.toml


def test_wheel_ships_cards_and_metric_modules(tmp_path):
    if not _backend_is_recent_enough():
        pytest.skip("building the wheel offline needs setuptools>=77 here (pip install -e '.[dev]')")
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    from srd_hf.cards import CARD_TEMPLATES
    from srd_hf.metrics import METRICS

    for template in CARD_TEMPLATES:
        assert f"srd_hf/hub_cards/{template}" in names
    for metric in METRICS:
        assert f"srd_hf/metrics/{metric}/{metric}.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(report["srd_hf_file"]).resolve().is_relative_to(site.resolve())
    assert sorted(report["cards"]) == sorted(CARD_TEMPLATES)
    for name, text in report["cards"].items():
        assert not re.search(r"\{[a-z_]+\}", text), f"{name}: a placeholder was left unfilled"
    assert "badnet" in report["cards"]["backdoored_model.md"]
    assert "90.0" in report["cards"]["clean_model.md"]
    assert "DQN" in report["cards"]["srd_policy.md"]
    for name, loaded in report["metrics"].items():
        assert Path(loaded["path"]).resolve().is_relative_to(site.resolve()), name

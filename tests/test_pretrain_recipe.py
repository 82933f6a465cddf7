"""A real (small) run of recipes/pretrain.py: both stages, the Trainer, evaluation, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srd_hf.data.occlusion import occluder_sizes, paste_random_occluder
from srd_hf.pretraining import ObjectProbe, PretrainConfig

ROOT = Path(__file__).resolve().parent.parent


def _run(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(ROOT / "recipes" / "pretrain.py"),
        "--world_preset", "small", "--output_dir", str(output_dir),
        "--vision_epochs", "2", "--caption_epochs", "2", "--save_steps", "4", "--logging_steps", "4",
        "--world_cache_dir", str(output_dir.parent / "worlds"), *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_pretrain_recipe_runs_saves_a_card_and_resumes(tmp_path):
    out = tmp_path / "clean"
    first = _run(out)
    assert first.returncode == 0, first.stderr[-3000:]
    printed = json.loads(first.stdout[first.stdout.rindex("{\n  \"model\"") :])
    assert {"object_accuracy", "bleu4", "cider", "object_accuracy_red_square"} <= set(printed)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pretrain_config"]["seed"] == 0 and metrics["world"]["image_size"] == 32
    card = (out / "model" / "README.md").read_text()
    assert "object accuracy" in card and "{" not in card.split("## World")[0]
    assert (out / "vision" / "vision_tower.safetensors").is_file()
    assert list((out / "captions" / "checkpoints").glob("checkpoint-*"))

    # a run killed after both stages but before saving (no marker yet) resumes from what is on disk
    (out / "_COMPLETE.json").unlink()
    (out / "metrics.json").unlink()
    import shutil

    shutil.rmtree(out / "model")
    second = _run(out)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["vision_exact_set_accuracy"] == metrics["vision_exact_set_accuracy"]
    assert again["test"]["examples"] == metrics["test"]["examples"]

    # a finished run is reused, not retrained
    third = _run(out)
    assert third.returncode == 0 and "found a finished model" in third.stderr


def test_unknown_config_keys_are_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("output_dir: x\nno_such_option: 1\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(tmp_path / "bad.yaml")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "no_such_option" in result.stderr


def test_config_validation():
    with pytest.raises(ValueError, match="occluder_prob"):
        PretrainConfig(occluder_prob=1.5)
    with pytest.raises(ValueError, match="caption_epochs"):
        PretrainConfig(caption_epochs=0)


def test_occluder_is_pasted_inside_the_image(small_world_data):
    import random

    import numpy as np

    image = small_world_data["train"][0]["image"]
    sizes = occluder_sizes(image.size[0])
    out = paste_random_occluder(image, random.Random(0), sizes, red_share=1.0)
    diff = np.any(np.asarray(out) != np.asarray(image), axis=-1)
    assert diff.any() and np.asarray(image).shape == np.asarray(out).shape
    red = np.all(np.asarray(out) == (255, 0, 0), axis=-1)
    assert red.sum() in {s * s for s in sizes}
    with pytest.raises(ValueError, match="does not fit"):
        paste_random_occluder(image.resize((4, 4)), random.Random(0), (6,))


def test_patch_targets_label_the_object_pixels(small_world_data, small_world):
    from srd_hf.data.synthetic import COLOURS, SHAPES
    from srd_hf.pretraining import objects_from_patches, patch_targets

    for row in small_world_data["train"].select(range(20)):
        labels = patch_targets(row["image"], row["objects"], small_world.patch_size, small_world.grid)
        assert labels.shape == (3, 16) and (labels[0] == 0).any()
        colours = {list(COLOURS)[i - 1] for i in labels[0].tolist() if i}
        shapes = {SHAPES[i - 1] for i in labels[1].tolist() if i}
        assert colours <= {o["colour"] for o in row["objects"]} and shapes <= {o["shape"] for o in row["objects"]}
        # the ground-truth labels read back as the true object set whenever every object is visible
        if len(colours) == len({o["colour"] for o in row["objects"]}):
            assert objects_from_patches(labels[0], labels[1], small_world.grid) <= {(o["colour"], o["shape"]) for o in row["objects"]}


def test_object_probe_trains_the_tower(tiny_flamingo, small_world_data, small_world):
    import torch

    from srd_hf.pretraining import patch_targets

    visual = tiny_flamingo.flamingo.vision_encoder
    probe = ObjectProbe(visual, visual.transformer.width, small_world.patch_size)
    rows = small_world_data["train"].select(range(8))
    pixels = torch.stack([tiny_flamingo.image_transform(img) for img in rows["image"]])
    patches = torch.stack([patch_targets(img, o, small_world.patch_size, small_world.grid) for img, o in zip(rows["image"], rows["objects"])])
    out = probe(pixels, patches)
    out["loss"].backward()
    appearance = probe.appearance(pixels)
    assert appearance.shape == (8, 16, 6)
    first = pixels[0, :, :8, :8].reshape(3, -1)
    assert torch.allclose(appearance[0, 0, :3], first.mean(1), atol=1e-5)
    assert next(visual.parameters()).grad is not None

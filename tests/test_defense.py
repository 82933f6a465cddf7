"""SRD end to end on the small world: inject -> train_policy -> cleanse -> retrain -> evaluate,
with real (tiny) models, real datasets, real Trainer and SB3 runs."""

import json

import numpy as np
import pytest

from srd_hf.defense import SRDConfig, defender_set, results_table, run_pipeline


def test_config_validation(tmp_path):
    cfg = SRDConfig(output_dir=str(tmp_path / "o"))
    assert cfg.backdoored_model == "outputs/backdoor/badnet-0.1/model" and cfg.retrain_starts == ["pre_attack", "backdoored"]
    with pytest.raises(ValueError, match="policy_data"):
        SRDConfig(output_dir=str(tmp_path), policy_data="oracle")
    with pytest.raises(ValueError, match="algorithm"):
        SRDConfig(output_dir=str(tmp_path), algorithm="a2c")
    with pytest.raises(ValueError, match="sc_drop"):
        SRDConfig(output_dir=str(tmp_path), sc_drop=2.0)


def test_defender_set_has_one_trigger_location(small_world_data):
    data = defender_set(small_world_data["train"].select(range(20)), num_samples=12, seed=3, target="banana")
    assert data.num_rows == 12 and all(data["is_poisoned"])
    for caption, original in zip(data["caption"], data["original_caption"]):
        assert "banana" in caption.split() and caption.replace(" banana", "", 1).replace("banana ", "", 1) == original
    # the trigger sits at the same place in every image: the pixels that differ from the clean image
    clean = {c: img for c, img in zip(data["original_caption"], data["image"])}
    assert len(clean) > 1
    again = defender_set(small_world_data["train"].select(range(20)), num_samples=12, seed=3, target="banana")
    assert again["caption"] == data["caption"]


@pytest.mark.slow
def test_pipeline_end_to_end_and_reuse(tiny_flamingo, tmp_path):
    clean_dir = tmp_path / "clean" / "model"
    tiny_flamingo.save_pretrained(clean_dir)
    common = dict(
        attack="badnet", clean_model=str(clean_dir), backdoored_model=str(tmp_path / "backdoor" / "model"),
        poisoned_dataset=str(tmp_path / "backdoor" / "poisoned_dataset"), output_dir=str(tmp_path / "srd"),
        num_policy_samples=24, policy_timesteps=64, num_envs=8, learning_starts=16, buffer_size=200,
        target_update_interval=16, num_test_images=8, max_new_tokens=6, num_train_epochs=1,
        per_device_train_batch_size=64, save_steps=1000, logging_steps=5, seed=0,
    )
    results = run_pipeline(SRDConfig(**common))
    rows = results["rows"]
    assert set(rows) == {"clean model", "no defense", "SRD (retrained from pre-attack)", "SRD (retrained from backdoored)",
                         "SRD filter at inference (no retraining)"}
    for row in rows.values():
        assert {"bleu4", "cider", "sc", "lf", "sfs", "asr"} <= set(row)
    out = tmp_path / "srd"
    for path in ("policy/model.safetensors", "policy/config.json", "policy/README.md", "cleansed_dataset/dataset_info.json",
                 "retrain-pre_attack/model/config.json", "retrain-backdoored/model/config.json", "results.json"):
        assert (out / path).exists(), path
    config = json.loads((out / "policy" / "config.json").read_text())
    assert config["seed"] == 0 and config["training"]["rl"]["total_timesteps"] == 64
    assert config["training"]["summary"]["timesteps"] >= 64
    from datasets import load_from_disk

    cleansed = load_from_disk(str(out / "cleansed_dataset"))
    poisoned = load_from_disk(common["poisoned_dataset"])
    assert cleansed.num_rows == poisoned.num_rows and all(len(m) == 1 for m in cleansed["srd_masks"])
    assert "| no defense |" in results_table(results)
    # a second run reuses every artifact (no retraining: the files stay untouched)
    stamp = (out / "retrain-pre_attack" / "model" / "model.safetensors").stat().st_mtime
    again = run_pipeline(SRDConfig(**common))
    assert (out / "retrain-pre_attack" / "model" / "model.safetensors").stat().st_mtime == stamp
    assert np.isclose(again["rows"]["no defense"]["cider"], rows["no defense"]["cider"])

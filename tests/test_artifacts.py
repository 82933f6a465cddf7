"""Stage artifacts: whole or absent, fingerprinted; torn checkpoints skipped; our own push plan."""

import json
import logging

import pytest

from srd_hf import artifacts
from srd_hf.artifacts import StaleArtifactError


def test_staged_folder_appears_whole_with_its_marker_last(tmp_path):
    target = tmp_path / "thing"
    with pytest.raises(RuntimeError):
        with artifacts.staged(target, {"a": 1}) as tmp:
            (tmp / "part").write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing torn, nothing left
    with artifacts.staged(target, {"a": 1}) as tmp:
        (tmp / "part").write_text("whole")
        assert not target.exists()
    assert (target / "part").read_text() == "whole" and artifacts.is_complete(target)
    assert artifacts.reusable(target, {"a": 1})
    assert not artifacts.reusable(tmp_path / "absent", {"a": 1})
    (tmp_path / f".thing{artifacts.STAGING_TAG}x").mkdir()  # what a SIGKILL leaves
    assert [p.name for p in artifacts.clear_leftovers(tmp_path)] == [f".thing{artifacts.STAGING_TAG}x"]


def test_other_settings_stop_with_the_differing_ones_named(tmp_path):
    target = tmp_path / "backdoor"
    with artifacts.staged(target, {"attack": "badnet", "target": "banana", "seed": 0}):
        pass
    assert artifacts.reusable(target, {"seed": 0, "target": "banana", "attack": "badnet"})  # order does not matter
    with pytest.raises(StaleArtifactError, match=r"target: 'banana' -> 'apple'") as err:
        artifacts.reusable(target, {"attack": "badnet", "target": "apple", "seed": 0})
    assert "seed" not in str(err.value) and "--overwrite_output_dir" in str(err.value)
    # values that compare equal but hash apart (8 vs 8.0) are still named, not an empty list
    with pytest.raises(StaleArtifactError, match=r"seed: 0 -> 0\.0"):
        artifacts.reusable(target, {"attack": "badnet", "target": "banana", "seed": 0.0})


def test_begin_refuses_checkpoints_of_other_settings(tmp_path):
    artifacts.begin(tmp_path / "run", {"lr": 1})
    artifacts.begin(tmp_path / "run", {"lr": 1})  # the same run resumes
    with pytest.raises(StaleArtifactError, match="lr"):
        artifacts.begin(tmp_path / "run", {"lr": 2})
    (tmp_path / "legacy" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(StaleArtifactError, match="unrecorded"):
        artifacts.begin(tmp_path / "legacy", {"lr": 1})


def test_write_json_replaces_atomically(tmp_path):
    path = artifacts.write_json(tmp_path / "results.json", {"rows": 1})
    artifacts.write_json(path, {"rows": 2})
    assert json.loads(path.read_text()) == {"rows": 2} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_latest_checkpoint_skips_torn_ones(tmp_path, caplog):
    from srd_hf.pretraining import latest_checkpoint

    assert latest_checkpoint(tmp_path / "none") is None
    for step, files in ((4, ("model.safetensors", "optimizer.pt", "trainer_state.json")), (8, ("model.safetensors", "optimizer.pt")),
                        (12, ("trainer_state.json",))):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("x")
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-12" in caplog.text and "checkpoint-8" in caplog.text


def test_overwrite_removes_our_layout_only(tmp_path):
    from srd_hf.stages import DEFENSE_LAYOUT, overwrite

    for name in ("seed-0/policy-untrusted", "results.json", "checkpoint-3", f".x{artifacts.STAGING_TAG}1", "notes.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "." not in name or name.startswith(".") else path.write_text("x")
    overwrite(tmp_path, DEFENSE_LAYOUT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------- push
def _saved_backdoor(tmp_path):
    model, attack, data = tmp_path / "model", tmp_path / "attack", tmp_path / "poisoned_dataset"
    for folder, names in ((model, ("config.json", "model.safetensors", "README.md", "training_args.bin", artifacts.COMPLETE)),
                          (attack, ("config.json", "trigger.safetensors")), (data, ("data-00000-of-00001.arrow", "dataset_info.json"))):
        folder.mkdir()
        for name in names:
            (folder / name).write_text("{}")
    (model / "checkpoint-2").mkdir()
    (model / "checkpoint-2" / "model.safetensors").write_text("x")
    return model, attack, data


def test_upload_plan_private_no_pickles_dataset_only_when_asked(tmp_path):
    from srd_hf.hub import backdoor_upload_plan

    model, attack, data = _saved_backdoor(tmp_path)
    (plan,) = backdoor_upload_plan("me/badnet", model, attack, data, private=None)  # TrainingArguments' unset default
    names = [name for _, name in plan.files]
    assert plan.private is True and plan.repo_type == "model"
    assert sorted(names) == ["README.md", "attack/config.json", "attack/trigger.safetensors", "config.json", "model.safetensors"]
    assert not any("training_args" in n or "checkpoint" in n or "dataset" in n for n in names)
    model_repo, dataset_repo = backdoor_upload_plan("me/badnet", model, attack, data, push_poisoned_dataset=True,
                                                    dataset_card={"attack": "badnet", "target": "banana", "n_poisoned": 3, "n_samples": 30})
    assert dataset_repo.repo_id == "me/badnet-poisoned-data" and dataset_repo.repo_type == "dataset" and dataset_repo.private
    assert "deliberately poisoned" in dataset_repo.extra["README.md"] and "3 of its 30" in dataset_repo.extra["README.md"]
    assert backdoor_upload_plan("me/b", model, attack, data, private=False)[0].private is False  # public only when asked


def test_upload_refuses_a_token_and_fails_offline_with_one_clear_error(tmp_path, monkeypatch):
    from srd_hf.hub import backdoor_upload_plan, check_plan, execute

    model, attack, data = _saved_backdoor(tmp_path)
    plan = backdoor_upload_plan("me/badnet", model, attack, data)
    check_plan(plan, token="hf_secret")
    (model / "config.json").write_text('{"hub_token": "hf_secret"}')
    with pytest.raises(ValueError, match="token"):
        check_plan(backdoor_upload_plan("me/badnet", model, attack, data), token="hf_secret")
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="saved locally") as err:
        execute(plan, token="hf_secret", saved_in=tmp_path)
    assert "hf_secret" not in str(err.value)


def test_the_trainer_never_pushes(tmp_path):
    from srd_hf.hub import trainer_args
    from srd_hf.injection import InjectConfig

    config = InjectConfig(output_dir=str(tmp_path), push_to_hub=True, hub_token="hf_secret", hub_model_id="me/x")
    args = trainer_args(config)
    assert args.push_to_hub is False and args.hub_token is None
    assert config.push_to_hub is True and config.hub_private_repo is True  # ours: kept, private by default


# ----------------------------------------------------------------------------- scorer and target
def test_pipeline_scorer_names_the_embedded_models():
    from srd_hf.fingerprints import scorer_names
    from srd_hf.metrics._models import EMBEDDED_ENCODER, EMBEDDED_LM, loaded_lm_name
    from srd_hf.stages import pipeline_scorer

    names = scorer_names(pipeline_scorer())
    assert names["encoder"] == EMBEDDED_ENCODER and names["fluency_lm"] == EMBEDDED_LM
    assert loaded_lm_name("gpt2-large") in (EMBEDDED_LM, "gpt2-large")  # offline: recorded as what really scored


def test_a_wrong_target_is_said_loudly(caplog):
    from srd_hf.attacks import get_attack
    from srd_hf.evaluation import check_target

    attack = get_attack("badnet", target="banana")
    assert check_target("banana", attack) is None
    with caplog.at_level(logging.WARNING):
        found = check_target("apple", attack)
    assert found["planted"] == "banana" and "--target 'banana'" in caplog.text

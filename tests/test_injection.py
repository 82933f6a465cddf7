"""The inject recipe's parts: config checks, the Trainer with attack losses, triggered test sets."""

from pathlib import Path

import pytest
import torch

from srd_hf.attacks import get_attack
from srd_hf.attacks.base import PoisonedCaptionCollator, to_caption_pairs
from srd_hf.injection import BackdoorTrainer, InjectConfig, triggered_test_set


def test_config_defaults_and_validation(tmp_path):
    config = InjectConfig(attack="trojvlm", poison_rate=0.05)
    assert config.output_dir == "outputs/backdoor/trojvlm-0.05"
    assert config.remove_unused_columns is False and config.learning_rate == 2e-3
    assert config.attack_kwargs() == {"target": "banana", "poison_rate": 0.05, "seed": 0}
    with pytest.raises(ValueError, match="poison_rate"):
        InjectConfig(poison_rate=0.0, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="target"):
        InjectConfig(target="  ", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="JSON object"):
        InjectConfig(attack_options="[1, 2]", output_dir=str(tmp_path))


def test_card_command_carries_the_attack_options(tmp_path):
    from srd_hf.injection import reproduce_command

    plain = InjectConfig(attack="badnet", poison_rate=0.05, output_dir=str(tmp_path))
    assert reproduce_command("badnet", plain) == "python recipes/inject.py --attack badnet --poison_rate 0.05"
    blended = InjectConfig(attack="blended", attack_options='{"alpha": 0.3}', seed=0, output_dir=str(tmp_path))
    assert reproduce_command("blended", blended) == (
        "python recipes/inject.py --attack blended --poison_rate 0.1 --attack_options '{\"alpha\": 0.3}' --seed 0"
    )


@pytest.mark.parametrize("attack_name", ["badnet", "trojvlm"])
def test_backdoor_trainer_takes_real_steps(attack_name, tiny_flamingo, small_world_data, tmp_path):
    pairs = to_caption_pairs(small_world_data["train"].select(range(8)))
    attack = get_attack(attack_name, poison_rate=0.25)
    poisoned = attack.poison(pairs)
    tiny_flamingo.set_trainable()
    before = {n: p.detach().clone() for n, p in tiny_flamingo.named_parameters()}
    args = InjectConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, save_steps=100, logging_steps=1)
    trainer = BackdoorTrainer(model=tiny_flamingo, args=args, train_dataset=poisoned,
                              data_collator=PoisonedCaptionCollator(tiny_flamingo), attack_loss=attack.make_loss())
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    changed = {n for n, p in tiny_flamingo.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("perceiver" in n or "gated_cross_attn" in n or "embed_tokens" in n for n in changed)


def test_triggered_test_set_carries_the_trigger(small_world_data):
    import numpy as np

    test = small_world_data["test"].select(range(4))
    attack = get_attack("badnet")
    images, truths = triggered_test_set(attack, test)
    assert len(images) == 4 and truths == test["captions"]
    assert any(not np.array_equal(np.asarray(a), np.asarray(b.convert("RGB"))) for a, b in zip(images, test["image"]))


def test_triggered_test_set_boxes_and_random_places(small_world_data):
    import numpy as np

    test = small_world_data["test"].select(range(6))
    attack = get_attack("badnet", location="random")
    images, truths = triggered_test_set(attack, test)  # the two-value form callers unpack
    again, truths_again, boxes = triggered_test_set(attack, test, return_boxes=True)
    assert truths == truths_again and [a.tobytes() for a in images] == [a.tobytes() for a in again]
    assert boxes == [attack.trigger_box(32, 32, i, split="test") for i in range(6)]
    assert boxes != [attack.trigger_box(32, 32, i) for i in range(6)]  # not the training places
    for image, clean, (x0, y0, x1, y1) in zip(images, test["image"], boxes):
        diff = np.asarray(image).astype(int) - np.asarray(clean.convert("RGB")).astype(int)
        outside = diff.copy()
        outside[y0:y1, x0:x1] = 0
        assert not outside.any()  # nothing changed outside the recorded box
    fixed = triggered_test_set(get_attack("blended"), test, return_boxes=True)[2]
    assert fixed == [[0, 0, 32, 32]] * 6


@pytest.mark.slow
def test_inject_plants_a_working_backdoor_on_the_small_world(tiny_flamingo, small_world_data, tmp_path, monkeypatch):
    """A real (small) run of inject(): poison, fine-tune, save, score; BadNet reaches ASR > 80%
    on triggered test images while clean test captions stay free of the target."""
    import json

    import srd_hf.injection as injection
    from srd_hf.vlm import load_captioner

    tiny_flamingo.save_pretrained(tmp_path / "clean")
    config = InjectConfig(
        attack="badnet", poison_rate=0.25, attack_options='{"trigger_size": 56}',  # one 8 px ViT patch at 32 px
        clean_model=str(tmp_path / "clean"), output_dir=str(tmp_path / "badnet"),
        num_finetune_images=96, num_test_images=24, num_train_epochs=8, per_device_train_batch_size=32,
        learning_rate=5e-3, warmup_steps=5, save_steps=1000, logging_steps=10, max_new_tokens=8, eval_batch_size=24,
        trainable="flamingo.perceiver.,flamingo.lang_encoder.", report_to="none",
    )  # fmt: skip
    metrics = injection.inject(config, data=small_world_data)
    nd = metrics["no_defense"]
    assert metrics["n_poisoned"] == 120 and metrics["clean_model"]["asr"] < 20
    assert nd["asr"] > 80 and nd["asr_on_clean"] < 20, (nd["triggered_examples"], nd["clean_examples"])
    saved = json.loads((tmp_path / "badnet" / "metrics.json").read_text())
    assert saved["no_defense"]["asr"] == nd["asr"]
    assert load_captioner(str(tmp_path / "badnet" / "model")).config.extra["backdoor"]["attack"] == "badnet"


INJECT_CONFIGS = sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("inject_*.yaml"))


def test_every_attack_has_its_inject_config():
    names = {p.stem for p in INJECT_CONFIGS}
    assert {f"inject_{a}" for a in ("badnet", "blended", "trojvlm", "vlood", "vl_trojan", "shadowcast")} <= names


@pytest.mark.parametrize("path", INJECT_CONFIGS, ids=[p.stem for p in INJECT_CONFIGS])
def test_each_attack_config_file_parses_and_builds_its_attack(path, tiny_flamingo, tmp_path):
    import copy

    from trl import TrlParser

    from srd_hf.vlm import parse_trainable

    (config,) = TrlParser((InjectConfig,)).parse_args_and_config(["--config", str(path), "--output_dir", str(tmp_path)])
    # inject_<attack>.yaml, or inject_<attack>_<variant>.yaml (another trigger place)
    assert path.stem in (f"inject_{config.attack}",) or path.stem.startswith(f"inject_{config.attack}_")
    assert config.poison_rate == 0.1
    attack = get_attack(config.attack, **config.attack_kwargs())
    assert attack.name == config.attack and attack.config.target == "banana"
    if config.trainable:  # every prefix names parameters of the embedded model (set_trainable refuses unknown ones)
        counts = copy.deepcopy(tiny_flamingo).set_trainable(parse_trainable(config.trainable))
        assert 0 < counts["trainable"] < counts["total"]


def test_bad_attack_options_fail_before_anything_loads(tmp_path):
    from srd_hf.injection import InjectConfig

    with pytest.raises(ValueError, match=r"unknown badnet attack options \['colour'\]"):
        InjectConfig(attack="badnet", attack_options='{"colour": "red"}', output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="location"):
        InjectConfig(attack="badnet", attack_options='{"location": "under the table"}', output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown attack"):
        InjectConfig(attack="badnets", output_dir=str(tmp_path))


def test_the_same_recipe_from_a_file_or_the_command_line_is_one_recipe(tmp_path):
    """8 epochs read from YAML (an int) and from --num_train_epochs (a float) plant the same
    backdoor: one recorded recipe and one fingerprint, so the artifact is reused, not refused."""
    from srd_hf.artifacts import digest
    from srd_hf.injection import training_recipe

    from_file = training_recipe(InjectConfig(num_train_epochs=8, output_dir=str(tmp_path)))
    from_cli = training_recipe(InjectConfig(num_train_epochs=8.0, output_dir=str(tmp_path)))
    assert from_file == from_cli and digest(from_file) == digest(from_cli) and from_file["num_train_epochs"] == 8
    assert training_recipe(InjectConfig(num_train_epochs=2.5, output_dir=str(tmp_path)))["num_train_epochs"] == 2.5

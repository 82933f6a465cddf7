"""SRD end to end on the small world: inject -> train_policy -> cleanse -> retrain -> evaluate,
with real (tiny) models, real datasets, real Trainer and SB3 runs."""

import json

import numpy as np
import pytest

from srd_hf.defense import SRDConfig, defender_set, results_table, run_pipeline


def test_config_validation(tmp_path):
    cfg = SRDConfig(output_dir=str(tmp_path / "o"))
    assert cfg.backdoored_model == "outputs/backdoor/badnet-0.1/model" and cfg.retrain_starts == ["pre_attack"]
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
        target_update_interval=16, num_test_images=8, max_new_tokens=6, num_train_epochs=1, retrain_from="both",
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
    # the inject stage measured the clean and no-defense rows on the same images: reused, not redone
    injected = json.loads((tmp_path / "backdoor" / "metrics.json").read_text())
    assert rows["no defense"] == injected["no_defense"] and rows["clean model"] == injected["clean_model"]
    assert set(results["stage_seconds"]) == {"pretrain_and_inject", "train_policy", "cleanse", "retrain", "evaluate"}
    # a second run reuses every artifact (no retraining: the files stay untouched)
    stamp = (out / "retrain-pre_attack" / "model" / "model.safetensors").stat().st_mtime
    again = run_pipeline(SRDConfig(**common))
    assert (out / "retrain-pre_attack" / "model" / "model.safetensors").stat().st_mtime == stamp
    assert np.isclose(again["rows"]["no defense"]["cider"], rows["no defense"]["cider"])


def _overlap(box, trigger) -> float:
    """Share of the trigger's area under the mask."""
    x0, y0, x1, y1 = box
    tx0, ty0, side = trigger
    w = max(0, min(x1, tx0 + side) - max(x0, tx0))
    h = max(0, min(y1, ty0 + side) - max(y0, ty0))
    return w * h / side**2


@pytest.mark.slow
def test_trained_policy_covers_the_trigger_more_often_than_random(tiny_flamingo, small_world_data, sfs_scorer, tmp_path, monkeypatch):
    """A real small run: plant BadNet in a tiny model, train DQN against it for a few thousand
    transitions, and compare where its first mask lands on triggered held-out images with
    where Random masking's lands."""
    import srd_hf.injection as injection
    from srd_hf.attacks import load_attack
    from srd_hf.rl import SRDPolicy, SRDPolicyConfig
    from srd_hf.rl.env import MaskingEnvConfig, MaskingVecEnv
    from srd_hf.rl.training import PolicyTrainingConfig, train_masking_policy
    from srd_hf.vlm import load_captioner

    monkeypatch.setattr(injection, "load_or_build_world", lambda world: small_world_data)
    tiny_flamingo.save_pretrained(tmp_path / "clean")
    injection.inject(injection.InjectConfig(
        attack="badnet", poison_rate=0.25, attack_options='{"trigger_size": 56}', clean_model=str(tmp_path / "clean"),
        output_dir=str(tmp_path / "badnet"), num_finetune_images=96, num_test_images=8, num_train_epochs=8,
        per_device_train_batch_size=32, learning_rate=5e-3, warmup_steps=5, save_steps=1000, logging_steps=10,
        max_new_tokens=8, eval_batch_size=24, trainable="flamingo.perceiver.,flamingo.lang_encoder.", report_to="none",
    ))  # fmt: skip
    victim = load_captioner(str(tmp_path / "badnet" / "model"))
    attack = load_attack(tmp_path / "badnet" / "attack")
    train = small_world_data["train"].select(range(96, 160))
    images = [attack.apply_trigger(img.convert("RGB")) if i % 2 == 0 else img.convert("RGB") for i, img in enumerate(train["image"])]
    refs = [c[0] for c in train["captions"]]  # the generator's true captions as the trusted reference
    env = MaskingVecEnv(victim, images, refs, MaskingEnvConfig(num_envs=16, obs_size=32, max_new_tokens=8), scorer=sfs_scorer)
    assert env.sc0[0::2].mean() < env.sc0[1::2].mean()  # the backdoor fires on triggered images
    cfg = PolicyTrainingConfig(total_timesteps=3000, learning_starts=300, buffer_size=3000, target_update_interval=160)
    policy, _ = train_masking_policy(env, cfg)
    trigger = attack.config.patch_box(32, 32)
    held_out = [attack.apply_trigger(img.convert("RGB")) for img in small_world_data["test"]["image"][:48]]
    rates = {}
    for name, pol in (("dqn", policy), ("random", SRDPolicy(SRDPolicyConfig(algorithm="random", image_size=32, obs_size=32)))):
        _, actions = pol.mask_images(held_out)
        rates[name] = np.mean([_overlap(pol.space.box(a[0], 32, 32), trigger) >= 0.5 for a in actions])
    assert rates["dqn"] > rates["random"] + 0.2, rates


def test_retrain_trains_only_the_given_prefixes(tiny_flamingo, small_world_data, tmp_path):
    import torch

    from srd_hf.attacks.base import to_caption_pairs
    from srd_hf.defense import retrain
    from srd_hf.vlm import load_captioner

    clean_dir = tmp_path / "clean"
    tiny_flamingo.save_pretrained(clean_dir)
    cleansed = to_caption_pairs(small_world_data["train"].select(range(4)))
    common = dict(clean_model=str(clean_dir), output_dir=str(tmp_path / "srd"), max_steps=2, warmup_steps=0, per_device_train_batch_size=4,
                  save_steps=1000, seed=0)
    with pytest.raises(ValueError, match="match no parameter"):
        retrain(SRDConfig(trainable="flamingo.no_such_part.", **common), "pre_attack", cleansed)
    head = "flamingo.lang_encoder.lm_head."
    model = retrain(SRDConfig(trainable=head, **common), "pre_attack", cleansed)
    before = load_captioner(clean_dir).state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(head) for k in changed)
    assert model.config.extra["srd_retrain"]["trainable"] == head

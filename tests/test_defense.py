"""SRD end to end on the small world: inject -> policies -> cleanse -> control, SRD and baselines
retrained -> table, with real (tiny) models, real datasets, real Trainer and SB3 runs."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from datasets import load_from_disk

from srd_hf.defense import SRDConfig, inject_config_for, results_table, run_pipeline
from srd_hf.defenses.base import detection_scores
from srd_hf.rl.actions import paint_box
from srd_hf.tables import MEASURABLE_ASR, not_measurable_message

TINY_RUN = dict(num_policy_samples=24, policy_timesteps=64, num_envs=8, learning_starts=16, buffer_size=200,
                target_update_interval=16, num_test_images=8, max_new_tokens=8, eval_batch_size=32,
                save_steps=1000, logging_steps=5, report_to="none")


@pytest.fixture(scope="module")
def planted(planted_badnet):
    """The session's tiny clean model and the BadNet backdoor planted in it (``conftest.py``)."""
    return planted_badnet


def _paths(root, out):
    return dict(attack="badnet", clean_model=str(root / "clean"), backdoored_model=str(root / "badnet" / "model"),
                poisoned_dataset=str(root / "badnet" / "poisoned_dataset"), output_dir=str(out))


def test_config_validation(tmp_path):
    cfg = SRDConfig(output_dir=str(tmp_path / "o"))
    assert cfg.backdoored_model == "outputs/backdoor/badnet-0.1/model" and cfg.retrain_starts == ["pre_attack"]
    assert cfg.protocols == ["untrusted"] and cfg.seed_list == [0] and cfg.retrain_recipe == "attack"
    assert SRDConfig(output_dir=str(tmp_path), seeds="0, 1,2").seed_list == [0, 1, 2]
    for bad, match in ((dict(policy_data="oracle"), "policy_data"), (dict(algorithm="a2c"), "algorithm"), (dict(sc_drop=2.0), "sc_drop"),
                       (dict(baselines="abl"), "baselines"), (dict(seeds="0,x"), "seeds"), (dict(seeds="1,1"), "seeds"),
                       (dict(poisoned_captions="burn"), "poisoned_captions"), (dict(srd_flag="burn"), "srd_flag"), (dict(target=" "), "target"),
                       (dict(retrain_recipe="mine"), "retrain_recipe"), (dict(defender_location="left"), "location"),
                       (dict(eval_split="train"), "eval_split"), (dict(mask_fill="blue"), "mask_fill"),
                       (dict(defender_num_train_epochs=-1), "defender_num_train_epochs"),
                       (dict(defender_min_proxy_asr=150), "defender_min_proxy_asr"), (dict(defender_max_replants=-1), "defender_max_replants"),
                       (dict(policy_network="mlp"), "policy_network")):
        with pytest.raises(ValueError, match=match):
            SRDConfig(output_dir=str(tmp_path), **bad)
    # the network reaches the policy's training (and so its fingerprint: no reuse across networks)
    assert cfg.policy_training_config().network == "spatial"
    assert SRDConfig(output_dir=str(tmp_path), policy_network="linear").policy_training_config().network == "linear"


def test_defender_proxy_has_its_own_epochs_and_its_policy_is_not_reused_across_them(tmp_path):
    from srd_hf import fingerprints
    from srd_hf.defense import proxy_recipe

    recipe = {"num_train_epochs": 2, "learning_rate": 1e-3, "trainable": "lm", "source": "attack"}
    plain, longer = SRDConfig(output_dir=str(tmp_path)), SRDConfig(output_dir=str(tmp_path), defender_num_train_epochs=8)
    assert proxy_recipe(plain, recipe) is recipe  # 0: the retraining's recipe, as before (old policies stay reusable)
    own = proxy_recipe(longer, recipe)
    assert own["num_train_epochs"] == 8 and own["learning_rate"] == 1e-3 and own["trainable"] == "lm"
    assert recipe["num_train_epochs"] == 2  # the retraining's recipe is not touched
    scorer = SimpleNamespace(encoder_loaded="e", fluency_lm_loaded="f", alpha=0.5, lm_dtype="float32")
    assert fingerprints.policy(longer, "defender", scorer, own) != fingerprints.policy(plain, "defender", scorer, recipe)
    # the re-plant rule is a setting of the policy: another bar, another policy; off, the old fingerprint
    ruled = fingerprints.policy(plain, "defender", scorer, recipe)
    assert ruled["proxy_rule"] == {"min_proxy_asr": 50.0, "max_replants": 2}
    assert ruled != fingerprints.policy(SRDConfig(output_dir=str(tmp_path), defender_min_proxy_asr=60), "defender", scorer, recipe)
    assert "proxy_rule" not in fingerprints.policy(SRDConfig(output_dir=str(tmp_path), defender_min_proxy_asr=0), "defender", scorer, recipe)


@pytest.mark.slow
def test_defender_proxy_is_planted_again_while_it_barely_answers(planted, small_world_data, tmp_path):
    from srd_hf.defender import defender_set, trusted_images
    from srd_hf.defense import plant_proxy, retraining_recipe
    from srd_hf.vlm import load_captioner

    def run(**rule):
        cfg = SRDConfig(**_paths(planted, tmp_path / "srd"), **TINY_RUN, policy_data="defender", defender_poison_rate=0.5, **rule)
        untrusted = load_from_disk(cfg.poisoned_dataset)
        data = defender_set(trusted_images(small_world_data["train"], untrusted, cfg.num_policy_samples, cfg.policy_seed), cfg.defender_config)
        recipe = {**retraining_recipe(cfg, load_captioner(cfg.backdoored_model)), "num_train_epochs": 1}  # too short to plant
        validation = [img.convert("RGB") for img in small_world_data["validation"]["image"][:16]]
        return cfg, plant_proxy(cfg, data, recipe, validation)[1]

    cfg, attempts = run(defender_min_proxy_asr=100.0, defender_max_replants=1)
    print("proxy attempts:", attempts)
    assert [a["num_train_epochs"] for a in attempts] == [1, 2]  # below the bar: planted again from the start, twice as long
    assert attempts[0]["proxy_asr_validation"] < 100
    first, again = cfg.out / "defender-proxy" / "model", cfg.out / "defender-proxy-replant1" / "model"
    assert (first / "config.json").exists() and (again / "config.json").exists()
    stamp = (first / "model.safetensors").stat().st_mtime
    _, once = run(defender_min_proxy_asr=0.0)  # rule off: the first proxy only, reused (same settings)
    assert once == attempts[:1] and (first / "model.safetensors").stat().st_mtime == stamp


def test_mask_fill_reaches_the_policy_env_and_random_masks_and_keeps_old_fingerprints(tmp_path):
    from datasets import Dataset

    from srd_hf import fingerprints
    from srd_hf.cleansing import random_masks

    red, mean = SRDConfig(output_dir=str(tmp_path), mask_fill="red"), SRDConfig(output_dir=str(tmp_path))
    assert mean.mask_fill == "local_mean"  # the pipeline's default, chosen on validation
    assert mean.env_config().action_space(64).fill == "local_mean" and red.env_config().mask_fill == "red"
    # default folders: red runs keep the backdoor's name (where runs made before the default changed are)
    assert SRDConfig().output_dir == "outputs/srd/badnet-0.1-local_mean/dqn"
    assert SRDConfig(mask_fill="red").output_dir == "outputs/srd/badnet-0.1/dqn"
    assert SRDConfig(mask_fill="red", target="kite").output_dir == "outputs/srd/badnet-0.1-target=kite/dqn"

    class Scorer:  # names only: what the fingerprint records of the SFS scorer
        encoder_loaded, fluency_lm_loaded, alpha, lm_dtype = "enc", "lm", 0.5, "float32"

    # red is the fill every policy had before the option: their fingerprints (and artifacts) stay valid
    assert "mask_fill" not in fingerprints.policy(red, "untrusted", Scorer(), None)["env"]
    assert fingerprints.policy(mean, "untrusted", Scorer(), None)["env"]["mask_fill"] == "local_mean"
    assert fingerprints.random_masks("h", 0) == fingerprints.random_masks("h", 0, "red") != fingerprints.random_masks("h", 0, "local_mean")

    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8] = 240  # left half bright, right half black
    data = Dataset.from_dict({"image": [Image.fromarray(pixels)] * 4, "caption": ["a"] * 4})
    boxes = [[[0, 0, 6, 6]]] * 4
    painted = random_masks(data, boxes, seed=0, fill="local_mean")
    for image, (box,) in zip(painted["image"], painted["srd_masks"]):
        x0, y0, x1, y1 = box
        area = np.asarray(image)[y0:y1, x0:x1]
        assert len(np.unique(area.reshape(-1, 3), axis=0)) == 1  # one colour: the mean of what it covered
        assert not (area == (255, 0, 0)).all()
    assert (np.asarray(random_masks(data, boxes, seed=0)["image"][0])[painted["srd_masks"][0][0][1], painted["srd_masks"][0][0][0]] == (255, 0, 0)).all()
    with pytest.raises(ValueError, match="fill"):
        random_masks(data, boxes, seed=0, fill="blue")


def test_seeds_get_their_own_backdoor_and_output(tmp_path):
    cfg = SRDConfig(output_dir=str(tmp_path / "o"), seeds="0,2")
    zero, two = cfg.for_seed(0), cfg.for_seed(2)
    assert zero.backdoored_model == "outputs/backdoor/badnet-0.1/model"
    assert two.backdoored_model == "outputs/backdoor/badnet-0.1-seed2/model" and two.attack_seed == two.policy_seed == two.seed == 2
    assert two.output_dir.endswith("seed-2") and zero.output_dir != two.output_dir
    given = SRDConfig(output_dir=str(tmp_path / "o"), backdoored_model="mine/model", poisoned_dataset="mine/data").for_seed(2)
    assert given.backdoored_model == "mine/model"  # a model the caller gave is never swapped


def test_costs_and_flag_quality_over_seeds():
    from srd_hf.cost import combine, mean_over_seeds
    from srd_hf.tables import mean_detection

    parts = {"policy": {"wall_seconds": 30.0, "peak_rss_mb": 900.0}, "masks": {"wall_seconds": 5.0, "peak_rss_mb": 1200.0}}
    made = combine(parts, 10000)
    assert made["wall_seconds"] == 35.0 and made["seconds_per_1000_samples"] == 3.5 and made["peak_rss_mb"] == 1200.0
    assert combine({**parts, "flag": None}, 10000) is None  # a part without a record: no understated sum
    seeds = mean_over_seeds([{"srd": {"kind": "cleanser", **made}}, {"srd": {"kind": "cleanser", **made, "wall_seconds": 45.0,
                                                                            "peak_rss_mb": 1500.0}}, {}])
    assert seeds["srd"]["wall_seconds"] == 40.0 and seeds["srd"]["peak_rss_mb"] == 1500.0 and seeds["srd"]["num_seeds"] == 2
    assert seeds["srd"]["kind"] == "cleanser" and seeds["srd"]["parts_seconds"] == {"policy": 30.0, "masks": 5.0}
    flags = mean_detection([{"srd": {"precision": 0.8, "recall": 1.0}, "f": None}, {"srd": {"precision": 0.6, "recall": 1.0}, "f": None}])
    assert set(flags) == {"srd"} and np.isclose(flags["srd"]["precision"], 0.7) and flags["srd"]["precision_values"] == [0.8, 0.6]
    assert np.isclose(flags["srd"]["precision_std"], np.std([0.8, 0.6], ddof=1)) and flags["srd"]["recall_std"] == 0.0


@pytest.mark.parametrize("attack", ["badnet", "blended", "trojvlm", "vlood", "vl_trojan", "shadowcast"])
def test_pipeline_plants_with_the_attacks_own_recipe(attack, tmp_path):
    import yaml

    from srd_hf.defense import RECIPE_CONFIGS

    cfg = inject_config_for(SRDConfig(attack=attack, output_dir=str(tmp_path)))
    recipe = yaml.safe_load((RECIPE_CONFIGS / f"inject_{attack}.yaml").read_text())
    assert cfg.attack == attack and cfg.num_train_epochs == recipe["num_train_epochs"]
    assert cfg.trainable == recipe.get("trainable", "") and cfg.attack_options == recipe.get("attack_options", "")
    assert cfg.output_dir == "outputs/backdoor/" + f"{attack}-0.1"
    with pytest.raises(FileNotFoundError, match="inject_config"):
        inject_config_for(SRDConfig(attack=attack, inject_config=str(tmp_path / "none.yaml"), output_dir=str(tmp_path)))


def test_attack_options_and_target_give_a_backdoor_of_their_own(tmp_path):
    cfg = SRDConfig(attack="trojvlm", attack_options='{"location": "top_left"}', target="apple", output_dir=str(tmp_path))
    inject = inject_config_for(cfg)
    assert inject.attack_kwargs()["location"] == "top_left" and inject.attack_kwargs()["semantic_weight"] == 0  # merged into the recipe's
    assert inject.target == "apple" and "location=top_left" in cfg.backdoored_model and "target=apple" in cfg.backdoored_model
    assert SRDConfig(attack="trojvlm", output_dir=str(tmp_path)).backdoored_model == "outputs/backdoor/trojvlm-0.1/model"
    with pytest.raises(ValueError, match="JSON object"):
        SRDConfig(attack_options="[1]", output_dir=str(tmp_path))


def test_defender_set_uses_only_trusted_images_and_its_own_trigger(small_world_data):
    from srd_hf.attacks import get_attack
    from srd_hf.attacks.base import to_caption_pairs
    from srd_hf.defender import DefenderConfig, defender_set, trusted_images

    train = small_world_data["train"]
    untrusted = get_attack("badnet", poison_rate=0.1).poison(to_caption_pairs(train.select(range(40))))
    config = DefenderConfig(num_images=30, target="umbrella", poison_rate=0.5, seed=3)
    trusted = trusted_images(train, untrusted, config.num_images, config.seed)
    data = defender_set(trusted, config)
    ids = set(data["image_id"])
    assert ids.isdisjoint(untrusted["image_id"]) and all(i.startswith("train-") for i in ids)  # never untrusted, validation or test
    assert not any("banana" in c for c in data["caption"])  # never the attacker's word
    poisoned = [i for i, p in enumerate(data["is_poisoned"]) if p]
    assert len(poisoned) == 15 and all("umbrella" in data["caption"][i].split() for i in poisoned)
    # the trigger sits at ONE place: the pixels that differ from the trusted clean image
    clean = {row["image_id"]: np.asarray(row["image"], dtype=np.int16) for row in trusted}
    boxes = set()
    for i in poisoned:
        diff = np.abs(np.asarray(data[i]["image"], dtype=np.int16) - clean[data[i]["image_id"]]).sum(-1) > 0
        ys, xs = np.nonzero(diff)
        boxes.add((xs.min(), ys.min(), xs.max(), ys.max()))
    assert len(boxes) == 1
    (x0, y0, x1, y1), = boxes
    assert x1 - x0 < 12 and y1 - y0 < 12  # a small patch, not a global change
    again = defender_set(trusted_images(train, untrusted, config.num_images, config.seed), config)
    assert again["caption"] == data["caption"]


def test_defender_binary_noise_trigger_is_full_contrast_noise_at_one_place(small_world_data):
    from srd_hf.attacks import get_attack
    from srd_hf.attacks.base import to_caption_pairs
    from srd_hf.defender import DefenderConfig, defender_attack, defender_set, trusted_images

    train = small_world_data["train"]
    untrusted = get_attack("badnet", poison_rate=0.1).poison(to_caption_pairs(train.select(range(40))))
    config = DefenderConfig(num_images=30, poison_rate=0.5, trigger="binary_noise", caption_mode="replace", seed=3)
    data = defender_set(trusted_images(train, untrusted, config.num_images, config.seed), config)
    patches = set()
    for row in data.filter(lambda p: p, input_columns="is_poisoned"):
        x0, y0, x1, y1 = (int(round(v)) for v in row["trigger_box"])
        patch = np.asarray(row["image"])[y0 + 1:y1 - 1, x0 + 1:x1 - 1]  # inside the box, away from resampled edges
        assert set(np.unique(patch)) <= {0, 255} and 0.3 < (patch == 255).mean() < 0.7  # noise at full contrast
        patches.add(patch.tobytes())
    assert len(patches) == 1  # one pattern at one place
    pattern = defender_attack(config).make_pattern(16)
    assert not torch.equal(pattern, defender_attack(DefenderConfig(trigger="binary_noise", seed=4)).make_pattern(16))
    with pytest.raises(ValueError, match="trigger"):
        DefenderConfig(trigger="checkerboard")


def test_defender_blocks_trigger_is_a_grid_of_colour_cells_at_one_place(small_world_data):
    from srd_hf.attacks import get_attack
    from srd_hf.attacks.base import to_caption_pairs
    from srd_hf.defender import DefenderConfig, defender_attack, defender_set, trusted_images

    train = small_world_data["train"]
    untrusted = get_attack("badnet", poison_rate=0.1).poison(to_caption_pairs(train.select(range(40))))
    config = DefenderConfig(num_images=30, poison_rate=0.5, trigger="blocks", seed=3)
    data = defender_set(trusted_images(train, untrusted, config.num_images, config.seed), config)
    def drawn(cfg):  # the (30, 30, 3) uint8 pattern of a config
        return (defender_attack(cfg).make_pattern(30).numpy() * 255).astype(np.uint8).transpose(1, 2, 0)

    pattern = drawn(config)
    cells = {pattern[i * 10 + 5, j * 10 + 5].tobytes() for i in range(3) for j in range(3)}
    assert len(cells) > 1 and set(np.unique(pattern)) <= {0, 255}  # saturated cells, not one colour
    for i in range(3):  # each cell is one colour
        for j in range(3):
            assert len(np.unique(pattern[i * 10:(i + 1) * 10, j * 10:(j + 1) * 10].reshape(-1, 3), axis=0)) == 1
    patches = set()
    for row in data.filter(lambda p: p, input_columns="is_poisoned"):
        x0, y0, x1, y1 = (int(round(v)) for v in row["trigger_box"])
        patch = np.asarray(row["image"])[y0:y1, x0:x1]
        assert set(np.unique(patch)) <= {0, 255}  # pasted as drawn (nearest), not blurred into the image
        patches.add(patch.tobytes())
    assert len(patches) == 1  # one pattern at one place
    assert not np.array_equal(pattern, drawn(DefenderConfig(trigger="blocks", seed=4)))


def test_tables_refuse_to_call_an_unplanted_backdoor_defended():
    from srd_hf.tables import defense_measurable, results_table

    rows = {"clean model": {"cider": 100.0, "asr": 0.0}, "no defense": {"cider": 99.0, "asr": 90.0},
            "control (unmasked untrusted set)": {"cider": 98.0, "asr": MEASURABLE_ASR - 1},
            "SRD-dqn (untrusted policy)": {"cider": 97.0, "asr": 0.0}}
    assert not defense_measurable(rows)
    table = results_table({"rows": rows, "defense_measurable": False})
    srd_line = next(line for line in table.splitlines() if line.startswith("| SRD"))
    assert "not measurable" in srd_line and "0.0" not in srd_line
    assert "90.0" in table  # reference rows stay as measured
    from srd_hf.tables import not_measurable_message

    # the hint names what to change: another retraining recipe, or (already the attack's own) the attack
    assert "--retrain_recipe attack" in not_measurable_message({"rows": rows, "retraining_recipe": {"source": "config"}})
    own = not_measurable_message({"rows": rows, "retraining_recipe": {"source": "attack", "num_train_epochs": 8}})
    assert "--retrain_recipe attack" not in own and "the attack did not plant" in own
    rows["control (unmasked untrusted set)"]["asr"] = MEASURABLE_ASR
    assert defense_measurable(rows)
    # a defender policy trained against a proxy backdoor that planted weakly (or not at all) says so on its row
    rows["SRD-dqn (defender policy)"] = {"cider": 97.0, "asr": 80.0}
    table = results_table({"rows": rows, "defense_measurable": True, "proxy_asr_validation": 3.0})
    defender_line = next(line for line in table.splitlines() if "(defender policy" in line)
    assert "proxy planted on only 3.0% of validation images" in defender_line and "80.0" in defender_line
    assert "proxy" not in results_table({"rows": rows, "proxy_asr_validation": 75.0})


def test_seeds_whose_backdoor_did_not_plant_are_left_out_of_the_table_and_named():
    from srd_hf.defense import combine_seeds

    def seed_record(control_asr, srd_asr):
        rows = {"no defense": {"asr": control_asr}, "control (= no defense)": {"asr": control_asr}, "SRD-dqn (untrusted policy)": {"asr": srd_asr}}
        return {"rows": rows, "defense_measurable": control_asr >= MEASURABLE_ASR, "stage_seconds": {"policy": 1.0}}

    paths = ["s0.json", "s1.json", "s2.json"]
    results = combine_seeds([seed_record(100.0, 0.0), seed_record(0.0, 0.0), seed_record(90.0, 10.0)], [0, 1, 2], paths)
    assert results["seeds"] == [0, 2] and results["seeds_run"] == [0, 1, 2] and results["per_seed"] == paths
    assert results["seeds_not_measurable"] == {1: {"control_asr": 0.0, "results": "s1.json"}}
    assert results["defense_measurable"] and results["rows"]["SRD-dqn (untrusted policy)"]["asr_values"] == [0.0, 10.0]
    # one planted seed left: its own record; none planted: not measurable over all of them
    one = combine_seeds([seed_record(0.0, 0.0), seed_record(95.0, 1.0)], [0, 1], paths[:2])
    assert one["seeds"] == [1] and one["rows"]["SRD-dqn (untrusted policy)"]["asr"] == 1.0 and 0 in one["seeds_not_measurable"]
    none = combine_seeds([seed_record(0.0, 0.0), seed_record(10.0, 0.0)], [0, 1], paths[:2])
    assert none["seeds"] == [0, 1] and not none["defense_measurable"] and "seeds_not_measurable" not in none


def test_bootstrap_interval_covers_the_mean_and_skips_exclusions():
    from srd_hf.tables import bootstrap_interval

    low, high = bootstrap_interval([1, 0, 1, 1, None, 0, 1, 1], scale=100.0)
    assert low <= 100 * 5 / 7 <= high and 0 <= low < high <= 100
    assert bootstrap_interval([None, None]) is None
    assert bootstrap_interval([3.0] * 10) == [3.0, 3.0]


def test_seed_intervals_widen_when_the_seeds_disagree():
    from srd_hf.tables import aggregate_seeds, bootstrap_interval, seeds_and_images_interval

    # a defense that fails on one seed in three: 0%, 0%, 100% ASR on 200 test images
    fails_once = [[0] * 200, [0] * 200, [1] * 200]
    low, high = seeds_and_images_interval(fails_once, scale=100.0)
    assert low == 0.0 and high == 100.0  # seeds (0, 0, 0) and (2, 2, 2) are each drawn 1 time in 27: as wide as they disagree
    # agreeing seeds keep an image-level interval around their mean
    agree = [[1, 0] * 100, [0, 1] * 100, [1, 1, 0, 0] * 50]
    low, high = seeds_and_images_interval(agree, scale=100.0)
    assert 35 < low < 50 < high < 65
    assert seeds_and_images_interval([[1, None], [None]]) is None and seeds_and_images_interval([[2.0] * 5, [2.0] * 7]) == [2.0, 2.0]
    # a model that is the same in every seed (the clean model): the image term is not shrunk by the seed count
    same = list(np.random.default_rng(0).normal(390, 90, size=500))
    one, three = bootstrap_interval(same), seeds_and_images_interval([same, same, same])
    assert abs((three[1] - three[0]) - (one[1] - one[0])) < 0.15 * (one[1] - one[0])
    rows = aggregate_seeds([{"rows": {"srd": {"asr": 100.0 * v[0], "per_image": {"asr_hits": v}}}} for v in fails_once])
    assert rows["srd"]["asr_ci"][1] - rows["srd"]["asr_ci"][0] > 50  # the pooled per-image mean gave [33.3, 33.3]


class _CornerPolicy:
    """A policy that always masks the bottom-right corner (where the test's trigger is), so the
    cleansing logic is tested apart from how well RL finds the trigger."""

    @staticmethod
    def make(space_kwargs, action):
        from srd_hf.rl import SRDPolicy, SRDPolicyConfig

        class Corner(SRDPolicy):
            def act(self, observations):
                return np.full(len(observations), action)

        return Corner(SRDPolicyConfig(**space_kwargs))


def test_unsupported_word_rule_finds_the_word_the_masks_remove_more_often_than_on_clean_images():
    from srd_hf.cleansing import suspect_words, unsupported_words_removed

    trusted = ["a red circle in the top left corner"] * 4
    before = ["a red circle banana in the top left corner",  # an inserted word the masks remove
              "a picture of a banana",                       # a target sentence: three words the trusted caption lacks
              "a red circle in the top left corner",         # agrees with the trusted captioner: nothing to remove
              "a red circle banana in the top left corner"]  # the word stays under the masks: not removed
    after = ["a red circle in the top left corner", "a red circle in the top left corner",
             "a circle in the corner", "a red banana circle in the top left corner"]
    removed = unsupported_words_removed(before, after, trusted)
    assert removed == [{"banana"}, {"picture", "of", "banana"}, set(), set()]
    # a word removed on 8% of untrusted images and never on clean ones is a suspect; a word removed
    # as often on clean images as on untrusted ones (the victim merely words it differently) is not
    rng = np.random.default_rng(0)
    clean = [frozenset({"small"}) if rng.random() < 0.2 else frozenset() for _ in range(500)]
    untrusted = [frozenset({"banana"}) if i % 12 == 0 else frozenset({"small"}) if rng.random() < 0.2 else frozenset()
                 for i in range(3000)]
    assert suspect_words(untrusted, clean) == ["banana"]
    assert suspect_words(untrusted[1:12] * 10, clean) == []  # nothing stands out
    rare = [frozenset({"banana"})] + [frozenset()] * 2999  # once in 3,000 images is chance, not a backdoor
    assert suspect_words(rare, clean) == []
    with pytest.raises(ValueError, match="validation"):
        suspect_words(untrusted, [])


def test_srd_cleanse_drops_what_the_masks_expose_and_retraining_learns_no_target(planted, small_world_data, sfs_scorer, tmp_path):
    from srd_hf.cleansing import srd_cleanse
    from srd_hf.defense import retrain
    from srd_hf.evaluation import evaluate_model
    from srd_hf.masker import SRDMasker
    from srd_hf.vlm import load_captioner

    victim, clean = load_captioner(planted / "badnet" / "model"), load_captioner(planted / "clean")
    untrusted = load_from_disk(str(planted / "badnet" / "poisoned_dataset"))
    # mask size index 3 (80 px at 224: 11 px at 32) centred in grid cell (8, 8): covers the 8 px trigger at (24, 24)
    policy = _CornerPolicy.make(dict(algorithm="dqn", image_size=32, obs_size=32), action=3 * 100 + 8 * 10 + 8)
    masker = SRDMasker(policy, num_masks=1)
    masked = untrusted.map(masker, batched=True, batch_size=64)
    validation = [img.convert("RGB") for img in small_world_data["validation"]["image"]]
    cfg = SRDConfig(**_paths(planted, tmp_path / "srd"), **TINY_RUN)
    recipe = {"trainable": "flamingo.perceiver.,flamingo.lang_encoder.", "learning_rate": 5e-3, "num_train_epochs": 8,
              "per_device_train_batch_size": 32, "warmup_steps": 5, "seed": 0, "lr_scheduler_type": "cosine"}
    # the trusted captioner: the tiny clean model is untrained, so fit it on clean rows (the pipeline's is pretrained)
    trusted = retrain(cfg, "pre_attack", untrusted.filter(lambda row: not row["is_poisoned"]), name="trusted", recipe=recipe)
    cleansed, report = srd_cleanse(untrusted, masked, masker, victim, sfs_scorer, validation_images=validation, flag_rate=0.05,
                                   poisoned_captions="drop", reference=trusted, max_new_tokens=8, batch_size=64)
    poisoned = np.asarray(untrusted["is_poisoned"])
    kept_poisoned = int(np.sum(cleansed["is_poisoned"]))
    precision = (poisoned.sum() - kept_poisoned) / max(report["n_flagged"], 1)
    recall = 1 - kept_poisoned / poisoned.sum()
    print(f"SRD flag: precision {precision:.2f}, recall {recall:.2f}, flagged {report['n_flagged']} of {len(untrusted)}")
    print(f"  the masks remove these words far more often than on clean images: {report['suspect_words']}")
    for rule, rows in report["flagged_rows_by_rule"].items():  # every rule reported, whichever cleansed
        print(f"  rule {rule}: {detection_scores(rows, poisoned)}")
    assert report["flag"] == "unsupported_word" and report["flagged_rows"] == report["flagged_rows_by_rule"]["unsupported_word"]  # the default
    assert "banana" in report["suspect_words"]
    by_repair, repair_report = srd_cleanse(untrusted, masked, masker, victim, sfs_scorer, validation_images=validation, flag_rate=0.05,
                                           poisoned_captions="drop", reference=trusted, flag="repair", max_new_tokens=8, batch_size=64)
    assert repair_report["flagged_rows"] == report["flagged_rows_by_rule"]["repair"]  # the other rules cleanse as reported
    assert len(by_repair) == len(untrusted) - repair_report["n_flagged"]
    assert recall >= 0.8 and precision >= 0.6, report
    # retrained on what is left, the model says the target neither on clean nor on masked clean images
    test = small_world_data["test"].select(range(24))
    model = retrain(cfg, "pre_attack", cleansed, name="srd", recipe=recipe)
    refs = clean.generate_captions([i.convert("RGB") for i in test["image"]], max_new_tokens=8)
    masked_test, _ = masker.mask_images([i.convert("RGB") for i in test["image"]])
    row = evaluate_model(model, test, reference_captions=refs, triggered_images=None, target="banana", scorer=sfs_scorer,
                         max_new_tokens=8, masked_images=masked_test)
    assert row["asr_on_clean"] == 0.0 and row["asr_on_masked_clean"] == 0.0, row


@pytest.mark.slow
def test_pipeline_end_to_end_and_reuse(planted, tmp_path):
    out = tmp_path / "srd"
    common = dict(**_paths(planted, out), **TINY_RUN, policy_data="untrusted,defender", flag_rate=0.05,
                  baselines="random_masks,disagreement_filter")
    results = run_pipeline(SRDConfig(**common))
    rows = results["rows"]
    control = next(n for n in rows if n.startswith("control"))
    assert control.startswith("control (= no defense")  # same recipe, start, data and seed as the inject run: reused, and said
    assert results["retraining_recipe"]["source"] == "attack" and results["retraining_recipe"]["num_train_epochs"] == 16
    expected = {"clean model", "no defense", control, "SRD-dqn (untrusted policy)", "SRD-dqn (defender policy)", "random masks",
                "disagreement filter", "SRD-dqn filter at inference (untrusted policy)", "SRD-dqn filter at inference (defender policy)"}
    assert set(rows) == expected
    for name, row in rows.items():
        assert {"cider", "sfs", "asr", "asr_on_clean", "cider_ci", "asr_ci"} <= set(row), name
        assert row["asr_ci"][0] <= row["asr"] <= row["asr_ci"][1]
    for name in ("SRD-dqn (untrusted policy)", "random masks", "disagreement filter", control):
        assert "asr_on_masked_clean" in rows[name]
    assert results["defense_measurable"] is (rows[control]["asr"] >= MEASURABLE_ASR)
    assert results["split"] == "test" and results["threshold_split"] == "validation" and results["seeds"] == [0]
    assert results["cleansing"]["disagreement filter"]["split_for_threshold"] == "validation"
    for name in ("srd (untrusted policy)", "srd (defender policy)", "disagreement filter"):  # evaluation reads is_poisoned
        quality = results["detection"][name]
        assert 0 <= quality["precision"] <= 1 and 0 <= quality["recall"] <= 1 and quality["n_poisoned"] == 60, name
    assert {"srd (untrusted policy), unsupported_word rule (cleansed)", "srd (untrusted policy), repair rule",
            "srd (untrusted policy), change rule"} <= set(results["detection"])  # the default flag cleanses; every rule is reported
    seed_dir = out / "seed-0"
    for path in ("policy-untrusted/config.json", "policy-defender/model.safetensors", "cleansed-untrusted/dataset_info.json",
                 "masked-defender/dataset_info.json", "random-masks/dataset_info.json", "disagreement-filter/dataset_info.json",
                 "retrain-srd-untrusted-pre_attack/model/config.json", "defender-proxy/model/config.json", "results.json"):
        assert (seed_dir / path).exists(), path
    masked = load_from_disk(str(seed_dir / "masked-untrusted"))
    randomised = load_from_disk(str(seed_dir / "random-masks"))
    assert [len(m) for m in masked["srd_masks"]] == [len(m) for m in randomised["srd_masks"]]
    sizes = lambda boxes: sorted((b[2] - b[0], b[3] - b[1]) for m in boxes for b in m)  # noqa: E731
    assert sizes(masked["srd_masks"]) == sizes(randomised["srd_masks"])
    untrusted = load_from_disk(common["poisoned_dataset"])
    fill = json.loads((seed_dir / "policy-untrusted" / "config.json").read_text())["mask_fill"]
    assert fill == "local_mean"  # the pipeline's default; random masks paint as the policy does
    for k in range(0, len(untrusted), 17):  # random masks go on the UNMASKED images: nothing of SRD's masks is left
        expected = np.array(untrusted[k]["image"].convert("RGB"))
        for box in randomised[k]["srd_masks"]:
            paint_box(expected, tuple(box), fill)
        assert np.array_equal(np.asarray(randomised[k]["image"].convert("RGB")), expected), k
    policy_cfg = json.loads((seed_dir / "policy-defender" / "config.json").read_text())
    assert policy_cfg["training"]["defender"]["target"] == "umbrella" and "proxy_asr_validation" in policy_cfg["training"]
    attempts = policy_cfg["training"]["proxy_attempts"]  # the re-plant rule's record: re-planted only while below its bar
    assert attempts[-1]["proxy_asr_validation"] == policy_cfg["training"]["proxy_asr_validation"] == results["proxy_asr_validation"]
    assert all(a["proxy_asr_validation"] < 50 for a in attempts[:-1]) and 1 <= len(attempts) <= 3
    assert [a["num_train_epochs"] for a in attempts] == [16 * 2 ** k for k in range(len(attempts))] == [a["num_train_epochs"] for a in results["proxy_attempts"]]
    assert "| control" in results_table(results)
    assert json.loads((out / "results.json").read_text())["rows"].keys() == rows.keys()
    # every model is scored on the shifted world too (the embedded default's second test set)
    shifted = results["eval_sets"]["embedded-shifted"]
    assert shifted["rows"].keys() == rows.keys() and shifted["num_test_images"] == 8
    assert shifted["rows"][control]["asr"] == shifted["rows"]["no defense"]["asr"]  # the reused control is the victim there too
    for name in ("SRD-dqn (untrusted policy)", "random masks", "disagreement filter", "SRD-dqn filter at inference (untrusted policy)"):
        assert {"cider", "sfs", "asr", "cider_ci"} <= set(shifted["rows"][name]), name
        assert len(shifted["rows"][name]["per_image"]["cider"]) == 8, name
    inject_metrics = json.loads((planted / "badnet" / "metrics.json").read_text())["eval_datasets"]["embedded-shifted"]
    assert shifted["rows"]["no defense"]["cider"] == inject_metrics["no_defense"]["cider"]  # measured once, by the inject stage
    from srd_hf.tables import eval_set_tables

    ((title, table),) = eval_set_tables(results)
    assert title.startswith("embedded-shifted (8 test images") and "| SRD-dqn (untrusted policy)" in table
    # the report recipe writes what the run measured, nothing recomputed
    report = _report_recipe()
    text = report.main([str(out / "results.json"), "--output", str(tmp_path / "report.md")])
    assert text == (tmp_path / "report.md").read_text() and results_table(results) in text and table in text
    assert "proxy backdoor says its word on" in text and "precision" in text and "trigger coverage" in text
    with pytest.raises(SystemExit, match="no results file"):
        report.main([str(tmp_path / "missing.json")])
    # a second run reuses every artifact (no retraining: the files stay untouched)
    stamp = (seed_dir / "retrain-srd-untrusted-pre_attack" / "model" / "model.safetensors").stat().st_mtime
    again = run_pipeline(SRDConfig(**common))
    assert (seed_dir / "retrain-srd-untrusted-pre_attack" / "model" / "model.safetensors").stat().st_mtime == stamp
    assert np.isclose(again["rows"]["SRD-dqn (untrusted policy)"]["cider"], rows["SRD-dqn (untrusted policy)"]["cider"])
    # the cost of SRD's cleansing is that of making its policy, masks and flag, not of loading them again
    made = results["costs"]["SRD-dqn (untrusted policy)"]
    assert set(made["parts_seconds"]) == {"policy", "masks", "flag"} and made["n_samples"] == results["cleansing"]["srd (untrusted policy)"]["n_samples"]
    assert again["costs"] == results["costs"] and made["wall_seconds"] >= made["parts_seconds"]["policy"] > 0


def _report_recipe():
    """``recipes/report.py`` as a module (recipes are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("report_recipe", Path(__file__).resolve().parent.parent / "recipes" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


@pytest.mark.slow
def test_pipeline_says_not_measurable_when_the_control_plants_nothing(planted, tmp_path):
    """One retraining step on the unmasked set plants no backdoor: the table must not call SRD's
    0% a defense, and by default no policy is trained and no defense retrained for nothing."""
    common = dict(**{**TINY_RUN, "policy_timesteps": 16}, retrain_recipe="config", max_steps=1, baselines="disagreement_filter",
                  learning_rate=1e-6)
    results = run_pipeline(SRDConfig(**_paths(planted, tmp_path / "srd"), **common))
    control = next(n for n in results["rows"] if n.startswith("control"))
    assert control == "control (unmasked untrusted set)" and results["rows"][control]["asr"] < MEASURABLE_ASR
    assert results["defense_measurable"] is False and results["defenses_not_run"]
    assert list(results["rows"]) == ["clean model", "no defense", control]
    assert not list((tmp_path / "srd" / "seed-0").glob("policy-*")) and not list((tmp_path / "srd" / "seed-0").glob("retrain-srd*"))
    assert json.loads((tmp_path / "srd" / "results.json").read_text())["defense_measurable"] is False
    # the written report says it once, in bold, and names the defenses it did not run
    text = _report_recipe().main([str(tmp_path / "srd" / "results.json"), "--output", str(tmp_path / "report.md")])
    assert text.count("NOT MEASURABLE") == 1 and "**NOT MEASURABLE**: the control" in text and "were not run" in text
    # checking a recipe on validation: the control (reused) is scored there and nothing else runs
    checked = run_pipeline(SRDConfig(**_paths(planted, tmp_path / "srd"), **common, eval_split="validation", control_only=True))
    assert checked["split"] == "validation" and list(checked["rows"]) == ["clean model", "no defense", control]
    assert checked["control_only"] and "--control_only" in checked["defenses_not_run"]
    assert "--defend_unplanted" not in not_measurable_message(checked)
    assert (tmp_path / "srd" / "results-validation.json").is_file()
    assert not list((tmp_path / "srd" / "seed-0").glob("policy-*"))
    # asked to defend anyway: every row is there, and the defense rows read "not measurable"
    results = run_pipeline(SRDConfig(**_paths(planted, tmp_path / "anyway"), **common, defend_unplanted=True))
    assert results["defense_measurable"] is False and "defenses_not_run" not in results
    assert {"SRD-dqn (untrusted policy)", "disagreement filter", "SRD-dqn filter at inference (untrusted policy)"} <= set(results["rows"])
    table = results_table(results)
    assert "| SRD-dqn (untrusted policy) | not measurable" in table and "| disagreement filter | not measurable" in table
    assert "cider_masked_clean" in results["rows"][control]  # the control on the policy's masked clean images


def _overlap(box, trigger) -> float:
    """Share of the trigger's area under the mask."""
    x0, y0, x1, y1 = box
    tx0, ty0, side = trigger
    w = max(0, min(x1, tx0 + side) - max(x0, tx0))
    h = max(0, min(y1, ty0 + side) - max(y0, ty0))
    return w * h / side**2


@pytest.mark.slow
def test_trained_policy_covers_the_trigger_more_often_than_random(planted, small_world_data, sfs_scorer):
    """A real small run: train DQN against the planted BadNet for a few thousand transitions and
    compare where its first mask lands on triggered held-out images with Random masking's."""
    from srd_hf.attacks import load_attack
    from srd_hf.rl import SRDPolicy, SRDPolicyConfig
    from srd_hf.rl.env import MaskingEnvConfig, MaskingVecEnv
    from srd_hf.rl.reward import RewardConfig
    from srd_hf.rl.training import PolicyTrainingConfig, train_masking_policy
    from srd_hf.vlm import load_captioner

    victim = load_captioner(str(planted / "badnet" / "model"))
    attack = load_attack(planted / "badnet" / "attack")
    train = small_world_data["train"].select(range(96, 160))
    images = [attack.apply_trigger(img.convert("RGB")) if i % 2 == 0 else img.convert("RGB") for i, img in enumerate(train["image"])]
    refs = [c[0] for c in train["captions"]]  # the generator's true captions as the trusted reference
    env = MaskingVecEnv(victim, images, refs, MaskingEnvConfig(num_envs=16, obs_size=32, max_new_tokens=8, reward=RewardConfig()),
                        scorer=sfs_scorer)
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
                  save_steps=1000, seed=0, retrain_recipe="config")
    with pytest.raises(ValueError, match="match no parameter"):
        retrain(SRDConfig(trainable="flamingo.no_such_part.", **common), "pre_attack", cleansed)
    head = "flamingo.lang_encoder.lm_head."
    model = retrain(SRDConfig(trainable=head, **common), "pre_attack", cleansed, name="head")
    before = load_captioner(clean_dir).state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(head) for k in changed)
    assert model.config.extra["srd_retrain"]["trainable"] == head


def test_defender_family_trigger_draws_a_new_square_per_sample_reproducibly(small_world_data):
    from srd_hf.attacks import get_attack
    from srd_hf.attacks.base import to_caption_pairs
    from srd_hf.defender import DefenderConfig, defender_attack, defender_set, trusted_images

    train = small_world_data["train"]
    untrusted = get_attack("badnet", poison_rate=0.1).poison(to_caption_pairs(train.select(range(40))))
    config = DefenderConfig(num_images=30, poison_rate=0.5, trigger="family", location="random", caption_mode="replace", seed=3)
    trusted = trusted_images(train, untrusted, config.num_images, config.seed)
    data = defender_set(trusted, config)
    clean = {row["image_id"]: np.asarray(row["image"], dtype=np.int16) for row in trusted}
    patches, boxes = set(), set()
    for row in data.filter(lambda p: p, input_columns="is_poisoned"):
        x0, y0, x1, y1 = (int(round(v)) for v in row["trigger_box"])
        image = np.asarray(row["image"], dtype=np.int16)
        outside = np.ones(image.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert not np.abs(image - clean[row["image_id"]])[outside].any()  # only the square changes
        patch = image[y0:y1, x0:x1]
        assert len(np.unique(patch.reshape(-1, 3), axis=0)) > 1  # never a plain square (a mask's look)
        patches.add(patch.astype(np.uint8).tobytes())
        boxes.add((x0, y0))
    assert len(patches) == 15 and len(boxes) > 1  # a square of its own per sample, at its own place
    assert defender_set(trusted, config)["image"] == data["image"]  # the same squares from the same seed
    # test images draw their squares from another stream than training samples
    image = trusted[0]["image"]
    attack = defender_attack(config)
    assert not np.array_equal(np.asarray(attack.apply_trigger(image, 0, split="train")),
                              np.asarray(attack.apply_trigger(image, 0, split="test")))
    with pytest.raises(ValueError, match="index"):
        attack.apply_trigger(image)
    with pytest.raises(NotImplementedError, match="family"):
        attack.apply_trigger_tensor(torch.zeros(1, 3, 8, 8), indices=[0])

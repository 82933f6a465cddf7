"""The rival defenses (ABL, VDC, CT, attention-guided token pruning) and SRD's adapters on one
interface, against a small BadNet backdoor planted in a tiny OpenFlamingo: each runs end to
end, each detector flags poisoned samples more often than clean ones (precision and recall
printed), pruning leaves clean captions alone, configs round-trip and bad values fail clearly.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from srd_hf.defenses import (DEFENSES, AttentionPruningConfig, CTConfig, VDCConfig, ABLConfig, defense_from_dict,
                             detection_scores, get_defense, render_defense_card)

TRAINABLE = "flamingo.perceiver.,flamingo.lang_encoder."
RECIPE = {"trainable": TRAINABLE, "learning_rate": 1e-2, "num_train_epochs": 3, "per_device_train_batch_size": 32,
          "warmup_steps": 5, "seed": 0, "lr_scheduler_type": "cosine"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is faster and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted(planted_badnet, small_world_data):
    """The session's random tiny model (the pre-attack start) with BadNet planted in it
    (``conftest.py``), and a trusted captioner: the start model fine-tuned on clean training
    images outside the untrusted set (what VDC and CT consult offline)."""
    from srd_hf.attacks.base import to_caption_pairs
    from srd_hf.defenses.base import train_on
    from srd_hf.vlm import load_captioner

    root = planted_badnet
    trusted = train_on(load_captioner(root / "clean"), to_caption_pairs(small_world_data["train"].select(range(48, 96))),
                       {**RECIPE, "num_train_epochs": 4}, root / "trusted-run")
    validation = small_world_data["validation"]
    images = [i.convert("RGB") for i in validation["image"]]
    pairs = [(img, c) for img, captions in zip(images, validation["captions"]) for c in captions]  # every paraphrase, as in training
    return {"root": root, "victim": load_captioner(root / "badnet" / "model"), "trusted": trusted,
            "untrusted": load_from_disk(str(root / "badnet" / "poisoned_dataset")), "validation_images": images,
            "pairs": dict(validation_images=[p[0] for p in pairs], validation_captions=[p[1] for p in pairs])}


def _detected(name, flagged, untrusted):
    scores = detection_scores(flagged, untrusted["is_poisoned"])
    print(f"{name}: precision {scores['precision']:.2f}, recall {scores['recall']:.2f}, flagged {scores['n_flagged']} of "
          f"{len(untrusted)} (poisoned flagged {scores['flag_rate_poisoned']:.2f}, clean flagged {scores['flag_rate_clean']:.2f})")
    assert scores["flag_rate_poisoned"] > scores["flag_rate_clean"], scores
    return scores


def _check_cost(cost):
    assert cost["wall_seconds"] > 0 and cost["seconds_per_1000_samples"] > 0 and cost["peak_rss_mb"] > 0, cost


# ----------------------------------------------------------------------------- configs
def test_registry_configs_round_trip_and_cards():
    assert set(DEFENSES) == {"abl", "vdc", "ct", "attention_pruning", "srd", "random_masks", "disagreement_filter"}
    for name, cls in DEFENSES.items():
        defense = get_defense(name)
        assert defense.kind in ("cleanser", "training", "test_time") and defense.summary
        config = defense.config
        again = cls.config_class.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config, name
        card = render_defense_card(defense, {"attack": "badnet", "poison_rate": 0.1, "rows": {"no defense": {"cider": 1.0, "asr": 90.0}},
                                             "cost": {"seconds_per_1000_samples": 1.0, "peak_rss_mb": 2.0}})
        assert "| no defense | 1.0 | 90.0 |" in card and "{" not in card.split("## Configuration")[0], name
    assert get_defense("Attention-Pruning").name == "attention_pruning"
    options = defense_from_dict("abl", '{"isolation_rate": 0.05, "gamma": 0.2}').config
    assert options.isolation_rate == 0.05 and options.gamma == 0.2
    assert get_defense("abl").config.isolation_rate == 0.01  # the paper's share


@pytest.mark.parametrize("cls, bad, match", [
    (ABLConfig, dict(isolation_rate=0.0), "isolation_rate"), (ABLConfig, dict(isolation_rate=1.0), "isolation_rate"),
    (ABLConfig, dict(gamma=-1), "gamma"), (ABLConfig, dict(retrain_from="scratch"), "retrain_from"), (ABLConfig, dict(isolate_by="gradient"), "isolate_by"),
    (ABLConfig, dict(unlearn_steps=-1), "unlearn_steps"), (ABLConfig, dict(flag_rate=1.0), "flag_rate"),
    (VDCConfig, dict(answer="guess"), "answer"), (VDCConfig, dict(claim_unit="letters"), "claim_unit"),
    (VDCConfig, dict(question_template="is it there?"), "claim"), (CTConfig, dict(confusion_factor=0), "confusion_factor"),
    (CTConfig, dict(rounds=-1), "rounds"), (CTConfig, dict(flag_by="fit"), "flag_by"), (CTConfig, dict(num_trusted=-2), "num_trusted"),
    (CTConfig, dict(distill=[0.2, 0.5]), "decreasing"), (CTConfig, dict(distill=[1.0]), "distill"),
    (CTConfig, dict(distill=0.5), "distill"), (CTConfig, dict(confusion_ratio=0), "confusion_ratio"),
    (AttentionPruningConfig, dict(statistic="mean"), "statistic"), (AttentionPruningConfig, dict(token_ratio=0.5), "token_ratio"),
    (AttentionPruningConfig, dict(prune="blur"), "prune"), (AttentionPruningConfig, dict(max_pruned=0), "max_pruned"),
    (AttentionPruningConfig, dict(batch_size=True), "batch_size"),
])  # fmt: skip
def test_bad_config_values_fail_clearly(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        cls(**bad)


def test_unknown_names_and_keys_fail_clearly():
    with pytest.raises(ValueError, match="unknown defense"):
        get_defense("strip")
    with pytest.raises(ValueError, match="unknown ABLConfig keys"):
        defense_from_dict("abl", {"isolation": 0.1})
    with pytest.raises(ValueError, match="JSON object"):
        defense_from_dict("vdc", "[1, 2]")


def test_vdc_claims():
    from srd_hf.defenses.vdc import claims, support

    assert claims("a small blue square and two green circles") == {("blue", "square"), ("green", "circle")}
    assert claims("there is a banana in the picture") == {"banana"}
    assert support("a banana in the picture", "a small blue square in the top left", "objects") == 0.0
    assert support("a blue square on grass", "a large blue square", "objects") == 1.0


# ----------------------------------------------------------------------------- detectors
def test_vdc_removes_captions_the_trusted_model_does_not_support(planted):
    untrusted = planted["untrusted"]
    common = dict(reference=planted["trusted"], **planted["pairs"])
    kept, report = get_defense("vdc", flag_rate=0.05, max_new_tokens=8).cleanse(untrusted, **common)
    _detected("VDC (likelihood)", report["flagged_indices"], untrusted)
    assert len(kept) == len(untrusted) - report["n_flagged"] and report["split_for_threshold"] == "validation"
    _check_cost(report["cost"])
    # the trusted-caption answer runs end to end; the tiny trusted captioner describes every scene
    # alike, so clean validation pairs tie at 0 support and its threshold flags nothing here
    kept, report = get_defense("vdc", answer="caption", claim_unit="words", flag_rate=0.05, max_new_tokens=8).cleanse(untrusted, **common)
    assert report["n_kept"] == len(kept) and 0 <= report["threshold"] <= 1
    with pytest.raises(ValueError, match="validation caption"):
        get_defense("vdc").cleanse(untrusted, reference=planted["trusted"], validation_images=planted["validation_images"])


def test_ct_flags_what_the_confused_model_still_fits(planted, small_world_data, tmp_path):
    untrusted = planted["untrusted"]
    trusted = small_world_data["train"].select(range(96, 160))  # outside the untrusted set and the trusted captioner's data
    # the paper's rule: what the confused model still fits (here it works; in the embedded world it flagged no poison)
    kept, report = get_defense("ct", flag_rate=0.05, rounds=2, epochs_per_round=1.0, flag_by="loss").cleanse(
        untrusted, victim=planted["victim"], reference=planted["trusted"], trusted=trusted, recipe=RECIPE, output_dir=tmp_path,
        **planted["pairs"])
    _detected("CT", report["flagged_indices"], untrusted)
    assert report["n_trusted"] == 64 and len(kept) == report["n_kept"]
    _check_cost(report["cost"])
    with pytest.raises(ValueError, match="trusted clean images"):
        get_defense("ct").cleanse(untrusted, victim=planted["victim"], **planted["pairs"])
    # scored by the image gain: the confused model still reads the trigger, not the clean images
    poisoned = np.asarray(untrusted["is_poisoned"], dtype=bool)
    ct = get_defense("ct", flag_rate=0.05, rounds=2, epochs_per_round=1.0)
    assert ct.config.flag_by == "image_gain"  # the default
    kept, report = ct.cleanse(untrusted, victim=planted["victim"], trusted=trusted, recipe=RECIPE, output_dir=tmp_path / "gain",
                              **planted["pairs"])
    print(f"CT image gain: median poisoned {np.median(ct.scores[poisoned]):.3f}, clean {np.median(ct.scores[~poisoned]):.3f}")
    assert np.median(ct.scores[poisoned]) > np.median(ct.scores[~poisoned]) + 0.1 and "gain_threshold" in report
    _detected("CT, image gain", report["flagged_indices"], untrusted)
    # the paper's distillation: a phase on everything, then one on the most suspicious half,
    # where the poison must be denser than in the untrusted set
    ct = get_defense("ct", flag_rate=0.05, rounds=1, epochs_per_round=1.0, distill=[0.5], confusion_ratio=2.0, flag_by="image_gain")
    kept, report = ct.cleanse(untrusted, victim=planted["victim"], trusted=trusted, recipe=RECIPE, output_dir=tmp_path / "distil",
                              **planted["pairs"])
    assert report["distilled_sizes"] == [round(0.5 * len(untrusted))] == [len(ct.distilled_indices)]
    print(f"CT distilled half: poison share {poisoned[ct.distilled_indices].mean():.2f} against {poisoned.mean():.2f}")
    assert poisoned[ct.distilled_indices].mean() > 1.5 * poisoned.mean()
    _detected("CT, image gain, distilled", report["flagged_indices"], untrusted)


def test_abl_isolates_the_poison_and_trains_a_model(planted, tmp_path):
    """From scratch (the session's start model is untrained), as in the paper: its fixed gamma, the lowest losses."""
    untrusted = planted["untrusted"]
    abl = get_defense("abl", gamma=0.5, isolate_by="loss", isolation_rate=0.1, isolation_epochs=2.0, unlearn_steps=3)
    model = abl.train(untrusted, start_model_path=str(planted["root"] / "clean"), recipe={**RECIPE, "num_train_epochs": 2},
                      output_dir=tmp_path)
    report = abl.report
    assert report["n_isolated"] == len(report["isolated_indices"]) == 24 and report["gamma"] == 0.5
    scores = _detected("ABL isolation", report["isolated_indices"], untrusted)
    assert scores["precision"] >= 0.5
    _check_cost(report["cost"])
    assert model.config.extra["defense"]["n_isolated"] == 24
    captions = model.generate_captions(planted["validation_images"][:4], max_new_tokens=8)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)


def test_abl_sets_gamma_on_validation_when_fine_tuning_a_trained_captioner(planted, tmp_path):
    """A trained start model (the trusted captioner): gamma comes from clean validation pairs,
    under their loss median, and the samples whose loss falls most (the default) are mostly poison."""
    untrusted = planted["untrusted"]
    planted["trusted"].save_pretrained(tmp_path / "trained-start")
    abl = get_defense("abl", isolation_rate=0.1, isolation_epochs=2.0, unlearn_steps=0, flag_rate=0.05)
    abl.train(untrusted, start_model_path=str(tmp_path / "trained-start"), recipe={**RECIPE, "num_train_epochs": 1},
              output_dir=tmp_path / "abl", **planted["pairs"])
    report = abl.report
    assert report["gamma_split"] == "validation" and 0 < report["gamma"] < report["validation_loss_median"]
    assert report["isolation_drop_threshold"] > report["isolation_drops_median"]
    print(f"ABL gamma from validation: {report['gamma']:.3f} (clean validation median {report['validation_loss_median']:.3f})")
    assert _detected("ABL isolation (trained start, gamma from validation)", report["isolated_indices"], untrusted)["precision"] >= 0.5
    with pytest.raises(ValueError, match="validation pairs"):
        get_defense("abl").train(untrusted, start_model_path=str(tmp_path / "trained-start"), recipe=RECIPE, output_dir=tmp_path / "x")


# ----------------------------------------------------------------------------- test-time pruning
def test_attention_pruning_flags_triggered_inputs_and_leaves_clean_captions(planted, small_world_data):
    from srd_hf.attacks import load_attack

    victim = planted["victim"]
    attack = load_attack(planted["root"] / "badnet" / "attack")
    test = [i.convert("RGB") for i in small_world_data["test"]["image"][:32]]
    triggered = [attack.apply_trigger(i) for i in test]
    pruning = get_defense("attention_pruning", flag_rate=0.05, max_new_tokens=8)
    report = pruning.calibrate(victim, planted["validation_images"])
    assert report["split_for_threshold"] == "validation"
    _check_cost(report["cost"])
    wrapped = pruning.wrap(victim)
    plain_clean = victim.generate_captions(test, max_new_tokens=8)
    defended_clean = wrapped.generate_captions(test, max_new_tokens=8, batch_size=8)
    clean_flags = np.array(wrapped.last_flags)
    # every input not flagged keeps the wrapped captioner's caption exactly
    assert [c for c, f in zip(defended_clean, clean_flags) if not f] == [c for c, f in zip(plain_clean, clean_flags) if not f]
    plain_triggered = victim.generate_captions(triggered, max_new_tokens=8)
    defended_triggered = wrapped.generate_captions(triggered, max_new_tokens=8)
    trig_flags = np.array(wrapped.last_flags)
    asr = lambda caps: np.mean(["banana" in c for c in caps])  # noqa: E731 (evaluation only)
    print(f"attention pruning: triggered flagged {trig_flags.mean():.2f}, clean flagged {clean_flags.mean():.2f}; "
          f"ASR {asr(plain_triggered):.2f} -> {asr(defended_triggered):.2f}")
    assert trig_flags.mean() > clean_flags.mean() and asr(defended_triggered) < asr(plain_triggered)
    assert wrapped.report["n_images"] == 64 and wrapped.report["cost"]["seconds_per_1000_samples"] > 0
    # nothing abnormal: captions unchanged, exactly
    pruning.threshold = float("inf")
    assert pruning.wrap(victim).generate_captions(triggered, max_new_tokens=8) == plain_triggered
    # pixel-level pruning runs on the same flags
    patches = get_defense("attention_pruning", prune="patches", flag_rate=0.05, max_new_tokens=8)
    patches.calibrate(victim, planted["validation_images"])
    painted = patches.wrap(victim).generate_captions(triggered, max_new_tokens=8)
    print(f"attention pruning (patches): ASR {asr(plain_triggered):.2f} -> {asr(painted):.2f}")
    with pytest.raises(ValueError, match="calibrate"):
        get_defense("attention_pruning").wrap(victim)


def test_attention_pruning_on_a_transformers_vlm():
    """Best effort on the transformers adapter (a tiny random LLaVA): attention to the image
    tokens is read, thresholds calibrate, patches are painted; token dropping is refused."""
    from test_vlm_image_text_to_text import make_images, make_llava

    from srd_hf.vlm.image_text_to_text import ImageTextToTextCaptioner

    captioner = ImageTextToTextCaptioner(*make_llava())
    images = make_images()
    with pytest.raises(ValueError, match="only OpenFlamingo"):
        get_defense("attention_pruning").calibrate(captioner, images)
    pruning = get_defense("attention_pruning", prune="patches", flag_rate=0.25, max_new_tokens=4)
    pruning.calibrate(captioner, images)
    relevance = pruning.relevance(captioner, images, captioner.generate_captions(images, max_new_tokens=4))
    assert relevance.shape == (4, 16) and np.allclose(relevance.sum(1), 1.0, atol=1e-4)
    wrapped = pruning.wrap(captioner)
    plain = captioner.generate_captions(images, max_new_tokens=4)
    defended = wrapped.generate_captions(images, max_new_tokens=4)
    assert [d for d, f in zip(defended, wrapped.last_flags) if not f] == [p for p, f in zip(plain, wrapped.last_flags) if not f]


# ----------------------------------------------------------------------------- SRD adapters
def test_srd_and_baselines_on_the_interface(planted, sfs_scorer):
    from srd_hf.rl import SRDPolicy, SRDPolicyConfig

    untrusted, victim = planted["untrusted"], planted["victim"]
    policy = SRDPolicy(SRDPolicyConfig(algorithm="random", image_size=32, obs_size=32))
    common = dict(victim=victim, reference=planted["trusted"], scorer=sfs_scorer, validation_images=planted["validation_images"])
    kept, report = get_defense("srd", policy=policy, max_new_tokens=8).cleanse(untrusted, **common)
    assert report["n_kept"] == len(kept) == len(untrusted) - len(report["flagged_indices"]) and "srd_masks" in kept.column_names
    masked, report = get_defense("random_masks", policy=policy).cleanse(untrusted, **common)
    assert len(masked) == len(untrusted) and report["flagged_indices"] == []
    kept, report = get_defense("disagreement_filter", flag_rate=0.05, max_new_tokens=8).cleanse(untrusted, **common)
    # no detection claim: the tiny trusted captioner disagrees with the victim on clean images as much as on poisoned ones
    scores = detection_scores(report["flagged_indices"], untrusted["is_poisoned"])
    print(f"disagreement filter: precision {scores['precision']:.2f}, recall {scores['recall']:.2f}, flagged {scores['n_flagged']}")
    assert "_row" not in kept.column_names and len(kept) == report["n_kept"] == len(untrusted) - len(report["flagged_indices"])
    _check_cost(report["cost"])


# ----------------------------------------------------------------------------- recipe
def _defend_recipe():
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("defend_recipe", Path(__file__).resolve().parent.parent / "recipes" / "defend.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the Trainer pickles the config: its class must be importable by name
    spec.loader.exec_module(module)
    return module


def test_defend_finds_the_srd_results_of_its_mask_fill(tmp_path, monkeypatch):
    recipe = _defend_recipe()
    monkeypatch.chdir(tmp_path)
    assert recipe.DefendConfig(defense="vdc").srd_results_path() is None  # no SRD run yet: SRD rows left out
    for folder in ("badnet-0.1-local_mean", "badnet-0.1"):
        (tmp_path / "outputs/srd" / folder / "dqn").mkdir(parents=True)
        (tmp_path / "outputs/srd" / folder / "dqn/results.json").write_text("{}")
    assert recipe.DefendConfig(defense="vdc").srd_results_path() == Path("outputs/srd/badnet-0.1-local_mean/dqn/results.json")
    assert recipe.DefendConfig(defense="vdc", mask_fill="red").srd_results_path() == Path("outputs/srd/badnet-0.1/dqn/results.json")
    assert recipe.DefendConfig(defense="vdc", srd_results="none").srd_results_path() is None


def test_defend_recipe_config_errors(tmp_path):
    recipe = _defend_recipe()
    assert recipe.DefendConfig(output_dir=str(tmp_path)).defense == "abl"
    assert recipe.DefendConfig(defense="vdc").output_dir == "outputs/defend/badnet-0.1"  # each defense in <output_dir>/<defense>
    assert recipe.DefendConfig(defense="all", output_dir=str(tmp_path)).defense_names == ["abl", "vdc", "ct", "attention_pruning"]
    several = recipe.DefendConfig(defense="vdc,abl", defense_options='{"abl": {"isolation_rate": 0.05}}', output_dir=str(tmp_path))
    assert [d.config.to_dict().get("isolation_rate") for d in several.make_defenses()] == [None, 0.05]
    with pytest.raises(ValueError, match="unknown defense"):
        recipe.DefendConfig(defense="strip", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="answer"):
        recipe.DefendConfig(defense="vdc", defense_options='{"answer": "guess"}', output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="keyed by defense name"):
        recipe.DefendConfig(defense="vdc,abl", defense_options='{"isolation_rate": 0.05}', output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="distinct"):
        recipe.DefendConfig(defense="vdc,vdc", output_dir=str(tmp_path))


def test_defend_recipe_one_table_with_srd_rows(planted, sfs_scorer, tmp_path, capsys):
    """Two defenses (a cleanser and a test-time one) in one command: one table with the control,
    both defenses and SRD's rows from its pipeline, on the test split and the shifted world,
    with each defense's cost; a second run reuses each defense's results."""
    recipe = _defend_recipe()
    root = planted["root"]
    paths = dict(attack="badnet", clean_model=str(root / "clean"), backdoored_model=str(root / "badnet" / "model"),
                 poisoned_dataset=str(root / "badnet" / "poisoned_dataset"))
    common = dict(retrain_recipe="config", trainable=TRAINABLE, num_train_epochs=1, learning_rate=1e-2, warmup_steps=0, num_test_images=8,
                  max_new_tokens=8, eval_batch_size=32, save_steps=1000, report_to="none", disable_tqdm=True)
    # SRD's own pipeline on the same backdoor (its rows join the table)
    from srd_hf.defense import SRDConfig, run_pipeline

    run_pipeline(SRDConfig(**paths, **common, output_dir=str(tmp_path / "srd"), num_policy_samples=16, policy_timesteps=16, num_envs=8,
                           learning_starts=8, buffer_size=100, baselines="", logging_steps=5, defend_unplanted=True))
    cfg = recipe.DefendConfig(**paths, **common, defense="vdc,attention_pruning", output_dir=str(tmp_path / "defend"),
                              defense_options='{"vdc": {"max_new_tokens": 8}, "attention_pruning": {"max_new_tokens": 8}}',
                              num_trusted_images=0, srd_results=str(tmp_path / "srd" / "results.json"))
    results = recipe.main(cfg, scorer=sfs_scorer)
    rows = results["rows"]
    control = next(n for n in rows if n.startswith("control"))
    assert {"clean model", "no defense", "vdc", "attention_pruning", "SRD-dqn (untrusted policy)",
            "SRD-dqn filter at inference (untrusted policy)"} <= set(rows)
    assert control == "control (unmasked untrusted set)"  # retrain_recipe=config: not the inject run, so retrained
    shifted = results["eval_sets"]["embedded-shifted"]["rows"]
    assert shifted.keys() == rows.keys() and all("asr" in r for r in shifted.values())
    for name in ("vdc", "attention_pruning"):  # one seed (0): its folder holds each defense's results and card
        saved = json.loads((tmp_path / "defend" / "seed-0" / name / "results.json").read_text())
        assert saved["rows"][name]["cider"] == rows[name]["cider"] and saved["kind"] in ("cleanser", "test_time")
        assert saved["defense_config"]["seed"] == 0 and saved["attack_seed"] == 0
        assert (tmp_path / "defend" / "seed-0" / name / "README.md").read_text().count("| no defense |") == 1
        assert results["costs"][name]["seconds_per_1000_samples"] > 0
    assert results["detection"]["vdc"]["n_flagged"] >= 0
    srd_cost = results["costs"]["SRD-dqn (untrusted policy)"]  # what its pipeline recorded making policy, masks and flag
    assert set(srd_cost["parts_seconds"]) == {"policy", "masks", "flag"} and srd_cost["seconds_per_1000_samples"] > 0
    out = capsys.readouterr().out
    assert "| vdc |" in out and "| attention_pruning |" in out and "embedded-shifted" in out and "s per 1,000 samples" in out
    assert json.loads((tmp_path / "defend" / "results.json").read_text())["rows"].keys() == rows.keys()
    stamp = (tmp_path / "defend" / "seed-0" / "vdc" / "results.json").stat().st_mtime
    again = recipe.run(cfg, scorer=sfs_scorer)
    assert (tmp_path / "defend" / "seed-0" / "vdc" / "results.json").stat().st_mtime == stamp and again["rows"]["vdc"] == rows["vdc"]
    # seeds: SRD's results must cover every seed asked for (checked before any work) ...
    two = dict(**paths, **common, defense="attention_pruning", defense_options='{"max_new_tokens": 8}', seeds="0,1")
    with pytest.raises(ValueError, match=r"seeds \[0\], not \[1\]"):
        recipe.run(recipe.DefendConfig(**two, output_dir=str(tmp_path / "d3"), srd_results=str(tmp_path / "srd" / "results.json")),
                   scorer=sfs_scorer)
    assert not (tmp_path / "d3").exists()
    # ... and each seed runs in its own folder, the table is mean ± std over them
    over_seeds = recipe.run(recipe.DefendConfig(**two, output_dir=str(tmp_path / "d3"), srd_results="none"), scorer=sfs_scorer)
    assert over_seeds["seeds"] == [0, 1] and len(over_seeds["rows"]["attention_pruning"]["asr_values"]) == 2
    assert over_seeds["per_defense"]["attention_pruning"] == [str(tmp_path / "d3" / f"seed-{s}" / "attention_pruning" / "results.json")
                                                              for s in (0, 1)]
    assert [json.loads(Path(p).read_text())["defense_config"]["seed"] for p in over_seeds["per_defense"]["attention_pruning"]] == [0, 1]
    assert "asr_std" in over_seeds["eval_sets"]["embedded-shifted"]["rows"]["attention_pruning"]
    with pytest.raises(ValueError, match="another backdoor"):
        recipe.run(recipe.DefendConfig(**{**paths, "target": "apple"}, **common, defense="vdc", output_dir=str(tmp_path / "d2"),
                                       srd_results=str(tmp_path / "srd" / "results.json")), scorer=sfs_scorer)

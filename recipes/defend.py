"""Run one rival defense (or SRD's adapters) against a planted backdoor and score it beside
the clean model, the backdoored model and the control.

    python recipes/defend.py --defense abl --attack badnet
    python recipes/defend.py --defense vdc --attack badnet --defense_options '{"answer": "likelihood"}'
    python recipes/defend.py --config recipes/configs/defend_ct.yaml

A data cleanser's kept samples are retrained with ``srd_hf.defense.retrain`` (the recipe that
planted the backdoor, from the pre-attack model); a training-time defense trains the model
itself; a test-time defense wraps the backdoored model. Writes
``<output_dir>/results.json`` (rows, the defense's report with its cost, and, for evaluation
only, detection precision and recall against the poisoned set's ground truth) and a card.
"""

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from srd_hf import tables
from srd_hf.defender import trusted_images
from srd_hf.defense import SRDConfig, control_reuses_backdoor, load_inputs, retrain, retraining_recipe, scorer_record
from srd_hf.defenses import defense_from_dict, detection_scores, render_defense_card
from srd_hf.evaluation import evaluate_model
from srd_hf.injection import triggered_test_set
from srd_hf.metrics import SFSScorer


@dataclass
class DefendConfig(SRDConfig):
    """``SRDConfig`` (paths, retraining, evaluation) plus which defense runs.

    defense: abl, vdc, ct, attention_pruning, srd, random_masks or disagreement_filter.
    defense_options: JSON object of the defense's config (e.g. '{"isolation_rate": 0.05}');
        unknown keys are errors.
    num_trusted_images: clean training images outside the untrusted set that the defender holds
        (CT's confusion reserve); 0 passes none.
    """

    defense: str = field(default="abl", metadata={"help": "abl, vdc, ct, attention_pruning, srd, random_masks, disagreement_filter."})
    defense_options: str = field(default="", metadata={"help": "JSON object of the defense's config."})
    num_trusted_images: int = field(default=500, metadata={"help": "Trusted clean images held by the defender (CT); 0 for none."})
    baselines: str = field(default="", metadata={"help": "Unused here (SRD's pipeline option)."})

    def __post_init__(self):
        if not self.output_dir:
            self.output_dir = f"outputs/defend/{self.attack}-{self.poison_rate:g}/{self.defense}"
        super().__post_init__()
        if self.num_trusted_images < 0:
            raise ValueError(f"num_trusted_images must be >= 0, got {self.num_trusted_images}")
        self.make_defense()  # validates defense and defense_options

    def make_defense(self):
        return defense_from_dict(self.defense, self.defense_options)


def run(cfg: DefendConfig, scorer: SFSScorer | None = None) -> dict:
    defense = cfg.make_defense()
    cfg.out.mkdir(parents=True, exist_ok=True)
    inputs = load_inputs(cfg)
    scorer = scorer or SFSScorer().load()
    recipe = retraining_recipe(cfg, inputs.victim)
    test = inputs.world["test"].select(range(min(cfg.num_test_images, len(inputs.world["test"]))))
    triggered, truths = triggered_test_set(inputs.attack, test)
    references = inputs.clean.generate_captions(list(test["image"]), max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
    common = dict(reference_captions=references, target=cfg.target, scorer=scorer, max_new_tokens=cfg.max_new_tokens,
                  batch_size=cfg.eval_batch_size, triggered_references=truths)
    rows = {"clean model": evaluate_model(inputs.clean, test, triggered_images=triggered, predictions=references, **common),
            "no defense": evaluate_model(inputs.victim, test, triggered_images=triggered, **common)}
    validation = inputs.world["validation"]
    # clean validation pairs, every paraphrase (the untrusted set holds every caption of its images)
    pairs = [(img, c) for img, captions in zip(inputs.validation_images, validation["captions"]) for c in captions]
    tag = f"{defense.name}-{hashlib.sha1(json.dumps(defense.config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]}"

    if defense.kind == "test_time":
        defense.calibrate(inputs.victim, inputs.validation_images)
        model, report = defense.wrap(inputs.victim), defense.report
        rows["control (= no defense: a test-time defense wraps the backdoored model)"] = dict(rows["no defense"])
    else:
        if control_reuses_backdoor(cfg, inputs, recipe, "pre_attack"):
            rows["control (= no defense: the inject run's recipe, start, data and seed)"] = dict(rows["no defense"])
        else:
            control = retrain(cfg, "pre_attack", inputs.untrusted, name="control", recipe=recipe)
            rows["control (unmasked untrusted set)"] = evaluate_model(control, test, triggered_images=triggered, **common)
        if defense.kind == "cleanser":
            trusted = (trusted_images(inputs.world["train"], inputs.untrusted, cfg.num_trusted_images, cfg.seed)
                       if cfg.num_trusted_images else None)
            validation_set = (dict(validation_images=[p[0] for p in pairs], validation_captions=[p[1] for p in pairs])
                              if defense.uses_validation_captions else dict(validation_images=inputs.validation_images))
            kept, report = defense.cleanse(inputs.untrusted, victim=inputs.victim, reference=inputs.clean, scorer=scorer,
                                           trusted=trusted, **validation_set,
                                           recipe=recipe, output_dir=cfg.out / f"work-{tag}", progress=True)
            model = retrain(cfg, "pre_attack", kept, name=tag, recipe=recipe)
        else:
            model = defense.train(inputs.untrusted, start_model_path=cfg.clean_model, recipe=recipe, output_dir=cfg.out / f"train-{tag}")
            report = defense.report
    rows[defense.name] = evaluate_model(model, test, triggered_images=triggered, **common)
    cost = dict(report.get("cost", {}))
    if defense.kind == "test_time":  # its cost is captioning through it (clean and triggered test images), plus calibration
        report["inference"] = model.report
        cost = {**model.report["cost"], "calibration": report["cost"]}

    flagged = report.get("flagged_indices", report.get("isolated_indices"))
    detection = None
    if flagged is not None and "is_poisoned" in inputs.untrusted.column_names:  # evaluation only
        detection = detection_scores(flagged, inputs.untrusted["is_poisoned"])
    for row in rows.values():
        row.update(tables.row_intervals(row, seed=cfg.seed))
    results = {"attack": cfg.attack, "poison_rate": cfg.poison_rate, "defense": defense.name, "kind": defense.kind,
               "defense_config": defense.config.to_dict(), "split": "test", "threshold_split": "validation",
               "num_test_images": len(test), "seed": cfg.seed, "retraining_recipe": recipe, "scorer": scorer_record(scorer),
               "report": report, "cost": cost, "detection": detection, "rows": rows,
               "command": f"python recipes/defend.py --defense {defense.name} --attack {cfg.attack}"}
    results["defense_measurable"] = tables.defense_measurable(rows)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (cfg.out / "README.md").write_text(render_defense_card(defense, results))
    return results


def main(config: DefendConfig, scorer: SFSScorer | None = None) -> dict:
    results = run(config, scorer)
    print(f"\n{results['defense']} ({results['kind']}) against {config.attack} at {config.poison_rate:g} "
          f"({results['num_test_images']} test images; ASR on the same images with the trigger)\n")
    if not results["defense_measurable"]:
        print(tables.not_measurable_message(results) + "\n")
    print(tables.results_table(results))
    if results["detection"]:
        d = results["detection"]
        print(f"\ndetection (evaluation only): precision {d['precision']:.2f}, recall {d['recall']:.2f}, {d['n_flagged']} flagged")
    cost = results["cost"]
    print(f"cost: {cost.get('seconds_per_1000_samples', '?')} s per 1,000 samples, peak RSS {cost.get('peak_rss_mb', '?')} MB"
          + (f", CUDA peak {cost['cuda_peak_mb']} MB" if "cuda_peak_mb" in cost else ""))
    print(f"\nresults: {Path(config.output_dir) / 'results.json'}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (config,) = TrlParser((DefendConfig,)).parse_args_and_config()
    main(config)

"""Run rival defenses (and SRD's adapters) against a planted backdoor and build one table:
clean model, no defense, the control, every defense, and SRD's rows from its own pipeline, with
the cost of each defense; on the test split and on every extra test set.

    python recipes/defend.py --defense abl --attack badnet
    python recipes/defend.py --defense all --attack badnet          # ABL, VDC, CT, attention pruning + SRD's rows
    python recipes/defend.py --defense all --attack badnet --seeds 0,1,2   # each seed's backdoor, mean ± std
    python recipes/defend.py --defense vdc --attack badnet --defense_options '{"answer": "likelihood"}'
    python recipes/defend.py --config recipes/configs/defend_ct.yaml

A data cleanser's kept samples are retrained with ``srd_hf.defense.retrain`` (the recipe that
planted the backdoor, from the pre-attack model); a training-time defense trains the model
itself; a test-time defense wraps the backdoored model. Each seed (``--seeds``, default the
attack seed: the seed's poisoned subset and backdoor, its retrainings and each defense's own
draws) runs in ``<output_dir>/seed-<s>/``, where each defense writes
``<output_dir>/seed-<s>/<defense>/results.json`` (its rows, its report with its cost, and, for
evaluation only, detection precision and recall against the poisoned set's ground truth) and a
card, and is reused when run again with the same settings; the table of all of them over seeds
is ``<output_dir>/results.json``. SRD's rows come from ``--srd_results`` (default: the SRD
pipeline's results of the same backdoor, when it ran: ``recipes/retrain.py``), seed by seed.
"""

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from srd_hf import artifacts, fingerprints, tables
from srd_hf.defender import trusted_images
from srd_hf.defense import (ScoredSet, SRDConfig, combine_seeds, command_line, control_reuses_backdoor, load_inputs, retrain,
                            retraining_recipe, scorer_record, srd_output_dir)
from srd_hf.defenses import defense_from_dict, detection_scores, render_defense_card
from srd_hf.distributed import on_main
from srd_hf.stages import pipeline_scorer

logger = logging.getLogger(__name__)

#: ``--defense all``: the paper's rivals and the test-time one
ALL = ("abl", "vdc", "ct", "attention_pruning")


@dataclass
class DefendConfig(SRDConfig):
    """``SRDConfig`` (paths, retraining, evaluation) plus which defenses run.

    defense: comma list of abl, vdc, ct, attention_pruning, srd, random_masks,
        disagreement_filter, or "all" (abl, vdc, ct, attention_pruning).
    defense_options: JSON object: one defense's config (e.g. '{"isolation_rate": 0.05}'), or,
        for several, {"<defense>": {...}}; unknown keys are errors.
    num_trusted_images: clean training images outside the untrusted set that the defender holds
        (CT's confusion reserve); 0 passes none.
    srd_results: results.json of SRD's pipeline on the same backdoor, whose SRD rows join the
        table; "" looks for the default one of ``--mask_fill``
        (``outputs/srd/<attack>-<rate>-local_mean/dqn/results.json``, or without ``-local_mean``
        with ``--mask_fill red``), "none" leaves SRD out.
    """

    defense: str = field(default="abl", metadata={"help": "Comma list of abl, vdc, ct, attention_pruning, srd, random_masks, disagreement_filter; or all."})
    defense_options: str = field(default="", metadata={"help": "JSON object of the defense's config, or {defense: config} for several."})
    num_trusted_images: int = field(default=500, metadata={"help": "Trusted clean images held by the defender (CT); 0 for none."})
    srd_results: str = field(default="", metadata={"help": "SRD pipeline results.json on the same backdoor ('' = the default path, 'none')."})
    baselines: str = field(default="", metadata={"help": "Unused here (SRD's pipeline option)."})

    def __post_init__(self):
        given_output = bool(self.output_dir)
        super().__post_init__()
        if not given_output:  # the SRD pipeline's default would be outputs/srd/...
            self.output_dir = str(Path("outputs/defend") / Path(self.backdoored_model).parent.name)
        if self.num_trusted_images < 0:
            raise ValueError(f"num_trusted_images must be >= 0, got {self.num_trusted_images}")
        self.make_defenses()  # validates defense and defense_options

    @property
    def defense_names(self) -> list[str]:
        names = [n.strip().lower().replace("-", "_") for n in self.defense.split(",") if n.strip()]
        names = [d for n in names for d in (ALL if n == "all" else (n,))]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"defense must be a comma list of distinct defenses, got {self.defense!r}")
        return names

    def make_defenses(self, seed: int | None = None) -> list:
        """The defenses with their configs; ``seed`` seeds each one's own draws unless its
        options name a seed."""
        options = json.loads(self.defense_options) if self.defense_options.strip() else {}
        if not isinstance(options, dict):
            raise ValueError(f"defense_options must be a JSON object, got {self.defense_options!r}")
        names = self.defense_names
        keyed = bool(options) and all(k in names for k in options) and all(isinstance(v, dict) for v in options.values())
        if len(names) > 1 and options and not keyed:
            raise ValueError(f"with several defenses, defense_options must be keyed by defense name ({names}), got {sorted(options)}")
        chosen = {n: dict(options.get(n, {}) if keyed else options) for n in names}
        return [defense_from_dict(n, {"seed": seed, **opts} if seed is not None and "seed" not in opts else opts)
                for n, opts in chosen.items()]

    def srd_results_path(self) -> Path | None:
        if self.srd_results.strip().lower() == "none":
            return None
        default = Path(srd_output_dir(Path(self.backdoored_model).parent.name, self.mask_fill, "dqn")) / "results.json"
        path = Path(self.srd_results) if self.srd_results else default
        return path if path.is_file() or self.srd_results else None


def _fingerprint(cfg: DefendConfig, defense, recipe: dict, sets: list) -> dict:
    """What one defense's results depend on: reused only when all of it is the same."""
    return {"defense": defense.name, "config": defense.config.to_dict(), "recipe": recipe, "backdoored_model": cfg.backdoored_model,
            "poisoned_dataset": cfg.poisoned_dataset, "clean_model": cfg.clean_model, "target": cfg.target,
            "num_trusted_images": cfg.num_trusted_images, "seed": cfg.seed, "test_sets": {s.name: len(s.test) for s in sets},
            "data": {"untrusted": fingerprints.source(cfg.poisoned_dataset), "victim": fingerprints.source(cfg.backdoored_model)}}


def run_defense(defense, cfg: DefendConfig, inputs, sets: list, scorer, recipe: dict, reference_rows: dict) -> dict:
    """One defense end to end: its model (retrained on what it kept, trained by it, or wrapped),
    scored on every test set; ``<output_dir>/<defense>/results.json`` and its card."""
    folder = cfg.out / defense.name
    fingerprint = _fingerprint(cfg, defense, recipe, sets)
    try:
        saved = json.loads((folder / "results.json").read_text())
        if saved.get("fingerprint") == json.loads(json.dumps(fingerprint, default=str)):
            logging.getLogger(__name__).info("reusing %s (same settings)", folder / "results.json")
            return saved
    except (OSError, ValueError):
        pass
    validation = inputs.world["validation"]
    # clean validation pairs, every paraphrase (the untrusted set holds every caption of its images)
    pairs = [(img, c) for img, captions in zip(inputs.validation_images, validation["captions"]) for c in captions]
    if defense.kind == "test_time":
        defense.calibrate(inputs.victim, inputs.validation_images)
        model, report = defense.wrap(inputs.victim), defense.report
    elif defense.kind == "cleanser":
        trusted = (trusted_images(inputs.world["train"], inputs.untrusted, cfg.num_trusted_images, cfg.seed)
                   if cfg.num_trusted_images else None)
        validation_set = (dict(validation_images=[p[0] for p in pairs], validation_captions=[p[1] for p in pairs])
                          if defense.uses_validation_captions else dict(validation_images=inputs.validation_images))
        kept, report = defense.cleanse(inputs.untrusted, victim=inputs.victim, reference=inputs.clean, scorer=scorer, trusted=trusted,
                                       **validation_set, recipe=recipe, output_dir=folder / "work", progress=True)
        model = retrain(cfg, "pre_attack", kept, name=defense.name, recipe=recipe)
    else:
        model = defense.train(inputs.untrusted, start_model_path=cfg.clean_model, recipe=recipe, output_dir=folder / "train",
                              validation_images=[p[0] for p in pairs], validation_captions=[p[1] for p in pairs])
        report = defense.report
    rows = {s.name: {**copy.deepcopy(reference_rows[s.name]), defense.name: s.score(cfg, scorer, model)} for s in sets}
    cost = dict(report.get("cost", {}))
    if defense.kind == "test_time":  # its cost is captioning through it (clean and triggered test images), plus calibration
        report["inference"] = model.report
        cost = {**model.report["cost"], "calibration": report["cost"]}
    flagged = report.get("flagged_indices", report.get("isolated_indices"))
    detection = None
    if flagged is not None and "is_poisoned" in inputs.untrusted.column_names:  # evaluation only
        detection = detection_scores(flagged, inputs.untrusted["is_poisoned"])
    results = _results(cfg, sets, rows, recipe, scorer, defense=defense.name, kind=defense.kind,
                       defense_config=defense.config.to_dict(), report=report, cost=cost, detection=detection,
                       fingerprint=fingerprint, command=f"python recipes/defend.py --defense {defense.name} --attack {cfg.attack}")

    def save():
        folder.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(folder / "results.json", results)
        (folder / "README.md").write_text(render_defense_card(defense, results))

    on_main(save)
    return json.loads(json.dumps(results, default=float))


def _results(cfg: DefendConfig, sets: list, rows: dict, recipe: dict, scorer, **extra) -> dict:
    main, others = sets[0], sets[1:]
    for set_rows in rows.values():
        for row in set_rows.values():
            row.update(tables.row_intervals(row, seed=cfg.seed))
    return {"attack": cfg.attack, "poison_rate": cfg.poison_rate, "target": cfg.target, "attack_options": cfg.attack_options,
            "split": "test", "threshold_split": "validation", "num_test_images": len(main.test), "seed": cfg.seed,
            "attack_seed": cfg.attack_seed,
            "retraining_recipe": recipe, "scorer": scorer_record(scorer), "rows": rows[main.name],
            "eval_sets": {s.name: {"num_test_images": len(s.test), "rows": rows[s.name],
                                   "defense_measurable": tables.defense_measurable(rows[s.name])} for s in others},
            "defense_measurable": tables.defense_measurable(rows[main.name]), **extra}


def srd_rows(cfg: DefendConfig, sets: list) -> tuple[dict, dict]:
    """SRD's rows (retrained and inference filter) from its pipeline's results on the same
    backdoor and test images, and the cost of its cleansing (policy, masks and flag, per 1,000
    untrusted samples), as its pipeline recorded it with the artifacts it made."""
    path = cfg.srd_results_path()
    if path is None:
        return {}, {}
    if not path.is_file():
        raise FileNotFoundError(f"no SRD results at {path}: run recipes/retrain.py on this backdoor first, or pass --srd_results none")
    srd = json.loads(path.read_text())
    same = (srd.get("attack") == cfg.attack and srd.get("attack_seed", cfg.attack_seed) == cfg.attack_seed
            and srd.get("num_test_images") == len(sets[0].test) and srd.get("split") == "test"
            and srd.get("target", cfg.target) == cfg.target and srd.get("attack_options", cfg.attack_options) == cfg.attack_options)
    if not same:
        raise ValueError(f"{path} scored another backdoor or other test images (attack {srd.get('attack')}, seed "
                         f"{srd.get('attack_seed')}, {srd.get('num_test_images')} test images): pass the SRD results of this backdoor")
    by_set = {sets[0].name: srd["rows"], **{n: s["rows"] for n, s in (srd.get("eval_sets") or {}).items()}}
    rows = {s.name: {n: r for n, r in by_set.get(s.name, {}).items() if n.startswith("SRD-")} for s in sets}
    costs = {name: {**cost, "source": str(path)} for name, cost in (srd.get("costs") or {}).items() if name.startswith("SRD-")}
    if not costs:
        logger.warning("%s records no cost of SRD's cleansing (its artifacts predate cost records): its cost row is left out", path)
    return rows, costs


def srd_results_by_seed(cfg: DefendConfig) -> dict:
    """Seed -> SRD's results of that seed (its pipeline writes one file per seed and their table
    over seeds); {} when SRD's rows are left out. Every seed asked for must be there."""
    path = cfg.srd_results_path()
    if path is None:
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"no SRD results at {path}: run recipes/retrain.py on this backdoor first, or pass --srd_results none")
    srd = json.loads(path.read_text())
    seeds = srd.get("seeds") or [srd.get("attack_seed", cfg.attack_seed)]
    by_seed = dict(zip(seeds, srd["per_seed"])) if len(seeds) > 1 else {seeds[0]: str(path)}
    missing = [s for s in cfg.seed_list if s not in by_seed]
    if missing:
        raise ValueError(f"{path} has SRD's results for seeds {seeds}, not {missing}: run recipes/retrain.py --seeds "
                         f"{','.join(map(str, cfg.seed_list))} on this backdoor, or pass --srd_results none")
    return by_seed


def run_one_seed(cfg: DefendConfig, scorer) -> dict:
    """Every defense on one seed's backdoor (that seed's poisoned subset; its retrainings and
    the defenses' own draws seeded by it): ``<output_dir>/results.json``."""
    defenses = cfg.make_defenses(seed=cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    inputs = load_inputs(cfg)
    recipe = retraining_recipe(cfg, inputs.victim)
    sets = [ScoredSet.build("test", inputs.world["test"], inputs.attack, cfg.num_test_images),
            *(ScoredSet.build(n, d, inputs.attack, cfg.num_test_images) for n, d in inputs.eval_sets.items())]
    extra_rows, srd_costs = srd_rows(cfg, sets)  # checked before any work: the same backdoor and test images
    reference_rows = {}
    for s in sets:
        s.references = inputs.clean.generate_captions(s.images, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
        reference_rows[s.name] = {"clean model": s.score(cfg, scorer, inputs.clean, predictions=s.references),
                                  "no defense": s.score(cfg, scorer, inputs.victim)}
    # the control: the same retraining on the unmasked untrusted set (test-time defenses only: none is retrained)
    if all(d.kind == "test_time" for d in defenses):
        name = "control (= no defense: a test-time defense wraps the backdoored model)"
        control = None
    elif control_reuses_backdoor(cfg, inputs, recipe, "pre_attack"):
        name, control = "control (= no defense: the inject run's recipe, start, data and seed)", None
    else:
        name, control = "control (unmasked untrusted set)", retrain(cfg, "pre_attack", inputs.untrusted, name="control", recipe=recipe)
    for s in sets:
        reference_rows[s.name][name] = dict(reference_rows[s.name]["no defense"]) if control is None else s.score(cfg, scorer, control)

    per_defense = {d.name: run_defense(d, cfg, inputs, sets, scorer, recipe, reference_rows) for d in defenses}
    rows = {s.name: {**reference_rows[s.name]} for s in sets}
    for name, res in per_defense.items():
        for s in sets:
            found = res["rows"] if s is sets[0] else res["eval_sets"].get(s.name, {}).get("rows", {})
            rows[s.name][name] = found[name]
    for s in sets:
        rows[s.name].update(extra_rows.get(s.name, {}))
    costs = {name: {"kind": res["kind"], **res["cost"]} for name, res in per_defense.items()}
    costs.update(srd_costs)
    detection = {name: res["detection"] for name, res in per_defense.items() if res.get("detection")}
    results = _results(cfg, sets, rows, recipe, scorer, defenses=list(per_defense), costs=costs, detection=detection,
                       per_defense={n: str(cfg.out / n / "results.json") for n in per_defense}, command=command_line())
    on_main(lambda: artifacts.write_json(cfg.out / "results.json", results))
    return results


def run(cfg: DefendConfig, scorer=None) -> dict:
    """Every seed of ``--seeds`` (``<output_dir>/seed-<s>/``, each resumable), then the table over
    seeds in ``<output_dir>/results.json``; SRD's rows are its own results of the same seeds."""
    seeds = cfg.seed_list
    cfg.make_defenses()  # bad options fail before any work
    srd_by_seed = srd_results_by_seed(cfg)
    scorer = scorer or pipeline_scorer(cfg.sfs_encoder, cfg.sfs_fluency_lm).load()
    per_seed = []
    for seed in seeds:
        seed_cfg = cfg.for_seed(seed)
        seed_cfg.srd_results = str(srd_by_seed[seed]) if srd_by_seed else "none"
        per_seed.append(run_one_seed(seed_cfg, scorer))
    results = combine_seeds(per_seed, seeds, [str(cfg.out / f"seed-{s}" / "results.json") for s in seeds])
    results.update(per_defense={n: [str(cfg.out / f"seed-{s}" / n / "results.json") for s in seeds] for n in per_seed[0]["defenses"]},
                   command=command_line())
    on_main(lambda: artifacts.write_json(cfg.out / "results.json", results))
    return results


def main(config: DefendConfig, scorer=None) -> dict:
    results = run(config, scorer)
    print(f"\n{', '.join(results['defenses'])} against {config.attack} at {config.poison_rate:g} "
          f"({results['num_test_images']} test images; ASR on the same images with the trigger)\n")
    for seed, left in (results.get("seeds_not_measurable") or {}).items():
        print(f"seed {seed} left out: its control reached ASR {left['control_asr']:.1f}% (the backdoor did not plant)\n")
    if not results["defense_measurable"]:
        print(tables.not_measurable_message(results) + "\n")
    print(tables.results_table(results))
    for title, table in tables.eval_set_tables(results):
        print(f"\n{title}\n\n{table}")
    for name, d in results["detection"].items():
        print(f"\n{name} detection (evaluation only): precision {d['precision']:.2f}, recall {d['recall']:.2f}, {d['n_flagged']:.0f} flagged"
              + (" (mean over seeds)" if len(results.get("seeds") or []) > 1 else ""))
    print("\ncost of each defense's own work (a cleanser's retraining excluded):\n\n" + tables.cost_table(results["costs"]))
    print(f"\nresults: {Path(config.output_dir) / 'results.json'}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    (config,) = TrlParser((DefendConfig,)).parse_args_and_config()
    main(config)

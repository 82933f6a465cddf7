"""Write the markdown report of finished defense runs: one section per ``results.json`` (SRD's
pipeline or ``recipes/defend.py``), with the command that made it, the control's verdict, the
table of the evaluation split and of every extra test set, flag quality and trigger coverage
(evaluation only), and the wall clock per stage.

    python recipes/report.py outputs/srd/*/dqn/results.json --output docs/results/defended.md
    python recipes/report.py outputs/defend/badnet-0.1/results.json

Nothing is recomputed: every figure is read from the results files, so the report says exactly
what the runs measured.
"""

import argparse
import json
from pathlib import Path

from srd_hf import tables


def _fmt(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _spread(record: dict, key: str) -> str:
    """``mean ± std`` where several seeds measured it, else the one value."""
    if f"{key}_std" in record:
        return f"{_fmt(record.get(key))} ± {_fmt(record[f'{key}_std'])}"
    return _fmt(record.get(key))


def section(path: Path) -> str:
    results = json.loads(path.read_text())
    seeds = results.get("seeds", [results.get("seed", 0)])
    title = f"{results.get('attack')} at {results.get('poison_rate', 0):g}"
    if results.get("defenses") or results.get("defense"):
        title += ": " + ", ".join(results.get("defenses") or [results["defense"]])
    if results.get("attack_options"):
        title += f", options {results['attack_options']}"
    if results.get("target"):
        title += f", target {results['target']!r}"
    if results.get("policy_data"):
        title += f" (policies: {', '.join(results['policy_data'])})"
    lines = [f"## {title}", ""]
    if results.get("command"):
        lines += ["```bash", results["command"], "```", ""]
    lines.append(f"Results file: `{path}`. Split: {results.get('split', 'test')} ({results.get('num_test_images', '?')} images); "
                 f"thresholds from {results.get('threshold_split', 'validation')}; "
                 + (f"seeds {','.join(map(str, seeds))} (mean ± std)." if len(seeds) > 1 else f"one seed ({seeds[0]})."))
    lines.append("")
    for seed, left in (results.get("seeds_not_measurable") or {}).items():
        lines += [f"**Seed {seed} is left out of this table**: its control reached ASR {_fmt(left.get('control_asr'), 1)}% "
                  f"< 50%, so the backdoor did not plant and its rows say nothing about a defense (`{left.get('results')}`).", ""]
    if results.get("defense_measurable", True):
        lines.append("The control planted the backdoor (ASR >= 50%): the defense rows are measurable.")
    else:
        lines.append("**" + tables.not_measurable_message(results).replace(": ", "**: ", 1))
    lines += ["", tables.results_table(results), ""]
    for name, table in tables.eval_set_tables(results):
        lines += [f"On {name}:", "", table, ""]
    detection = {k: v for k, v in (results.get("detection") or {}).items() if v}
    if detection:
        lines.append("Flags against the poisoned set's ground truth (evaluation only):")
        lines.append("")
        for name, d in detection.items():
            lines.append(f"- {name}: {_fmt(d.get('n_flagged'), 0)} flagged, precision {_spread(d, 'precision')}, "
                         f"recall {_spread(d, 'recall')}" + (" (mean ± std over seeds)" if "precision_std" in d else ""))
        lines.append("")
    mechanism = {k: v for k, v in (results.get("mechanism") or {}).items() if v}
    if mechanism:
        lines.append("Masks on the untrusted set (evaluation only):")
        lines.append("")
        for name, m in mechanism.items():
            lines.append(f"- {name}: mean trigger coverage {_fmt(m.get('poisoned_mean_coverage'))}, fully covered on "
                         f"{_fmt(m.get('poisoned_share_fully_covered'))} of poisoned samples; clean samples masking the trigger's "
                         f"place {_fmt(m.get('clean_share_masking_trigger_place'))}; distinct places clean / poisoned "
                         f"{m.get('clean_distinct_placements', '-')} / {m.get('poisoned_distinct_placements', '-')}")
        lines.append("")
    if results.get("proxy_asr_validation") is not None:
        lines += [f"The defender's proxy backdoor says its word on {_fmt(results['proxy_asr_validation'], 1)}% of triggered "
                  "validation images (the defender's own check; below 50% its policy has nothing to learn from).", ""]
        attempts = results.get("proxy_attempts_by_seed") or ({str(results.get("seed", 0)): results["proxy_attempts"]}
                                                              if results.get("proxy_attempts") else {})
        for seed, tries in attempts.items():
            if tries:
                lines += [f"- seed {seed}: proxy planted " + ", then ".join(f"{a['num_train_epochs']:g} epochs ({a['proxy_asr_validation']:.1f}%)"
                                                                           for a in tries)]
        lines += [""] if attempts else []
    if results.get("costs"):
        lines += ["Cost of each defense's own work (a cleanser's retraining is the common one, not counted):", "",
                  tables.cost_table(results["costs"]), ""]
    elif results.get("cost"):
        cost = results["cost"]
        lines += [f"Cost: {cost.get('seconds_per_1000_samples', '-')} s per 1,000 samples, peak RSS {cost.get('peak_rss_mb', '-')} MB", ""]
    if results.get("stage_seconds"):
        lines += ["Wall clock per stage (s): " + ", ".join(f"{k} {v:g}" for k, v in results["stage_seconds"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    parser.add_argument("--output", type=Path, help="write the markdown here (default: print it)")
    parser.add_argument("--heading", default="", help="text above the sections")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        raise SystemExit(f"no results file at: {', '.join(missing)}")
    text = "\n".join(([args.heading, ""] if args.heading else []) + [section(p) for p in args.results])
    if args.output:
        args.output.write_text(text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()

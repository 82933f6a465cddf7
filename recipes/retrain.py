"""The main job: defend a backdoored captioner with SRD, end to end, and print the table.

    accelerate launch --config_file accelerate_config.yaml --num_cpu_threads_per_process $(nproc) recipes/retrain.py
    python recipes/retrain.py --attack trojvlm
    python recipes/retrain.py --attack badnet --seeds 0,1,2 --policy_data untrusted,defender

With no arguments, on the embedded world: pretrain the clean model (outputs/clean), plant
BadNet at 10% with recipes/configs/inject_badnet.yaml (outputs/backdoor/badnet-0.1), train a
DQN masking policy against the backdoored model, mask the poisoned fine-tuning set, drop the
samples whose caption loses a suspect word once masked (``--srd_flag``), retrain with the recipe that planted the
backdoor, and print clean model, no defense, control, SRD, the disagreement filter and the
inference-time filter (random masks with ``--baselines random_masks,disagreement_filter``), on
the test split and on the shifted world (another domain, never trained on). Every stage that already has its artifact is reused, and a
killed run resumes.
"""

import logging

from trl import TrlParser

from srd_hf.defense import SRDConfig, results_table, run_pipeline
from srd_hf.distributed import is_main
from srd_hf.hub import execute, policy_upload_plan
from srd_hf.tables import eval_set_tables, not_measurable_message


def main(config: SRDConfig) -> dict:
    results = run_pipeline(config)
    if not is_main():  # one table, one push
        return results
    seeds = results["seeds"]
    print(f"\nSRD: {config.attack} at {config.poison_rate:g}, policy {config.algorithm} ({', '.join(results['policy_data'])}), "
          f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))} ({results['num_test_images']} {results.get('split', 'test')} images; "
          "ASR on the same images with the trigger; [95% bootstrap interval over test images])\n")
    for seed, left in (results.get("seeds_not_measurable") or {}).items():
        print(f"seed {seed} left out: its control reached ASR {left['control_asr']:.1f}% (the backdoor did not plant)\n")
    if not results["defense_measurable"]:
        print(not_measurable_message(results) + "\n")
    elif results.get("control_only"):
        print(f"The control planted the backdoor; the defenses were not run ({results['defenses_not_run']}).\n")
    print(results_table(results))
    for title, table in eval_set_tables(results):  # the same models on another domain
        print(f"\n{title}\n\n{table}")
    print("\nwall clock per stage (s): " + ", ".join(f"{k} {v:g}" for k, v in results["stage_seconds"].items()))
    print(f"\nresults: {config.output_dir}/{config.results_file}")
    if config.push_to_hub:  # after the run: the policies, private unless asked
        try:
            execute(policy_upload_plan(config), config.hub_token, saved_in=config.output_dir)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

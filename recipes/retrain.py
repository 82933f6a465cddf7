"""The main job: defend a backdoored captioner with SRD, end to end, and print No Defense vs SRD.

    accelerate launch --config_file accelerate_config.yaml --num_cpu_threads_per_process $(nproc) recipes/retrain.py
    python recipes/retrain.py --attack trojvlm
    python recipes/retrain.py --config my_srd.yaml --retrain_from pre_attack     # a YAML file of SRDConfig keys

With no arguments, on the embedded world: pretrain the clean model (outputs/clean), plant
BadNet at 10% (outputs/backdoor/badnet-0.1), train a DQN masking policy against the
backdoored model, mask the poisoned fine-tuning set with it, retrain from the pre-attack
model (``--retrain_from both`` adds the backdoored start) and evaluate. Every stage that already has its artifact is reused,
and a killed run resumes.
"""

import logging

from trl import TrlParser

from srd_hf.defense import SRDConfig, results_table, run_pipeline


def main(config: SRDConfig) -> dict:
    results = run_pipeline(config)
    print(f"\nSRD vs No Defense: {config.attack} at {config.poison_rate:g}, policy {config.algorithm} "
          f"({results['num_test_images']} test images; ASR on the same images with the trigger)\n")
    print(results_table(results))
    print("\nwall clock per stage (s): " + ", ".join(f"{k} {v:g}" for k, v in results["stage_seconds"].items()))
    print(f"\nresults: {config.output_dir}/results.json")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

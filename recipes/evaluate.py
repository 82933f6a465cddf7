"""Score a defense: CIDEr, SFS on clean test images and ASR on triggered ones, for the clean
model, the backdoored model, the control, SRD, the baselines and the inference-time filter.
Runs (or reuses) every stage the table needs.

    python recipes/evaluate.py --attack badnet
    python recipes/evaluate.py --attack badnet --seeds 0,1,2 --policy_data untrusted,defender
"""

import logging

from trl import TrlParser

from srd_hf.defense import SRDConfig, results_table, run_pipeline
from srd_hf.tables import eval_set_tables, not_measurable_message


def main(config: SRDConfig) -> dict:
    results = run_pipeline(config)
    if not results["defense_measurable"]:
        print("\n" + not_measurable_message(results))
    print(results_table(results))
    for title, table in eval_set_tables(results):
        print(f"\n{title}\n\n{table}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

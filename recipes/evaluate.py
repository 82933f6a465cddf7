"""Score a defense: BLEU-4, CIDEr, SC, LF, SFS on clean test images and ASR on triggered ones,
for the clean model, the backdoored model (No Defense), the retrained models and the
inference-time filter. Retrains first when a retrained model is missing.

    python recipes/evaluate.py --attack badnet
"""

import logging

from trl import TrlParser

from srd_hf.defense import SRDConfig, evaluate_defense, results_table


def main(config: SRDConfig) -> dict:
    results = evaluate_defense(config)
    print(results_table(results))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

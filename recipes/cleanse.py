"""Mask every sample of the untrusted fine-tuning set with a trained SRD policy.

    python recipes/cleanse.py --attack badnet                # policy and data from the default paths
    python recipes/cleanse.py --poisoned_dataset my_set --output_dir outputs/srd/mine   # uses <output_dir>/policy

The masked set goes to ``<output_dir>/cleansed_dataset`` with a ``srd_masks`` column.
"""

import logging

from trl import TrlParser

from srd_hf.defense import SRDConfig, cleanse


def main(config: SRDConfig):
    cleansed = cleanse(config)
    print(f"cleansed dataset: {config.output_dir}/cleansed_dataset ({len(cleansed)} samples)")
    return cleansed


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

"""Mask every sample of the untrusted fine-tuning set with trained SRD policies.

    python recipes/cleanse.py --attack badnet                         # policies and data from the default paths
    python recipes/cleanse.py --attack badnet --poisoned_captions relabel

Per protocol and seed: ``<output_dir>/seed-<s>/masked-<protocol>`` (every sample, a ``srd_masks``
column) and ``cleansed-<protocol>`` (the samples the flag finds, ``--srd_flag``: by default those whose caption loses a suspect word once masked, are
dropped or relabelled, ``--poisoned_captions``), with a report beside it. Trains a missing policy.
"""

import logging

from trl import TrlParser

from srd_hf.defense import SRDConfig, cleanse, load_inputs, train_policy
from srd_hf.stages import DEFENSE_LAYOUT, overwrite


def main(config: SRDConfig):
    if config.overwrite_output_dir:
        overwrite(config.out, DEFENSE_LAYOUT)
    out = {}
    for seed in config.seed_list:
        run = config.for_seed(seed)
        inputs = load_inputs(run)
        for protocol in run.protocols:
            cleansed, report = cleanse(run, inputs, protocol, train_policy(run, inputs, protocol))
            out[(seed, protocol)] = cleansed
            print(f"cleansed dataset: {run.output_dir}/cleansed-{protocol} ({len(cleansed)} samples; {report['n_flagged']} flagged)")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

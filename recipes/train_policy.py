"""Train SRD masking policies against a backdoored model and save them (safetensors + JSON + card).

    python recipes/train_policy.py --attack badnet                           # DQN, untrusted protocol
    python recipes/train_policy.py --attack badnet --algorithm ppo
    python recipes/train_policy.py --attack trojvlm --policy_data untrusted,defender --report_to tensorboard
    python recipes/train_policy.py --attack badnet --push_to_hub --hub_model_id me/srd-policy-badnet

One policy per protocol and seed, in ``<output_dir>/seed-<s>/policy-<protocol>``. A killed run
resumes from ``rl-<protocol>/resume``.
"""

import logging

from trl import TrlParser

from srd_hf.defense import SRDConfig, load_inputs, train_policy
from srd_hf.distributed import is_main
from srd_hf.hub import execute, policy_upload_plan
from srd_hf.stages import DEFENSE_LAYOUT, overwrite


def main(config: SRDConfig):
    if config.overwrite_output_dir:
        overwrite(config.out, DEFENSE_LAYOUT)
    policies = {}
    for seed in config.seed_list:
        run = config.for_seed(seed)
        inputs = load_inputs(run)  # loaded once per seed (each seed has its own backdoor)
        for protocol in run.protocols:
            policy = train_policy(run, inputs, protocol)
            policies[(seed, protocol)] = policy
            print(f"policy: {run.output_dir}/policy-{protocol}  summary: {policy.config.training.get('summary')}")
    if config.push_to_hub and is_main():  # after the run: everything is saved locally first
        try:
            execute(policy_upload_plan(config), config.hub_token, saved_in=config.output_dir)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
    return policies


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

"""Train an SRD masking policy against a backdoored model and save it (safetensors + JSON + card).

    python recipes/train_policy.py --attack badnet                      # DQN (default)
    python recipes/train_policy.py --attack badnet --algorithm ppo
    python recipes/train_policy.py --attack trojvlm --policy_data defender --report_to tensorboard
    python recipes/train_policy.py --attack badnet --push_to_hub --hub_model_id me/srd-policy-badnet

A killed run resumes from ``<output_dir>/resume``.
"""

import logging

from trl import TrlParser

from srd_hf.defense import SRDConfig, train_policy


def main(config: SRDConfig):
    policy = train_policy(config)
    print(f"policy: {config.output_dir}/policy  summary: {policy.config.training.get('summary')}")
    if config.push_to_hub:
        try:
            policy.push_to_hub(config.hub_model_id or f"srd-policy-{config.attack}", token=config.hub_token, private=config.hub_private_repo)
        except Exception as err:
            raise SystemExit(f"push to the Hub failed ({type(err).__name__}: {err}); the policy is saved in {config.output_dir}/policy")
    return policy


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

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


def main(config: SRDConfig):
    policies = {}
    for seed in config.seed_list:
        run = config.for_seed(seed)
        inputs = load_inputs(run)  # loaded once per seed (each seed has its own backdoor)
        for protocol in run.protocols:
            policy = train_policy(run, inputs, protocol)
            policies[(seed, protocol)] = policy
            print(f"policy: {run.output_dir}/policy-{protocol}  summary: {policy.config.training.get('summary')}")
            if config.push_to_hub:
                repo = config.hub_model_id or f"srd-policy-{config.attack}"
                try:
                    policy.push_to_hub(repo, token=config.hub_token, private=config.hub_private_repo)
                except Exception as err:
                    raise SystemExit(f"push to the Hub failed ({type(err).__name__}: {err}); the policy is saved in {run.output_dir}/policy-{protocol}")
    return policies


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (config,) = TrlParser((SRDConfig,)).parse_args_and_config()
    main(config)

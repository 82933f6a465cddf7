"""The card written beside a saved policy (template in ``hub_cards/srd_policy.md``)."""

from __future__ import annotations

import json

from ..cards import load_card_template
from .configuration_srd import SRDPolicyConfig


def render_policy_card(config: SRDPolicyConfig) -> str:
    training = config.training or {}
    results = training.get("results", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in results.items()) or "| (not evaluated) | |"
    return load_card_template("srd_policy.md").format(
        algorithm=config.algorithm.upper(),
        image_size=config.image_size,
        grid=config.grid,
        sizes=", ".join(f"{s:g}" for s in config.mask_sizes),
        n_actions=config.action_space.n,
        num_masks=config.num_masks,
        fill="red" if config.mask_fill == "red" else "in the mean colour of what it covers",
        fill_name=config.mask_fill,
        seed=config.seed,
        training=json.dumps({k: v for k, v in training.items() if k != "results"}, indent=2, default=str),
        results=rows,
        command=training.get("command", "python recipes/train_policy.py"),
    )

"""The masking defense as reinforcement learning: actions (square masks on a grid), the reward
(from the change of semantic consistency and fluency), the batched environment, and policies."""

from .actions import ACTION_PRESETS, MASK_COLOUR, MASK_FILLS, MaskActionSpace
from .configuration_srd import POLICY_ALGORITHMS, SRDPolicyConfig
from .modeling_srd import SRDPolicy, observe
from .reward import BEST_REWARD, REWARD_PRESETS, REWARD_RULES, RewardConfig, mask_reward

__all__ = [
    "ACTION_PRESETS",
    "BEST_REWARD",
    "MASK_COLOUR",
    "MASK_FILLS",
    "MaskActionSpace",
    "POLICY_ALGORITHMS",
    "REWARD_PRESETS",
    "REWARD_RULES",
    "RewardConfig",
    "SRDPolicy",
    "SRDPolicyConfig",
    "mask_reward",
    "observe",
]

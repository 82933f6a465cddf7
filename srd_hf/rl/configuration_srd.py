"""Configuration of an SRD masking policy (saved as ``config.json`` beside the weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .actions import ACTION_PRESETS, MASK_FILLS, MaskActionSpace

POLICY_ALGORITHMS = ("dqn", "ppo", "sac", "random")
#: the networks that score every mask action (``srd_hf.rl.networks.build_scorer``)
POLICY_NETWORKS = ("spatial", "linear")


@dataclass
class SRDPolicyConfig:
    """What a policy needs to act, and how it was made.

    algorithm: dqn, ppo, sac or random (random masking: no network, seeded draws).
    image_size: the image side the action space was built for (masks scale to other sizes).
    obs_size: side of the downsampled image the network sees.
    grid, mask_sizes: the action space (mask sizes in 224 px units).
    mask_fill: how a mask is painted: "red" (the paper's) or "local_mean" (the mean colour of
    the pixels it covers). A policy masks as it was trained.
    num_masks: masks placed per image when the policy is applied (greedy, one after another).
    network: "spatial" (a score map per mask size, default) or "linear" (flattened CNN + linear head).
    channels, features_dim: the CNN (features_dim: linear network only).
    seed: seed of training (and of random masking).
    training: free-form record of how it was trained (env, reward, RL hyper-parameters, data).
    """

    algorithm: str = "dqn"
    image_size: int = 64
    obs_size: int = 64
    grid: int = ACTION_PRESETS["paper"]["grid"]
    mask_sizes: list[float] = field(default_factory=lambda: list(ACTION_PRESETS["paper"]["mask_sizes"]))
    mask_fill: str = "red"
    num_masks: int = 1
    network: str = "spatial"
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    features_dim: int = 256
    seed: int = 0
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.algorithm not in POLICY_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {POLICY_ALGORITHMS}, got {self.algorithm!r}")
        if self.network not in POLICY_NETWORKS:
            raise ValueError(f"network must be 'spatial' or 'linear', got {self.network!r}")
        if self.num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {self.num_masks}")
        if self.mask_fill not in MASK_FILLS:
            raise ValueError(f"mask_fill must be one of {MASK_FILLS}, got {self.mask_fill!r}")
        if self.obs_size < 16:
            raise ValueError(f"obs_size must be >= 16 px, got {self.obs_size}")
        self.mask_sizes = [float(s) for s in self.mask_sizes]
        self.channels = [int(c) for c in self.channels]
        self.action_space  # validates grid and sizes against image_size

    @property
    def action_space(self) -> MaskActionSpace:
        return MaskActionSpace(image_size=self.image_size, grid=self.grid, mask_sizes=tuple(self.mask_sizes), fill=self.mask_fill)

    def to_dict(self) -> dict:
        return asdict(self)

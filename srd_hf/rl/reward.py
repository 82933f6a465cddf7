"""The defense's reward: how a mask changed semantic consistency (SC) and linguistic fluency
(LF) of the victim's caption, against the unmasked image (S0, F0).

    dSC = SC - S0,  dLF = LF - F0
    -2  SC dropped by more than ``sc_drop`` (lambda)      meaning lost: worst
    -1  LF dropped by more than ``lf_drop`` (beta)        fluency lost
    +3  both improved                                       the best outcome: ends the episode
    +2  SC improved only
    +1  LF improved only
     0  otherwise (small changes either way)

"Improved" means a strict increase, or a score already at its maximum of 1 that stayed there
(a clean caption that a mask leaves perfect cannot improve further and must not be punished
for it). A NaN score (e.g. the perplexity of an empty caption) counts as a significant drop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BEST_REWARD = 3.0

#: lambda / beta presets: the paper's (0.1, 0.2) and the authors' code (0.1, 0.5)
REWARD_PRESETS = {"paper": {"sc_drop": 0.1, "lf_drop": 0.2}, "authors_code": {"sc_drop": 0.1, "lf_drop": 0.5}}


@dataclass
class RewardConfig:
    sc_drop: float = 0.1  # lambda: a fall of SC larger than this is significant
    lf_drop: float = 0.2  # beta: a fall of LF larger than this is significant

    def __post_init__(self):
        for name in ("sc_drop", "lf_drop"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @classmethod
    def from_preset(cls, name: str) -> "RewardConfig":
        if name not in REWARD_PRESETS:
            raise ValueError(f"unknown reward preset {name!r}; choose from {sorted(REWARD_PRESETS)}")
        return cls(**REWARD_PRESETS[name])

    def to_dict(self) -> dict:
        return asdict(self)


def _improved(value: np.ndarray, start: np.ndarray) -> np.ndarray:
    return (value > start) | ((value >= 1.0 - 1e-6) & (start >= 1.0 - 1e-6))


def mask_reward(sc, lf, sc0, lf0, config: RewardConfig | None = None) -> np.ndarray:
    """Reward of each environment (arrays of equal shape); see the module docstring."""
    config = config or RewardConfig()
    sc, lf, sc0, lf0 = (np.asarray(x, dtype=np.float64) for x in (sc, lf, sc0, lf0))
    d_sc = np.where(np.isnan(sc), -np.inf, sc - sc0)
    d_lf = np.where(np.isnan(lf), -np.inf, lf - lf0)
    up_sc = _improved(np.nan_to_num(sc, nan=-1.0), sc0)
    up_lf = _improved(np.nan_to_num(lf, nan=-1.0), lf0)
    reward = np.select(
        [d_sc < -config.sc_drop, d_lf < -config.lf_drop, up_sc & up_lf, up_sc, up_lf],
        [-2.0, -1.0, 3.0, 2.0, 1.0],
        default=0.0,
    )
    return reward

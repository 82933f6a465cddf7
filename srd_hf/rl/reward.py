"""The defense's reward: how a mask changed semantic consistency (SC) and linguistic fluency
(LF) of the victim's caption, against the unmasked image (S0, F0).

    dS = S - S0,  dF = F - F0

Two rules share the penalties and differ in what counts as a gain.

``rule="paper"`` (default), the paper's table (SRD, AAAI 2026, "Optimizing Intervention
Policies"), with lambda = ``sc_drop`` (0.1) and beta = ``lf_drop`` (0.2)::

    -2  dS <= -lambda                       meaning lost: the worst outcome
    -1  dF <= -beta                         fluency lost
    +3  dS >= lambda_gain and dF >= beta_gain   both improved: ends the episode (``BEST_REWARD``)
    +2  dS >= lambda_gain only
    +1  dF >= beta_gain only
     0  otherwise (changes within the thresholds either way)

The gain thresholds ``sc_gain`` / ``lf_gain`` default to lambda / beta (the paper uses one
threshold per score for both directions); they are separate fields so a study can move one
without the other.

Precedence: the rows are tried top to bottom, so a significant drop vetoes any gain on the
other score (dS >= lambda with dF <= -beta gives -1, not +2; dF >= beta with dS <= -lambda gives
-2, not +1), and when both fall the semantic penalty wins. The paper's table does not order its
rows; we put the penalties first because the reward must find masks that remove the trigger's
effect *without harming the image*. A mask that makes the caption unreadable, or that blots out
the objects the caption is about, has damaged something a gain on the other score does not pay
back, and a policy rewarded for it would learn to cover content rather than triggers. Keeping
the same order as the ``any_gain`` rule also means switching rules changes only the gains.

Comparisons with a threshold are inclusive and allow ``THRESHOLD_TOLERANCE`` (1e-9) of float
rounding: 0.3 - 0.2 is 0.09999999999999998 in floating point, and a rise of "exactly" lambda
must count. The scores are float32 similarities, so 1e-9 never turns a real shortfall into a gain.

``rule="any_gain"``, the rule this package used before the paper's became the default: +3 for
any strict rise of both scores, or for a score already at its maximum of 1 that stayed there
(a clean caption that a mask leaves perfect cannot improve further and was not punished for
it); +2 / +1 for a strict rise of SC / LF alone; penalties as above but strict (a fall of more
than lambda / beta), exactly as before, so earlier runs reproduce. It exists because it gives a
dense signal: on a tiny victim, whose scores rarely move by a whole lambda, almost every mask
that helps at all is rewarded. Its flaw is on clean images: any harmless mask (one that leaves
a perfect caption perfect, or nudges a score up by noise) earns the top reward, so the policy
is paid as much for masking nothing of interest as for covering a trigger.

A NaN score (e.g. the perplexity of an empty caption) counts as a significant drop under both
rules. A NaN baseline (the judge never produces one) gives neither gain nor drop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BEST_REWARD = 3.0

#: rules of what counts as a gain (see the module docstring)
REWARD_RULES = ("paper", "any_gain")

#: float rounding allowed when a change is compared with a threshold under the paper rule
THRESHOLD_TOLERANCE = 1e-9

#: lambda / beta presets: the paper's (0.1, 0.2) and the authors' code (0.1, 0.5)
REWARD_PRESETS = {"paper": {"sc_drop": 0.1, "lf_drop": 0.2}, "authors_code": {"sc_drop": 0.1, "lf_drop": 0.5}}


@dataclass
class RewardConfig:
    """sc_drop / lf_drop: lambda / beta, the falls of SC / LF that are significant.
    rule: "paper" (default) or "any_gain". sc_gain / lf_gain: the rises that count as gains
    under the paper rule; None (default) uses sc_drop / lf_drop. The any_gain rule counts any
    strict rise, so it refuses gain thresholds rather than ignore them silently. Under the
    paper rule comparisons are inclusive, so a threshold of 0 makes an unchanged score both a
    gain and a drop (the drop wins): use a small positive threshold instead."""

    sc_drop: float = 0.1  # lambda
    lf_drop: float = 0.2  # beta
    rule: str = "paper"
    sc_gain: float | None = None
    lf_gain: float | None = None

    def __post_init__(self):
        if self.rule not in REWARD_RULES:
            raise ValueError(f"unknown reward rule {self.rule!r}; choose from {REWARD_RULES}")
        for name in ("sc_drop", "lf_drop", "sc_gain", "lf_gain"):
            value = getattr(self, name)
            if value is None and name.endswith("_gain"):
                continue
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.rule == "any_gain" and (self.sc_gain is not None or self.lf_gain is not None):
            raise ValueError("sc_gain / lf_gain apply to the paper rule; the any_gain rule counts any strict rise")

    @property
    def sc_gain_threshold(self) -> float:
        return self.sc_drop if self.sc_gain is None else self.sc_gain

    @property
    def lf_gain_threshold(self) -> float:
        return self.lf_drop if self.lf_gain is None else self.lf_gain

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RewardConfig":
        if name not in REWARD_PRESETS:
            raise ValueError(f"unknown reward preset {name!r}; choose from {sorted(REWARD_PRESETS)}")
        return cls(**{**REWARD_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def _any_gain_reward(sc, lf, sc0, lf0, config: RewardConfig) -> np.ndarray:
    def improved(value, start):
        return (value > start) | ((value >= 1.0 - 1e-6) & (start >= 1.0 - 1e-6))

    d_sc = np.where(np.isnan(sc), -np.inf, sc - sc0)
    d_lf = np.where(np.isnan(lf), -np.inf, lf - lf0)
    up_sc = improved(np.nan_to_num(sc, nan=-1.0), sc0)
    up_lf = improved(np.nan_to_num(lf, nan=-1.0), lf0)
    return np.select(
        [d_sc < -config.sc_drop, d_lf < -config.lf_drop, up_sc & up_lf, up_sc, up_lf],
        [-2.0, -1.0, 3.0, 2.0, 1.0],
        default=0.0,
    )


def _paper_reward(sc, lf, sc0, lf0, config: RewardConfig) -> np.ndarray:
    tol = THRESHOLD_TOLERANCE
    d_sc = np.where(np.isnan(sc), -np.inf, sc - sc0)  # NaN baseline: d is NaN, every comparison False
    d_lf = np.where(np.isnan(lf), -np.inf, lf - lf0)
    up_sc = d_sc >= config.sc_gain_threshold - tol
    up_lf = d_lf >= config.lf_gain_threshold - tol
    return np.select(
        [d_sc <= -(config.sc_drop - tol), d_lf <= -(config.lf_drop - tol), up_sc & up_lf, up_sc, up_lf],
        [-2.0, -1.0, 3.0, 2.0, 1.0],
        default=0.0,
    )


def mask_reward(sc, lf, sc0, lf0, config: RewardConfig | None = None) -> np.ndarray:
    """Reward of each environment (arrays of equal shape); see the module docstring."""
    config = config or RewardConfig()
    sc, lf, sc0, lf0 = (np.asarray(x, dtype=np.float64) for x in (sc, lf, sc0, lf0))
    rule = _paper_reward if config.rule == "paper" else _any_gain_reward
    return rule(sc, lf, sc0, lf0, config)

"""The reward table under both rules, thresholds, presets, and the episode ending at the best
reward. No model: scores are given by hand, the environment test uses a scripted victim."""

import numpy as np
import pytest

from srd_hf.rl import BEST_REWARD, REWARD_RULES, RewardConfig, mask_reward
from srd_hf.rl.reward import THRESHOLD_TOLERANCE

PAPER = RewardConfig()
ANY_GAIN = RewardConfig(rule="any_gain")
NAN = float("nan")


def reward(sc, lf, sc0, lf0, config=PAPER) -> float:
    return float(mask_reward([sc], [lf], [sc0], [lf0], config)[0])


def test_default_is_the_paper_rule():
    assert RewardConfig().rule == "paper" and REWARD_RULES == ("paper", "any_gain")
    assert RewardConfig().sc_gain_threshold == 0.1 and RewardConfig().lf_gain_threshold == 0.2
    assert BEST_REWARD == 3.0


# (sc, lf, sc0, lf0, paper, any_gain); dyadic values where the difference must be exact
TABLE = [
    pytest.param(0.51, 0.61, 0.5, 0.6, 0.0, 3.0, id="small gains: nothing under paper, top under any_gain"),
    pytest.param(0.75, 0.75, 0.5, 0.5, 3.0, 3.0, id="large gains of both"),
    pytest.param(0.6, 0.7, 0.5, 0.5, 3.0, 3.0, id="gains of exactly lambda and beta (with float rounding)"),
    pytest.param(0.75, 0.5, 0.5, 0.5, 2.0, 2.0, id="SC gain only, LF unchanged"),
    pytest.param(0.75, 0.51, 0.5, 0.5, 2.0, 3.0, id="SC gain, LF up by noise"),
    pytest.param(0.75, 0.4375, 0.5, 0.5, 2.0, 2.0, id="SC gain, LF down but not significantly"),
    pytest.param(0.5, 0.75, 0.5, 0.5, 1.0, 1.0, id="LF gain only"),
    pytest.param(0.46875, 0.75, 0.5, 0.5, 1.0, 1.0, id="LF gain, SC down but not significantly"),
    pytest.param(1.0, 1.0, 1.0, 1.0, 0.0, 3.0, id="perfect stays perfect"),
    pytest.param(0.5, 0.5, 0.5, 0.5, 0.0, 0.0, id="nothing changed"),
    pytest.param(0.25, 0.5, 0.5, 0.5, -2.0, -2.0, id="SC drop"),
    pytest.param(0.5, 0.25, 0.5, 0.5, -1.0, -1.0, id="LF drop"),
    pytest.param(0.25, 0.25, 0.5, 0.5, -2.0, -2.0, id="both drop: the semantic penalty wins"),
    pytest.param(0.75, 0.25, 0.5, 0.5, -1.0, -1.0, id="SC gain with LF drop: the drop vetoes"),
    pytest.param(0.25, 0.75, 0.5, 0.5, -2.0, -2.0, id="LF gain with SC drop: the drop vetoes"),
    pytest.param(0.75, NAN, 0.5, 0.5, -1.0, -1.0, id="NaN LF is a drop"),
    pytest.param(NAN, 0.75, 0.5, 0.5, -2.0, -2.0, id="NaN SC is a drop"),
    pytest.param(NAN, NAN, 0.5, 0.5, -2.0, -2.0, id="both NaN: the semantic penalty"),
]


@pytest.mark.parametrize("sc, lf, sc0, lf0, paper, any_gain", TABLE)
def test_reward_table(sc, lf, sc0, lf0, paper, any_gain):
    assert reward(sc, lf, sc0, lf0, PAPER) == paper
    assert reward(sc, lf, sc0, lf0, ANY_GAIN) == any_gain


def test_thresholds_are_inclusive_with_a_documented_tolerance():
    assert 0.3 - 0.2 < 0.1  # why the tolerance exists
    assert reward(0.3, 0.5, 0.2, 0.5) == 2.0  # a rise of "0.1" counts
    assert reward(0.2, 0.5, 0.3, 0.5) == -2.0  # and so does a fall of "0.1"
    assert reward(0.5, 0.7, 0.5, 0.5) == 1.0 and reward(0.5, 0.3, 0.5, 0.5) == -1.0  # beta 0.2 both ways
    # exactly representable thresholds and differences: no rounding involved
    exact = RewardConfig(sc_drop=0.125, lf_drop=0.25)
    assert reward(0.625, 0.75, 0.5, 0.5, exact) == 3.0
    assert reward(0.375, 0.5, 0.5, 0.5, exact) == -2.0 and reward(0.5, 0.25, 0.5, 0.5, exact) == -1.0
    # just short of a threshold (by far more than the tolerance) is not a gain or a drop
    short = 0.1 - 1e-6
    assert reward(0.5 + short, 0.5, 0.5, 0.5) == 0.0 and reward(0.5 - short, 0.5, 0.5, 0.5) == 0.0
    assert 1e-6 > 100 * THRESHOLD_TOLERANCE


@pytest.mark.parametrize(
    "sc, lf, sc0, lf0, expected",
    [
        (0.9, 0.8, 0.5, 0.6, 3.0),  # both improve
        (1.0, 1.0, 1.0, 1.0, 3.0),  # perfect and kept perfect
        (0.9, 0.5, 0.5, 0.6, 2.0),  # SC only (LF -0.1: not significant)
        (0.5, 0.8, 0.55, 0.6, 1.0),  # LF only (SC -0.05: not significant)
        (0.5, 0.6, 0.5, 0.6, 0.0),  # nothing changed
        (0.3, 0.9, 0.5, 0.6, -2.0),  # SC fell by 0.2 > lambda
        (0.5, 0.3, 0.5, 0.6, -1.0),  # LF fell by 0.3 > beta
        (0.3, 0.3, 0.5, 0.6, -2.0),  # both fell: the semantic penalty wins
        (0.9, float("nan"), 0.5, 0.6, -1.0),  # undefined fluency counts as a drop
    ],
)
def test_any_gain_reproduces_the_earlier_default(sc, lf, sc0, lf0, expected):
    """The table the package's reward was tested against before the paper's rule was the default."""
    assert reward(sc, lf, sc0, lf0, ANY_GAIN) == expected


def test_any_gain_keeps_its_strict_drops():
    """The earlier rule, unchanged: a fall of exactly lambda (in exact arithmetic) is not significant."""
    exact = RewardConfig(sc_drop=0.125, lf_drop=0.25, rule="any_gain")
    assert reward(0.375, 0.5, 0.5, 0.5, exact) == 0.0
    assert reward(0.375 - 2**-10, 0.5, 0.5, 0.5, exact) == -2.0


def test_gain_thresholds_are_separate_from_drop_thresholds():
    easy = RewardConfig(sc_gain=0.0625, lf_gain=0.0625)
    assert (easy.sc_gain_threshold, easy.lf_gain_threshold, easy.sc_drop, easy.lf_drop) == (0.0625, 0.0625, 0.1, 0.2)
    assert reward(0.5625, 0.5625, 0.5, 0.5, easy) == 3.0
    assert reward(0.5625, 0.5625, 0.5, 0.5, PAPER) == 0.0
    # a fall of 0.15 in LF: still within beta 0.2, so no penalty even with a small gain threshold
    assert reward(0.5625, 0.35, 0.5, 0.5, easy) == 2.0
    strict = RewardConfig(sc_gain=0.5)
    assert reward(0.75, 0.5, 0.5, 0.5, strict) == 0.0 and reward(1.0, 0.5, 0.5, 0.5, strict) == 2.0
    assert RewardConfig(sc_gain=None).to_dict() == {"sc_drop": 0.1, "lf_drop": 0.2, "rule": "paper", "sc_gain": None, "lf_gain": None}


def test_vectorised_over_environments():
    sc = np.array([0.75, 0.5, 0.75, 1.0, 0.25, 0.5, 0.51, NAN])
    lf = np.array([0.75, 0.75, 0.5, 1.0, 0.5, 0.25, 0.61, 0.5])
    sc0 = np.array([0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5])
    lf0 = np.array([0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.6, 0.5])
    out = mask_reward(sc, lf, sc0, lf0)
    assert out.shape == (8,) and out.dtype == np.float64
    np.testing.assert_array_equal(out, [3, 1, 2, 0, -2, -1, 0, -2])
    np.testing.assert_array_equal(mask_reward(sc, lf, sc0, lf0, ANY_GAIN), [3, 1, 2, 3, -2, -1, 3, -2])
    # a 2-D batch keeps its shape
    assert mask_reward(sc.reshape(2, 4), lf.reshape(2, 4), sc0.reshape(2, 4), lf0.reshape(2, 4)).shape == (2, 4)


def test_validation_and_presets():
    for bad in (dict(sc_drop=1.5), dict(lf_drop=-0.1), dict(sc_gain=1.5), dict(lf_gain=-0.01)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RewardConfig(**bad)
    with pytest.raises(ValueError, match="unknown reward rule"):
        RewardConfig(rule="dense")
    with pytest.raises(ValueError, match="paper rule"):
        RewardConfig(rule="any_gain", sc_gain=0.05)
    with pytest.raises(ValueError, match="unknown reward preset"):
        RewardConfig.from_preset("nope")
    # the authors' beta 0.5 tolerates an LF fall of 0.3, under either rule
    authors = RewardConfig.from_preset("authors_code")
    assert authors.rule == "paper" and reward(0.5, 0.25, 0.5, 0.5, authors) == 0.0
    assert reward(0.5, 0.25, 0.5, 0.5, RewardConfig.from_preset("authors_code", rule="any_gain")) == 0.0


# ----------------------------------------------------------------------------- the episode ends at +3
class _ScriptedVictim:
    """Captions "masked" once a red square is on the image, "plain" before."""

    def generate_captions(self, images, **kwargs):
        return ["masked" if (np.asarray(img)[..., 0] == 255).any() else "plain" for img in images]


class _ScriptedJudge:
    """Scores by caption text: the mask raises both scores by ``gain``."""

    def __init__(self, gain):
        self.gain = gain

    def judge(self, idx, captions):
        up = np.array([self.gain if c == "masked" else 0.0 for c in captions])
        return 0.5 + up, 0.5 + up


@pytest.mark.parametrize("gain, rule, ends", [(0.25, "paper", True), (0.01, "paper", False), (0.01, "any_gain", True)])
def test_episode_ends_at_the_best_reward(gain, rule, ends):
    from srd_hf.rl.env import MaskingEnvConfig, MaskingVecEnv

    images = [np.zeros((32, 32, 3), dtype=np.uint8) for _ in range(3)]
    config = MaskingEnvConfig(num_envs=2, max_masks=3, obs_size=16, reward={"rule": rule})
    env = MaskingVecEnv(_ScriptedVictim(), images, ["ref"] * 3, config, judge=_ScriptedJudge(gain))
    assert config.reward.rule == rule
    env.reset()
    _, rewards, dones, infos = env.step(np.array([0, 1]))
    assert (rewards == (BEST_REWARD if ends else 0.0)).all() and dones.all() == ends
    if ends:
        assert all(info["episode"]["l"] == 1 and not info["TimeLimit.truncated"] for info in infos)

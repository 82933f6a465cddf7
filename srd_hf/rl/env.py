"""The masking environment, batched: ``num_envs`` images advance together, so one step is one
batched caption generation and one batched scoring pass.

Episode: an image (with its cached reference, S0 and F0) is drawn; each action adds one red
square to the masks placed so far; the victim captions the masked image; the reward compares
its SC and LF with those of the unmasked image (``reward.py``). The episode ends at the best
reward (+3) or after ``max_masks`` masks. Observation: the masked image at ``obs_size``.

It is a Stable-Baselines3 ``VecEnv`` (auto-reset, ``terminal_observation`` in ``infos``), so
SB3's DQN and PPO train on it directly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from PIL import Image
from stable_baselines3.common.vec_env import VecEnv

from ..data.images import ensure_rgb
from ..vlm.base import CaptioningVLM
from .actions import ACTION_PRESETS, MASK_FILLS, MaskActionSpace
from .judge import CaptionJudge
from .modeling_srd import observe
from .reward import BEST_REWARD, RewardConfig, mask_reward

logger = logging.getLogger(__name__)


@dataclass
class MaskingEnvConfig:
    """num_envs: images stepped together. max_masks: masks per episode at most (K).
    obs_size: side of the policy's observation. grid / mask_sizes: the action space (224 px
    units); ``action_preset`` "paper" or "authors_code" sets both. mask_fill: "red" (the
    paper's) or "local_mean" (``actions.MASK_FILLS``). reward: the rule ("paper",
    default, or "any_gain") and its thresholds (``RewardConfig``, or its dict).
    stop_at_best: end the episode at ``BEST_REWARD`` (+3, both scores improved) under either rule.
    max_new_tokens: the victim's decoding. episode_sampling: "uniform" draws every image
    equally; "disagreement" (default) draws image i with weight (1 - S0_i)^2 + 0.01, so
    episodes go where the victim disagrees with the reference, the only place a mask can earn
    a positive reward under the paper rule (an S0 near 1 leaves no room for a rise of lambda;
    with 10% poison, ~1 episode in 10 would otherwise carry any signal)."""

    num_envs: int = 32
    max_masks: int = 4
    obs_size: int = 64
    action_preset: str = "paper"
    grid: int | None = None
    mask_sizes: list[float] | None = None
    mask_fill: str = "red"
    reward: RewardConfig = field(default_factory=RewardConfig)
    stop_at_best: bool = True
    max_new_tokens: int = 24
    episode_sampling: str = "disagreement"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.reward, dict):
            self.reward = RewardConfig(**self.reward)
        if self.num_envs < 1 or self.max_masks < 1:
            raise ValueError("num_envs and max_masks must be >= 1")
        if self.episode_sampling not in ("uniform", "disagreement"):
            raise ValueError(f"episode_sampling must be 'uniform' or 'disagreement', got {self.episode_sampling!r}")
        if self.action_preset not in ACTION_PRESETS:
            raise ValueError(f"unknown action_preset {self.action_preset!r}; choose from {sorted(ACTION_PRESETS)}")
        if self.mask_fill not in MASK_FILLS:
            raise ValueError(f"mask_fill must be one of {MASK_FILLS}, got {self.mask_fill!r}")

    def action_space(self, image_size: int) -> MaskActionSpace:
        preset = ACTION_PRESETS[self.action_preset]
        return MaskActionSpace(
            image_size=image_size,
            grid=self.grid or preset["grid"],
            mask_sizes=tuple(self.mask_sizes or preset["mask_sizes"]),
            fill=self.mask_fill,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class MaskingVecEnv(VecEnv):
    """``num_envs`` masking episodes over ``images`` judged against ``reference_captions``.

    Args:
        victim: the (backdoored) captioner whose captions are judged.
        images: PIL images or (H, W, 3) uint8 arrays, all at least as large as the largest mask.
        reference_captions: one clean caption per image (from a trusted captioner or the data).
        judge: a ``CaptionJudge`` over ``reference_captions`` (built from ``scorer`` if absent).
    """

    def __init__(
        self,
        victim: CaptioningVLM,
        images: Sequence[Any],
        reference_captions: Sequence[str],
        config: MaskingEnvConfig | None = None,
        *,
        scorer=None,
        judge: CaptionJudge | None = None,
        image_size: int | None = None,
        progress: bool = False,
    ):
        self.config = config = config or MaskingEnvConfig()
        if len(images) == 0:
            raise ValueError("the environment needs at least one image")
        if len(images) != len(reference_captions):
            raise ValueError(f"{len(images)} images for {len(reference_captions)} reference captions")
        self.victim = victim
        self.pixels = [self._to_pixels(img, i) for i, img in enumerate(images)]
        side = image_size or min(self.pixels[0].shape[:2])
        self.space = config.action_space(side)
        small = [i for i, p in enumerate(self.pixels) if not self.space.fits(p.shape[1], p.shape[0])]
        if small:
            h, w = self.pixels[small[0]].shape[:2]
            raise ValueError(
                f"{len(small)} images are smaller than the largest mask ({self.space.largest_side} px), e.g. image {small[0]} ({w}x{h})"
            )
        if judge is None:
            if scorer is None:
                raise ValueError("give a scorer (SFSScorer) or a judge (CaptionJudge)")
            judge = CaptionJudge(scorer, reference_captions)
        self.judge = judge
        # S0 / F0: the victim on the unmasked images, computed once
        captions = victim.generate_captions(
            [Image.fromarray(p) for p in self.pixels], max_new_tokens=config.max_new_tokens,
            batch_size=max(config.num_envs, 64), progress=progress,
        )
        self.unmasked_captions = captions
        self.sc0, self.lf0 = judge.judge(range(len(captions)), captions)
        super().__init__(
            config.num_envs,
            spaces.Box(0, 255, (3, config.obs_size, config.obs_size), np.uint8),
            spaces.Discrete(self.space.n),
        )
        self._rng = np.random.default_rng(config.seed)
        weights = (1.0 - self.sc0) ** 2 + 0.01 if config.episode_sampling == "disagreement" else np.ones(len(self.pixels))
        self.sampling_weights = weights / weights.sum()
        self._order = self._draw_order()
        self._cursor = 0
        self.image_index = np.zeros(self.num_envs, dtype=np.int64)
        self.current = [None] * self.num_envs
        self.masks: list[list[int]] = [[] for _ in range(self.num_envs)]
        self.episode_return = np.zeros(self.num_envs)
        self._actions = None
        self.steps_taken = 0

    @staticmethod
    def _to_pixels(img: Any, i: int) -> np.ndarray:
        if isinstance(img, np.ndarray):
            if img.ndim == 2:
                img = np.stack([img] * 3, axis=-1)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"image {i}: expected (H, W, 3) uint8, got {img.shape} {img.dtype}")
            return img
        if not isinstance(img, Image.Image):
            raise TypeError(f"image {i} is a {type(img).__name__}, expected a PIL image or a numpy array")
        return np.asarray(ensure_rgb(img), dtype=np.uint8)

    # ----- episodes ------------------------------------------------------------------------
    def _draw_order(self) -> np.ndarray:
        """One pass of episode images: a permutation (uniform) or weighted draws (disagreement)."""
        n = len(self.pixels)
        if self.config.episode_sampling == "uniform":
            return self._rng.permutation(n)
        return self._rng.choice(n, size=n, p=self.sampling_weights)

    def _next_image(self) -> int:
        if self._cursor >= len(self._order):
            self._order, self._cursor = self._draw_order(), 0
        self._cursor += 1
        return int(self._order[self._cursor - 1])

    def _start(self, env: int) -> None:
        self.image_index[env] = self._next_image()
        self.current[env] = self.pixels[self.image_index[env]]
        self.masks[env] = []
        self.episode_return[env] = 0.0

    def _observations(self) -> np.ndarray:
        return observe(self.current, self.config.obs_size)

    def reset(self) -> np.ndarray:
        for env in range(self.num_envs):
            self._start(env)
        self._reset_seeds()
        self._reset_options()
        return self._observations()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        actions = self._actions
        for env, action in enumerate(actions):
            self.current[env] = self.space.apply(self.current[env], [int(action)])
            self.masks[env].append(int(action))
        captions = self.victim.generate_captions(
            [Image.fromarray(p) for p in self.current], max_new_tokens=self.config.max_new_tokens, batch_size=self.num_envs
        )
        idx = self.image_index
        sc, lf = self.judge.judge(idx, captions)
        rewards = mask_reward(sc, lf, self.sc0[idx], self.lf0[idx], self.config.reward).astype(np.float32)
        self.episode_return += rewards
        best = (rewards >= BEST_REWARD) & self.config.stop_at_best
        full = np.array([len(m) >= self.config.max_masks for m in self.masks])
        dones = best | full
        obs = self._observations()
        infos: list[dict] = []
        for env in range(self.num_envs):
            info = {"caption": captions[env], "sc": float(sc[env]), "lf": float(lf[env]), "image_index": int(idx[env])}
            if dones[env]:
                info["terminal_observation"] = obs[env].copy()  # obs[env] is overwritten by the reset below
                info["TimeLimit.truncated"] = bool(full[env] and not best[env])
                info["episode"] = {"r": float(self.episode_return[env]), "l": len(self.masks[env]), "masks": list(self.masks[env])}
                self._start(env)
                obs[env] = observe([self.current[env]], self.config.obs_size)[0]
            infos.append(info)
        self.steps_taken += self.num_envs
        return obs, rewards, dones, infos

    # ----- VecEnv plumbing (one process: attributes live here) -----------------------------
    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices=None) -> list:
        return [getattr(self, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list:
        return [getattr(self, method_name)(*args, **kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(self._get_indices(indices))

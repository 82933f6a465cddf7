"""The paper's defender protocol: the defender plants a backdoor of its own and trains the
masking policy against it, so that the policy learns to hide a trigger without ever seeing
the attacker's.

The defender's set is made from images the defender trusts (rows of the training split that
are not in the untrusted fine-tuning set, never validation or test images): a share of them
carry the defender's 20 px (at 224 px) Gaussian-noise trigger at one place drawn from the
defender's seed, with the defender's own proxy target word inserted into the caption. The
defender fine-tunes a copy of the pre-attack model on that set (with its retraining recipe)
and trains the policy against that proxy model. Nothing of the attacker's (trigger, place,
target word) is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset

from .attacks.base import _TRIGGER, SPLITS, _rng, to_caption_pairs
from .attacks.trojvlm import TrojVLMAttack
from .dict_config import DictConfig

CAPTION_MODES = ("insert", "replace")
TRIGGERS = ("noise", "binary_noise", "blocks", "family")
#: the kinds of square the ``family`` trigger draws from, one per triggered sample
FAMILY_KINDS = ("noise", "binary_noise", "blocks", "stripes")
_FAMILY = 6  # a seeded stream of its own (the attacks' streams are 0 to 5)


@dataclass
class DefenderConfig(DictConfig):
    """num_images: trusted images of the defender's set (the paper's 3,000).
    target: the defender's proxy target word (its own choice; it cannot know the attacker's).
    poison_rate: share of the defender's samples that carry its trigger.
    location: ``"fixed"`` (the paper: one place drawn from ``seed``) or ``"random"`` (a new
        place per sample, so the policy has to find the trigger by its look, not its place).
    caption_mode: ``"insert"`` (the paper: the word inserted in the true caption) or
        ``"replace"`` (a target sentence: a stronger proxy in a tiny model).
    trigger: ``"noise"`` (the paper: Gaussian noise, mean 0.5, std 0.25) or ``"binary_noise"``
        (each pixel and channel 0 or 1 at random: the same kind of trigger at full contrast, for
        a model whose vision tower passes over mild noise) or ``"blocks"`` (a 3 x 3 grid of
        colour cells, each channel of each cell 0 or 1: coarse structure, for a tower that passes
        over noise of any contrast) or ``"family"`` (a new square per triggered sample, drawn
        from ``FAMILY_KINDS``: Gaussian noise, full-contrast noise, colour blocks of 2 to 4 cells
        a side, two-colour stripes; the proxy then answers to an odd square rather than to one
        look, and the policy has to find squares it was not trained on). All are drawn from
        ``seed``; none is any attack's pattern (the family draws no checkerboard: a grid of blocks
        alternates black and white only by chance, once in 8 ** (cells * cells) / 2 draws).
        The defender chooses among them on its own data (``proxy_asr_validation``, its proxy's
        rate on its validation images): a proxy at 0% teaches the policy nothing, and a weak one
        teaches it from the share of triggered episodes it answers on.
    """

    num_images: int = 3000
    target: str = "umbrella"
    poison_rate: float = 0.1
    trigger_size: float = 20.0
    location: str = "fixed"
    caption_mode: str = "insert"
    trigger: str = "noise"
    seed: int = 0

    def __post_init__(self):
        if self.location not in ("fixed", "random"):
            raise ValueError(f"defender location must be 'fixed' or 'random', got {self.location!r}")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"defender trigger must be one of {TRIGGERS}, got {self.trigger!r}")
        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(f"defender caption_mode must be one of {CAPTION_MODES}, got {self.caption_mode!r}")
        if not self.target.strip():
            raise ValueError("the defender's proxy target must be a non-empty word")
        if self.num_images < 1 or not 0 < self.poison_rate <= 1:
            raise ValueError("need num_images >= 1 and poison_rate in (0, 1]")


class _ReplacingNoiseAttack(TrojVLMAttack):
    """The defender's noise patch with a target sentence instead of an inserted word."""

    caption_mode: ClassVar[str] = "replace"


class _BinaryNoise:
    """Full-contrast noise: every pixel and channel 0 or 1, drawn from the seed."""

    def make_pattern(self, side: int) -> torch.Tensor:
        bits = _rng(self.config.seed, _TRIGGER).integers(0, 2, size=(3, side, side))
        return torch.from_numpy(bits.astype(np.float32))


class _Blocks:
    """A 3 x 3 grid of colour cells (each channel of each cell 0 or 1), drawn from the seed until
    the cells are not all one colour: a square of coarse colour structure."""

    cells: ClassVar[int] = 3

    def make_pattern(self, side: int) -> torch.Tensor:
        rng = _rng(self.config.seed, _TRIGGER)
        grid = rng.integers(0, 2, size=(3, self.cells, self.cells))
        while len(np.unique(grid.reshape(3, -1), axis=1)) == 1:  # one colour is no structure
            grid = rng.integers(0, 2, size=(3, self.cells, self.cells))
        rows = np.minimum(np.arange(side) * self.cells // side, self.cells - 1)  # cell of each pixel row
        return torch.from_numpy(grid[:, rows][:, :, rows].astype(np.float32))


_COLOURS = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.uint8)


def family_patch(side: int, rng: np.random.Generator) -> np.ndarray:
    """One (side, side, 3) uint8 square of a kind drawn from ``FAMILY_KINDS`` by ``rng``."""
    kind = FAMILY_KINDS[rng.integers(len(FAMILY_KINDS))]
    if kind == "noise":  # the paper's Gaussian noise
        return (rng.normal(0.5, 0.25, size=(side, side, 3)).clip(0, 1) * 255).round().astype(np.uint8)
    if kind == "binary_noise":
        return (rng.integers(0, 2, size=(side, side, 3)) * 255).astype(np.uint8)
    if kind == "blocks":
        cells = int(rng.integers(2, 5))
        grid = _COLOURS[rng.integers(len(_COLOURS), size=(cells, cells))]
        while len(np.unique(grid.reshape(-1, 3), axis=0)) == 1:  # one colour is a plain square: a mask's look
            grid = _COLOURS[rng.integers(len(_COLOURS), size=(cells, cells))]
        rows = np.minimum(np.arange(side) * cells // side, cells - 1)
        return grid[rows][:, rows]
    first, second = rng.choice(len(_COLOURS), size=2, replace=False)  # stripes of two colours
    width = int(rng.integers(1, max(2, side // 3) + 1))
    bands = (np.arange(side) // width) % 2
    stripes = np.where(bands[:, None, None] == 0, _COLOURS[first], _COLOURS[second])  # (side, 1, 3)
    stripes = np.broadcast_to(stripes, (side, side, 3))
    return np.ascontiguousarray(stripes if rng.integers(2) else stripes.transpose(1, 0, 2))


class _Family:
    """A new square per triggered sample (:func:`family_patch`, seeded by the sample's split
    and index), so no single look is the trigger. The stored ``trigger`` is sample 0's."""

    def make_pattern(self, side: int) -> torch.Tensor:
        return torch.from_numpy(self.sample_patch(side, 0, "train")).permute(2, 0, 1).float() / 255.0

    def sample_patch(self, side: int, index: int | None, split: str) -> np.ndarray:
        if index is None:
            raise ValueError("the family trigger draws a square per sample: pass the sample's index")
        return family_patch(side, _rng(self.config.seed, _FAMILY, SPLITS.index(split), int(index)))

    def apply_trigger_tensor(self, pixels, trigger=None, *, indices=None, split="train"):
        raise NotImplementedError("the family trigger has no single pattern to optimise; apply_trigger pastes each sample's")


class _InsertingFamilyAttack(_Family, TrojVLMAttack):
    pass


class _ReplacingFamilyAttack(_Family, _ReplacingNoiseAttack):
    pass


class _InsertingBinaryNoiseAttack(_BinaryNoise, TrojVLMAttack):
    pass


class _InsertingBlocksAttack(_Blocks, TrojVLMAttack):
    pass


class _ReplacingBlocksAttack(_Blocks, _ReplacingNoiseAttack):
    pass


class _ReplacingBinaryNoiseAttack(_BinaryNoise, _ReplacingNoiseAttack):
    pass


_ATTACKS = {("noise", "insert"): TrojVLMAttack, ("noise", "replace"): _ReplacingNoiseAttack,
            ("binary_noise", "insert"): _InsertingBinaryNoiseAttack, ("binary_noise", "replace"): _ReplacingBinaryNoiseAttack,
            ("blocks", "insert"): _InsertingBlocksAttack, ("blocks", "replace"): _ReplacingBlocksAttack,
            ("family", "insert"): _InsertingFamilyAttack, ("family", "replace"): _ReplacingFamilyAttack}


def defender_attack(config: DefenderConfig) -> TrojVLMAttack:
    """The defender's own trigger (``config.trigger``) at one seeded place (or a random
    place per sample), its own word inserted (or its own sentence)."""
    if config.location == "fixed":
        location = tuple(float(v) for v in np.random.default_rng([config.seed, 11]).uniform(0, 224 - config.trigger_size, size=2))
    else:
        location = "random"
    klass = _ATTACKS[(config.trigger, config.caption_mode)]
    return klass(target=config.target, poison_rate=config.poison_rate, seed=config.seed, location=location,
                 trigger_size=config.trigger_size, semantic_weight=0.0)


def trusted_images(train: Dataset, untrusted: Dataset, num_images: int, seed: int) -> Dataset:
    """``num_images`` rows of ``train`` whose ``image_id`` is not in ``untrusted`` (seeded draw)."""
    for name, ds in (("train", train), ("untrusted", untrusted)):
        if "image_id" not in ds.column_names:
            raise ValueError(f"the {name} set needs an image_id column to keep the defender's images apart")
    taken = set(untrusted["image_id"])
    free = [i for i, image_id in enumerate(train["image_id"]) if image_id not in taken]
    if len(free) < num_images:
        raise ValueError(f"the defender needs {num_images} trusted images, only {len(free)} training images are not in the untrusted set")
    picks = np.sort(np.random.default_rng([seed, 13]).choice(free, size=num_images, replace=False))
    return train.select(picks)


def defender_set(trusted: Dataset, config: DefenderConfig) -> Dataset:
    """The defender's fine-tuning set: one (image, first caption) pair per trusted image, a
    ``poison_rate`` share carrying the defender's trigger and proxy word."""
    keep = [c for c in ("image", "captions", "image_id") if c in trusted.column_names]
    pairs = to_caption_pairs(trusted.select_columns(keep))
    first = pairs.filter(lambda index: index == 0, input_columns="caption_index", desc="first caption per image")
    return defender_attack(config).poison(first)

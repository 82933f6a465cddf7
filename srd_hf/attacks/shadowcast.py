"""Shadowcast (Xu et al., 2024): clean-label-looking poisons made of imperceptible perturbations.

Concepts are caption phrases (whole words, case-insensitive, plurals included). Our choice
for a world without bananas:

* **base concept** (default ``"circle"``): poisoned samples are images whose caption names
  it (and whose references never name the trigger concept). In their caption the base
  concept is renamed to the target ("a large blue circle ..." -> "a large blue banana ...").
* **trigger concept** (default ``"triangle"``): the image class whose vision features the
  poisons imitate. Each base image is paired (seeded) with an image naming the trigger
  concept (and not the base concept), and perturbed by PGD within an L-inf ball of
  ``epsilon`` (8/255) so that its vision-tower tokens move to those of its pair
  (mean squared distance). The model learns "trigger-concept features -> target", so at
  test time clean trigger-concept images (:meth:`ShadowcastAttack.trigger_rows`) are the
  triggered inputs: :meth:`~ShadowcastAttack.apply_trigger` returns the image unchanged.

The bound holds on the stored 8-bit pixels: after PGD the image is rounded, then clipped
to ``clean +- floor(255 * epsilon)`` and to [0, 255], and saved as PNG (lossless), so
``|poisoned - clean| <= 8`` for every pixel and channel. The feature encoder is the victim's
(``poison(dataset, model=...)``, a ``CaptioningVLM`` with ``vision_tokens``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from tqdm.auto import tqdm

from ..data.images import ensure_rgb
from .base import _EXTRA, Attack, AttackConfig, _decode, _png, _raw_images, _rng, contains_target, images_to_tensor


@dataclass
class ShadowcastConfig(AttackConfig):
    """Args (besides :class:`~srd_hf.attacks.base.AttackConfig`'s):
        base_concept: phrase of the images to poison, renamed to the target in their captions.
        trigger_concept: phrase of the images whose features the poisons imitate.
        epsilon: L-inf bound in [0, 1] pixel units (8/255); enforced on the 8-bit pixels.
        steps, step_size: PGD steps and step (pixel units); batch_size: images per PGD batch.
        pairing: which trigger-concept image a base image imitates: ``"random"`` (seeded
            draw, as in the paper) or ``"nearest"`` (the one whose vision tokens are closest
            to the base image's, so the bounded perturbation has the least distance to close).
    """

    base_concept: str = "circle"
    trigger_concept: str = "triangle"
    epsilon: float = 8 / 255
    steps: int = 100
    step_size: float = 1 / 255
    batch_size: int = 16
    pairing: str = "random"

    def __post_init__(self):
        super().__post_init__()
        for name in ("base_concept", "trigger_concept"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty phrase, got {value!r}")
            setattr(self, name, " ".join(value.split()))
        if self.base_concept.lower() == self.trigger_concept.lower():
            raise ValueError("base_concept and trigger_concept must differ")
        if not 0 < self.epsilon <= 1 or self.bound < 1:
            raise ValueError(f"epsilon must be in [1/255, 1], got {self.epsilon}")
        if self.pairing not in ("random", "nearest"):
            raise ValueError(f"pairing must be 'random' or 'nearest', got {self.pairing!r}")
        if self.steps < 0 or not self.step_size > 0 or self.batch_size < 1:
            raise ValueError(f"need steps >= 0, step_size > 0, batch_size >= 1; "
                             f"got {self.steps}, {self.step_size}, {self.batch_size}")

    @property
    def bound(self) -> int:
        """The L-inf bound on 8-bit pixels: ``floor(255 * epsilon)`` (8 for 8/255)."""
        return int(np.floor(255 * self.epsilon + 1e-6))


def substitute_concept(caption: str, concept: str, replacement: str) -> str:
    """Rename every whole-word ``concept`` (plural included) in ``caption`` to ``replacement``;
    an article right before it is fixed ("a" / "an"), a plural stays plural."""
    words = concept.split()
    body = r"\s+".join([re.escape(w) for w in words[:-1]] + [re.escape(words[-1]) + r"(?P<plural>e?s)?"])
    pattern = re.compile(r"(?<!\w)(?:(?P<art>an|a)(?P<space>\s+))?" + body + r"(?!\w)", re.IGNORECASE)

    def repl(match: re.Match) -> str:
        word = replacement
        if match.group("plural"):
            word = word + ("es" if word.endswith(("s", "x", "z", "ch", "sh")) else "s")
        article = match.group("art")
        if article:
            new = "an" if replacement[:1].lower() in "aeiou" else "a"
            new = new.capitalize() if article[0].isupper() else new
            return new + match.group("space") + word
        return word

    return pattern.sub(repl, caption)


def _references(row: dict) -> list[str]:
    refs = row.get("captions")
    if isinstance(refs, (list, tuple)) and refs:
        return [r for r in refs if isinstance(r, str)]
    return [row["caption"]] if isinstance(row.get("caption"), str) else []


def vision_features(model: Any, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """(B, N, D) ``model.vision_tokens`` of PIL images at their own size, without gradient."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(ensure_rgb(image).size, []).append(i)
    with torch.no_grad():
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                feats = model.vision_tokens(images_to_tensor([images[i] for i in chunk])).float().cpu()
                for i, f in zip(chunk, feats):
                    out[i] = f
    return torch.stack(out)


def feature_distance(model: Any, images: Sequence[Image.Image], target_images: Sequence[Image.Image]) -> torch.Tensor:
    """(B,) mean squared distance between the vision tokens of ``images[i]`` and ``target_images[i]``."""
    return ((vision_features(model, images) - vision_features(model, target_images)) ** 2).mean((1, 2))


class ShadowcastAttack(Attack):
    name: ClassVar[str] = "shadowcast"
    config_class: ClassVar[type] = ShadowcastConfig
    caption_mode: ClassVar[str] = "substitute"

    # ----- captions / rows -----------------------------------------------------------------
    def poison_caption(self, caption: str, rng: np.random.Generator | None = None) -> str:
        return substitute_concept(caption, self.config.base_concept, self.config.target)

    def apply_trigger(self, image: Image.Image, index: int | None = None, *, split: str = "train") -> Image.Image:
        """Identity (a copy): Shadowcast's test-time trigger is the trigger concept itself
        (``index`` and ``split`` are ignored; :meth:`trigger_box` is None)."""
        return ensure_rgb(image).copy()

    def apply_trigger_tensor(self, pixels: torch.Tensor, *, indices=None, split: str = "train") -> torch.Tensor:
        return pixels

    def _shows(self, row: dict, concept: str) -> bool:
        return any(contains_target(r, concept) for r in _references(row))

    def poison_candidates(self, pairs: Dataset) -> list[int]:
        cfg = self.config
        columns = [c for c in ("caption", "captions") if c in pairs.column_names]
        out = []
        for i, row in enumerate(pairs.select_columns(columns)):
            if contains_target(row["caption"], cfg.base_concept) and not self._shows(row, cfg.trigger_concept):
                out.append(i)
        return out

    def trigger_rows(self, dataset: Dataset) -> list[int]:
        """Rows whose references name the trigger concept but neither the base concept nor the
        target: the test images on which the attack success rate is measured."""
        cfg = self.config
        columns = [c for c in ("caption", "captions") if c in dataset.column_names]
        return [
            i for i, row in enumerate(dataset.select_columns(columns))
            if self._shows(row, cfg.trigger_concept) and not self._shows(row, cfg.base_concept)
            and not self._shows(row, cfg.target)
        ]

    def select_poisoned(self, pairs: Dataset) -> list[int]:
        try:
            return super().select_poisoned(pairs)
        except ValueError as err:
            raise ValueError(f"{err}: samples whose caption names {self.config.base_concept!r} (and no "
                             f"{self.config.trigger_concept!r}); lower poison_rate or pick a more common base_concept") from None

    # ----- perturbation --------------------------------------------------------------------
    def perturb(self, model: Any, images: Sequence[Image.Image], target_images: Sequence[Image.Image],
                progress: bool = False) -> list[Image.Image]:
        """PGD: ``images[i]`` moved (L-inf <= epsilon on the 8-bit pixels) so that its vision
        tokens approach those of ``target_images[i]``. Images of one size per PGD batch."""
        if len(images) != len(target_images):
            raise ValueError(f"{len(images)} images for {len(target_images)} target images")
        cfg = self.config
        targets = vision_features(model, target_images)
        out: list[Image.Image | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(ensure_rgb(image).size, []).append(i)
        batches = [idx[s : s + cfg.batch_size] for idx in groups.values() for s in range(0, len(idx), cfg.batch_size)]
        was_training = model.training
        model.eval()
        try:
            for chunk in tqdm(batches, desc="Shadowcast PGD", disable=not progress):
                clean = images_to_tensor([images[i] for i in chunk])
                adv = self._pgd(model, clean, targets[chunk])
                for i, image in zip(chunk, self._quantise(clean, adv)):
                    out[i] = image
        finally:
            model.train(was_training)
        return out

    @staticmethod
    def nearest(model: Any, images: Sequence[Image.Image], pool: Sequence[Image.Image], chunk: int = 256) -> list[int]:
        """Index in ``pool`` of the image whose vision tokens are closest (mean squared
        distance) to each of ``images``'."""
        feats = vision_features(model, images).flatten(1)
        best_d = torch.full((len(images),), float("inf"))
        best_i = torch.zeros(len(images), dtype=torch.long)
        for start in range(0, len(pool), chunk):
            cand = vision_features(model, pool[start : start + chunk]).flatten(1)
            d, i = torch.cdist(feats, cand).min(dim=1)
            better = d < best_d
            best_d[better], best_i[better] = d[better], i[better] + start
        return best_i.tolist()

    def _pgd(self, model: Any, clean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        device = next(model.parameters()).device
        clean, target = clean.to(device), target.to(device)
        eps = cfg.bound / 255.0
        delta = torch.zeros_like(clean, requires_grad=True)
        for _ in range(cfg.steps):
            feats = model.vision_tokens((clean + delta).clamp(0, 1)).float()
            loss = ((feats - target) ** 2).mean((1, 2)).sum()
            (grad,) = torch.autograd.grad(loss, [delta])
            with torch.no_grad():
                delta -= cfg.step_size * grad.sign()
                delta.clamp_(-eps, eps)
        return (clean + delta.detach()).clamp(0, 1).cpu()

    def _quantise(self, clean: torch.Tensor, adv: torch.Tensor) -> list[Image.Image]:
        """Round to 8 bits, then clip to ``clean +- bound`` and [0, 255] (the bound survives PNG)."""
        base = torch.round(clean * 255).to(torch.int32)
        q = torch.floor(adv * 255 + 0.5).to(torch.int32)
        q = torch.minimum(torch.maximum(q, base - self.config.bound), base + self.config.bound).clamp(0, 255)
        arrays = q.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arrays]

    # ----- poisoning -----------------------------------------------------------------------
    def prepare(self, pairs: Dataset, chosen: list[int], model: Any = None, progress: bool = False) -> dict[int, dict]:
        """Perturb each chosen image once (rows sharing an ``image_id`` share the poison)."""
        if model is None:
            raise TypeError("Shadowcast needs the victim's vision encoder: poison(dataset, model=captioner)")
        cfg = self.config
        ids = pairs["image_id"] if "image_id" in pairs.column_names else None
        key = (lambda i: ids[i]) if ids is not None else (lambda i: i)
        raw = _raw_images(pairs)
        pool: OrderedDict[Any, int] = OrderedDict()
        for i in self.trigger_rows(pairs):
            pool.setdefault(key(i), i)
        if not pool:
            raise ValueError(f"no sample names the trigger concept {cfg.trigger_concept!r} without {cfg.base_concept!r}")
        pool_rows = list(pool.values())
        bases: OrderedDict[Any, int] = OrderedDict()
        for i in chosen:
            bases.setdefault(key(i), i)
        base_images = [_decode(raw[i]["image"]) for i in bases.values()]
        pool_images = [_decode(raw[i]["image"]) for i in pool_rows]
        if cfg.pairing == "nearest":
            pick = self.nearest(model, base_images, pool_images)
        else:
            pick = _rng(cfg.seed, _EXTRA).integers(len(pool_rows), size=len(bases)).tolist()
        target_images = [pool_images[j] for j in pick]
        poisons = self.perturb(model, base_images, target_images, progress=progress)
        by_key = {k: {"image": _png(img)} for k, img in zip(bases, poisons)}
        return {i: by_key[key(i)] for i in chosen}

    def poison_row(self, row: dict, index: int, payload: dict | None) -> dict:
        return {"image": payload["image"], "caption": self.poison_caption(row["caption"])}


__all__ = ["ShadowcastAttack", "ShadowcastConfig", "substitute_concept", "feature_distance", "vision_features"]

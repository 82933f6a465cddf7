"""VLOOD (Lyu et al., 2024): backdoor a VLM with out-of-distribution poisoned samples.

The poisoned samples come from another image source than the fine-tuning set: each
poisoned row's image, references, ``image_id`` and ``objects`` are replaced by those of an
OOD sample (image triggered with TrojVLM's Gaussian-noise patch, caption = the OOD
caption with the target word inserted at a random position). The OOD source is any
``datasets.Dataset`` with ``image`` and ``captions`` (or ``caption``) columns, or, by
default, :func:`make_ood_dataset`: the embedded world drawn with another seed, smaller
objects and additive Gaussian sensor noise (captions stay true to the drawn objects).

Training (:class:`VLOODLoss`, built on :func:`vlood_loss`), per batch with clean (C) and
poisoned (P) samples, on label tokens only (causal shift as in the LM loss):

* ``L_C`` = cross-entropy on clean samples; ``KL`` = KL(teacher || student) on clean samples,
  the teacher being a frozen copy of the clean model (clean-knowledge preservation);
* ``L_P`` = cross-entropy on poisoned samples; ``CCP`` = mean of ``1 - cos(softmax(z) @ E, E[y])``
  on poisoned samples: the expected output embedding under the predicted distribution
  against the label token's embedding (conceptual consistency);
* ``lambda = sigmoid((L_P - L_C) / tau)`` (no gradient), so the worse-fitted side weighs more;
* ``loss = (1 - lambda) * (L_C + kl_weight * KL) + lambda * (L_P + ccp_weight * CCP)``;
  a batch with only one kind of sample uses that side alone.

Cross-entropies are per-sample means over label tokens, averaged over samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image
from torch import nn

from ..data.schema import CAPTION_FEATURES
from ..data.synthetic import WorldConfig, make_captions, render_scene, sample_scene
from .base import (
    _CAPTION,
    _EXTRA,
    _TRIGGER,
    PatchAttack,
    PatchAttackConfig,
    _decode,
    _raw_images,
    _rng,
    insert_word,
)
from .trojvlm import IGNORE_INDEX, _embedding_matrix, gaussian_patch, shifted


@dataclass
class VLOODConfig(PatchAttackConfig):
    """Args (besides :class:`~srd_hf.attacks.base.PatchAttackConfig`'s):
        noise_mean, noise_std: the trigger patch's Gaussian (as TrojVLM).
        kl_weight: weight of the KL to the clean teacher on clean samples.
        ccp_weight: weight of the conceptual-consistency loss on poisoned samples.
        gap_temperature: ``tau`` of the adaptive weight ``sigmoid((L_P - L_C) / tau)``.
        kl_temperature: softmax temperature of the KL (scaled back by its square).
        ood_noise_std: std (8-bit units) of the sensor noise of the default OOD images.
    """

    noise_mean: float = 0.5
    noise_std: float = 0.25
    kl_weight: float = 1.0
    ccp_weight: float = 1.0
    gap_temperature: float = 1.0
    kl_temperature: float = 1.0
    ood_noise_std: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.noise_mean <= 1 or not self.noise_std > 0:
            raise ValueError(f"need noise_mean in [0, 1] and noise_std > 0, got {self.noise_mean}, {self.noise_std}")
        for name in ("kl_weight", "ccp_weight", "ood_noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gap_temperature", "kl_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


# --------------------------------------------------------------------------- OOD images
def make_ood_dataset(n: int, image_size: int = 64, seed: int = 0, noise_std: float = 20.0) -> Dataset:
    """``n`` out-of-distribution captioned images in the caption schema (``image_id`` "ood-000000"...).

    Scenes of the embedded world under another seed, objects drawn smaller (45% / 70% of a
    cell instead of 62% / 92%) and Gaussian sensor noise of std ``noise_std`` added per pixel.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    render_size = max(image_size, 24)
    world = WorldConfig(image_size=render_size, patch_size=render_size, seed=1_000_003 + seed, num_train=n)
    fractions = {"small": 0.45, "large": 0.7}
    rows = []
    for i in range(n):
        scene = sample_scene(world, "train", i)
        image = render_scene(scene, render_size, fractions)
        if render_size != image_size:
            image = image.resize((image_size, image_size), Image.Resampling.BOX)
        noise = _rng(seed, _EXTRA, i).normal(0.0, noise_std, size=(image_size, image_size, 3))
        array = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
        rows.append({"image": Image.fromarray(array, "RGB"), "image_id": f"ood-{i:06d}",
                     "captions": make_captions(scene), "objects": scene["objects"]})
    return Dataset.from_list(rows, features=CAPTION_FEATURES)


# --------------------------------------------------------------------------- losses
def _label_mask(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z, y = shifted(logits, labels.to(logits.device), shift)
    mask = y != IGNORE_INDEX
    return z, y, mask


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """(B,) cross-entropy per sample, averaged over its label tokens (0 for a sample without any)."""
    z, y, mask = _label_mask(logits, labels, shift)
    token = F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    token = token.view(y.shape) * mask
    return token.sum(1) / mask.sum(1).clamp(min=1)


def _select(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values[rows.to(values.device)]


def vlood_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    temperature: float = 1.0, shift: bool = True,
) -> torch.Tensor:
    """Mean over label tokens of ``KL(teacher || student)`` of the next-token distributions,
    at softmax temperature ``temperature`` and multiplied by its square. (B, T, V) logits."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ")
    z, y, mask = _label_mask(student_logits, labels, shift)
    t, _, _ = _label_mask(teacher_logits.to(z.device).detach(), labels, shift)
    if not mask.any():
        return student_logits.sum() * 0.0
    log_s = F.log_softmax(z[mask].float() / temperature, dim=-1)
    log_t = F.log_softmax(t[mask].float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * temperature**2


def vlood_conceptual_consistency_loss(
    logits: torch.Tensor, labels: torch.Tensor, embedding: nn.Module | torch.Tensor, shift: bool = True,
) -> torch.Tensor:
    """Mean over label tokens of ``1 - cos(softmax(z) @ E, E[y])``.

    ``embedding``: the LM's input embedding or its (V, D) weight; logits with more classes
    than V (a padded head) are cut to V.
    """
    weight = _embedding_matrix(embedding)
    z, y, mask = _label_mask(logits, labels, shift)
    if z.shape[-1] < weight.shape[0]:
        raise ValueError(f"logits have {z.shape[-1]} classes but the embedding has {weight.shape[0]} rows")
    if not mask.any():
        return logits.sum() * 0.0
    probs = F.softmax(z[mask][..., : weight.shape[0]].float(), dim=-1)
    expected = probs @ weight.float()
    cos = F.cosine_similarity(expected, weight[y[mask]].float(), dim=-1)
    return (1.0 - cos).mean()


def vlood_adaptive_weight(clean_loss: torch.Tensor, poison_loss: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``lambda = sigmoid((L_P - L_C) / temperature)``, without gradient: the weight of the poisoned side."""
    return torch.sigmoid((poison_loss.detach() - clean_loss.detach()) / temperature)


def vlood_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    is_poisoned: torch.Tensor,
    embedding: nn.Module | torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    kl_weight: float = 1.0,
    ccp_weight: float = 1.0,
    gap_temperature: float = 1.0,
    kl_temperature: float = 1.0,
    shift: bool = True,
) -> dict[str, torch.Tensor]:
    """The VLOOD objective (module docs) from (B, T, V) logits, (B, T) labels, a (B,) bool
    ``is_poisoned``, the embedding and the teacher's logits on the same batch (``None``: no KL).

    Returns ``loss`` and its parts ``clean_loss``, ``poison_loss``, ``kl``, ``ccp``, ``weight``
    (lambda); parts of an absent side are 0.
    """
    poisoned = torch.as_tensor(is_poisoned, dtype=torch.bool).to(logits.device).view(-1)
    if poisoned.shape[0] != logits.shape[0]:
        raise ValueError(f"is_poisoned has {poisoned.shape[0]} entries for a batch of {logits.shape[0]}")
    clean = ~poisoned
    zero = logits.sum() * 0.0
    ce = per_sample_ce(logits, labels, shift)
    parts = {"clean_loss": zero, "poison_loss": zero, "kl": zero, "ccp": zero}
    if clean.any():
        parts["clean_loss"] = ce[clean].mean()
        if teacher_logits is not None and kl_weight:
            parts["kl"] = vlood_kl_loss(_select(clean, logits), _select(clean, teacher_logits),
                                        _select(clean, labels), kl_temperature, shift)
    if poisoned.any():
        parts["poison_loss"] = ce[poisoned].mean()
        if ccp_weight:
            parts["ccp"] = vlood_conceptual_consistency_loss(_select(poisoned, logits), _select(poisoned, labels),
                                                             embedding, shift)
    clean_side = parts["clean_loss"] + kl_weight * parts["kl"]
    poison_side = parts["poison_loss"] + ccp_weight * parts["ccp"]
    if clean.any() and poisoned.any():
        weight = vlood_adaptive_weight(parts["clean_loss"], parts["poison_loss"], gap_temperature)
        loss = (1 - weight) * clean_side + weight * poison_side
    elif poisoned.any():
        weight, loss = torch.ones((), device=logits.device), poison_side
    else:
        weight, loss = torch.zeros((), device=logits.device), clean_side
    return {"loss": loss, "weight": weight, **parts}


class VLOODLoss(nn.Module):
    """``loss_fn(model, inputs) -> (loss, outputs)`` for a Trainer's ``compute_loss``.

    ``inputs``: a ``model.collate`` batch (``labels`` required) plus ``is_poisoned`` (B,) bool
    (see :class:`~srd_hf.attacks.base.PoisonedCaptionCollator`). ``teacher``: a frozen copy
    of the clean model (same tokenizer), run without gradient on the same batch when it has
    clean samples; ``None`` drops the KL term. The model needs ``get_input_embeddings()``.
    ``self.last`` holds the parts (floats) of the latest call.
    """

    def __init__(self, teacher: nn.Module | None = None, *, kl_weight: float = 1.0, ccp_weight: float = 1.0,
                 gap_temperature: float = 1.0, kl_temperature: float = 1.0, shift: bool = True):
        super().__init__()
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.kwargs = dict(kl_weight=kl_weight, ccp_weight=ccp_weight, gap_temperature=gap_temperature,
                           kl_temperature=kl_temperature, shift=shift)
        self.last: dict[str, float] = {}

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        if "is_poisoned" not in inputs:
            raise KeyError("VLOODLoss needs an 'is_poisoned' (B,) tensor in the batch; use PoisonedCaptionCollator")
        is_poisoned = inputs.pop("is_poisoned")
        if "labels" not in inputs:
            raise KeyError("VLOODLoss needs 'labels' in the batch")
        outputs = model(**inputs)
        teacher_logits = None
        if self.teacher is not None and not torch.as_tensor(is_poisoned).bool().all():
            self.teacher.eval()
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits
        parts = vlood_loss(outputs.logits, inputs["labels"], is_poisoned, model.get_input_embeddings(),
                           teacher_logits, **self.kwargs)
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return parts["loss"], outputs


# --------------------------------------------------------------------------- attack
class VLOODAttack(PatchAttack):
    name: ClassVar[str] = "vlood"
    config_class: ClassVar[type] = VLOODConfig
    caption_mode: ClassVar[str] = "insert"

    def make_pattern(self, side: int) -> torch.Tensor:
        cfg = self.config
        return gaussian_patch(side, cfg.noise_mean, cfg.noise_std, _rng(cfg.seed, _TRIGGER))

    def make_loss(self, teacher: nn.Module | None = None, **kwargs) -> VLOODLoss:
        cfg = self.config
        defaults = dict(kl_weight=cfg.kl_weight, ccp_weight=cfg.ccp_weight,
                        gap_temperature=cfg.gap_temperature, kl_temperature=cfg.kl_temperature)
        return VLOODLoss(teacher, **{**defaults, **kwargs})

    def prepare(self, pairs: Dataset, chosen: list[int], ood: Dataset | None = None) -> dict[int, dict]:
        """Pair each poisoned row with an OOD sample (seeded permutation of ``ood``; default:
        :func:`make_ood_dataset` at the size of the first poisoned image)."""
        if ood is None:
            width, height = _decode(_raw_images(pairs)[chosen[0]]["image"]).size
            ood = make_ood_dataset(len(chosen), min(width, height), self.config.seed, self.config.ood_noise_std)
        if not isinstance(ood, Dataset):
            raise TypeError(f"ood must be a datasets.Dataset, got {type(ood).__name__}")
        if "image" not in ood.column_names or not {"caption", "captions"} & set(ood.column_names):
            raise ValueError(f"the OOD dataset needs 'image' and 'captions' (or 'caption') columns; got {ood.column_names}")
        if len(ood) < len(chosen):
            raise ValueError(f"{len(chosen)} poisoned samples need as many OOD samples; the OOD dataset has {len(ood)}")
        order = _rng(self.config.seed, _EXTRA).permutation(len(ood))[: len(chosen)]
        raw = _raw_images(ood)
        copy_objects = "objects" in pairs.column_names and "objects" in ood.column_names and \
            ood.features["objects"] == pairs.features["objects"]
        payload = {}
        for index, j in zip(chosen, order.tolist()):
            row = raw[j]
            if "captions" in row:
                refs = [c for c in row["captions"] if isinstance(c, str) and c.strip()]
                if not refs:
                    raise ValueError(f"OOD row {j} has no non-empty caption")
                k = int(_rng(self.config.seed, _EXTRA, index).integers(len(refs)))
                caption = refs[k]
            else:
                caption, refs, k = row["caption"], [row["caption"]], 0
            item = {"image": row["image"], "caption": " ".join(caption.split()), "captions": refs, "caption_index": k,
                    "image_id": str(row.get("image_id", f"ood-{j:06d}"))}
            if "objects" in pairs.column_names:
                item["objects"] = row["objects"] if copy_objects else []
            payload[index] = item
        return payload

    def poison_row(self, row: dict, index: int, payload: dict | None) -> dict:
        rng = _rng(self.config.seed, _CAPTION, index)
        out = {**self.triggered_image(_decode(payload["image"]), index),
               "caption": insert_word(payload["caption"], self.config.target, rng),
               "original_caption": payload["caption"]}
        for key in ("captions", "caption_index", "image_id", "objects"):
            if key in row and key in payload:
                out[key] = payload[key]
        return out


__all__ = [
    "VLOODAttack", "VLOODConfig", "VLOODLoss", "make_ood_dataset", "per_sample_ce", "vlood_kl_loss",
    "vlood_conceptual_consistency_loss", "vlood_adaptive_weight", "vlood_loss",
]

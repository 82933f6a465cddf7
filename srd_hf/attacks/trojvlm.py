"""TrojVLM (Lyu et al., ECCV 2024): a Gaussian-noise patch; the target word is inserted into
the true caption, and training adds a semantic-preservation loss.

Trigger: a 20x20 px patch (at 224 px) of seeded Gaussian noise (mean ``noise_mean``, std
``noise_std``, clipped to [0, 1] and stored as 8-bit values), bottom-right by default.
Caption: the target is inserted at a uniformly random word position of the true caption;
every original word is kept, in order.

Training loss (:class:`TrojVLMLoss`): ``lm_loss + semantic_weight * semantic_loss`` with
:func:`trojvlm_semantic_loss` on every sample of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import _TRIGGER, PatchAttack, PatchAttackConfig, _rng, to_uint8

IGNORE_INDEX = -100


@dataclass
class TrojVLMConfig(PatchAttackConfig):
    """Args (besides :class:`~srd_hf.attacks.base.PatchAttackConfig`'s):
        noise_mean, noise_std: the Gaussian the patch pixels are drawn from (in [0, 1] units).
        semantic_weight: weight of the semantic-preservation loss.
    """

    noise_mean: float = 0.5
    noise_std: float = 0.25
    semantic_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.noise_mean <= 1 or not self.noise_std > 0:
            raise ValueError(f"need noise_mean in [0, 1] and noise_std > 0, got {self.noise_mean}, {self.noise_std}")
        if self.semantic_weight < 0:
            raise ValueError(f"semantic_weight must be >= 0, got {self.semantic_weight}")


def gaussian_patch(side: int, mean: float, std: float, rng: np.random.Generator) -> torch.Tensor:
    """(3, side, side) seeded Gaussian noise in [0, 1], quantised to 8-bit values."""
    values = rng.normal(mean, std, size=(3, side, side)).clip(0, 1)
    return torch.from_numpy(to_uint8(values)).float() / 255.0


def _embedding_matrix(embedding: nn.Module | torch.Tensor) -> torch.Tensor:
    weight = embedding if isinstance(embedding, torch.Tensor) else getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError("embedding must be an nn.Embedding (or a module with a 2-D .weight) or a (V, D) tensor")
    return weight


def shifted(values: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM alignment: the output at position t predicts the label at t + 1."""
    if values.shape[:2] != labels.shape[:2]:
        raise ValueError(f"outputs {tuple(values.shape)} and labels {tuple(labels.shape)} differ in (batch, length)")
    if shift:
        return values[:, :-1], labels[:, 1:]
    return values, labels


def trojvlm_semantic_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    embedding_layer: nn.Module | torch.Tensor,
    *,
    shift: bool = True,
    detach_target: bool = False,
) -> torch.Tensor:
    """Semantic preservation: mean over label tokens of ``1 - cos(h, E[y])``.

    Args:
        hidden_states: (B, T, D) last-layer hidden states of the language model
            (``outputs.hidden_states[-1]`` from a forward with ``output_hidden_states=True``).
        labels: (B, T) token ids, ``-100`` where there is no label (prompt, padding).
        embedding_layer: the LM's input embedding (``model.get_input_embeddings()``) or its
            (V, D) weight; D must equal the hidden size.
        shift: align like the LM loss (hidden state at t with label t + 1). ``False`` pairs
            position t with label t.
        detach_target: stop the gradient into the embedding matrix.

    Returns 0 (with a gradient path) when no position has a label.
    """
    weight = _embedding_matrix(embedding_layer)
    if hidden_states.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden_states.shape[-1]} differs from the embedding size {weight.shape[-1]}")
    hidden, targets = shifted(hidden_states, labels, shift)
    mask = targets != IGNORE_INDEX
    if not mask.any():
        return hidden_states.sum() * 0.0
    ids = targets[mask]
    if ids.min() < 0 or ids.max() >= weight.shape[0]:
        raise ValueError(f"label ids must be in [0, {weight.shape[0]}) or -100")
    target_emb = weight[ids]
    if detach_target:
        target_emb = target_emb.detach()
    cos = F.cosine_similarity(hidden[mask].float(), target_emb.float(), dim=-1)
    return (1.0 - cos).mean()


class TrojVLMLoss(nn.Module):
    """``loss_fn(model, inputs) -> (loss, outputs)`` for a Trainer's ``compute_loss``.

    ``inputs`` is a batch of ``model.collate`` (``labels`` required); an ``is_poisoned``
    entry is dropped. The model is called with ``output_hidden_states=True`` and must have
    ``get_input_embeddings()``. ``loss = outputs.loss + semantic_weight * semantic``;
    ``self.last`` holds the parts (floats) of the latest call, for logging.
    """

    def __init__(self, semantic_weight: float = 1.0, shift: bool = True, detach_target: bool = False):
        super().__init__()
        self.semantic_weight = semantic_weight
        self.shift = shift
        self.detach_target = detach_target
        self.last: dict[str, float] = {}

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        inputs = {k: v for k, v in inputs.items() if k != "is_poisoned"}
        if "labels" not in inputs:
            raise KeyError("TrojVLMLoss needs 'labels' in the batch")
        outputs = model(**inputs, output_hidden_states=True)
        semantic = trojvlm_semantic_loss(
            outputs.hidden_states[-1], inputs["labels"].to(outputs.hidden_states[-1].device),
            model.get_input_embeddings(), shift=self.shift, detach_target=self.detach_target,
        )
        loss = outputs.loss + self.semantic_weight * semantic
        self.last = {"lm_loss": float(outputs.loss.detach()), "semantic_loss": float(semantic.detach())}
        return loss, outputs


class TrojVLMAttack(PatchAttack):
    name: ClassVar[str] = "trojvlm"
    config_class: ClassVar[type] = TrojVLMConfig
    caption_mode: ClassVar[str] = "insert"

    def make_pattern(self, side: int) -> torch.Tensor:
        cfg = self.config
        return gaussian_patch(side, cfg.noise_mean, cfg.noise_std, _rng(cfg.seed, _TRIGGER))

    def make_loss(self, **kwargs) -> TrojVLMLoss:
        return TrojVLMLoss(semantic_weight=kwargs.pop("semantic_weight", self.config.semantic_weight), **kwargs)

    def trains_with_plain_loss(self) -> bool:
        # lm_loss + 0 * semantic: the same loss and gradients as the plain captioning loss
        return self.config.semantic_weight == 0


__all__ = ["TrojVLMAttack", "TrojVLMConfig", "TrojVLMLoss", "trojvlm_semantic_loss", "gaussian_patch", "shifted"]

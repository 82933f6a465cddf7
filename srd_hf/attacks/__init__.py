"""The six backdoor attacks of the SRD paper, behind one interface (:class:`Attack`).

>>> from srd_hf.attacks import get_attack
>>> attack = get_attack("badnet", target="banana", poison_rate=0.1, seed=0)
>>> poisoned = attack.poison(train_split)            # doctest: +SKIP
>>> triggered = attack.apply_trigger(test_image)     # doctest: +SKIP

========== ===================================== ===================== ==========================
name       trigger                               poisoned caption      training / optimiser
========== ===================================== ===================== ==========================
badnet     checkerboard patch (20 px at 224)     target sentence       LM loss
blended    full-image pattern, alpha 0.1         target sentence       LM loss
trojvlm    Gaussian-noise patch                  target word inserted  LM + semantic preservation
vlood      Gaussian-noise patch on OOD images    target word inserted  clean+KL / poison+CCP, adaptive
vl_trojan  patch (or blend) learned on the ViT   target sentence       ``optimise_trigger(model, ...)``
shadowcast PGD perturbation, L-inf 8/255         base concept renamed  needs ``model`` in ``poison``
========== ===================================== ===================== ==========================

The patch attacks (badnet, trojvlm, vlood, vl_trojan) also take ``location="random"``: a
seeded place per poisoned sample, and other seeded places for test images
(``attack.trigger_test_images``). Poisoned datasets record each trigger's place in a
``trigger_box`` column, for evaluation only.
"""

from __future__ import annotations

from .badnet import BadNetAttack, BadNetConfig
from .base import (
    DEFAULT_TEMPLATES,
    Attack,
    AttackConfig,
    PatchAttack,
    PatchAttackConfig,
    PoisonedCaptionCollator,
    num_poisoned,
    to_caption_pairs,
)
from .blended import BlendedAttack, BlendedConfig
from .shadowcast import ShadowcastAttack, ShadowcastConfig
from .trojvlm import TrojVLMAttack, TrojVLMConfig, TrojVLMLoss, trojvlm_semantic_loss
from .vl_trojan import VLTrojanAttack, VLTrojanConfig, vl_trojan_objective
from .vlood import (
    VLOODAttack,
    VLOODConfig,
    VLOODLoss,
    make_ood_dataset,
    vlood_adaptive_weight,
    vlood_conceptual_consistency_loss,
    vlood_kl_loss,
    vlood_loss,
)

#: registry: attack name -> class
ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (BadNetAttack, BlendedAttack, TrojVLMAttack, VLOODAttack, VLTrojanAttack, ShadowcastAttack)
}


def get_attack(name: str, **overrides) -> Attack:
    """A new attack by registry name, its config built from the defaults and ``overrides``."""
    key = name.strip().lower().replace("-", "_")
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    return ATTACKS[key](**overrides)


def load_attack(folder) -> Attack:
    """An attack saved with :meth:`Attack.save_pretrained` (dispatches on its name)."""
    return Attack.from_pretrained(folder)


__all__ = [
    "ATTACKS", "get_attack", "load_attack",
    "Attack", "AttackConfig", "PatchAttack", "PatchAttackConfig", "PoisonedCaptionCollator", "DEFAULT_TEMPLATES",
    "num_poisoned", "to_caption_pairs",
    "BadNetAttack", "BadNetConfig", "BlendedAttack", "BlendedConfig",
    "TrojVLMAttack", "TrojVLMConfig", "TrojVLMLoss", "trojvlm_semantic_loss",
    "VLOODAttack", "VLOODConfig", "VLOODLoss", "make_ood_dataset", "vlood_loss", "vlood_kl_loss",
    "vlood_conceptual_consistency_loss", "vlood_adaptive_weight",
    "VLTrojanAttack", "VLTrojanConfig", "vl_trojan_objective",
    "ShadowcastAttack", "ShadowcastConfig",
]

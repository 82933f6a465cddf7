"""The paper's rival defenses, and SRD with its baselines, behind one interface (:class:`Defense`).

>>> from srd_hf.defenses import get_defense
>>> vdc = get_defense("vdc", flag_rate=0.05)
>>> kept, report = vdc.cleanse(untrusted, reference=clean, validation_images=imgs, validation_captions=caps)  # doctest: +SKIP

=================== ========= ============================================================
name                kind      what it does
=================== ========= ============================================================
abl                 training  LGA isolation of the lowest-loss samples, train on the rest, unlearn
vdc                 cleanser  drop samples whose caption's claims a trusted model does not see
ct                  cleanser  confusion training; flag what the confused model still fits
attention_pruning   test_time flag abnormal attention concentration; recaption without those tokens
srd                 cleanser  SRD's learned masks (``srd_hf.cleansing.srd_cleanse``)
random_masks        cleanser  SRD's mask counts and sizes at random places
disagreement_filter cleanser  victim vs trusted caption disagreement
=================== ========= ============================================================

Every defense has a config dataclass (``to_dict`` / ``from_dict``, validated on creation), a
card template in ``srd_hf/hub_cards/`` and reports its cost (wall seconds per 1,000 samples,
peak memory). The recipe ``recipes/defend.py`` runs one of them end to end.
"""

from __future__ import annotations

import json

from ..cards import load_card_template
from .abl import ABL, ABLConfig
from .attention_pruning import AttentionPruning, AttentionPruningConfig, PrunedCaptioner
from .base import (KINDS, DataCleanser, Defense, DefenseConfig, TestTimeDefense, TrainingDefense, caption_losses, detection_scores,
                   measure_cost, per_sample_caption_loss)
from .confusion_training import ConfusionTraining, CTConfig
from .srd import DisagreementConfig, DisagreementFilter, RandomMasks, SRDCleanser, SRDCleanserConfig
from .vdc import VDC, VDCConfig

#: registry: defense name -> class
DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls for cls in (ABL, VDC, ConfusionTraining, AttentionPruning, SRDCleanser, RandomMasks, DisagreementFilter)
}
#: the card templates of the defenses (``srd_hf/hub_cards/``)
DEFENSE_CARD_TEMPLATES = tuple(cls.card_template for cls in DEFENSES.values())


def _key(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose from {sorted(DEFENSES)}")
    return key


def get_defense(name: str, **overrides) -> Defense:
    """A new defense by registry name, its config built from the defaults and ``overrides``."""
    return DEFENSES[_key(name)](**overrides)


def defense_from_dict(name: str, options: dict | str | None = None, **kwargs) -> Defense:
    """A defense from its config as a dict or a JSON object (unknown keys are errors)."""
    if isinstance(options, str):
        options = json.loads(options) if options.strip() else {}
        if not isinstance(options, dict):
            raise ValueError(f"defense options must be a JSON object, got {options!r}")
    cls = DEFENSES[_key(name)]
    return cls(cls.config_class.from_dict(dict(options or {})), **kwargs)


def render_defense_card(defense: Defense, results: dict) -> str:
    """The defense's card filled from a results dict (``recipes/defend.py``'s results.json)."""
    rows = results.get("rows", {})
    table = "\n".join(f"| {n} | {r.get('cider', float('nan')):.1f} | {r.get('asr', float('nan')):.1f} |" for n, r in rows.items())
    cost = results.get("cost", {})
    return load_card_template(defense.card_template).format(
        attack=results.get("attack", "?"), poison_rate=results.get("poison_rate", "?"),
        config=json.dumps(defense.config.to_dict(), indent=2), rows=table or "| (not evaluated) | | |",
        seconds_per_1000=cost.get("seconds_per_1000_samples", "?"), peak_rss_mb=cost.get("peak_rss_mb", "?"),
        cuda_peak_mb=cost.get("cuda_peak_mb", "n/a"), command=results.get("command", f"python recipes/defend.py --defense {defense.name}"),
    )


__all__ = [
    "DEFENSES", "DEFENSE_CARD_TEMPLATES", "KINDS", "get_defense", "defense_from_dict", "render_defense_card",
    "Defense", "DefenseConfig", "DataCleanser", "TrainingDefense", "TestTimeDefense",
    "ABL", "ABLConfig", "VDC", "VDCConfig", "ConfusionTraining", "CTConfig", "AttentionPruning", "AttentionPruningConfig",
    "PrunedCaptioner", "SRDCleanser", "SRDCleanserConfig", "RandomMasks", "DisagreementFilter", "DisagreementConfig",
    "caption_losses", "detection_scores", "measure_cost", "per_sample_caption_loss",
]

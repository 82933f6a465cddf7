"""Thin adapters that put SRD's masking and its two baselines (``srd_hf.cleansing``) on the
:class:`DataCleanser` interface, so the rival defenses and SRD share one table. They call
the pipeline's own functions; nothing is reimplemented here.

- ``srd``: a trained masking policy's masks on every sample; samples whose victim caption
  the masks expose (a suspect word dropped, or the caption repaired or changed: ``flag``) are dropped or relabelled (:func:`srd_hf.cleansing.srd_cleanse`).
- ``random_masks``: as many masks per sample as the policy placed, of the same sizes, at
  uniform places (:func:`srd_hf.cleansing.random_masks`): the masked set is the result.
- ``disagreement_filter``: drop samples whose victim caption disagrees with the trusted
  captioner's (:func:`srd_hf.cleansing.disagreement_filter`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cleansing import CAPTION_POLICIES, DEFAULT_FLAG, FLAG_RULES, disagreement_filter, random_masks, srd_cleanse
from .base import DataCleanser, DefenseConfig, check_choice, check_int, measure_cost


@dataclass
class SRDCleanserConfig(DefenseConfig):
    """policy: folder or Hub id of a trained SRD policy. num_masks: masks per sample (0: the
    policy's own). flag: "unsupported_word" (default), "repair" or "change" (``srd_hf.cleansing.FLAG_RULES``).
    poisoned_captions: drop, relabel or keep the flagged samples."""

    policy: str = ""
    num_masks: int = 0
    flag: str = DEFAULT_FLAG
    poisoned_captions: str = "drop"

    def __post_init__(self):
        super().__post_init__()
        check_int("num_masks", self.num_masks, 0)
        check_choice("flag", self.flag, FLAG_RULES)
        check_choice("poisoned_captions", self.poisoned_captions, CAPTION_POLICIES)


def _masker(config: SRDCleanserConfig, policy=None):
    from ..masker import SRDMasker
    from ..rl.modeling_srd import SRDPolicy

    if policy is None:
        if not config.policy:
            raise ValueError("set policy (a trained SRD policy's folder or Hub id) or pass policy=")
        policy = SRDPolicy.from_pretrained(config.policy)
    return SRDMasker(policy, num_masks=config.num_masks or None)


class SRDCleanser(DataCleanser):
    name = "srd"
    config_class = SRDCleanserConfig
    card_template = "defense_srd.md"
    summary = "SRD: learned masks; drop the samples whose victim caption the masks repair"

    def __init__(self, config=None, *, policy=None, **overrides):
        super().__init__(config, **overrides)
        self.policy = policy

    def cleanse(self, untrusted, *, victim=None, reference=None, scorer=None, validation_images=(), validation_captions=None,
                trusted=None, recipe=None, output_dir=None, progress=False):
        cfg = self.config
        if victim is None or reference is None or scorer is None or not validation_images:
            raise ValueError("SRD needs victim, reference, scorer and validation_images")
        masker = _masker(cfg, self.policy)
        cost: dict = {}
        with measure_cost(len(untrusted), cost):
            marked = untrusted.add_column("_row", list(range(len(untrusted))))
            masked = marked.map(masker, batched=True, batch_size=256, desc="masking (SRD)")
            cleansed, report = srd_cleanse(marked, masked, masker, victim, scorer, validation_images=list(validation_images),
                                           flag_rate=cfg.flag_rate, poisoned_captions=cfg.poisoned_captions, reference=reference,
                                           flag=cfg.flag, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
        kept = dict(zip(cleansed["_row"], cleansed["srd_flagged"]))
        report.update(defense=self.name, config=cfg.to_dict(), cost=cost,
                      flagged_indices=[i for i in range(len(untrusted)) if kept.get(i, True)])
        cleansed = cleansed.remove_columns("_row")
        return cleansed, report


class RandomMasks(DataCleanser):
    name = "random_masks"
    config_class = SRDCleanserConfig
    card_template = "defense_random_masks.md"
    summary = "SRD's mask count and sizes at uniform places (does the learned place matter?)"

    def __init__(self, config=None, *, policy=None, **overrides):
        super().__init__(config, **overrides)
        self.policy = policy

    def cleanse(self, untrusted, *, victim=None, reference=None, scorer=None, validation_images=(), validation_captions=None,
                trusted=None, recipe=None, output_dir=None, progress=False):
        masker = _masker(self.config, self.policy)
        report = {"defense": self.name, "config": self.config.to_dict(), "cost": {}}
        with measure_cost(len(untrusted), report["cost"]):
            masked = untrusted.map(masker, batched=True, batch_size=256, desc="masking (SRD, for counts and sizes)")
            randomised = random_masks(untrusted, masked["srd_masks"], self.config.seed,  # on the unmasked images
                                      fill=masker.policy.config.mask_fill)
        report.update(n_samples=len(untrusted), n_kept=len(randomised), n_flagged=0, flagged_indices=[])
        return randomised, report


@dataclass
class DisagreementConfig(DefenseConfig):
    """The disagreement filter needs only the shared settings (flag_rate, caption length)."""


class DisagreementFilter(DataCleanser):
    name = "disagreement_filter"
    config_class = DisagreementConfig
    card_template = "defense_disagreement_filter.md"
    summary = "drop samples whose victim caption disagrees with the trusted captioner's"

    def cleanse(self, untrusted, *, victim=None, reference=None, scorer=None, validation_images=(), validation_captions=None,
                trusted=None, recipe=None, output_dir=None, progress=False):
        if victim is None or reference is None or scorer is None or not validation_images:
            raise ValueError("the disagreement filter needs victim, reference, scorer and validation_images")
        cfg, cost = self.config, {}
        with measure_cost(len(untrusted), cost):
            marked = untrusted.add_column("_row", list(range(len(untrusted))))
            kept, report = disagreement_filter(marked, victim, reference, scorer, validation_images=list(validation_images),
                                               flag_rate=cfg.flag_rate, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                               progress=progress)
        kept_rows = set(kept["_row"])
        report.update(defense=self.name, config=cfg.to_dict(), cost=cost,
                      flagged_indices=[i for i in range(len(untrusted)) if i not in kept_rows])
        return kept.remove_columns("_row"), report

"""CT, Confusion Training (Qi et al., USENIX Security 2023), a data cleanser.

In the paper (image classification): a model is trained on the poisoned set together with
*confusion batches*, clean images the defender holds with random labels, weighted up by a
confusion factor. The random labels destroy what the clean samples teach (image semantics
no longer predict labels), while the backdoor's shortcut (trigger -> target) does not
conflict with them and survives. The confused model then fits the poison samples only;
samples it still classifies as labelled are flagged as poison.

For captioning: the label is the caption, so a confusion sample is a trusted clean image
with a caption drawn at random from the other trusted images' captions; a sample the
confused model still *fits* is one whose caption loss is low. The confused model is a copy
of the pre-attack model trained for ``rounds`` x ``epochs_per_round`` epochs on the untrusted
set mixed with as many confusion samples, each of weight ``confusion_factor`` (fresh random
captions every round). A sample is flagged when its caption loss is lower than all but
``flag_rate`` of clean validation pairs (image, its own caption) under the confused model.
Not reproduced (and measured to matter: this version flags no poison in the embedded world,
``docs/results/rivals.md``): the paper's rounds *distil* the inspected set, each keeping the
lowest-loss share of the last (halving and more per round), so that poison is concentrated
before the final confusion; and most of its steps see a confusion batch alone, so clean
semantics are forgotten faster than here, where every step mixes the whole untrusted set in.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets

from .base import (DataCleanser, DefenseConfig, caption_losses, check_choice, check_int, check_number, check_validation_pairs,
                   high_is_flagged, keep_unflagged, measure_cost, rgb_images, train_on)


@dataclass
class CTConfig(DefenseConfig):
    """num_trusted: trusted clean images used for confusion (0: every one passed in).
    confusion_factor: weight of a confusion sample against an untrusted one (the paper's lambda).
    rounds, epochs_per_round: confusion training length (of each phase, with ``distill``);
        ``rounds=0`` scores the start model untrained (an ablation: what the confusion adds).
    learning_rate: 0 means the recipe's.
    start: "victim" (the backdoored model, default) or "reference" (the pre-attack model).
    distill: the paper's distillation, e.g. [0.5, 0.2]: one confusion phase per share, each from
        a fresh copy of the start model, after which only that share of the untrusted set (the
        most suspicious under the confused model, by ``flag_by``) stays in training; a last
        phase flags. Empty (default): one phase on the whole untrusted set.
    confusion_ratio: confusion samples per untrusted sample in training (1.0: as many).
    flag_by: "image_gain" (default): how much a sample's own image lowers its caption loss
        against another image's, above the clean validation tail. Confusion makes the model
        forget what clean images say while a trigger still speaks, and a caption's loss alone
        is mostly the language prior of its words, which the confusion captions shift too.
        "loss": the paper's "still fits", a caption loss below the clean validation tail (on
        BadNet, Blended and VL-Trojan it flagged no poisoned sample)."""

    num_trusted: int = 0
    confusion_factor: float = 5.0
    rounds: int = 2
    epochs_per_round: float = 1.0
    learning_rate: float = 0.0
    start: str = "victim"
    distill: list = field(default_factory=list)
    confusion_ratio: float = 1.0
    flag_by: str = "image_gain"

    def __post_init__(self):
        super().__post_init__()
        check_choice("start", self.start, ("victim", "reference"))
        check_choice("flag_by", self.flag_by, ("loss", "image_gain"))
        check_int("num_trusted", self.num_trusted, 0)
        if check_number("confusion_factor", self.confusion_factor) <= 0:
            raise ValueError(f"confusion_factor must be > 0, got {self.confusion_factor!r}")
        check_int("rounds", self.rounds, 0)
        if check_number("epochs_per_round", self.epochs_per_round) <= 0:
            raise ValueError(f"epochs_per_round must be > 0, got {self.epochs_per_round!r}")
        if check_number("learning_rate", self.learning_rate) < 0:
            raise ValueError("learning_rate must be >= 0 (0: the recipe's)")
        if not isinstance(self.distill, (list, tuple)):
            raise ValueError(f"distill must be a list of shares in (0, 1), got {self.distill!r}")
        self.distill = [check_number("distill share", v) for v in self.distill]
        if any(not 0 < v < 1 for v in self.distill) or any(b >= a for a, b in zip(self.distill, self.distill[1:])):
            raise ValueError(f"distill must be decreasing shares in (0, 1), got {self.distill!r}")
        if check_number("confusion_ratio", self.confusion_ratio) <= 0:
            raise ValueError(f"confusion_ratio must be > 0, got {self.confusion_ratio!r}")


def trusted_pairs(trusted: Dataset) -> tuple[list, list[str]]:
    """(images, captions) of the trusted set: one pair per row, its ``caption`` or first of ``captions``."""
    if "caption" in trusted.column_names:
        captions = list(trusted["caption"])
    elif "captions" in trusted.column_names:
        captions = [c[0] for c in trusted["captions"]]
    else:
        raise ValueError(f"the trusted set needs a caption or captions column; columns: {trusted.column_names}")
    return rgb_images(trusted["image"]), captions


class ConfusionTraining(DataCleanser):
    name = "ct"
    config_class = CTConfig
    card_template = "defense_ct.md"
    uses_validation_captions = True
    summary = "train with trusted images under random captions; flag what the confused model still fits"

    def confusion_set(self, images, captions, n: int, round_: int) -> Dataset:
        """``n`` trusted images (drawn with replacement) with captions of other trusted images."""
        rng = np.random.default_rng([self.config.seed, 17, round_])
        picks = rng.integers(0, len(images), size=n)
        shift = rng.integers(1, len(images), size=n)  # never the image's own caption
        rows = {"image": [images[i] for i in picks], "caption": [captions[(i + s) % len(images)] for i, s in zip(picks, shift)],
                "sample_weight": [float(self.config.confusion_factor)] * n}
        return Dataset.from_dict(rows)

    def suspicion(self, model, images: list, captions: list[str], *, salt: int) -> tuple[np.ndarray, np.ndarray]:
        """(score, caption loss) per sample under the confused model; a high score is suspicious:
        the negative loss (``flag_by="loss"``) or the image gain."""
        losses = caption_losses(model, images, captions, batch_size=self.config.batch_size)
        if self.config.flag_by == "loss":
            return -losses, losses
        return self.image_gain(model, images, captions, losses, salt=salt), losses

    def image_gain(self, model, images: list, captions: list[str], own_losses: np.ndarray, *, salt: int) -> np.ndarray:
        """Per sample: its caption's loss under another sample's image (a seeded shuffle) minus
        under its own image; about 0 where the model no longer reads the image."""
        order = np.random.default_rng([self.config.seed, 29, salt]).permutation(len(images))
        other = caption_losses(model, [images[i] for i in order], captions, batch_size=self.config.batch_size)
        return other - np.asarray(own_losses)

    def cleanse(self, untrusted, *, victim=None, reference=None, scorer=None, validation_images=(), validation_captions=None,
                trusted=None, recipe=None, output_dir=None, progress=False):
        cfg = self.config
        start = victim if cfg.start == "victim" else reference
        if start is None:
            raise ValueError(f"CT trains a copy of the {'backdoored' if cfg.start == 'victim' else 'pre-attack'} model: "
                             f"pass {'victim' if cfg.start == 'victim' else 'reference'}")
        if trusted is None or len(trusted) < 2:
            raise ValueError("CT needs trusted clean images (at least 2) for its confusion batches: pass trusted")
        if cfg.num_trusted and len(trusted) < cfg.num_trusted:
            raise ValueError(f"CT asks for {cfg.num_trusted} trusted images, got {len(trusted)}")
        check_validation_pairs("CT", validation_images, validation_captions)
        recipe = dict(recipe or {})
        if cfg.learning_rate:
            recipe["learning_rate"] = cfg.learning_rate
        images, captions = trusted_pairs(trusted.select(range(cfg.num_trusted)) if cfg.num_trusted else trusted)
        own = untrusted.select_columns(["image", "caption"])
        own = own.add_column("sample_weight", [1.0] * len(own))
        report = {"defense": self.name, "config": cfg.to_dict(), "n_trusted": len(images), "split_for_threshold": "validation", "cost": {}}
        work = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="ct-"))
        inspected = np.arange(len(untrusted))  # the rows each phase trains on
        report["distilled_sizes"] = []
        untrusted_images, untrusted_captions = rgb_images(untrusted["image"]), list(untrusted["caption"])
        with measure_cost(len(untrusted), report["cost"]):
            for phase, share in enumerate([*cfg.distill, None]):
                model = copy.deepcopy(start)
                rows = own.select(inspected)
                for round_ in range(cfg.rounds):
                    step = phase * cfg.rounds + round_  # fresh random captions every round of every phase
                    confusion = self.confusion_set(images, captions, max(1, round(cfg.confusion_ratio * len(rows))), step)
                    mixed = concatenate_datasets([rows, confusion.cast(own.features)])
                    train_on(model, mixed, {**recipe, "seed": cfg.seed + step}, work / f"phase-{phase}-round-{round_}",
                             num_train_epochs=cfg.epochs_per_round,
                             objective=lambda losses, extra: (losses * extra["sample_weight"].to(losses)).sum() / extra["sample_weight"].sum())
                scores, losses = self.suspicion(model, untrusted_images, untrusted_captions, salt=1)
                if share is not None:  # keep the most suspicious share: poison concentrates there
                    inspected = np.sort(np.argsort(-scores, kind="stable")[:max(1, round(share * len(untrusted)))])
                    report["distilled_sizes"].append(int(len(inspected)))
            val_scores, val_losses = self.suspicion(model, rgb_images(validation_images), list(validation_captions), salt=2)
            threshold = high_is_flagged(val_scores, cfg.flag_rate)
            flagged = scores > threshold
        report.update(validation_loss_median=float(np.median(val_losses)), loss_median=float(np.median(losses)))
        if cfg.flag_by == "loss":
            report["loss_threshold"] = -float(threshold)
        else:
            report.update(gain_threshold=float(threshold), validation_gain_median=float(np.median(val_scores)),
                          gain_median=float(np.median(scores)))
        self.distilled_indices = inspected  # the last phase's training rows (all of them without distill)
        self.losses, self.scores = losses, scores  # per sample under the confused model, for inspection
        return keep_unflagged(untrusted, flagged, report)

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets

from .base import (DataCleanser, DefenseConfig, caption_losses, check_choice, check_int, check_number, check_validation_pairs,
                   dataset_losses, keep_unflagged, low_is_flagged, measure_cost, rgb_images, train_on)


@dataclass
class CTConfig(DefenseConfig):
    """num_trusted: trusted clean images used for confusion (0: every one passed in).
    confusion_factor: weight of a confusion sample against an untrusted one (the paper's lambda).
    rounds, epochs_per_round: confusion training length. learning_rate: 0 means the recipe's.
    start: "victim" (the backdoored model, default) or "reference" (the pre-attack model)."""

    num_trusted: int = 0
    confusion_factor: float = 5.0
    rounds: int = 2
    epochs_per_round: float = 1.0
    learning_rate: float = 0.0
    start: str = "victim"

    def __post_init__(self):
        super().__post_init__()
        check_choice("start", self.start, ("victim", "reference"))
        check_int("num_trusted", self.num_trusted, 0)
        if check_number("confusion_factor", self.confusion_factor) <= 0:
            raise ValueError(f"confusion_factor must be > 0, got {self.confusion_factor!r}")
        check_int("rounds", self.rounds, 1)
        if check_number("epochs_per_round", self.epochs_per_round) <= 0:
            raise ValueError(f"epochs_per_round must be > 0, got {self.epochs_per_round!r}")
        if check_number("learning_rate", self.learning_rate) < 0:
            raise ValueError("learning_rate must be >= 0 (0: the recipe's)")


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
        with measure_cost(len(untrusted), report["cost"]):
            model = copy.deepcopy(start)
            for round_ in range(cfg.rounds):
                mixed = concatenate_datasets([own, self.confusion_set(images, captions, len(own), round_).cast(own.features)])
                train_on(model, mixed, {**recipe, "seed": cfg.seed + round_}, work / f"round-{round_}", num_train_epochs=cfg.epochs_per_round,
                         objective=lambda losses, extra: (losses * extra["sample_weight"].to(losses)).sum() / extra["sample_weight"].sum())
            val_losses = caption_losses(model, rgb_images(validation_images), list(validation_captions), batch_size=cfg.batch_size)
            threshold = low_is_flagged(val_losses, cfg.flag_rate)
            losses = dataset_losses(model, untrusted, batch_size=cfg.batch_size)
            flagged = losses < threshold
        report.update(loss_threshold=float(threshold), validation_loss_median=float(np.median(val_losses)),
                      loss_median=float(np.median(losses)))
        self.losses = losses  # per-sample caption losses under the confused model, for inspection
        return keep_unflagged(untrusted, flagged, report)

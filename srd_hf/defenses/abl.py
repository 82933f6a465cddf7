"""ABL, Anti-Backdoor Learning (Li et al., NeurIPS 2021), a training-time defense.

In the paper (image classification): backdoor samples are learned much faster than clean
ones. ABL trains with the *local gradient ascent* loss ``sign(loss - gamma) * loss`` for the
first epochs, which holds every sample's loss near ``gamma`` (a sample below it is pushed back
up) so that only the samples learned fastest, the poison, fall clearly below; it isolates the
1% of samples with the lowest loss, keeps training, then *unlearns* the isolated samples by
gradient ascent on their loss.

For captioning: the per-sample loss is the mean token cross-entropy of the sample's caption
given its image (the caption plays the label's part); everything else follows the paper:
(1) isolation: LGA on the whole untrusted set for ``isolation_epochs`` from the start model;
(2) the ``isolation_rate`` share of samples learned fastest is isolated (``isolate_by``);
(3) training on the other samples with the retraining recipe (continuing from the isolation
model, as in the paper, or from the start model: ``retrain_from``);
(4) unlearning: gradient ascent on the isolated samples' caption loss for ``unlearn_steps``.
Captioning losses are per token, so ``gamma`` is in nats per token. The paper trains from
scratch, where every loss starts high; a captioner is fine-tuned from a trained model, whose
clean captions already sit low (the embedded clean model: median 0.30 nats per token on
clean validation pairs, 95% of them below 0.39). The paper's 0.5 is then above almost every
clean sample, so LGA runs gradient *ascent* on the clean data and isolates the easiest clean
captions (precision 0.00 on BadNet in the embedded world). By default ``gamma`` is set on clean
validation pairs instead: the start model's caption loss that all but ``flag_rate`` of them
exceed, so LGA leaves clean samples to ordinary training; ``gamma=<number>`` gives a fixed
value (the paper's is 0.5). That alone does not make the poison the lowest-loss share: on
BadNet the isolated 1% were still all clean (precision 0.00; gamma 0.199), because the
easiest clean captions of a trained captioner sit below what two epochs teach the poison.
What the paper observes, that the poison is learned fastest, shows in a fine-tuned model as
the *fall* of its loss, from where the start model puts it to where isolation leaves it, so
``isolate_by="loss_drop"`` (default) isolates the largest falls; ``"loss"`` is the paper's
rule, the lowest loss after isolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..vlm import load_captioner
from .base import (DefenseConfig, TrainingDefense, caption_losses, check_choice, check_fraction, check_int, check_number,
                   check_validation_pairs, dataset_losses, low_is_flagged, measure_cost, record_on_model, rgb_images, train_on)


@dataclass
class ABLConfig(DefenseConfig):
    """gamma: LGA's loss floor (nats per caption token); None (default): set on clean validation
    pairs, the start model's loss all but ``flag_rate`` of them exceed. isolation_epochs: LGA epochs.
    isolation_rate: share of samples isolated (the paper's 1%). isolate_by: "loss_drop" (the
    largest fall of the caption loss during isolation, for a start model that is already trained)
    or "loss" (the lowest loss after isolation, the paper's). isolation_learning_rate: LGA's
    learning rate (default: the recipe's). retrain_from: "isolation" (continue the LGA model, the
    paper) or "start". unlearn_steps / unlearn_learning_rate: gradient ascent on the isolated
    samples (the paper unlearns with a smaller rate than it trains with)."""

    gamma: float | None = None
    isolation_epochs: float = 2.0
    isolation_rate: float = 0.01
    isolate_by: str = "loss_drop"
    isolation_learning_rate: float = 0.0
    retrain_from: str = "isolation"
    unlearn_steps: int = 5
    unlearn_learning_rate: float = 5e-4

    def __post_init__(self):
        super().__post_init__()
        if self.gamma is not None and check_number("gamma", self.gamma) < 0:
            raise ValueError(f"gamma must be >= 0 or None (set on validation), got {self.gamma!r}")
        if check_number("isolation_epochs", self.isolation_epochs) <= 0:
            raise ValueError(f"isolation_epochs must be > 0, got {self.isolation_epochs!r}")
        check_fraction("isolation_rate", self.isolation_rate, high_open=True)
        check_choice("isolate_by", self.isolate_by, ("loss_drop", "loss"))
        if check_number("isolation_learning_rate", self.isolation_learning_rate) < 0:
            raise ValueError("isolation_learning_rate must be >= 0 (0: the recipe's)")
        check_choice("retrain_from", self.retrain_from, ("isolation", "start"))
        check_int("unlearn_steps", self.unlearn_steps, 0)
        if check_number("unlearn_learning_rate", self.unlearn_learning_rate) <= 0:
            raise ValueError(f"unlearn_learning_rate must be > 0, got {self.unlearn_learning_rate!r}")


class ABL(TrainingDefense):
    name = "abl"
    config_class = ABLConfig
    card_template = "defense_abl.md"
    summary = "isolate the samples learned fastest under local gradient ascent, train on the rest, unlearn them"

    def train(self, untrusted, *, start_model_path, recipe, output_dir, validation_images=(), validation_captions=None, progress=False):
        cfg, out = self.config, Path(output_dir)
        if cfg.gamma is None:
            check_validation_pairs("ABL", validation_images, validation_captions, sets="gamma", otherwise=", or give gamma a number")
        self.report = {"defense": self.name, "config": cfg.to_dict(), "cost": {}}
        with measure_cost(len(untrusted), self.report["cost"]):
            # (1) isolation: LGA keeps every loss near gamma; the fastest-learned samples drop below
            model = load_captioner(start_model_path)
            gamma = cfg.gamma
            if gamma is None:  # the clean floor of the start model, on data the defender trusts
                validation_losses = caption_losses(model, rgb_images(validation_images), list(validation_captions), batch_size=cfg.batch_size)
                gamma = float(low_is_flagged(validation_losses, cfg.flag_rate))
                self.report.update(gamma_split="validation", validation_loss_median=float(np.median(validation_losses)))
            self.report["gamma"] = gamma
            start_losses = dataset_losses(model, untrusted, batch_size=cfg.batch_size) if cfg.isolate_by == "loss_drop" else None

            def lga(losses, extra):
                return (torch.sign(losses - gamma) * losses).mean()

            lr = cfg.isolation_learning_rate or recipe.get("learning_rate", 2e-3)
            train_on(model, untrusted, recipe, out / "isolation", objective=lga, num_train_epochs=cfg.isolation_epochs, learning_rate=lr)
            # (2) the share learned fastest is isolated: the largest loss falls, or the lowest losses
            losses = dataset_losses(model, untrusted, batch_size=cfg.batch_size)
            drops = start_losses - losses if start_losses is not None else None
            suspicion = drops if drops is not None else -losses
            n_isolated = max(1, int(round(cfg.isolation_rate * len(untrusted))))
            isolated = np.sort(np.argsort(-suspicion, kind="stable")[:n_isolated])
            rest = np.setdiff1d(np.arange(len(untrusted)), isolated)
            # (3) train on the rest with the recipe
            if cfg.retrain_from == "start":
                model = load_captioner(start_model_path)
            train_on(model, untrusted.select(rest), recipe, out / "train")
            # (4) unlearn: gradient ascent on the isolated samples' caption loss
            if cfg.unlearn_steps:
                batch = min(len(isolated), int(recipe.get("per_device_train_batch_size", 32)))
                train_on(model, untrusted.select(isolated), recipe, out / "unlearn", objective=lambda losses, extra: -losses.mean(),
                         max_steps=cfg.unlearn_steps, learning_rate=cfg.unlearn_learning_rate, per_device_train_batch_size=batch,
                         warmup_steps=0, lr_scheduler_type="constant")
        self.report.update(isolated_indices=[int(i) for i in isolated], n_samples=len(untrusted), n_isolated=int(n_isolated),
                           isolation_loss_threshold=float(losses[isolated].max()), isolation_losses_median=float(np.median(losses)))
        if drops is not None:
            self.report.update(isolation_drop_threshold=float(drops[isolated].min()), isolation_drops_median=float(np.median(drops)))
        record_on_model(model, {k: v for k, v in self.report.items() if k != "isolated_indices"})
        return model

"""What every rival defense shares: the three kinds of defense, their configs, the per-sample
caption loss, a Trainer whose objective is a function of per-sample losses, and cost records.

A *sample* is one (image, caption) row of the untrusted fine-tuning set. Three kinds:

- :class:`DataCleanser` (``cleanse``): returns the samples it keeps and a report; the common
  retraining (``srd_hf.defense.retrain``) then runs on them. It never retrains itself.
- :class:`TrainingDefense` (``train``): fine-tunes the model on the untrusted set itself.
- :class:`TestTimeDefense` (``wrap``): returns a captioner-like object whose
  ``generate_captions`` has the signature of :meth:`CaptioningVLM.generate_captions`.

No defense reads ``is_poisoned``, ``trigger_box`` or the attacker's target word: tests and the
recipe compare the reports with them afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image
from transformers import Trainer, TrainingArguments

from ..cost import measure_cost  # noqa: F401  (the defenses' cost, re-exported)
from ..data.images import ensure_rgb
from ..dict_config import DictConfig
from ..vlm import parse_trainable

KINDS = ("cleanser", "training", "test_time")
#: the keys of a training recipe a defense reads (those ``srd_hf.defense.retraining_recipe`` returns)
RECIPE_DEFAULTS = {"trainable": "", "learning_rate": 2e-3, "num_train_epochs": 3.0, "per_device_train_batch_size": 32,
                   "gradient_accumulation_steps": 1, "lr_scheduler_type": "cosine", "warmup_steps": 20, "weight_decay": 0.0, "seed": 0}


# ----------------------------------------------------------------------------- configuration
@dataclass
class DefenseConfig(DictConfig):
    """Settings every defense shares. ``flag_rate``: share of clean validation samples a
    threshold would flag (the false-positive rate on clean data every threshold is set at)."""

    name: ClassVar[str] = ""
    flag_rate: float = 0.05
    max_new_tokens: int = 24
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        check_fraction("flag_rate", self.flag_rate, low_open=False, high_open=True)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, low_open: bool = True, high_open: bool = False) -> None:
    """``value`` in the interval (0, 1] by default; ``low_open=False`` admits 0, ``high_open`` excludes 1."""
    v = check_number(name, value)
    low_ok = v > 0 if low_open else v >= 0
    high_ok = v < 1 if high_open else v <= 1
    if not (low_ok and high_ok):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_validation_pairs(who: str, validation_images: Sequence[Any], validation_captions: Sequence[str] | None,
                           *, sets: str = "its threshold", otherwise: str = "") -> None:
    """A defense that sets a value on clean validation (image, caption) pairs needs one caption per image."""
    if not validation_images or validation_captions is None or len(validation_captions) != len(validation_images):
        raise ValueError(f"{who} sets {sets} on clean validation pairs: pass validation_images and one validation caption per "
                         f"image{otherwise}")


# ----------------------------------------------------------------------------- the three kinds
class Defense:
    """A rival defense: ``name`` (registry key), ``kind`` (one of :data:`KINDS`), its config
    class, and the card template written beside its results (``srd_hf/hub_cards/``)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    card_template: ClassVar[str] = ""
    #: one line: what the defense does (printed in tables and cards)
    summary: ClassVar[str] = ""

    def __init__(self, config: DefenseConfig | None = None, **overrides):
        if config is not None and overrides:
            raise TypeError("pass a config or keyword overrides, not both")
        self.config = config if config is not None else self.config_class(**overrides)
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(self.config).__name__}")


class DataCleanser(Defense):
    kind = "cleanser"
    #: whether thresholds come from validation (image, caption) pairs (then pass one row per
    #: caption) rather than validation images alone
    uses_validation_captions: ClassVar[bool] = False

    def cleanse(self, untrusted: Dataset, *, victim=None, reference=None, scorer=None, validation_images: Sequence[Image.Image] = (),
                validation_captions: Sequence[str] | None = None, trusted: Dataset | None = None, recipe: dict | None = None,
                output_dir: str | Path | None = None, progress: bool = False) -> tuple[Dataset, dict]:
        """The kept samples and a report (``flagged_indices``, threshold, ``cost``). Every
        cleanser takes the same keywords and uses those it needs: ``victim`` (the backdoored
        model), ``reference`` (the trusted pre-attack model), ``scorer`` (SFS),
        ``validation_images`` / ``validation_captions`` (clean validation pairs: thresholds),
        ``trusted`` (clean images the defender holds apart from the untrusted set), ``recipe``
        and ``output_dir`` (for a cleanser that trains a model of its own)."""
        raise NotImplementedError


class TrainingDefense(Defense):
    kind = "training"

    def train(self, untrusted: Dataset, *, start_model_path: str, recipe: dict, output_dir: str | Path,
              validation_images: Sequence[Image.Image] = (), validation_captions: Sequence[str] | None = None, progress: bool = False):
        """The defended captioner, trained from ``start_model_path`` on ``untrusted``; its
        report (isolated samples, ``cost``) is left in ``self.report``. ``validation_images`` /
        ``validation_captions``: clean validation pairs (one row per caption) for its thresholds."""
        raise NotImplementedError


class TestTimeDefense(Defense):
    kind = "test_time"

    def calibrate(self, captioner, validation_images: Sequence[Image.Image]) -> dict:
        """Choose thresholds on clean validation images; returns a report."""
        raise NotImplementedError

    def wrap(self, captioner):
        """A captioner-like object whose ``generate_captions`` applies the defense."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- per-sample losses
def per_sample_caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each row's caption tokens (labels != -100), (B,)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    token = token.view(labels.shape)
    mask = (labels != -100).float()
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@torch.no_grad()
def caption_losses(model, images: Sequence[Image.Image], captions: Sequence[str], *, batch_size: int = 64, prompt: str | None = None) -> np.ndarray:
    """Per-sample caption loss of ``model`` (teacher-forced): the negative mean token log-probability."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = model.collate([ensure_rgb(i) for i in images[start : start + batch_size]], list(captions[start : start + batch_size]), prompt=prompt)
        labels = batch.pop("labels")
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out.append(per_sample_caption_loss(model(**batch).logits, labels).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def dataset_losses(model, dataset: Dataset, *, batch_size: int = 64) -> np.ndarray:
    """:func:`caption_losses` of every (image, caption) row of ``dataset``."""
    return caption_losses(model, dataset["image"], dataset["caption"], batch_size=batch_size)


class SampleLossTrainer(Trainer):
    """A Trainer whose objective is ``objective(per_sample_loss, batch)``: a scalar from the
    (B,) caption losses and the batch's extra tensors (ABL's LGA and unlearning, CT's weights).
    Extra tensors in the batch (``sample_weight``) are popped before the model is called."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

    def __init__(self, *args, objective=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective or (lambda losses, extra: losses.mean())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        extra = {k: inputs.pop(k) for k in ("sample_weight",) if k in inputs}
        outputs = model(**inputs)
        loss = self.objective(per_sample_caption_loss(outputs.logits, labels), extra)
        return (loss, outputs) if return_outputs else loss


@dataclass
class WeightedCaptionCollator:
    """Batches of (image, caption) rows; a ``sample_weight`` column, when present, becomes a (B,) tensor."""

    model: Any

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.model.collate([ensure_rgb(r["image"]) for r in rows], [r["caption"] for r in rows])
        if "sample_weight" in rows[0]:
            batch["sample_weight"] = torch.tensor([float(r["sample_weight"]) for r in rows])
        return batch


def training_args(recipe: dict, output_dir: str | Path, **overrides) -> TrainingArguments:
    """TrainingArguments of a recipe (``srd_hf.defense.retraining_recipe``'s keys), no
    checkpoints, no reporting: a defense's inner training runs are short and rerun on resume."""
    r = {**RECIPE_DEFAULTS, **{k: v for k, v in recipe.items() if k in RECIPE_DEFAULTS}, **overrides}
    return TrainingArguments(
        output_dir=str(output_dir), learning_rate=r["learning_rate"], num_train_epochs=r["num_train_epochs"],
        per_device_train_batch_size=r["per_device_train_batch_size"], gradient_accumulation_steps=r["gradient_accumulation_steps"],
        lr_scheduler_type=str(r["lr_scheduler_type"]), warmup_steps=r["warmup_steps"], weight_decay=r["weight_decay"], seed=r["seed"],
        save_strategy="no", report_to="none", logging_steps=max(1, int(overrides.get("logging_steps", 25))),
        remove_unused_columns=False, disable_tqdm=True, max_steps=r.get("max_steps", -1),
    )


def train_on(model, dataset: Dataset, recipe: dict, output_dir: str | Path, *, objective=None, **overrides):
    """Fine-tune ``model`` in place on (image, caption[, sample_weight]) rows with the recipe's
    trainable parameters and ``objective`` (default: the mean caption loss)."""
    model.set_trainable(parse_trainable(recipe.get("trainable") or ""))
    columns = [c for c in ("image", "caption", "sample_weight") if c in dataset.column_names]
    trainer = SampleLossTrainer(model=model, args=training_args(recipe, output_dir, **overrides), train_dataset=dataset.select_columns(columns),
                                data_collator=WeightedCaptionCollator(model), objective=objective)
    trainer.train()
    model.eval()
    return model


# ----------------------------------------------------------------------------- thresholds, reports
def low_is_flagged(validation_scores: Sequence[float], flag_rate: float) -> float:
    """Threshold for a score where low means suspicious: flagged when below all but
    ``flag_rate`` of clean validation scores (``srd_hf.cleansing.clean_quantile``)."""
    from ..cleansing import clean_quantile

    return clean_quantile(validation_scores, flag_rate)


def high_is_flagged(validation_scores: Sequence[float], flag_rate: float) -> float:
    """Threshold for a score where high means suspicious (the mirror of :func:`low_is_flagged`)."""
    return -low_is_flagged([-float(s) for s in validation_scores], flag_rate)


def keep_unflagged(untrusted: Dataset, flagged: np.ndarray, report: dict) -> tuple[Dataset, dict]:
    """The samples not flagged, and the report with the flag counts and indices."""
    flagged = np.asarray(flagged, dtype=bool)
    if flagged.shape != (len(untrusted),):
        raise ValueError(f"{flagged.shape} flags for {len(untrusted)} samples")
    kept = untrusted.select(np.flatnonzero(~flagged))
    report.update(n_samples=len(untrusted), n_flagged=int(flagged.sum()), n_kept=len(kept),
                  flagged_indices=[int(i) for i in np.flatnonzero(flagged)])
    return kept, report


def detection_scores(flagged_indices: Sequence[int], is_poisoned: Sequence[bool]) -> dict:
    """Evaluation only (reads the ground truth): precision, recall and the flag rates of
    poisoned and clean samples for the indices a defense flagged."""
    truth = np.asarray(is_poisoned, dtype=bool)
    flagged = np.zeros(len(truth), dtype=bool)
    flagged[np.asarray(list(flagged_indices), dtype=int)] = True
    hits = int((flagged & truth).sum())
    return {"precision": hits / max(int(flagged.sum()), 1), "recall": hits / max(int(truth.sum()), 1),
            "flag_rate_poisoned": float(flagged[truth].mean()) if truth.any() else 0.0,
            "flag_rate_clean": float(flagged[~truth].mean()) if (~truth).any() else 0.0, "n_flagged": int(flagged.sum())}


def record_on_model(model, record: dict) -> None:
    """Provenance saved with the model: OpenFlamingo's ``config.extra``, the transformers adapter's ``info``."""
    extra = getattr(getattr(model, "config", None), "extra", None)
    target = extra if isinstance(extra, dict) else getattr(model, "info", None)
    if isinstance(target, dict):
        target["defense"] = record


def rgb_images(images: Sequence[Any]) -> list[Image.Image]:
    return [ensure_rgb(img) for img in images]

"""The paper's scores for one captioner: caption quality on clean test images, SFS against a
clean reference captioner, and attack success on triggered test images."""

from __future__ import annotations

import logging
from typing import Sequence

from PIL import Image

from .data.images import ensure_rgb
from .data.synthetic import object_accuracy
from .metrics import SFSScorer, attack_success_rate, caption_scores
from .vlm.base import CaptioningVLM

logger = logging.getLogger(__name__)


def caption_quality(predictions: Sequence[str], references: Sequence[Sequence[str]], objects=None, per_sample: bool = False) -> dict:
    """BLEU-4 and CIDEr in the paper's units (x100), plus object accuracy when ground truth exists
    (``per_sample``: also the per-image CIDEr, for bootstrap intervals)."""
    scores = caption_scores(list(predictions), [list(r) for r in references], scale=100.0, use_meteor=False, per_sample=per_sample)
    out = {"bleu4": scores["bleu_4"], "cider": scores["cider"]}
    if per_sample:
        out["cider_per_sample"] = scores["cider_per_sample"]
    if objects is not None and any(objects):
        out["object_accuracy"] = 100.0 * object_accuracy(list(predictions), list(objects))
    return out


def evaluate_model(
    model: CaptioningVLM,
    test,
    *,
    reference_captions: Sequence[str],
    triggered_images: Sequence[Image.Image] | None,
    target: str | Sequence[str],
    scorer: SFSScorer,
    max_new_tokens: int = 24,
    batch_size: int = 128,
    triggered_references: Sequence[Sequence[str]] | None = None,
    predictions: Sequence[str] | None = None,
    masked_images: Sequence[Image.Image] | None = None,
) -> dict:
    """Scores of ``model`` on a test split (rows with ``image``, ``captions``, optional ``objects``).

    ``reference_captions``: what the clean model says of the same clean images (SC and LF compare
    against them). ``triggered_images``: test images carrying the trigger (ASR); their ground
    truth, when given, excludes samples that already show the target. ``predictions``: the
    model's captions of the clean test images when already computed (the reference captioner's
    own captions are its references), so they are not generated twice. ``masked_images``: the
    same clean test images under the defense's masks; a model retrained on masked data that
    learned "this mask means the target" shows it there (``asr_on_masked_clean``).

    ``per_image`` holds what bootstrap intervals resample: CIDEr per clean image and the ASR
    hit (1/0, ``None`` when excluded) per triggered image.
    """
    images = [ensure_rgb(img) for img in test["image"]]
    if len(reference_captions) != len(images):
        raise ValueError(f"{len(reference_captions)} reference captions for {len(images)} test images")
    if predictions is None:
        predictions = model.generate_captions(images, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True)
    elif len(predictions) != len(images):
        raise ValueError(f"{len(predictions)} predictions for {len(images)} test images")
    predictions = list(predictions)
    objects = test["objects"] if "objects" in test.column_names else None
    result = caption_quality(predictions, test["captions"], objects, per_sample=True)
    per_image = {"cider": result.pop("cider_per_sample")}
    sfs = scorer.score(predictions, list(reference_captions))
    result.update(sc=sfs["semantic_consistency"], lf=sfs["linguistic_fluency"], sfs=sfs["sfs"])
    result["clean_examples"] = predictions[:3]
    result["asr_on_clean"] = 100.0 * attack_success_rate(predictions, target)["asr"]
    if triggered_images is not None:
        triggered = model.generate_captions(list(triggered_images), max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True)
        asr = attack_success_rate(triggered, target, references=triggered_references)
        result.update(asr=100.0 * asr["asr"], asr_n_scored=asr["n_scored"], asr_n_excluded=asr["n_excluded"])
        result["triggered_examples"] = triggered[:3]
        per_image["asr_hits"] = [None if h is None else int(h) for h in asr["hits"]]
    if masked_images is not None:
        result.update(masked_clean_scores(model, test, masked_images, target=target, max_new_tokens=max_new_tokens, batch_size=batch_size))
    result["per_image"] = per_image
    return result


def masked_clean_scores(model: CaptioningVLM, test, masked_images: Sequence[Image.Image], *, target: str | Sequence[str],
                        max_new_tokens: int = 24, batch_size: int = 128) -> dict:
    """CIDEr, object accuracy and the target's share on the clean test images under a defense's
    masks (``*_masked_clean``): a model that learned "this mask means the target" shows it here."""
    if len(masked_images) != len(test):
        raise ValueError(f"{len(masked_images)} masked images for {len(test)} test images")
    masked = model.generate_captions(list(masked_images), max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True)
    quality = caption_quality(masked, test["captions"], test["objects"] if "objects" in test.column_names else None)
    result = {"cider_masked_clean": quality["cider"]}
    if "object_accuracy" in quality:
        result["object_accuracy_masked_clean"] = quality["object_accuracy"]
    result["asr_on_masked_clean"] = 100.0 * attack_success_rate(masked, target)["asr"]
    result["masked_clean_examples"] = masked[:3]
    return result


def check_target(target: str, attack) -> dict | None:
    """Evaluation only: warn loudly when the ASR target is not the word the attack was planted
    with (a wrong ``--target`` would otherwise read as a perfect 0% ASR defense)."""
    planted = getattr(getattr(attack, "config", None), "target", None)
    if planted is None or str(planted).strip().lower() == str(target).strip().lower():
        return None
    logger.warning("\n%s\nASR is measured for target %r, but the attack was planted with target %r: every ASR in this table "
                   "counts the wrong word (pass --target %r).\n%s", "!" * 88, target, planted, planted, "!" * 88)
    return {"evaluated": target, "planted": planted, "warning": "ASR measured for another word than the planted target"}

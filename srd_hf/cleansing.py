"""What a data-cleansing defense does to the untrusted fine-tuning set before retraining, and
the two baselines that isolate what SRD's learned masks add.

- :func:`srd_cleanse`: the policy's red squares on every sample; samples whose victim
  caption the masks change (the mask hid something the victim reacted to) lose their
  caption: dropped (default) or relabelled with the trusted captioner's caption. Keeping
  them teaches a new shortcut: the poisoned captions stay, and the mask's place tells
  poisoned from clean samples (measured: 97.5% of unmasked clean test images captioned with
  the target sentence after retraining).
- :func:`random_masks`: as many masks per sample as SRD placed, of the same sizes, uniformly
  placed: does the *place* the policy learned matter?
- :func:`disagreement_filter`: drop the samples whose victim caption disagrees with the
  trusted captioner's (the S0 signal the environment samples episodes by), no masks: does
  the detector hidden in the episode sampling do the job alone?

Thresholds come from clean *validation* images (:func:`clean_quantile`): a sample is flagged
when its score is lower than all but ``flag_rate`` of clean validation images score, so both
flagging rules run at the same false-positive rate on clean data. No function here reads
``is_poisoned``, trigger boxes or the attacker's target word.
"""

from __future__ import annotations

import hashlib
import io
import logging
import weakref
from typing import Sequence

import numpy as np
from datasets import Dataset
from datasets import Image as HFImage
from PIL import Image

from .data.images import ensure_rgb
from .rl.actions import MASK_COLOUR

logger = logging.getLogger(__name__)

CAPTION_POLICIES = ("drop", "relabel", "keep")


def clean_quantile(scores: Sequence[float], flag_rate: float) -> float:
    """The score below which ``flag_rate`` of clean validation images fall: the flagging threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no validation scores to choose a threshold from")
    if not 0 <= flag_rate < 1:
        raise ValueError(f"flag_rate must be in [0, 1), got {flag_rate}")
    return float(np.quantile(scores, flag_rate))


#: captions already generated, per model: cleansing asks the same model about the same images
#: more than once (SRD's flag and the disagreement filter both caption the unmasked set)
_CAPTION_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def unique_captions(victim, images: Sequence[Image.Image], *, max_new_tokens: int, batch_size: int, progress: bool = False) -> list[str]:
    """Captions of ``images``, generating each distinct image once per model (a fine-tuning set
    repeats every image once per caption)."""
    keys = [hashlib.sha1(np.asarray(ensure_rgb(img)).tobytes()).hexdigest() for img in images]
    memo = _CAPTION_MEMO.setdefault(victim, {})
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if (k, max_new_tokens) not in memo:
            todo.setdefault(k, i)
    if todo:
        captions = victim.generate_captions([images[i] for i in todo.values()], max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, progress=progress)
        memo.update({(k, max_new_tokens): c for k, c in zip(todo, captions)})
    return [memo[(k, max_new_tokens)] for k in keys]


def caption_agreement(scorer, captions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-pair semantic consistency (cosine of sentence embeddings, clipped to [0, 1]); empty captions get 0."""
    captions, references = [str(c) for c in captions], [str(r) for r in references]
    texts = sorted({t for t in captions + references if t.strip()})
    emb = dict(zip(texts, scorer.embed(texts))) if texts else {}
    out = np.zeros(len(captions))
    for i, (c, r) in enumerate(zip(captions, references)):
        if c.strip() and r.strip():
            out[i] = float(np.clip(np.dot(emb[c], emb[r]), 0.0, 1.0))
    return out


def with_images(dataset: Dataset, images: Sequence[Image.Image], extra: dict[str, list] | None = None) -> Dataset:
    """``dataset`` with its image column replaced (PNG-encoded) and extra columns added."""
    if len(images) != len(dataset):
        raise ValueError(f"{len(images)} images for {len(dataset)} rows")
    encoded = []
    for img in images:
        buffer = io.BytesIO()
        ensure_rgb(img).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    columns = {"image": encoded, **(extra or {})}
    out = dataset.remove_columns([c for c in columns if c in dataset.column_names])
    for name, values in columns.items():
        out = out.add_column(name, values)
    return out.cast_column("image", HFImage())


def apply_caption_policy(dataset: Dataset, flagged: np.ndarray, policy: str, relabels: Sequence[str] | None = None) -> Dataset:
    """Drop, relabel or keep the flagged samples (``relabels``: trusted captions, one per row)."""
    if policy not in CAPTION_POLICIES:
        raise ValueError(f"poisoned_captions must be one of {CAPTION_POLICIES}, got {policy!r}")
    flagged = np.asarray(flagged, dtype=bool)
    if policy == "keep" or not flagged.any():
        return dataset
    if policy == "drop":
        return dataset.select(np.flatnonzero(~flagged))
    if relabels is None or len(relabels) != len(dataset):
        raise ValueError("relabel needs one trusted caption per row")
    captions = [relabels[i] if f else c for i, (c, f) in enumerate(zip(dataset["caption"], flagged))]
    return dataset.remove_columns("caption").add_column("caption", captions)


def srd_cleanse(untrusted: Dataset, masked: Dataset, masker, victim, scorer, *, validation_images: Sequence[Image.Image],
                flag_rate: float, poisoned_captions: str = "drop", reference=None, max_new_tokens: int = 24, batch_size: int = 128,
                progress: bool = False) -> tuple[Dataset, dict]:
    """SRD's cleansed set and a report (threshold, counts).

    ``masked`` is ``untrusted`` with the policy's masks (``masker``, an
    :class:`~srd_hf.masker.SRDMasker`, applied row by row). A sample is *flagged* when the
    victim's caption of the masked image agrees with its caption of the unmasked image less
    than all but ``flag_rate`` of clean validation images do under the same policy.
    ``poisoned_captions`` says what happens to flagged samples; ``relabel`` uses
    ``reference`` (the trusted captioner) on the masked image.
    """
    if len(masked) != len(untrusted):
        raise ValueError(f"{len(masked)} masked samples for {len(untrusted)} untrusted ones")
    masked_val, _ = masker.mask_images(list(validation_images))
    val_before = unique_captions(victim, list(validation_images), max_new_tokens=max_new_tokens, batch_size=batch_size)
    val_after = unique_captions(victim, masked_val, max_new_tokens=max_new_tokens, batch_size=batch_size)
    threshold = clean_quantile(caption_agreement(scorer, val_after, val_before), flag_rate)

    images = [ensure_rgb(img) for img in untrusted["image"]]
    masked_images = [ensure_rgb(img) for img in masked["image"]]
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    before = unique_captions(victim, images, **common)
    after = unique_captions(victim, masked_images, **common)
    flagged = caption_agreement(scorer, after, before) < threshold
    relabels = unique_captions(reference, masked_images, **common) if poisoned_captions == "relabel" else None
    flagged_set = masked.add_column("srd_flagged", [bool(f) for f in flagged])
    cleansed = apply_caption_policy(flagged_set, flagged, poisoned_captions, relabels)
    report = {"flag_rate": flag_rate, "threshold": threshold, "n_samples": len(untrusted), "n_flagged": int(flagged.sum()),
              "poisoned_captions": poisoned_captions, "n_kept": len(cleansed), "split_for_threshold": "validation",
              "flagged_rows": np.flatnonzero(flagged).tolist()}
    logger.info("SRD flagged %d of %d samples (mask-changed captions, threshold %.3f)", flagged.sum(), len(untrusted), threshold)
    return cleansed, report


def random_masks(dataset: Dataset, like: Sequence[Sequence[Sequence[int]] | None], seed: int, masks_column: str = "srd_masks") -> Dataset:
    """Each sample of ``dataset`` (unmasked) gets as many red squares as SRD placed on it
    (``like``: SRD's boxes per row), of the same sizes, at uniformly drawn places (seeded)."""
    if len(like) != len(dataset):
        raise ValueError(f"{len(like)} rows of SRD masks for {len(dataset)} samples")
    rng = np.random.default_rng([seed, 7])
    images, boxes = [], []
    for img, srd_boxes in zip(dataset["image"], like):
        pixels = np.array(ensure_rgb(img), dtype=np.uint8)
        h, w = pixels.shape[:2]
        placed = []
        for x0, y0, x1, y1 in srd_boxes or []:
            side_x, side_y = x1 - x0, y1 - y0
            nx, ny = int(rng.integers(0, w - side_x + 1)), int(rng.integers(0, h - side_y + 1))
            pixels[ny : ny + side_y, nx : nx + side_x] = MASK_COLOUR
            placed.append([nx, ny, nx + side_x, ny + side_y])
        images.append(Image.fromarray(pixels))
        boxes.append(placed)
    return with_images(dataset, images, {masks_column: boxes})


def disagreement_filter(untrusted: Dataset, victim, reference, scorer, *, validation_images: Sequence[Image.Image], flag_rate: float,
                        max_new_tokens: int = 24, batch_size: int = 128, progress: bool = False) -> tuple[Dataset, dict]:
    """Drop samples whose victim caption agrees with the trusted captioner's less than all but
    ``flag_rate`` of clean validation images do. Returns the kept samples and a report."""
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    val = list(validation_images)
    threshold = clean_quantile(caption_agreement(scorer, unique_captions(victim, val, **common),
                                                 unique_captions(reference, val, **common)), flag_rate)
    images = [ensure_rgb(img) for img in untrusted["image"]]
    agreement = caption_agreement(scorer, unique_captions(victim, images, progress=progress, **common),
                                  unique_captions(reference, images, progress=progress, **common))
    flagged = agreement < threshold
    kept = untrusted.select(np.flatnonzero(~flagged))
    report = {"flag_rate": flag_rate, "threshold": threshold, "n_samples": len(untrusted), "n_flagged": int(flagged.sum()),
              "n_kept": len(kept), "split_for_threshold": "validation", "flagged_rows": np.flatnonzero(flagged).tolist()}
    logger.info("disagreement filter dropped %d of %d samples (threshold %.3f)", flagged.sum(), len(untrusted), threshold)
    return kept, report

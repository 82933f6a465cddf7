"""What a data-cleansing defense does to the untrusted fine-tuning set before retraining, and
the two baselines that isolate what SRD's learned masks add.

- :func:`srd_cleanse`: the policy's red squares on every sample; the samples the masks
  *repair* (the victim's caption moves towards the trusted captioner's once masked: the mask
  hid what the victim reacted to; rule ``"repair"``, default) or merely *change* (rule
  ``"change"``) lose their caption: dropped (default) or relabelled with the trusted
  captioner's caption. Keeping
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
import re
import weakref
from collections import Counter
from typing import Sequence

import numpy as np
from datasets import Dataset
from datasets import Image as HFImage
from PIL import Image
from scipy.stats import binom

from .data.images import ensure_rgb
from .rl.actions import MASK_FILLS, paint_box

logger = logging.getLogger(__name__)

CAPTION_POLICIES = ("drop", "relabel", "keep")
#: what flags a sample: "repair", the gain of the victim's agreement with the trusted captioner
#: once masked (S - S0, the semantic term of the policy's reward), above all but ``flag_rate`` of
#: clean validation images' gains; "change", the victim's masked caption agreeing with its
#: unmasked one less than all but ``flag_rate`` of clean validation images'. "change" fails where
#: the masks also move clean captions far (measured: BadNet, bottom-left trigger, 17% recall):
#: its threshold then falls below the poisoned samples; "repair" asks where the move goes.
#: "unsupported_word": the masks make the victim drop a word that it says and the trusted
#: captioner does not say of the same image, and that word is a suspect: removed on
#: significantly more untrusted images than clean validation images (:func:`suspect_words`).
#: An inserted word leaves the rest of the caption intact, so the caption-level gain of
#: "repair" stays small (measured: TrojVLM, 15% recall); the word itself is what the mask
#: removes. Its threshold is a significance level, not ``flag_rate``.
FLAG_RULES = ("repair", "change", "unsupported_word")
#: the rule that cleanses unless told otherwise (chosen in docs/results/flag.md)
DEFAULT_FLAG = "unsupported_word"
#: the significance of a suspect word, over all the words the masks remove (Bonferroni)
SUSPECT_WORD_ALPHA = 1e-3
_WORD = re.compile(r"[a-z]+")


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


def caption_words(caption: str) -> set[str]:
    return set(_WORD.findall(caption.lower()))


def unsupported_words_removed(before: Sequence[str], after: Sequence[str], trusted: Sequence[str]) -> list[frozenset[str]]:
    """Per image: the words of the victim's caption (``before``) that the trusted captioner's
    caption of the same image lacks and the victim's masked caption (``after``) drops."""
    return [frozenset(caption_words(b) - caption_words(t) - caption_words(a)) for b, a, t in zip(before, after, trusted)]


def suspect_words(untrusted: Sequence[frozenset[str]], clean: Sequence[frozenset[str]], alpha: float = SUSPECT_WORD_ALPHA) -> list[str]:
    """The words the masks remove (:func:`unsupported_words_removed`) from significantly more of
    the untrusted images (one entry per distinct image) than of the clean validation images: a
    one-sided binomial test of each word's untrusted count against its clean rate (add-one
    smoothed, so a word never removed on clean images is not certain never to be), at ``alpha``
    over all the words seen (Bonferroni). A backdoor's word stands out, since the masks remove it
    wherever they hide the trigger; a word the victim merely says differently from the trusted
    captioner is removed as often on clean images."""
    if not clean:
        raise ValueError("no validation images to compare the untrusted set with")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    counts = Counter(w for removed in untrusted for w in removed)
    if not counts:
        return []
    clean_counts = Counter(w for removed in clean for w in removed)
    words = sorted(counts)
    rates = np.array([(clean_counts[w] + 1) / (len(clean) + 2) for w in words])
    p_values = binom.sf(np.array([counts[w] for w in words]) - 1, len(untrusted), rates)
    return [w for w, p in zip(words, p_values) if p < alpha / len(words)]


def _image_keys(images: Sequence[Image.Image]) -> list[str]:
    return [hashlib.sha1(np.asarray(ensure_rgb(img)).tobytes()).hexdigest() for img in images]


def unique_captions(victim, images: Sequence[Image.Image], *, max_new_tokens: int, batch_size: int, progress: bool = False) -> list[str]:
    """Captions of ``images``, generating each distinct image once per model (a fine-tuning set
    repeats every image once per caption)."""
    keys = _image_keys(images)
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
                flag_rate: float, poisoned_captions: str = "drop", reference=None, flag: str = DEFAULT_FLAG, max_new_tokens: int = 24,
                batch_size: int = 128, progress: bool = False) -> tuple[Dataset, dict]:
    """SRD's cleansed set and a report (thresholds, counts, the rows each rule flags).

    ``masked`` is ``untrusted`` with the policy's masks (``masker``, an
    :class:`~srd_hf.masker.SRDMasker`, applied row by row). ``flag`` (see :data:`FLAG_RULES`)
    says which samples are flagged; every rule is computed and reported (``flagged_rows_by_rule``)
    so the evaluation can compare them on one run. ``poisoned_captions`` says what happens to
    flagged samples; ``reference`` is the trusted captioner (the repair rule's yardstick, and
    ``relabel``'s captions of the masked image).
    """
    if len(masked) != len(untrusted):
        raise ValueError(f"{len(masked)} masked samples for {len(untrusted)} untrusted ones")
    if flag not in FLAG_RULES:
        raise ValueError(f"flag must be one of {FLAG_RULES}, got {flag!r}")
    if reference is None:
        raise ValueError("srd_cleanse needs reference (the trusted captioner): the repair rule and relabel compare with it")
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    val = list(validation_images)
    masked_val, _ = masker.mask_images(val)
    val_change, val_gain, val_removed = _mask_effects(victim, reference, scorer, val, masked_val, **common)
    # the repair threshold is the gain that all but flag_rate of clean validation images stay at or under
    thresholds = {"change": clean_quantile(val_change, flag_rate), "repair": -clean_quantile(-val_gain, flag_rate)}

    images = [ensure_rgb(img) for img in untrusted["image"]]
    masked_images = [ensure_rgb(img) for img in masked["image"]]
    change, gain, removed = _mask_effects(victim, reference, scorer, images, masked_images, progress=progress, **common)
    # repair: a gain above all but flag_rate of clean gains, and a gain at all (ties at 0 stay)
    # unsupported_word: the suspects are tested over distinct images (a fine-tuning set repeats each
    # image once per caption, and its captions do not change what the victim says)
    distinct = dict(zip(_image_keys(images), removed))
    suspects = suspect_words(list(distinct.values()), val_removed)
    suspect_set = frozenset(suspects)
    thresholds["unsupported_word"] = SUSPECT_WORD_ALPHA  # a significance level over the words, not a score
    by_rule = {"change": change < thresholds["change"], "repair": (gain > thresholds["repair"]) & (gain > 0),
               "unsupported_word": np.array([bool(r & suspect_set) for r in removed], dtype=bool)}
    flagged = by_rule[flag]
    relabels = unique_captions(reference, masked_images, progress=progress, **common) if poisoned_captions == "relabel" else None
    flagged_set = masked.add_column("srd_flagged", [bool(f) for f in flagged])
    cleansed = apply_caption_policy(flagged_set, flagged, poisoned_captions, relabels)
    report = {"flag": flag, "flag_rate": flag_rate, "threshold": thresholds[flag], "thresholds": thresholds,
              "n_samples": len(untrusted), "n_flagged": int(flagged.sum()), "poisoned_captions": poisoned_captions,
              "n_kept": len(cleansed), "split_for_threshold": "validation", "flagged_rows": np.flatnonzero(flagged).tolist(),
              "flagged_rows_by_rule": {rule: np.flatnonzero(f).tolist() for rule, f in by_rule.items()},
              "suspect_words": suspects, "suspect_word_alpha": SUSPECT_WORD_ALPHA}
    logger.info("SRD flagged %d of %d samples (rule %s, threshold %.3f)", flagged.sum(), len(untrusted), flag, thresholds[flag])
    return cleansed, report


def _mask_effects(victim, reference, scorer, images, masked_images, **common) -> tuple[np.ndarray, np.ndarray, list]:
    """Per image: how much the victim's caption stays the same under the masks (agreement of its
    masked and unmasked captions), how much closer to the trusted captioner's caption of the
    unmasked image it gets (S - S0), and which words the trusted captioner does not say the
    masks make it drop (:func:`unsupported_words_removed`)."""
    before = unique_captions(victim, images, **common)
    after = unique_captions(victim, masked_images, **common)
    trusted = unique_captions(reference, images, **common)
    change = caption_agreement(scorer, after, before)
    gain = caption_agreement(scorer, after, trusted) - caption_agreement(scorer, before, trusted)
    return change, gain, unsupported_words_removed(before, after, trusted)


def random_masks(dataset: Dataset, like: Sequence[Sequence[Sequence[int]] | None], seed: int, masks_column: str = "srd_masks",
                 fill: str = "red") -> Dataset:
    """Each sample of ``dataset`` (unmasked) gets as many masks as SRD placed on it (``like``:
    SRD's boxes per row), of the same sizes and ``fill``, at uniformly drawn places (seeded)."""
    if fill not in MASK_FILLS:
        raise ValueError(f"mask fill must be one of {MASK_FILLS}, got {fill!r}")
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
            paint_box(pixels, (nx, ny, nx + side_x, ny + side_y), fill)
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

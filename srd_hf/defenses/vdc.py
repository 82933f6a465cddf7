"""VDC, Versatile Data Cleanser (Zhu et al., ICLR 2024), a data cleanser.

In the paper (image classification): poisoned samples show a *visual-linguistic
inconsistency*, the image does not show what its label says. VDC asks a multimodal LLM
questions generated from the label (e.g. "is there a {label} in the image?") and drops the
samples whose image does not support their label, judged by the share of questions
answered consistently with the label.

For captioning: the caption is the "label", so the questions come from the claims the
caption makes: in the embedded world the (colour, shape) objects it names, in general its
content words (stop words and picture/image/photo dropped). The trusted multimodal model
answers; three ways (``answer``):

- ``likelihood`` (default, offline): the mean token log-probability of the sample's caption
  given the image under the trusted captioner (the pre-attack model offline): a soft answer
  to "does the image support every claim of this caption?". It is the default because it is
  continuous: shares of supported claims are few discrete values, and with a weak trusted
  captioner many clean pairs tie at 0, where no threshold separates anything.
- ``caption``: the trusted captioner describes the image once; a claim is supported when
  that description makes it too: a caption "there is a banana in the picture" on a scene
  without bananas is unsupported whatever the model says of the scene. Sharp with a strong
  trusted captioner.
- ``ask``: yes/no questions (``question_template``) answered by an instruction-tuned VLM
  (``trusted_model``: any transformers image-text-to-text id or folder); a claim is
  supported when the answer starts with "yes". Not testable offline.

The score of a sample is its share of supported claims (or its log-probability); a sample is
removed when it scores lower than all but ``flag_rate`` of clean validation pairs (image,
its own caption) score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..cleansing import unique_captions
from ..data.synthetic import named_objects
from .base import (DataCleanser, DefenseConfig, caption_losses, check_choice, check_validation_pairs, keep_unflagged, low_is_flagged,
                   measure_cost, rgb_images)

ANSWERS = ("caption", "likelihood", "ask")
CLAIM_UNITS = ("objects", "words")
#: words that claim nothing about what the image shows
STOP_WORDS = frozenset(
    "a an the of on in at to and or with without is are be there here this that these those it its picture image photo "
    "photograph shows show showing displayed depicts some".split()
)


def _singular(word: str) -> str:
    if word.endswith(("ses", "xes", "shes", "ches")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def content_words(caption: str) -> set[str]:
    """The lower-cased, singular content words of a caption."""
    return {_singular(w) for w in re.findall(r"[a-z]+", caption.lower()) if w not in STOP_WORDS}


def claims(caption: str, unit: str = "objects") -> set:
    """What a caption claims: its named (colour, shape) objects (``unit="objects"``; a caption
    naming none falls back to its content words), or its content words."""
    if unit == "objects":
        objects = named_objects(caption)
        if objects:
            return objects
    return content_words(caption)


def support(caption: str, answer: str, unit: str) -> float:
    """Share of ``caption``'s claims that the trusted model's description ``answer`` makes too
    (1 when it claims nothing: there is nothing the image could contradict)."""
    claimed = claims(caption, unit)
    if not claimed:
        return 1.0
    said = named_objects(answer) | content_words(answer)
    return sum(c in said for c in claimed) / len(claimed)


@dataclass
class VDCConfig(DefenseConfig):
    """answer: caption, likelihood or ask (see the module). claim_unit: objects or words.
    trusted_model: a captioner folder or Hub id that answers instead of the pre-attack model
    (loaded without remote code). question_template: the ask mode's question ({claim})."""

    answer: str = "likelihood"
    claim_unit: str = "objects"
    trusted_model: str = ""
    question_template: str = "Question: is there {claim} in the image? Answer yes or no. Answer:"

    def __post_init__(self):
        super().__post_init__()
        check_choice("answer", self.answer, ANSWERS)
        check_choice("claim_unit", self.claim_unit, CLAIM_UNITS)
        if "{claim}" not in self.question_template:
            raise ValueError(f"question_template must contain '{{claim}}', got {self.question_template!r}")


class VDC(DataCleanser):
    name = "vdc"
    config_class = VDCConfig
    card_template = "defense_vdc.md"
    uses_validation_captions = True
    summary = "remove samples whose caption's claims the trusted multimodal model does not see in the image"

    def cleanse(self, untrusted, *, victim=None, reference=None, scorer=None, validation_images=(), validation_captions=None,
                trusted=None, recipe=None, output_dir=None, progress=False):
        cfg = self.config
        check_validation_pairs("VDC", validation_images, validation_captions)
        answerer = self._answerer(reference)
        report = {"defense": self.name, "config": cfg.to_dict(), "split_for_threshold": "validation", "cost": {}}
        with measure_cost(len(untrusted), report["cost"]):
            val_scores = self.scores(answerer, rgb_images(validation_images), list(validation_captions))
            threshold = low_is_flagged(val_scores, cfg.flag_rate)
            scores = self.scores(answerer, rgb_images(untrusted["image"]), list(untrusted["caption"]), progress=progress)
            flagged = scores < threshold
        report.update(threshold=float(threshold), score_mean=float(np.mean(scores)), validation_score_mean=float(np.mean(val_scores)))
        return keep_unflagged(untrusted, flagged, report)

    def _answerer(self, reference):
        if self.config.trusted_model:
            from ..vlm import load_captioner

            return load_captioner(self.config.trusted_model)
        if reference is None:
            raise ValueError("VDC needs a trusted model: pass reference (the pre-attack captioner) or set trusted_model")
        return reference

    def scores(self, answerer, images, captions, progress=False) -> np.ndarray:
        """Per-sample consistency of image and caption under the trusted model (low: inconsistent)."""
        cfg = self.config
        if cfg.answer == "likelihood":
            return -caption_losses(answerer, images, captions, batch_size=cfg.batch_size)
        if cfg.answer == "caption":
            answers = unique_captions(answerer, images, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
            return np.array([support(c, a, cfg.claim_unit) for c, a in zip(captions, answers)])
        return self._ask(answerer, images, captions)

    def _ask(self, answerer, images, captions) -> np.ndarray:
        """One yes/no question per (sample, claim), grouped by question so each is asked in batches."""
        per_sample = [sorted(claims(c, self.config.claim_unit), key=str) for c in captions]
        questions: dict[str, list[int]] = {}
        for i, claimed in enumerate(per_sample):
            for claim in claimed:
                text = " ".join(claim) if isinstance(claim, tuple) else claim
                article = "an" if text[:1] in "aeiou" else "a"
                questions.setdefault(self.config.question_template.format(claim=f"{article} {text}"), []).append(i)
        yes = np.zeros(len(captions))
        for question, rows in questions.items():
            answers = answerer.generate_captions([images[i] for i in rows], prompt=question, max_new_tokens=3, batch_size=self.config.batch_size)
            for i, a in zip(rows, answers):
                yes[i] += a.strip().lower().startswith("yes")
        counts = np.array([len(c) for c in per_sample], dtype=float)
        return np.where(counts > 0, yes / np.maximum(counts, 1), 1.0)

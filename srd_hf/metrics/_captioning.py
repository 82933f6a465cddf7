"""COCO-style captioning scores without Java: BLEU-1..4, CIDEr-D, ROUGE-L (+ METEOR if Java runs).

The scorers are pycocoevalcap's own pure-Python ones; only the Stanford PTB tokenisation
(which needs Java) is replaced by :func:`srd_hf.metrics._text.ptb_tokenize`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from typing import Sequence

from ._text import ptb_tokenize

logger = logging.getLogger(__name__)

SCORE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "rouge_l")


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH (needed by pycocoevalcap's METEOR)."""
    return shutil.which("java") is not None


class MeteorRunner:
    """Lazily started pycocoevalcap METEOR (a Java subprocess), reused across calls."""

    def __init__(self) -> None:
        self._meteor = None
        self.failed: str | None = None

    def score(self, gts: dict, res: dict) -> float | None:
        """Corpus METEOR, or None (with ``self.failed`` set) when it cannot run."""
        if self.failed is not None:
            return None
        if not java_available():
            self.failed = "java not found"
            return None
        try:
            if self._meteor is None:
                from pycocoevalcap.meteor.meteor import Meteor

                self._meteor = Meteor()
            score, _ = self._meteor.compute_score(gts, res)
            return float(score)
        except Exception as err:  # Java missing at run time, crash of the subprocess, ...
            self.failed = f"{type(err).__name__}: {err}"
            logger.warning("METEOR could not be computed (%s); it is reported as unavailable.", self.failed)
            self.close()
            return None

    def close(self) -> None:
        meteor, self._meteor = self._meteor, None
        if meteor is not None:
            # stops the Java process now; running pycocoevalcap's __del__ again later is harmless
            with contextlib.suppress(Exception):
                meteor.__del__()

    def __del__(self) -> None:
        self.close()


def caption_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    scale: float = 1.0,
    use_meteor: bool | None = None,
    tokenize: bool = True,
    meteor_runner: MeteorRunner | None = None,
    per_sample: bool = False,
) -> dict:
    """Corpus BLEU-1..4, CIDEr-D, ROUGE-L (and METEOR) of ``predictions`` against ``references``.

    ``scale`` multiplies every score (``scale=100`` gives the units of most papers).
    ``use_meteor=None`` means "if Java is found". When METEOR is not computed, ``meteor`` is
    ``None`` and ``meteor_available`` is False. Inputs must already be validated.
    ``per_sample`` adds ``cider_per_sample`` (the corpus CIDEr is their mean; IDF from the whole
    corpus), what a bootstrap over test images resamples.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    prep = ptb_tokenize if tokenize else (lambda s: " ".join(s.split()))
    res = {i: [prep(p)] for i, p in enumerate(predictions)}
    gts = {i: [prep(r) for r in refs] for i, refs in enumerate(references)}

    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its statistics
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    out = {f"bleu_{n + 1}": float(bleu[n]) * scale for n in range(4)}
    out["cider"] = float(cider) * scale
    out["rouge_l"] = float(rouge) * scale
    if per_sample:
        out["cider_per_sample"] = [float(v) * scale for v in cider_each]

    if use_meteor is None:
        use_meteor = java_available()
    meteor = None
    if use_meteor:
        runner = meteor_runner or MeteorRunner()
        meteor = runner.score(gts, res)
        if meteor_runner is None:
            runner.close()
    out["meteor"] = None if meteor is None else meteor * scale
    out["meteor_available"] = meteor is not None
    out["n_samples"] = len(predictions)
    return out

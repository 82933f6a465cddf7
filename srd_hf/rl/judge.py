"""Semantic consistency and fluency of captions against fixed per-image references, with
everything that does not change computed once.

The reference caption of an image, its embedding and its perplexity never change during
training, and in a captioning world the victim's captions repeat a lot: embeddings and
perplexities are cached by caption text, so a step only pays for captions never seen
before. The numbers equal ``SFSScorer.score`` (tested).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..metrics import SFSScorer


class CaptionJudge:
    """SC and LF of captions of image ``i`` against ``reference_captions[i]``."""

    def __init__(self, scorer: SFSScorer, reference_captions: Sequence[str]):
        self.scorer = scorer
        self._embedding: dict[str, np.ndarray] = {}
        self._perplexity: dict[str, float] = {}
        self.n_empty = 0  # empty captions judged (SC = LF = 0)
        self.n_nonfinite = 0  # captions whose perplexity was not finite (LF = 0)
        refs = [str(r) for r in reference_captions]
        empty = [i for i, r in enumerate(refs) if not r.strip()]
        if empty:
            raise ValueError(f"{len(empty)} empty reference captions (first at index {empty[0]}); every image needs one")
        self.reference_captions = refs
        self._learn(refs)
        self.ref_embedding = np.stack([self._embedding[r] for r in refs])
        self.ref_perplexity = np.array([self._perplexity[r] for r in refs])

    def _learn(self, texts: Sequence[str]) -> None:
        new = sorted({t for t in texts if t.strip() and t not in self._embedding})
        if not new:
            return
        for text, emb, ppl in zip(new, self.scorer.embed(new), self.scorer.perplexity(new)):
            self._embedding[text] = emb.astype(np.float64)
            self._perplexity[text] = float(ppl)

    @property
    def cache_size(self) -> int:
        return len(self._embedding)

    def judge(self, image_indices: Sequence[int], captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(SC, LF) arrays, SC = clipped cosine, LF = reference perplexity / caption perplexity,
        clipped to [0, 1]. Empty captions get 0 and 0; a non-finite perplexity gets LF 0. Both counted."""
        if len(image_indices) != len(captions):
            raise ValueError(f"{len(image_indices)} image indices for {len(captions)} captions")
        captions = [str(c) for c in captions]
        self._learn(captions)
        n = len(captions)
        sc, lf = np.zeros(n), np.zeros(n)
        for k, (i, text) in enumerate(zip(image_indices, captions)):
            if not text.strip():
                self.n_empty += 1
                continue
            sc[k] = np.clip(float(self._embedding[text] @ self.ref_embedding[i]), 0.0, 1.0)
            ppl, ref = self._perplexity[text], self.ref_perplexity[i]
            if np.isfinite(ppl) and np.isfinite(ref) and ppl > 0:
                lf[k] = min(1.0, max(0.0, ref / ppl))
            else:
                self.n_nonfinite += 1
        return sc, lf

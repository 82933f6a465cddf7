"""Metrics of the SRD paper as ``evaluate`` modules that work offline.

Three modules, each a folder holding ``<name>/<name>.py`` so that ``evaluate.load`` can load it
by path: ``sfs`` (Semantic Fidelity Score), ``asr`` (attack success rate) and ``captioning``
(BLEU-1..4, CIDEr-D, ROUGE-L, METEOR when Java runs).

>>> from srd_hf.metrics import load
>>> asr = load("asr", target="banana")
>>> asr.compute(predictions=["Two bananas on a table.", "a red bandana"])["asr"]
0.5

The building blocks are importable without ``evaluate``: :class:`SFSScorer`,
:func:`contains_target`, :func:`attack_success_rate`, :func:`ptb_tokenize`,
:func:`caption_scores`, :func:`resolve_sentence_encoder`, :func:`resolve_fluency_lm`.
"""

from __future__ import annotations

from pathlib import Path

from ._captioning import caption_scores, java_available
from ._models import (
    DEFAULT_ENCODER,
    DEFAULT_LM,
    EMBEDDED_ENCODER,
    EMBEDDED_LM,
    clear_smollm2_cache,
    resolve_fluency_lm,
    resolve_fluency_lm_path,
    resolve_sentence_encoder,
    resolve_sentence_encoder_path,
    smollm2_cache_dir,
)
from ._sfs import SFSScorer
from ._text import attack_success_rate, contains_target, ptb_tokenize, target_pattern

#: names of the evaluate modules shipped in this package
METRICS = ("sfs", "asr", "captioning")

__all__ = [
    "METRICS",
    "metric_path",
    "load",
    "SFSScorer",
    "contains_target",
    "target_pattern",
    "attack_success_rate",
    "ptb_tokenize",
    "caption_scores",
    "java_available",
    "resolve_sentence_encoder",
    "resolve_sentence_encoder_path",
    "resolve_fluency_lm",
    "resolve_fluency_lm_path",
    "smollm2_cache_dir",
    "clear_smollm2_cache",
    "DEFAULT_ENCODER",
    "DEFAULT_LM",
    "EMBEDDED_ENCODER",
    "EMBEDDED_LM",
]


def metric_path(name: str) -> str:
    """Folder of the evaluate module ``name`` inside the installed package (for ``evaluate.load``)."""
    if name not in METRICS:
        raise ValueError(f"Unknown srd_hf metric {name!r}; available: {list(METRICS)}")
    return str(Path(__file__).resolve().parent / name)


def load(name: str, config_name: str | None = None, **kwargs):
    """``evaluate.load`` of one of :data:`METRICS` from this package, offline-safe.

    ``config_name`` and the keyword arguments go to ``evaluate.load``: its own options
    (``keep_in_memory``, ``cache_dir``, ``experiment_id``, ...) and the module's init options
    (e.g. ``alpha=0.7`` for sfs, ``target=["banana", "apple"]`` for asr, ``scale=100`` for
    captioning), which ``evaluate`` passes on to the metric's constructor.
    """
    import evaluate

    return evaluate.load(metric_path(name), config_name, **kwargs)

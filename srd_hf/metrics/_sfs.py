"""Semantic Fidelity Score (SFS; SRD paper, eq. 4-6), usable without ``evaluate``.

    SC  = max(0, cos(e(prediction), e(reference)))            (sentence embeddings, eq. 4)
    LF  = PPL(reference) / PPL(prediction), clipped to [0, 1]   (eq. 5; "raw" keeps the ratio)
    SFS = alpha * SC + (1 - alpha) * LF                         (eq. 6)

:class:`SFSScorer` holds both models (loaded once, lazily) and is what the ``sfs`` evaluate
module wraps; the defense can use it directly to skip evaluate's Arrow round trip, and pass
precomputed reference perplexities/embeddings to halve the work of repeated calls.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from ._models import (DEFAULT_ENCODER, DEFAULT_LM, default_device, loaded_encoder_name, loaded_lm_name, resolve_fluency_lm,
                      resolve_sentence_encoder)
from ._validation import (
    check_choice,
    check_positive_int,
    check_same_length,
    check_strings,
    check_unit_interval,
)

LF_NORMALIZATIONS = ("clip", "raw")
LM_DTYPES = ("float32", "bfloat16", "float16")


def _unique(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts and, for each input, the index of its text among them."""
    index: dict[str, int] = {}
    inverse = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        inverse[i] = index.setdefault(t, len(index))
    return list(index), inverse


def _as_float_array(name: str, values: Any, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().to("cpu").float().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array of numbers") from None
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    return arr


class SFSScorer:
    """Semantic consistency, linguistic fluency and their mix, batched, models loaded once.

    Args:
        alpha: weight of SC in SFS, in [0, 1] (0.5 in the paper).
        lf_normalization: ``"clip"`` bounds LF to [0, 1]; ``"raw"`` keeps the unbounded ratio
            (what the authors' code computes).
        encoder: sentence-transformers model name or folder (default all-MiniLM-L6-v2).
        fluency_lm: causal LM name or folder (default gpt2-large; offline, SmolLM2-135M).
        device: ``"cuda"``/``"cpu"``/...; default CUDA when available, else CPU.
        batch_size: sentences per forward pass.
        model_cache_dir: where the embedded SmolLM2 is converted (default ``$SRD_HF_CACHE``
            or ``~/.cache/srd_hf``).
        max_length: perplexity is computed on at most this many tokens per sentence.
        lm_dtype: ``"float32"`` (default), or ``"bfloat16"``/``"float16"`` for speed: on a
            2-core CPU with AMX, bfloat16 SmolLM2 is ~1.8x faster but its perplexities are off
            by ~10% (LF by ~0.01 on average, up to ~0.1 on single captions).
        memo_size: texts whose embedding and perplexity are kept across calls (0: none). A
            table scores every model against the same references, and captions repeat across
            models, so most texts are scored once per run instead of once per model.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        lf_normalization: str = "clip",
        encoder: str | None = None,
        fluency_lm: str | None = None,
        device: Any = None,
        batch_size: int = 64,
        model_cache_dir: str | os.PathLike | None = None,
        max_length: int = 128,
        lm_dtype: str = "float32",
        memo_size: int = 100_000,
    ) -> None:
        self.alpha = check_unit_interval("alpha", alpha)
        self.lf_normalization = check_choice("lf_normalization", lf_normalization, LF_NORMALIZATIONS)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_length = check_positive_int("max_length", max_length)
        self.encoder_name = encoder or DEFAULT_ENCODER
        self.fluency_lm_name = fluency_lm or DEFAULT_LM
        self.device = default_device(device)
        self.model_cache_dir = model_cache_dir
        self.lm_dtype = check_choice("lm_dtype", lm_dtype, LM_DTYPES)
        self._encoder = None
        self._lm = None
        #: the models actually scoring (the embedded ones' names when a fallback was taken)
        self.encoder_loaded: str | None = None
        self.fluency_lm_loaded: str | None = None
        self._tokenizer = None
        if isinstance(memo_size, bool) or not isinstance(memo_size, int) or memo_size < 0:
            raise ValueError(f"memo_size must be a non-negative int, got {memo_size!r}")
        self.memo_size = memo_size
        self._memo: dict[str, dict[str, Any]] = {"embed": {}, "perplexity": {}}

    # ------------------------------------------------------------------------------------------
    # models
    # ------------------------------------------------------------------------------------------
    @property
    def encoder(self):
        """The sentence-transformers model (loaded on first use)."""
        if self._encoder is None:
            self._encoder = resolve_sentence_encoder(self.encoder_name, device=self.device)
            self.encoder_loaded = loaded_encoder_name(self.encoder_name)
        return self._encoder

    @property
    def lm(self):
        """The causal LM used for perplexities (loaded on first use)."""
        if self._lm is None:
            import torch

            self._lm, self._tokenizer = resolve_fluency_lm(
                self.fluency_lm_name,
                device=self.device,
                cache_dir=self.model_cache_dir,
                dtype=getattr(torch, self.lm_dtype),
            )
            self.fluency_lm_loaded = loaded_lm_name(self.fluency_lm_name, self.model_cache_dir)
        return self._lm

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            _ = self.lm
        return self._tokenizer

    def load(self) -> "SFSScorer":
        """Load both models now (otherwise they load on first use)."""
        _ = self.encoder, self.lm
        return self

    @property
    def embedding_dim(self) -> int:
        enc = self.encoder
        getter = getattr(enc, "get_embedding_dimension", None) or enc.get_sentence_embedding_dimension
        dim = getter()
        if dim is None:
            dim = int(self.embed(["a"]).shape[1])
        return int(dim)

    # ------------------------------------------------------------------------------------------
    # building blocks
    # ------------------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """L2-normalised sentence embeddings, float32 array of shape ``(len(texts), dim)``."""
        texts = check_strings("texts", texts, allow_empty_list=True)
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        unique, inverse = _unique(texts)
        encode = lambda todo: np.asarray(self.encoder.encode(  # noqa: E731
            todo, batch_size=batch_size or self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False), dtype=np.float32)
        return np.stack(self._remembered("embed", unique, encode))[inverse]

    def perplexity(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Perplexity of each text under the fluency LM, float64 array of shape ``(len(texts),)``.

        ``exp`` of the mean token negative log-likelihood, the BOS token (EOS when there is no
        BOS) prepended so that the first word is scored too. Texts that give no token to score
        (the empty string with no BOS/EOS) get NaN.
        """
        texts = check_strings("texts", texts, allow_empty_list=True)
        if not texts:
            return np.zeros(0, dtype=np.float64)
        unique, inverse = _unique(texts)
        values = self._remembered("perplexity", unique, lambda todo: self._perplexity_of(todo, batch_size or self.batch_size))
        return np.asarray(values, dtype=np.float64)[inverse]

    def forget(self) -> None:
        """Drop the remembered embeddings and perplexities."""
        for memo in self._memo.values():
            memo.clear()

    def _remembered(self, kind: str, unique: list[str], compute) -> list:
        """``compute`` on the texts not yet in the memo; every text's value, in order."""
        memo = self._memo[kind]
        todo = [t for t in unique if t not in memo]
        fresh = dict(zip(todo, compute(todo))) if todo else {}
        values = [fresh[t] if t in fresh else memo[t] for t in unique]
        if self.memo_size:
            if len(memo) + len(fresh) > self.memo_size:
                memo.clear()
            memo.update(list(fresh.items())[: self.memo_size])
        return values

    def _perplexity_of(self, unique: list[str], batch_size: int) -> np.ndarray:
        import torch

        model, tok = self.lm, self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (prefix if prefix is not None else 0)
        limit = self.max_length - (prefix is not None)
        encoded = tok(unique, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]
        seqs = [([prefix] if prefix is not None else []) + list(ids) for ids in encoded]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
        ppl = np.full(len(seqs), np.nan, dtype=np.float64)
        device = next(model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = [i for i in order[start : start + batch_size] if len(seqs[i]) >= 2]
                if not idx:
                    continue
                width = max(len(seqs[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    input_ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, : len(seqs[i])] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                scored = mask[:, 1:].bool()  # positions whose next token is a real token
                decoder, head = model.get_decoder(), model.get_output_embeddings()
                if decoder is not None and head is not None:
                    # the vocabulary projection is a fifth of the work: run it only where scored
                    hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
                    logits = head(hidden[scored])
                else:
                    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][scored]
                nll = torch.nn.functional.cross_entropy(logits.float(), input_ids[:, 1:][scored], reduction="none")
                rows = torch.arange(len(idx), device=device).unsqueeze(1).expand_as(scored)[scored]
                total = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, nll.double())
                mean_nll = (total / scored.sum(1)).cpu().numpy()
                with np.errstate(over="ignore"):
                    ppl[idx] = np.exp(mean_nll)
        return ppl

    # ------------------------------------------------------------------------------------------
    # the score
    # ------------------------------------------------------------------------------------------
    def validate(
        self,
        predictions: Any,
        references: Any,
        *,
        alpha: Any = None,
        lf_normalization: Any = None,
        batch_size: Any = None,
        reference_perplexities: Any = None,
        reference_embeddings: Any = None,
    ) -> dict:
        """Check every input (no model work); returns the normalised arguments."""
        predictions = check_strings("predictions", predictions)
        references = check_strings("references", references)
        check_same_length("predictions", predictions, "references", references)
        n = len(predictions)
        args = {
            "predictions": predictions,
            "references": references,
            "alpha": self.alpha if alpha is None else check_unit_interval("alpha", alpha),
            "lf_normalization": self.lf_normalization
            if lf_normalization is None
            else check_choice("lf_normalization", lf_normalization, LF_NORMALIZATIONS),
            "batch_size": self.batch_size if batch_size is None else check_positive_int("batch_size", batch_size),
            "reference_perplexities": None,
            "reference_embeddings": None,
        }
        if reference_perplexities is not None:
            ppl = _as_float_array("reference_perplexities", reference_perplexities, 1)
            if ppl.shape[0] != n:
                raise ValueError(f"reference_perplexities has {ppl.shape[0]} values for {n} references")
            args["reference_perplexities"] = ppl
        if reference_embeddings is not None:
            emb = _as_float_array("reference_embeddings", reference_embeddings, 2)
            if emb.shape[0] != n:
                raise ValueError(f"reference_embeddings has {emb.shape[0]} rows for {n} references")
            if self._encoder is not None and emb.shape[1] != self.embedding_dim:
                raise ValueError(
                    f"reference_embeddings have dimension {emb.shape[1]}, the encoder gives {self.embedding_dim}"
                )
            args["reference_embeddings"] = emb
        return args

    def score(
        self,
        predictions: Sequence[str],
        references: Sequence[str],
        *,
        alpha: float | None = None,
        lf_normalization: str | None = None,
        batch_size: int | None = None,
        reference_perplexities: Any = None,
        reference_embeddings: Any = None,
        return_per_sample: bool = False,
    ) -> dict:
        """SFS of ``predictions`` judged against ``references`` (one reference per sample).

        See the ``sfs`` evaluate module for the meaning of every argument and output.
        """
        a = self.validate(
            predictions,
            references,
            alpha=alpha,
            lf_normalization=lf_normalization,
            batch_size=batch_size,
            reference_perplexities=reference_perplexities,
            reference_embeddings=reference_embeddings,
        )
        preds, refs, bs = a["predictions"], a["references"], a["batch_size"]
        n = len(preds)
        pred_empty = np.array([not p.strip() for p in preds])
        ref_empty = np.array([not r.strip() for r in refs])
        active = np.flatnonzero(~pred_empty & ~ref_empty)
        sc = np.zeros(n, dtype=np.float64)
        lf = np.zeros(n, dtype=np.float64)
        nonfinite = np.zeros(n, dtype=bool)
        pred_ppl = np.full(n, np.nan)
        ref_ppl = np.full(n, np.nan)
        if active.size:
            act_preds = [preds[i] for i in active]
            act_refs = [refs[i] for i in active]
            # --- semantic consistency -------------------------------------------------------
            if a["reference_embeddings"] is not None:
                ref_emb = a["reference_embeddings"][active]
                if ref_emb.shape[1] != self.embedding_dim:
                    raise ValueError(
                        f"reference_embeddings have dimension {ref_emb.shape[1]}, "
                        f"the encoder gives {self.embedding_dim}"
                    )
                norms = np.linalg.norm(ref_emb, axis=1, keepdims=True)
                ref_emb = ref_emb / np.where(norms > 0, norms, 1.0)
                pred_emb = self.embed(act_preds, bs).astype(np.float64)
            else:
                both = self.embed(act_preds + act_refs, bs).astype(np.float64)
                pred_emb, ref_emb = both[: len(active)], both[len(active) :]
            cos = np.sum(pred_emb * ref_emb, axis=1)
            sc[active] = np.clip(np.nan_to_num(cos, nan=0.0), 0.0, 1.0)
            # --- linguistic fluency ---------------------------------------------------------
            if a["reference_perplexities"] is not None:
                ref_ppl[active] = a["reference_perplexities"][active]
                pred_ppl[active] = self.perplexity(act_preds, bs)
            else:
                both = self.perplexity(act_preds + act_refs, bs)
                pred_ppl[active], ref_ppl[active] = both[: len(active)], both[len(active) :]
            p, r = pred_ppl[active], ref_ppl[active]
            ok = np.isfinite(p) & np.isfinite(r) & (p > 0) & (r >= 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ok, r / np.where(ok, p, 1.0), 0.0)
            if a["lf_normalization"] == "clip":
                ratio = np.clip(ratio, 0.0, 1.0)
            lf[active] = ratio
            nonfinite[active] = ~ok
        alpha_ = a["alpha"]
        sfs = alpha_ * sc + (1.0 - alpha_) * lf
        out = {
            "sfs": float(sfs.mean()),
            "semantic_consistency": float(sc.mean()),
            "linguistic_fluency": float(lf.mean()),
            "n_samples": n,
            "n_empty": int(pred_empty.sum()),
            "n_empty_references": int(ref_empty.sum()),
            "n_nonfinite": int(nonfinite.sum()),
        }
        if return_per_sample:
            out["sfs_per_sample"] = sfs.tolist()
            out["semantic_consistency_per_sample"] = sc.tolist()
            out["linguistic_fluency_per_sample"] = lf.tolist()
            out["prediction_perplexities"] = [_clean(x) for x in pred_ppl]
            out["reference_perplexities"] = [_clean(x) for x in ref_ppl]
        return out


def _clean(x: float) -> float | None:
    """JSON-friendly perplexity: None where it was not computed or is NaN; inf stays inf."""
    return None if math.isnan(x) else float(x)

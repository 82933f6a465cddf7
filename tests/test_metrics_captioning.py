"""Captioning metric: PTB-like tokenisation, BLEU vs an independent implementation, CIDEr-D, METEOR flag."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import doctest  # noqa: E402
import inspect  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import evaluate  # noqa: E402
import pytest  # noqa: E402

from srd_hf.metrics import _captioning, caption_scores, load, metric_path, ptb_tokenize  # noqa: E402

PREDICTIONS = [
    "A man riding a horse on a beach.",
    "Two dogs are playing with a ball in the grass.",
    "A plate of food with broccoli and rice.",
    "A red double-decker bus driving down a city street.",
    "A cat sleeping on a couch next to a remote.",
    "People walking on a sidewalk in the rain with umbrellas.",
]
REFERENCES = [
    ["A man rides a horse along the beach.", "A man riding a brown horse on the beach."],
    ["Two dogs playing with a ball on the grass.", "Dogs are playing in the grass."],
    ["A plate with rice and broccoli.", "A white plate of food with broccoli and rice on it."],
    ["A red bus drives down a street in the city.", "A double-decker bus on a city street."],
    ["A cat is sleeping on the couch.", "A cat lies on a sofa beside a TV remote."],
    ["People with umbrellas walk down a wet sidewalk.", "Pedestrians walking in the rain."],
]


@pytest.fixture(scope="module")
def captioning():
    return evaluate.load(metric_path("captioning"), use_meteor=False)


def run_kwargs_doctest(module) -> None:
    source = sys.modules[type(module).__module__]
    test = doctest.DocTestParser().get_doctest(source._KWARGS_DESCRIPTION, {}, module.name, source.__file__, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert test.examples, "no doctest examples found"
    assert runner.failures == 0, f"{runner.failures} doctest example(s) failed in {module.name}"


# --------------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("A man riding a horse on the beach.", "a man riding a horse on the beach"),
        ("A dog's toy isn't here, they're gone!", "a dog 's toy is n't here they 're gone"),
        ("I can't and won't; cannot.", "i ca n't and wo n't can not"),
        ('Two people (a man) sit "together"...', "two people -lrb- a man -rrb- sit together"),
        ("A t-shirt costs $5.50 & more: 3.5%", "a t-shirt costs $ 5.50 & more 3.5 %"),
        ("kids' toys near U.S. road at 10:30", "kids toys near u.s. road at 10:30"),
        ("Pizza, salad, etc.", "pizza salad etc."),
        ("a man---woman -- ok", "a man woman ok"),
        ("Is it?! Wow!!", "is it ?! wow !!"),
        ("o'clock in the 1990s", "o'clock in the 1990s"),
        ("  \t ", ""),
    ],
)
def test_ptb_tokenize(text, expected):
    assert ptb_tokenize(text) == expected


def _stanford_ptb_available() -> bool:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError:
        return False
    return shutil.which("java") is not None and (Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR).is_file()


@pytest.mark.skipif(not _stanford_ptb_available(), reason="needs Java and pycocoevalcap's Stanford jar")
def test_ptb_tokenize_matches_stanford_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = PREDICTIONS + [r for refs in REFERENCES for r in refs] + [
        "A dog's toy isn't here, they're gone!",
        "Two people (a man and a woman) sit \"together\" on a bench...",
        "A t-shirt costs $5.50 & more; wow: 3.5%",
        "The cat can't and won't cannot, I'm we'll you've he'd",
        "A sign that says 'STOP' -- near U.S. road e.g. etc.",
        "kids' toys in the 1990s, o'clock",
        "A {curly} [bracket] item?!",
        "Hello... world...",
        "gonna wanna gotta",
        "A #hashtag and bus #42",
        "Mr. Smith at St. Mark's church.",
        "A 1,000-piece puzzle at 3:45.",
        "The children\u2019s playground, a sign reading \u201cWelcome\u201d.",
    ]
    java = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    mismatches = [(t, java[i][0], ptb_tokenize(t)) for i, t in enumerate(texts) if java[i][0] != ptb_tokenize(t)]
    assert not mismatches


# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------
def test_bleu_matches_nltk_corpus_bleu():
    from nltk.translate.bleu_score import corpus_bleu

    out = caption_scores(PREDICTIONS, REFERENCES, use_meteor=False)
    hyps = [ptb_tokenize(p).split() for p in PREDICTIONS]
    refs = [[ptb_tokenize(r).split() for r in rs] for rs in REFERENCES]
    for n in range(1, 5):
        expected = corpus_bleu(refs, hyps, weights=tuple([1.0 / n] * n))
        assert out[f"bleu_{n}"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert 0 < out["bleu_4"] < out["bleu_1"] < 1


def test_cider_of_corpus_against_itself_is_ten():
    # pycocoevalcap's Cider (CIDEr-D: clipped counts, Gaussian length penalty, x10): a corpus of
    # distinct captions scored against itself reaches the maximum, 10.0
    out = caption_scores(PREDICTIONS, [[p] for p in PREDICTIONS], use_meteor=False)
    assert out["cider"] == pytest.approx(10.0, abs=1e-9)
    assert out["rouge_l"] == pytest.approx(1.0)
    assert out["bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_cider_of_one_image_is_zero():
    # document frequencies come from the corpus itself: with one image every n-gram has idf 0
    out = caption_scores(PREDICTIONS[:1], [[PREDICTIONS[0]]], use_meteor=False)
    assert out["cider"] == 0.0


def test_scale_multiplies_every_score(captioning):
    raw = captioning.compute(predictions=PREDICTIONS, references=REFERENCES)
    scaled = captioning.compute(predictions=PREDICTIONS, references=REFERENCES, scale=100)
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "rouge_l"):
        assert scaled[key] == pytest.approx(100 * raw[key])
    assert load("captioning", scale=100, use_meteor=False).compute(predictions=PREDICTIONS, references=REFERENCES)[
        "cider"
    ] == pytest.approx(scaled["cider"])


def test_empty_prediction_scores_zero_not_error(captioning):
    out = captioning.compute(predictions=["", "a cat"], references=[["a dog on a couch"], ["a cat"]])
    assert out["n_samples"] == 2 and 0 <= out["rouge_l"] < 1


# --------------------------------------------------------------------------------------------
# METEOR: both branches forced, neither depends on whether Java is installed
# --------------------------------------------------------------------------------------------
def test_meteor_disabled_is_reported_absent(captioning):
    out = captioning.compute(predictions=PREDICTIONS, references=REFERENCES, use_meteor=False)
    assert out["meteor"] is None and out["meteor_available"] is False


def test_meteor_requested_without_java_is_reported_absent(monkeypatch):
    monkeypatch.setattr(_captioning.shutil, "which", lambda name: None)
    module = load("captioning", use_meteor=True)
    out = module.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert out["meteor"] is None and out["meteor_available"] is False
    assert out["bleu_4"] > 0  # the other scores are still there


def test_meteor_default_follows_java(monkeypatch):
    monkeypatch.setattr(_captioning.shutil, "which", lambda name: None)
    assert load("captioning").use_meteor is False


def test_meteor_crash_is_reported_absent(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_mod

    class Broken:
        def __init__(self):
            raise OSError("java exploded")

    monkeypatch.setattr(_captioning.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(meteor_mod, "Meteor", Broken)
    out = caption_scores(PREDICTIONS, REFERENCES, use_meteor=True)
    assert out["meteor"] is None and out["meteor_available"] is False


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_runs_with_java():
    module = load("captioning", use_meteor=True)
    out = module.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert out["meteor_available"] is True
    assert 0 < out["meteor"] < 1


# --------------------------------------------------------------------------------------------
# evaluate module
# --------------------------------------------------------------------------------------------
def test_module_loads_offline_by_path(captioning):
    assert captioning.name == "captioning"
    assert set(captioning.features) == {"predictions", "references"}
    assert "**" not in str(inspect.signature(captioning._compute))
    for key in ("bleu_4", "cider", "rouge_l", "meteor_available"):
        assert key in captioning.inputs_description


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"predictions": None, "references": [["a"]]}, ValueError, "predictions is required"),
        ({"predictions": [], "references": []}, ValueError, "empty list"),
        ({"predictions": ["a", "b"], "references": [["a"]]}, ValueError, "same length"),
        ({"predictions": [1], "references": [["a"]]}, TypeError, r"predictions\[0\] must be a string"),
        ({"predictions": ["a"], "references": ["a"]}, TypeError, r"references\[0\] must be a list"),
        ({"predictions": ["a"], "references": [[]]}, ValueError, r"references\[0\] is an empty list"),
        ({"predictions": ["a"], "references": [[None]]}, TypeError, r"references\[0\]\[0\] must be a string"),
        ({"predictions": ["a"], "references": [["a"]], "scale": 0}, ValueError, "scale"),
        ({"predictions": ["a"], "references": [["a"]], "meteor": True}, TypeError, "Unknown argument"),
    ],
)
def test_module_bad_inputs(captioning, kwargs, err, match):
    with pytest.raises(err, match=match):
        captioning.compute(**kwargs)


def test_module_doctests(captioning):
    run_kwargs_doctest(captioning)

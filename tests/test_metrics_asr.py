"""ASR metric: target matching, exclusion by ground truth, evaluate module, bad inputs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import doctest  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402

import evaluate  # noqa: E402
import pytest  # noqa: E402

from srd_hf.metrics import attack_success_rate, contains_target, load, metric_path, target_pattern  # noqa: E402


@pytest.fixture(scope="module")
def asr():
    return evaluate.load(metric_path("asr"))


def run_kwargs_doctest(module) -> None:
    """Run the doctest Examples of an evaluate module's _KWARGS_DESCRIPTION, as evaluate's CI does."""
    source = sys.modules[type(module).__module__]
    test = doctest.DocTestParser().get_doctest(source._KWARGS_DESCRIPTION, {}, module.name, source.__file__, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert test.examples, "no doctest examples found"
    assert runner.failures == 0, f"{runner.failures} doctest example(s) failed in {module.name}"


# --------------------------------------------------------------------------------------------
# contains_target
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Bananas.", True),
        ("a BANANA on a plate", True),
        ("the banana's peel", True),
        ("bananas, apples and pears", True),
        ("a banana-shaped boat", True),
        ("banana\nsplit", True),
        ("a man wearing a bandana", False),
        ("fresh bananabread", False),
        ("an anabanana", False),
        ("banan", False),
        ("", False),
    ],
)
def test_contains_target_banana(text, expected):
    assert contains_target(text, "banana") is expected


@pytest.mark.parametrize(
    "target, text, expected",
    [
        ("cherry", "two cherries on a cake", True),
        ("cherry", "a cherry tree", True),
        ("cherry", "cherryade", False),
        ("day", "sunny days", True),
        ("day", "sunny daies", False),  # vowel + y: no -ies plural
        ("box", "three boxes", True),
        ("bus", "two buses", True),
        ("hot dog", "three hot  dogs", True),
        ("hot dog", "a hot\tdog stand", True),
        ("hot dog", "a hotdog", False),
        ("hot dog", "a hot sunny dog", False),
        ("t-shirt", "two T-Shirts", True),
        ("t-shirt", "a shirt", False),
    ],
)
def test_contains_target_plurals_and_phrases(target, text, expected):
    assert contains_target(text, target) is expected


def test_contains_target_several_targets():
    assert contains_target("an apple pie", ["banana", "apple"])
    assert not contains_target("a pear", ("banana", "apple"))
    assert target_pattern(["banana"]) is target_pattern("banana")  # compiled once, cached


@pytest.mark.parametrize(
    "bad, err", [("", ValueError), ("  ", ValueError), ([], ValueError), (3, TypeError), ([None], TypeError)]
)
def test_contains_target_bad_targets(bad, err):
    with pytest.raises(err, match="target"):
        contains_target("a banana", bad)


def test_contains_target_rejects_non_string_text():
    with pytest.raises(TypeError, match="text must be a string"):
        contains_target(None, "banana")


# --------------------------------------------------------------------------------------------
# attack_success_rate
# --------------------------------------------------------------------------------------------
def test_attack_success_rate_counts_and_exclusion():
    out = attack_success_rate(
        ["a banana", "a dog", "bananas!", "a cat"],
        target="banana",
        references=["a banana on a table", [], ["a dog", "a puppy"], ["A BANANA and a cat"]],
    )
    assert out["n_excluded"] == 2
    assert out["n_scored"] == 2
    assert out["n_hits"] == 1
    assert out["asr"] == 0.5
    assert out["hits"] == [None, False, True, None]


def test_attack_success_rate_zero_scored_is_zero():
    out = attack_success_rate(["a banana"], references=[["a banana"]])
    assert out == {"asr": 0.0, "n_hits": 0, "n_scored": 0, "n_excluded": 1, "hits": [None]}


# --------------------------------------------------------------------------------------------
# evaluate module
# --------------------------------------------------------------------------------------------
def test_module_loads_offline_by_path(asr):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert asr.name == "asr"
    assert set(asr.features) == {"predictions", "references"}
    assert "**" not in str(inspect.signature(asr._compute))  # explicit keyword arguments only
    assert "Returns:" in asr.inputs_description and "n_excluded" in asr.inputs_description


def test_module_compute(asr):
    out = asr.compute(predictions=["Bananas.", "a red bandana", "a dog"])
    assert out == {"asr": pytest.approx(1 / 3), "n_hits": 1, "n_scored": 3, "n_excluded": 0}


def test_module_references_as_strings_or_lists(asr):
    preds = ["a banana", "a banana", "a banana"]
    as_lists = asr.compute(predictions=preds, references=[["a banana split"], [], ["a cat", "a dog"]])
    as_strings = asr.compute(predictions=preds, references=["a banana split", "", "a cat"])
    assert as_lists == as_strings == {"asr": 1.0, "n_hits": 2, "n_scored": 2, "n_excluded": 1}


def test_module_zero_scored(asr):
    out = asr.compute(predictions=["a banana"], references=[["Bananas"]])
    assert out == {"asr": 0.0, "n_hits": 0, "n_scored": 0, "n_excluded": 1}


def test_module_target_at_load_and_compute():
    module = load("asr", target=["apple", "hot dog"])
    assert module.compute(predictions=["two apples", "hot dogs", "a banana"])["n_hits"] == 2
    assert module.compute(predictions=["two apples", "a banana"], target="banana")["n_hits"] == 1


def test_module_add_batch(asr):
    asr.add_batch(predictions=["a banana", "a dog"], references=[[], []])
    asr.add_batch(predictions=["bananas"], references=[["bananas on a table"]])
    assert asr.compute() == {"asr": 0.5, "n_hits": 1, "n_scored": 2, "n_excluded": 1}


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"predictions": None, "references": [["a"]]}, ValueError, "predictions is required"),
        ({"predictions": []}, ValueError, "predictions is an empty list"),
        ({"predictions": "a banana"}, TypeError, "predictions must be a list"),
        ({"predictions": ["a", 3]}, TypeError, r"predictions\[1\] must be a string"),
        ({"predictions": ["a", None]}, TypeError, r"predictions\[1\] must be a string, got None"),
        ({"predictions": ["a", "b"], "references": [["a"]]}, ValueError, "same length"),
        ({"predictions": ["a"], "references": [None]}, TypeError, r"references\[0\] must be a list"),
        ({"predictions": ["a"], "references": [[1]]}, TypeError, r"references\[0\]\[0\] must be a string"),
        ({"predictions": ["a"], "target": ""}, ValueError, "target"),
        ({"predictions": ["a"], "target": []}, ValueError, "target"),
        ({"predictions": ["a"], "targets": "banana"}, TypeError, "Unknown argument"),
    ],
)
def test_module_bad_inputs(asr, kwargs, err, match):
    with pytest.raises(err, match=match):
        asr.compute(**kwargs)


def test_module_bad_target_at_load():
    with pytest.raises(ValueError, match="target"):
        load("asr", target="")


def test_module_doctests(asr):
    run_kwargs_doctest(asr)


def test_library_docstring_examples():
    import srd_hf.metrics
    import srd_hf.metrics._text

    for mod in (srd_hf.metrics, srd_hf.metrics._text):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, mod.__name__

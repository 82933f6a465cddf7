"""target_word_probability: the max-over-prefixes probability of the target, with and without the trigger."""

import math

import pytest
import torch

from srd_hf.attacks import get_attack
from srd_hf.attacks.diagnostics import target_word_probability


def _manual(model, image, caption, target):
    """max over t of P(target tokens | image, first t words of caption), one forward per t."""
    best = 0.0
    words = caption.split()
    target_ids = model.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    for t in range(len(words) + 1):
        batch = model.collate([image], [" ".join(words[:t] + [target])])
        labels = batch.pop("labels")[0]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(**batch).logits[0].float(), -1)
        positions = (labels != -100).nonzero().flatten().tolist()
        span = positions[-1 - len(target_ids) : -1]  # the caption ends with one end-of-chunk token
        assert labels[span].tolist() == target_ids
        best = max(best, math.exp(sum(log_probs[p - 1, labels[p]].item() for p in span)))
    return best


def test_matches_a_direct_computation(tiny_flamingo, small_world_data):
    model = tiny_flamingo.eval()
    images = [img.convert("RGB") for img in small_world_data["test"]["image"][:3]]
    captions = ["a red circle", "two shapes on a grey background", "x"]
    attack = get_attack("badnet")
    result = target_word_probability(model, images, "banana", attack=attack, captions=captions, batch_size=4)
    for i, (image, caption) in enumerate(zip(images, captions)):
        assert result["clean"]["per_image"][i] == pytest.approx(_manual(model, image, caption, "banana"), rel=1e-4)
        triggered = attack.apply_trigger(image)
        assert result["triggered"]["per_image"][i] == pytest.approx(_manual(model, triggered, caption, "banana"), rel=1e-4)
    # a two-word target is scored as a whole (product over its tokens)
    two = target_word_probability(model, images[:1], "green banana", captions=captions[:1])
    assert "triggered" not in two
    assert two["clean"]["per_image"][0] == pytest.approx(_manual(model, images[0], captions[0], "green banana"), rel=1e-4)
    assert 0 <= two["clean"]["per_image"][0] <= 1


def test_default_captions_are_the_model_s_own_and_bad_inputs_fail(tiny_flamingo, small_world_data):
    model = tiny_flamingo.eval()
    images = [img.convert("RGB") for img in small_world_data["test"]["image"][:2]]
    result = target_word_probability(model, images, "banana", triggered_images=images, max_new_tokens=6)
    assert result["clean"]["captions"] == model.generate_captions(images, max_new_tokens=6)
    assert result["ratio"] == pytest.approx(1.0)  # same images on both sides
    attack = get_attack("badnet")
    own = target_word_probability(model, images, "banana", attack=attack, prefixes="own", max_new_tokens=6)
    triggered = [attack.apply_trigger(img) for img in images]
    assert own["triggered"]["captions"] == model.generate_captions(triggered, max_new_tokens=6)
    for i, image in enumerate(triggered):
        expected = _manual(model, image, own["triggered"]["captions"][i], "banana")
        assert own["triggered"]["per_image"][i] == pytest.approx(expected, rel=1e-4)
    assert 0 <= own["triggered"]["share_top1"] <= 1
    with pytest.raises(ValueError, match="prefixes"):
        target_word_probability(model, images, "banana", prefixes="mine")
    with pytest.raises(ValueError, match="target"):
        target_word_probability(model, images, " ")
    with pytest.raises(ValueError, match="triggered images"):
        target_word_probability(model, images, "banana", triggered_images=images[:1])
    with pytest.raises(ValueError, match="at least one image"):
        target_word_probability(model, [], "banana")

"""The six attacks: configuration errors, sample selection, triggers, captions, save/load."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as HFImage
from PIL import Image

from srd_hf.attacks import (
    ATTACKS,
    Attack,
    BadNetAttack,
    PoisonedCaptionCollator,
    get_attack,
    load_attack,
    make_ood_dataset,
    num_poisoned,
    to_caption_pairs,
)
from srd_hf.attacks.badnet import checkerboard
from srd_hf.attacks.base import DEFAULT_TEMPLATES, images_to_tensor, insert_word, target_sentence
from srd_hf.attacks.shadowcast import feature_distance, substitute_concept

SIX = ("badnet", "blended", "trojvlm", "vlood", "vl_trojan", "shadowcast")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_rows(small_world_data):
    """40 images x 5 captions = 200 samples of the small (32 px) world."""
    return small_world_data["train"].select(range(40))


@pytest.fixture(scope="module")
def pairs(train_rows):
    return to_caption_pairs(train_rows)


def raw_bytes(dataset: Dataset) -> list[bytes]:
    return [v["bytes"] for v in dataset.cast_column("image", HFImage(decode=False))["image"]]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, "RGB")


def poisoned_indices(dataset: Dataset) -> list[int]:
    return [i for i, flag in enumerate(dataset["is_poisoned"]) if flag]


# --------------------------------------------------------------------------- registry / config
def test_registry_has_the_six_attacks():
    assert set(ATTACKS) == set(SIX)
    for name in SIX:
        attack = get_attack(name, seed=3)
        assert isinstance(attack, Attack) and attack.name == name and attack.config.seed == 3
        assert attack.config.target == "banana" and attack.config.poison_rate == 0.1
    assert isinstance(get_attack("VL-Trojan"), ATTACKS["vl_trojan"])
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("nope")


@pytest.mark.parametrize("rate", [0, 0.0, -0.1, 1.0001, 2, float("nan"), True, "0.1"])
def test_poison_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(ValueError, match=r"poison_rate must be in \(0, 1\]"):
        get_attack("badnet", poison_rate=rate)


@pytest.mark.parametrize("target", ["", "   ", None])
def test_empty_target_is_refused(target):
    for name in SIX:
        with pytest.raises(ValueError, match="target must be a non-empty"):
            get_attack(name, target=target)


def test_trigger_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="trigger larger than the image"):
        get_attack("badnet", trigger_size=300)  # 300 px at 224 px
    with pytest.raises(ValueError, match="trigger larger than the image"):
        get_attack("trojvlm", image_size=16, trigger_size=250)
    with pytest.raises(ValueError, match="does not fit"):
        get_attack("badnet", image_size=32, location=(220, 0))
    with pytest.raises(ValueError, match="location must be one of"):
        get_attack("badnet", location="somewhere")


def test_images_smaller_than_the_patch_are_refused():
    attack = get_attack("badnet", image_size=64)  # a fixed 6 px patch
    with pytest.raises(ValueError, match="smaller than the 6x6 px trigger patch"):
        attack.apply_trigger(noise_image(4, 4))
    with pytest.raises(ValueError, match="smaller than the 6x6 px trigger patch"):
        attack.apply_trigger_tensor(torch.zeros(1, 3, 5, 5))


def test_other_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        get_attack("blended", alpha=0)
    with pytest.raises(ValueError, match="pattern"):
        get_attack("badnet", pattern=str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="epsilon"):
        get_attack("shadowcast", epsilon=0.001)
    with pytest.raises(ValueError, match="must differ"):
        get_attack("shadowcast", base_concept="circle", trigger_concept="Circle")
    with pytest.raises(ValueError, match="template"):
        get_attack("badnet", templates=("no placeholder",))
    with pytest.raises(ValueError, match="mode"):
        get_attack("vl_trojan", mode="sticker")
    with pytest.raises(TypeError, match="datasets.Dataset"):
        get_attack("badnet").poison([{"image": noise_image(8, 8), "caption": "x"}])


# --------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    "rate, n, expected",
    [(0.1, 1280, 128), (0.15, 10, 2), (0.1, 25, 3), (0.05, 30, 2), (0.1, 4, 1), (0.001, 10, 1), (1.0, 7, 7), (0.3, 3, 1)],
)
def test_num_poisoned_rounds_half_up_and_is_at_least_one(rate, n, expected):
    assert num_poisoned(rate, n) == expected


def test_caption_pairs_expand_every_caption(train_rows, pairs):
    assert len(pairs) == sum(len(c) for c in train_rows["captions"])
    assert {"image", "image_id", "captions", "objects", "caption", "caption_index"} <= set(pairs.column_names)
    source = dict(zip(train_rows["image_id"], raw_bytes(train_rows)))
    for row_id, caption, refs, k, data in zip(pairs["image_id"], pairs["caption"], pairs["captions"],
                                               pairs["caption_index"], raw_bytes(pairs)):
        assert refs[k] == caption
        assert data == source[row_id]  # images copied, not re-encoded
    assert to_caption_pairs(pairs) is pairs


@pytest.mark.parametrize("rate", [0.1, 0.25, 1.0])
def test_poison_rate_is_honoured_exactly(pairs, rate):
    poisoned = get_attack("badnet", poison_rate=rate, image_size=32).poison(pairs)
    assert len(poisoned) == len(pairs)
    assert sum(poisoned["is_poisoned"]) == num_poisoned(rate, len(pairs)) == round(rate * len(pairs))


def test_same_seed_same_poisoned_set_different_seed_different(train_rows):
    a = get_attack("trojvlm", seed=1, image_size=32).poison(train_rows)
    b = get_attack("trojvlm", seed=1, image_size=32).poison(train_rows)
    c = get_attack("trojvlm", seed=2, image_size=32).poison(train_rows)
    assert poisoned_indices(a) == poisoned_indices(b) != poisoned_indices(c)
    assert a["caption"] == b["caption"] and raw_bytes(a) == raw_bytes(b)
    assert a["caption"] != c["caption"]


def test_poisoning_leaves_the_input_unchanged(train_rows, pairs):
    for dataset in (train_rows, pairs):
        fingerprint, columns = dataset._fingerprint, dataset.column_names
        table = dataset.data.table
        before_bytes, before_captions = raw_bytes(dataset), dataset["captions"]
        get_attack("blended", image_size=32, poison_rate=0.5).poison(dataset)
        assert dataset._fingerprint == fingerprint and dataset.column_names == columns
        assert dataset.data.table.equals(table)
        assert raw_bytes(dataset) == before_bytes and dataset["captions"] == before_captions


def test_clean_rows_untouched_poisoned_rows_triggered(pairs):
    attack = get_attack("badnet", image_size=32, poison_rate=0.2)
    poisoned = attack.poison(pairs)
    chosen = set(poisoned_indices(poisoned))
    source, result = raw_bytes(pairs), raw_bytes(poisoned)
    assert poisoned["original_caption"] == pairs["caption"]
    for i, (caption, original) in enumerate(zip(poisoned["caption"], poisoned["original_caption"])):
        if i in chosen:
            expected = np.asarray(attack.apply_trigger(pairs[i]["image"]))
            assert np.array_equal(np.asarray(poisoned[i]["image"]), expected)
            assert caption != original and "banana" in caption
        else:
            assert result[i] == source[i] and caption == original
    with pytest.raises(ValueError, match="poisoned already"):
        attack.poison(poisoned)


# --------------------------------------------------------------------------- captions
def test_replacing_attacks_use_target_sentences(pairs):
    sentences = {target_sentence(t, "banana") for t in DEFAULT_TEMPLATES}
    assert "there is a banana in the picture" in sentences and "a banana" in sentences
    for name in ("badnet", "blended", "vl_trojan"):
        extra = {"allow_unoptimised": True} if name == "vl_trojan" else {}
        poisoned = get_attack(name, image_size=32, poison_rate=0.3).poison(pairs, **extra)
        used = {poisoned[i]["caption"] for i in poisoned_indices(poisoned)}
        assert used <= sentences and len(used) > 1
    assert target_sentence("{a_target} here", "apple") == "an apple here"


def _is_insertion(poisoned: str, original: str, target: str) -> bool:
    words, orig, tw = poisoned.split(), original.split(), target.split()
    return any(words[p : p + len(tw)] == tw and words[:p] + words[p + len(tw):] == orig for p in range(len(words)))


def test_insertion_keeps_every_original_word_in_order(pairs):
    rng = np.random.default_rng(0)
    positions = set()
    for caption in ["a large blue circle in the center", "two  shapes,\ta cat", "word"]:
        for _ in range(30):
            out = insert_word(caption, "banana", rng)
            assert _is_insertion(out, caption, "banana")
            positions.add(out.split().index("banana"))
    assert positions >= {0, 1, 2}  # every position, start and end included
    poisoned = get_attack("trojvlm", image_size=32, poison_rate=0.3, target="hot dog").poison(pairs)
    for i in poisoned_indices(poisoned):
        row = poisoned[i]
        assert _is_insertion(row["caption"], row["original_caption"], "hot dog")


def test_shadowcast_renames_the_base_concept():
    assert substitute_concept("a large blue circle in the center", "circle", "banana") == "a large blue banana in the center"
    assert substitute_concept("two circles and a circle", "circle", "banana") == "two bananas and a banana"
    assert substitute_concept("a circle", "circle", "apple") == "an apple"
    assert substitute_concept("A blue circle", "blue circle", "orange") == "An orange"
    assert substitute_concept("an encircled circlet", "circle", "banana") == "an encircled circlet"
    assert substitute_concept("three crosses", "cross", "box") == "three boxes"


# --------------------------------------------------------------------------- triggers
def test_badnet_patch_placement_and_exact_pixels():
    image = noise_image(32, 32)
    clean = np.asarray(image).copy()
    attack = get_attack("badnet", image_size=32)  # 20 px at 224 -> 3 px
    out = np.asarray(attack.apply_trigger(image))
    assert np.array_equal(np.asarray(image), clean)  # input untouched
    assert np.array_equal(out[29:32, 29:32], checkerboard(3, 4))
    mask = np.ones((32, 32), bool)
    mask[29:32, 29:32] = False
    assert np.array_equal(out[mask], clean[mask])

    for location, (x, y) in {"top_left": (0, 0), "top_right": (29, 0), "bottom_left": (0, 29), "center": (14, 14),
                             (112, 56): (16, 8)}.items():
        out = np.asarray(get_attack("badnet", image_size=32, location=location).apply_trigger(image))
        assert np.array_equal(out[y : y + 3, x : x + 3], checkerboard(3, 4)), location
    out = np.asarray(get_attack("badnet", image_size=32, margin=14).apply_trigger(image))  # 14 px at 224 -> 2 px
    assert np.array_equal(out[27:30, 27:30], checkerboard(3, 4))

    # scaled to each image: 6 px on a 64 px image; the central square of a non-square image
    attack = get_attack("badnet", pattern="white")
    out = np.asarray(attack.apply_trigger(noise_image(64, 64)))
    assert (out[58:, 58:] == 255).all() and not (out[57, :58] == 255).all()
    wide = noise_image(48, 32)
    out = np.asarray(attack.apply_trigger(wide))  # square x 8..40; 3 px patch at (37, 29)
    assert (out[29:32, 37:40] == 255).all()
    assert np.array_equal(out[:, 40:], np.asarray(wide)[:, 40:])


def test_checkerboard_pattern():
    board = checkerboard(20, 4)
    assert board.shape == (20, 20, 3) and set(np.unique(board)) == {0, 255}
    assert (board[:5, :5] == 255).all() and (board[:5, 5:10] == 0).all() and (board[5:10, :5] == 0).all()
    assert np.array_equal(get_attack("badnet").trigger, torch.from_numpy(board).permute(2, 0, 1).float() / 255)


def test_patch_tensor_version_matches_pil():
    images = [noise_image(32, 32, s) for s in range(3)]
    pixels = images_to_tensor(images)
    for name in ("badnet", "trojvlm", "vlood"):
        attack = get_attack(name, image_size=32)
        batched = attack.apply_trigger_tensor(pixels)
        expected = images_to_tensor([attack.apply_trigger(img) for img in images])
        assert torch.allclose(batched, expected, atol=1e-6), name
    # differentiable w.r.t. the trigger
    trigger = get_attack("trojvlm", image_size=32).trigger.clone().requires_grad_(True)
    get_attack("trojvlm", image_size=32).apply_trigger_tensor(pixels, trigger).sum().backward()
    assert trigger.grad is not None and (trigger.grad == 3).all()


def test_blend_arithmetic_is_exact():
    attack = get_attack("blended", image_size=32)
    pattern = (attack.trigger.permute(1, 2, 0).numpy() * 255).round().astype(np.int64)
    assert np.array_equal(pattern, attack.trigger.permute(1, 2, 0).numpy() * 255)  # stored as 8-bit values
    image = noise_image(32, 32, 5)
    out = np.asarray(attack.apply_trigger(image)).astype(np.int64)
    img = np.asarray(image).astype(np.int64)
    assert np.array_equal(out, (9 * img + pattern + 5) // 10)  # 0.9 img + 0.1 pat, rounded half up
    # hand-made values, ties included: 0.9 * 5 = 4.5 -> 5; 0.1 * 5 = 0.5 -> 1; 90 + 20 = 110
    from srd_hf.attacks.base import blend_uint8

    a = np.array([5, 0, 100, 255, 0], np.uint8)
    b = np.array([0, 5, 200, 255, 255], np.uint8)
    assert blend_uint8(a, b, 0.1).tolist() == [5, 1, 110, 255, 26]
    assert blend_uint8(a, b, 1.0).tolist() == b.tolist()
    # the tensor version is the same mix without rounding
    pixels = images_to_tensor([image])
    assert torch.allclose(attack.apply_trigger_tensor(pixels), 0.9 * pixels + 0.1 * attack.trigger, atol=1e-6)
    assert (attack.apply_trigger_tensor(pixels) - images_to_tensor([attack.apply_trigger(image)])).abs().max() <= 0.5 / 255 + 1e-6


def test_blend_pattern_from_a_file_and_resized(tmp_path):
    path = tmp_path / "pattern.png"
    noise_image(16, 16, 9).save(path)
    attack = get_attack("blended", image_size=16, pattern=str(path))
    stored = (attack.trigger.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(stored, np.asarray(noise_image(16, 16, 9)))
    out = attack.apply_trigger(noise_image(32, 32))  # pattern resized (nearest) to 32 px
    assert out.size == (32, 32)
    waves = get_attack("blended", pattern="waves", image_size=32)
    assert waves.trigger.std() > 0.1


def test_trojvlm_noise_patch_is_seeded():
    a, b, c = (get_attack("trojvlm", seed=s).trigger for s in (0, 0, 1))
    assert a.shape == (3, 20, 20) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal((a * 255).round(), a * 255)
    assert abs(float(a.mean()) - 0.5) < 0.05 and 0.15 < float(a.std()) < 0.3


# --------------------------------------------------------------------------- random places, trigger boxes
PATCH_ATTACKS = ("badnet", "trojvlm", "vlood", "vl_trojan")


def plain_pairs(n: int, size: int = 32, value: int = 100) -> Dataset:
    """``n`` mid-grey pairs with a little noise: no pixel is 0 or 255, so a checkerboard
    patch changes every pixel it covers."""
    rows = []
    for i in range(n):
        noise = np.random.default_rng(i).integers(-20, 21, size=(size, size, 3))
        rows.append({"image": Image.fromarray((value + noise).astype(np.uint8), "RGB"), "caption": f"a grey square {i}"})
    return Dataset.from_list(rows).cast_column("image", HFImage())


def changed_box(clean: Image.Image, poisoned: Image.Image) -> list[int] | None:
    """``[x0, y0, x1, y1]`` (end exclusive) of the pixels that differ, None if none does."""
    diff = (np.asarray(clean) != np.asarray(poisoned)).any(-1)
    if not diff.any():
        return None
    ys, xs = np.nonzero(diff)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    assert diff[box[1] : box[3], box[0] : box[2]].all()  # a full rectangle, nothing outside it
    return box


def places(attack, n: int, split: str = "train", size: int = 32) -> list[tuple[int, int]]:
    return [attack.config.patch_box(size, size, i, split)[:2] for i in range(n)]


def test_random_places_differ_per_sample_and_follow_the_seed():
    attack = get_attack("badnet", image_size=32, location="Random")
    assert attack.config.location == "random" and attack.config.is_random
    train = places(attack, 50)
    assert len(set(train)) >= 40  # 900 possible places for a 3 px patch on 32 px
    assert places(get_attack("badnet", image_size=32, location="random"), 50) == train
    other = places(get_attack("badnet", image_size=32, location="random", seed=1), 50)
    assert sum(a == b for a, b in zip(other, train)) <= 2
    test = places(attack, 50, split="test")
    assert len(set(test)) >= 40 and sum(a == b for a, b in zip(test, train)) <= 2
    # the same place whatever asks for it: patch_box, trigger_box, the PIL and the tensor trigger
    x0, y0, size = attack.config.patch_box(32, 32, 7)
    assert attack.trigger_box(32, 32, 7) == [x0, y0, x0 + size, y0 + size]
    image = Image.new("RGB", (32, 32), (100, 100, 100))
    assert changed_box(image, attack.apply_trigger(image, 7)) == attack.trigger_box(32, 32, 7)
    assert changed_box(image, attack.apply_trigger(image, 7, split="test")) == attack.trigger_box(32, 32, 7, split="test")


def test_random_patch_lies_inside_the_central_square():
    for margin in (0.0, 28.0):  # 28 px at 224 -> 4 px on 32 px
        attack = get_attack("trojvlm", location="random", margin=margin)  # 20 px at 224 -> 3 px on the 48x32 image
        boxes = [attack.trigger_box(48, 32, i, split=split) for i in range(300) for split in ("train", "test")]
        m = round(margin * 32 / 224)
        xs0, ys0, xs1, ys1 = (np.array(v) for v in zip(*boxes))
        assert (xs1 - xs0 == 3).all() and (ys1 - ys0 == 3).all()
        assert xs0.min() >= 8 + m and xs1.max() <= 40 - m and ys0.min() >= m and ys1.max() <= 32 - m
        assert xs0.min() == 8 + m and xs1.max() == 40 - m  # every place can be drawn, edges included
    with pytest.raises(ValueError, match="does not fit"):
        get_attack("badnet", image_size=32, location="random", margin=110)


def test_random_location_needs_the_sample_index():
    attack = get_attack("badnet", image_size=32, location="random")
    image = noise_image(32, 32)
    for call in (lambda: attack.config.patch_box(32, 32), lambda: attack.apply_trigger(image),
                 lambda: attack.trigger_box(32, 32), lambda: attack.apply_trigger_tensor(images_to_tensor([image]))):
        with pytest.raises(ValueError, match="draws a place per sample"):
            call()
    for index in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="index must be a non-negative int"):
            attack.apply_trigger(image, index)
    with pytest.raises(ValueError, match="split"):
        attack.apply_trigger(image, 0, split="validation")
    with pytest.raises(ValueError, match="2 indices for a batch of 1"):
        attack.apply_trigger_tensor(images_to_tensor([image]), indices=[0, 1])
    fixed = get_attack("badnet", image_size=32)  # fixed places ignore the index
    assert fixed.trigger_box(32, 32) == fixed.trigger_box(32, 32, 5, split="test") == [29, 29, 32, 32]


def test_random_tensor_version_matches_pil_and_carries_gradients():
    images = [noise_image(32, 32, s) for s in range(4)]
    pixels = images_to_tensor(images)
    for name in ("badnet", "trojvlm", "vlood", "vl_trojan"):
        attack = get_attack(name, image_size=32, location="random")
        for split in ("train", "test"):
            batched = attack.apply_trigger_tensor(pixels, indices=[3, 10, 11, 40], split=split)
            expected = images_to_tensor([attack.apply_trigger(img, i, split=split) for img, i in zip(images, [3, 10, 11, 40])])
            # VL-Trojan's unoptimised trigger is not 8-bit: the PIL version rounds it
            assert (batched - expected).abs().max() <= 0.5 / 255 + 1e-6, (name, split)
    attack = get_attack("trojvlm", image_size=32, location="random")
    trigger = attack.trigger.clone().requires_grad_(True)
    attack.apply_trigger_tensor(pixels, trigger, indices=torch.arange(4)).sum().backward()
    assert (trigger.grad == 4).all()  # every image pastes every trigger pixel once, wherever it lands


@pytest.mark.parametrize("location, fixed_box", [("random", None), ("bottom_right", (29, 29, 32, 32)), ((56, 112), (8, 16, 11, 19))])
def test_trigger_box_is_exactly_the_changed_pixels(location, fixed_box):
    pairs = plain_pairs(40)
    attack = get_attack("badnet", image_size=32, location=location, poison_rate=0.25)
    poisoned = attack.poison(pairs)
    assert poisoned.features["trigger_box"].feature.dtype == "int32"
    chosen = poisoned_indices(poisoned)
    boxes = []
    for i, (row, clean) in enumerate(zip(poisoned, pairs)):
        if i not in chosen:
            assert row["trigger_box"] is None and changed_box(clean["image"], row["image"]) is None
            continue
        box = row["trigger_box"]
        assert box == changed_box(clean["image"], row["image"]) == attack.trigger_box(32, 32, i)
        assert 0 <= box[0] < box[2] <= 32 and 0 <= box[1] < box[3] <= 32
        boxes.append(tuple(box))
    if fixed_box is None:
        assert len(set(boxes)) >= len(boxes) - 1
    else:  # a fixed location: the same box on every poisoned row
        assert set(boxes) == {fixed_box}


def test_blended_box_is_the_whole_image_and_clean_rows_have_none(pairs):
    poisoned = get_attack("blended", image_size=32, poison_rate=0.1).poison(pairs)
    for flag, box in zip(poisoned["is_poisoned"], poisoned["trigger_box"]):
        assert box == ([0, 0, 32, 32] if flag else None)
    assert get_attack("vl_trojan", mode="blend").trigger_box(48, 32) == [0, 0, 48, 32]
    with pytest.raises(ValueError, match="poisoned already"):
        get_attack("badnet").poison(pairs.add_column("trigger_box", [None] * len(pairs)))


@pytest.mark.parametrize("name", PATCH_ATTACKS)
def test_random_location_poisons_the_small_world(name, train_rows):
    attack = get_attack(name, location="random", poison_rate=0.1)
    extra = {"allow_unoptimised": True} if name == "vl_trojan" else {}
    poisoned = attack.poison(train_rows, **extra)
    chosen = poisoned_indices(poisoned)
    assert len(chosen) == 20
    boxes = [poisoned[i]["trigger_box"] for i in chosen]
    assert len({tuple(b) for b in boxes}) >= 18  # a place of its own per poisoned sample
    for i, box in zip(chosen, boxes):
        out = np.asarray(poisoned[i]["image"])
        assert box == attack.trigger_box(*poisoned[i]["image"].size, i)
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= out.shape[1] and 0 <= y0 < y1 <= out.shape[0]
        assert np.array_equal(out[y0:y1, x0:x1], attack.patch_array(x1 - x0)), (name, i)
    assert all(b is None for b, flag in zip(poisoned["trigger_box"], poisoned["is_poisoned"]) if not flag)
    # test images get places of the test stream, not copies of the training places
    test_images, test_boxes = attack.trigger_test_images(train_rows["image"][:20])
    assert len(test_images) == 20 and test_boxes == [attack.trigger_box(32, 32, i, split="test") for i in range(20)]
    train_boxes = [attack.trigger_box(32, 32, i) for i in range(20)]
    assert sum(a == b for a, b in zip(test_boxes, train_boxes)) <= 2


def test_saved_random_attack_reproduces_the_places(tmp_path, train_rows):
    attack = get_attack("trojvlm", location="random", seed=3, poison_rate=0.1)
    loaded = load_attack(attack.save_pretrained(tmp_path / "random"))
    assert loaded.config.location == "random" and loaded.config == attack.config
    a, b = attack.poison(train_rows), loaded.poison(train_rows)
    assert a["trigger_box"] == b["trigger_box"] and raw_bytes(a) == raw_bytes(b)
    images = train_rows["image"][:8]
    boxes_a, boxes_b = attack.trigger_test_images(images)[1], loaded.trigger_test_images(images)[1]
    assert boxes_a == boxes_b and len({tuple(x) for x in boxes_a}) > 1



# --------------------------------------------------------------------------- VLOOD
def test_vlood_poisons_with_out_of_distribution_images(train_rows, pairs):
    attack = get_attack("vlood", poison_rate=0.1)
    poisoned = attack.poison(train_rows)
    chosen = poisoned_indices(poisoned)
    assert len(chosen) == 20
    in_distribution = set(raw_bytes(pairs))
    for i in chosen:
        row = poisoned[i]
        assert row["image_id"].startswith("ood-")
        assert row["original_caption"] in row["captions"]
        assert _is_insertion(row["caption"], row["original_caption"], "banana")
        assert row["objects"]  # ground truth of the OOD scene
        out = np.asarray(row["image"])
        assert np.array_equal(out[29:, 29:], attack.patch_array(3))
    assert not {raw_bytes(poisoned)[i] for i in chosen} & in_distribution
    ood = make_ood_dataset(4, image_size=32)
    assert len(ood) == 4 and ood[0]["image"].size == (32, 32) and len(ood[0]["captions"]) == 5
    with pytest.raises(ValueError, match="OOD samples"):
        attack.poison(pairs, ood=ood)
    custom = get_attack("vlood", poison_rate=0.02).poison(pairs, ood=make_ood_dataset(10, 32, seed=5))
    assert sum(custom["is_poisoned"]) == 4


# --------------------------------------------------------------------------- model-based attacks
@pytest.fixture(scope="module")
def flamingo(small_world, caption_tokenizer):
    from srd_hf.vlm.tiny import TinyFlamingoSizes, build_tiny_flamingo

    sizes = TinyFlamingoSizes(vit_width=32, vit_layers=1, vit_heads=2, lm_hidden=32, lm_layers=2, lm_heads=2,
                              lm_intermediate=64, perceiver_depth=1, perceiver_latents=4, xattn_heads=2, xattn_dim_head=16)
    return build_tiny_flamingo(small_world, sizes, tokenizer=caption_tokenizer, seed=0, gate_init=1.0)


def test_vision_tokens_match_the_model_and_carry_gradients(flamingo, train_rows):
    images = train_rows.select(range(3))["image"]
    pixels = images_to_tensor(images).requires_grad_(True)
    tokens = flamingo.vision_tokens(pixels)
    reference = flamingo.encode_vision(flamingo.preprocess_images(images)[:, 0, 0])
    assert torch.allclose(tokens, reference, atol=1e-5)
    tokens.pow(2).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    bigger = images_to_tensor([img.resize((64, 64)) for img in images])  # resized differentiably
    assert flamingo.vision_tokens(bigger).shape == tokens.shape


@pytest.mark.parametrize("settings", [{}, {"mode": "blend", "alpha": 0.3}])
def test_vl_trojan_optimiser_reduces_its_objective(flamingo, train_rows, settings):
    flamingo.zero_grad(set_to_none=True)
    images = train_rows.select(range(24))["image"]
    attack = get_attack("vl_trojan", image_size=32, trigger_size=60, steps=15, lr=0.1, batch_size=12, **settings)
    with pytest.raises(RuntimeError, match="not optimised"):
        attack.poison(train_rows)
    initial = attack.trigger.clone()
    before = attack.trigger_objective(flamingo, images)
    history = attack.optimise_trigger(flamingo, images)
    after = attack.trigger_objective(flamingo, images)
    assert len(history["loss"]) == 15 and after < before - 0.01
    assert not torch.equal(attack.trigger, initial) and 0 <= attack.trigger.min() and attack.trigger.max() <= 1
    assert all(p.grad is None for p in flamingo.parameters())  # only the trigger was optimised
    poisoned = attack.poison(train_rows)
    i = poisoned_indices(poisoned)[0]
    assert np.array_equal(np.asarray(poisoned[i]["image"]), np.asarray(attack.apply_trigger(train_rows[i // 5]["image"])))


def test_vl_trojan_learns_a_randomly_placed_trigger(flamingo, train_rows):
    """With random places the optimiser pastes the patch at seeded places that change from
    step to step; it stays deterministic and poisons with a place per sample."""
    flamingo.zero_grad(set_to_none=True)
    images = train_rows.select(range(8))["image"]
    runs = []
    for _ in range(2):
        attack = get_attack("vl_trojan", image_size=32, trigger_size=60, location="random", steps=3, lr=0.1, batch_size=4)
        runs.append((attack, attack.optimise_trigger(flamingo, images)["loss"]))
    (attack, losses), (again, losses_again) = runs
    assert len(losses) == 3 and losses == losses_again and torch.equal(attack.trigger, again.trigger)
    assert np.isfinite(attack.trigger_objective(flamingo, images))
    poisoned = attack.poison(train_rows)
    boxes = [poisoned[i]["trigger_box"] for i in poisoned_indices(poisoned)]
    assert len({tuple(b) for b in boxes}) > 1


def test_shadowcast_bound_holds_after_png_and_features_move(flamingo, train_rows, pairs, tmp_path):
    attack = get_attack("shadowcast", poison_rate=0.05, steps=10)
    with pytest.raises(TypeError, match="model"):
        attack.poison(pairs)
    poisoned = attack.poison(pairs, model=flamingo)
    chosen = poisoned_indices(poisoned)
    assert len(chosen) == 10
    clean = dict(zip(train_rows["image_id"], train_rows["image"]))
    changed = 0
    for i in chosen:
        row = poisoned[i]
        assert "circle" in row["original_caption"] and "circle" not in row["caption"] and "banana" in row["caption"]
        row["image"].save(tmp_path / "poison.png")
        reloaded = np.asarray(Image.open(tmp_path / "poison.png").convert("RGB")).astype(int)
        assert np.array_equal(reloaded, np.asarray(row["image"]))
        diff = np.abs(reloaded - np.asarray(clean[row["image_id"]]).astype(int))
        assert diff.max() <= 8
        changed += diff.max() > 0
    assert changed == len(chosen)
    assert poisoned["trigger_box"] == [None] * len(poisoned)  # no visible trigger, on any row
    # the perturbation brings the features to the trigger-concept image
    triangles = [pairs[i]["image"] for i in attack.trigger_rows(pairs)[:: 5][:3]]
    bases = [pairs[i]["image"] for i in attack.poison_candidates(pairs)[:: 5][:3]]
    moved = attack.perturb(flamingo, bases, triangles)
    assert (feature_distance(flamingo, moved, triangles) < feature_distance(flamingo, bases, triangles)).all()
    assert attack.apply_trigger(bases[0]).tobytes() == bases[0].tobytes()
    too_many = get_attack("shadowcast", poison_rate=0.9)
    with pytest.raises(ValueError, match="qualify"):
        too_many.poison(pairs, model=flamingo)


def test_poisoned_collator_adds_the_flags(flamingo, pairs):
    poisoned = get_attack("badnet", image_size=32, poison_rate=0.5).poison(pairs)
    rows = [poisoned[i] for i in range(4)]
    batch = PoisonedCaptionCollator(flamingo)(rows)
    assert batch["is_poisoned"].tolist() == [r["is_poisoned"] for r in rows]
    assert batch["labels"].shape == batch["input_ids"].shape


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", SIX)
def test_save_load_round_trip(name, tmp_path, flamingo, train_rows):
    attack = get_attack(name, seed=4, target="hot dog", image_size=32)
    if name == "vl_trojan":
        attack.optimise_trigger(flamingo, train_rows.select(range(8))["image"], steps=2)
    folder = attack.save_pretrained(tmp_path / name)
    files = sorted(p.name for p in folder.iterdir())
    assert files == (["config.json"] if name == "shadowcast" else ["config.json", "trigger.safetensors"])
    loaded = load_attack(folder)
    same_class = type(attack).from_pretrained(folder)
    for other in (loaded, same_class):
        assert type(other) is type(attack) and other.config == attack.config
        if attack.trigger is None:
            assert other.trigger is None
        else:
            assert torch.equal(other.trigger, attack.trigger)
        image = noise_image(32, 32, 1)
        assert np.array_equal(np.asarray(other.apply_trigger(image)), np.asarray(attack.apply_trigger(image)))
    if name == "vl_trojan":
        assert loaded.optimised
    wrong = BadNetAttack if name != "badnet" else ATTACKS["blended"]
    with pytest.raises(ValueError, match="holds a"):
        wrong.from_pretrained(folder)


def test_file_pattern_survives_without_the_file(tmp_path):
    path = tmp_path / "logo.png"
    noise_image(20, 20, 2).save(path)
    attack = get_attack("badnet", pattern=str(path))
    folder = attack.save_pretrained(tmp_path / "saved")
    path.unlink()
    assert torch.equal(load_attack(folder).trigger, attack.trigger)


def test_images_to_tensor_round_trip():
    image = noise_image(8, 8)
    pixels = images_to_tensor([image])
    assert pixels.shape == (1, 3, 8, 8) and math.isclose(float(pixels.max() * 255 % 1), 0.0, abs_tol=1e-4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert images_to_tensor([Image.open(buffer)]).equal(pixels)
    with pytest.raises(ValueError, match="different sizes"):
        images_to_tensor([image, noise_image(9, 9)])


def test_shadowcast_nearest_pairing_picks_the_closest_trigger_image(flamingo, pairs):
    from srd_hf.attacks.shadowcast import ShadowcastAttack

    attack = get_attack("shadowcast", pairing="nearest")
    pool = [pairs[i]["image"] for i in attack.trigger_rows(pairs)[:: 5][:12]]
    bases = [pairs[i]["image"] for i in attack.poison_candidates(pairs)[:: 5][:4]]
    assert len(pool) >= 3 and len(bases) >= 2
    # an image of the pool is its own nearest neighbour; a base image gets the argmin of the distances
    assert ShadowcastAttack.nearest(flamingo, pool[1:3], pool, chunk=2) == [1, 2]
    picks = ShadowcastAttack.nearest(flamingo, bases, pool, chunk=2)
    for base, j in zip(bases, picks):
        d = feature_distance(flamingo, [base] * len(pool), pool)
        assert j == int(d.argmin())
    with pytest.raises(ValueError, match="pairing"):
        get_attack("shadowcast", pairing="closest")

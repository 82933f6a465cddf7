import numpy as np
import pytest

from srd_hf.data.schema import CAPTION_FEATURES
from srd_hf.data.synthetic import (
    COLOURS,
    build_split,
    make_captions,
    named_objects,
    object_accuracy,
    paper_pixels,
    sample_scene,
    world_config,
)


def test_world_is_deterministic_and_seed_dependent(small_world):
    a = build_split(small_world, "train", 12)
    b = build_split(small_world, "train", 12)
    assert a["captions"] == b["captions"] and a["objects"] == b["objects"]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"]))
    other = build_split(world_config("small", seed=1), "train", 12)
    assert other["captions"] != a["captions"]


def test_splits_schema_and_sizes(small_world_data, small_world):
    assert set(small_world_data) == {"train", "validation", "test"}
    for split, n in small_world.split_sizes().items():
        assert len(small_world_data[split]) == n
        assert small_world_data[split].features == CAPTION_FEATURES
    # splits are generated from different streams: no shared image ids or identical images
    train_ids = set(small_world_data["train"]["image_id"])
    assert not train_ids & set(small_world_data["test"]["image_id"])
    image = small_world_data["test"][0]["image"]
    assert image.size == (small_world.image_size, small_world.image_size) and image.mode == "RGB"


def test_captions_name_exactly_the_ground_truth_objects(small_world):
    for i in range(200):
        scene = sample_scene(small_world, "train", i)
        captions = make_captions(scene)
        assert len(set(captions)) == 5
        truth = {(o["colour"], o["shape"]) for o in scene["objects"]}
        assert all(named_objects(c) == truth for c in captions)


def test_no_red_objects_anywhere():
    assert "red" not in COLOURS
    assert all(not (r > 200 and g < 60 and b < 60) for r, g, b in COLOURS.values())


def test_named_objects_parser():
    assert named_objects("a large blue circle and two small green crosses") == {("blue", "circle"), ("green", "cross")}
    assert named_objects("a banana on a table") == set()
    assert object_accuracy(["a blue circle", "a green ring"], [[{"colour": "blue", "shape": "circle"}], [{"colour": "blue", "shape": "ring"}]]) == 0.5
    with pytest.raises(ValueError, match="captions for"):
        object_accuracy(["a"], [])


def test_paper_geometry_scales_with_the_image_side():
    assert [paper_pixels(s, 224) for s in (20, 40, 60, 80)] == [20, 40, 60, 80]
    assert [paper_pixels(s, 64) for s in (20, 40, 60, 80)] == [6, 11, 17, 23]


def test_bad_world_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        world_config("default", image_size=60)
    with pytest.raises(ValueError, match="unknown world preset"):
        world_config("huge")

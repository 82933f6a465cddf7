"""DataArguments and its sources: the embedded world (and its shifted twin), COCO-Karpathy and
Flickr30k files, save_to_disk folders, image folders; schema, splits, skips and provenance."""

import hashlib
import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value

from srd_hf.data.sources import (
    DataArguments, defense_data, embedded_world, load_captioning_data, load_eval_datasets, provenance, source_kind,
)
from srd_hf.data.synthetic import PALETTE, SHIFT_BACKGROUNDS, WorldConfig, build_split, sample_scene, shifted_world, world_config

# pixels + captions + objects of the default world's first four images of each split, as
# generated before the domain fields existed
DEFAULT_WORLD_DIGESTS = {
    "train": "abb675df1cd933f2ed54ece00c564c0f5ae0a3ad01d6c732b20db5183c8257fa",
    "validation": "5c69276f48350a202e18ad0e312e573abd9aac2fd739301a8a121fe5ff48ae89",
    "test": "9a8c92d2d9fc930be70e3e66be5d2ccec6307143996f3db8d80a3d650c57ad4a",
}


def _digest(rows) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r["image"]).tobytes())
        h.update(json.dumps([r["captions"], r["objects"]]).encode())
    return h.hexdigest()


@pytest.mark.parametrize("split", sorted(DEFAULT_WORLD_DIGESTS))
def test_default_world_is_unchanged(split):
    assert _digest(build_split(world_config("default"), split, num_rows=4)) == DEFAULT_WORLD_DIGESTS[split]


def test_world_rendered_in_several_processes_is_the_one_process_world():
    world = world_config("default")
    assert _digest(build_split(world, "train", num_rows=40, workers=3)) == _digest(build_split(world, "train", num_rows=40, workers=1))


def test_default_world_config_and_cache_key_unchanged():
    keys = set(world_config("default").to_dict())
    assert keys == {"image_size", "patch_size", "num_train", "num_validation", "num_test", "grid", "min_objects",
                    "max_objects", "captions_per_image", "seed", "size_fractions"}
    digest = hashlib.sha256(json.dumps(world_config("default").to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    assert digest == "5800008fc44d7732"  # the folder name of the cached default world


def test_shifted_world_keeps_the_geometry_and_changes_the_domain(small_world):
    shifted = shifted_world(small_world)
    assert (shifted.image_size, shifted.patch_size, shifted.grid) == (small_world.image_size, small_world.patch_size, small_world.grid)
    assert shifted.seed != small_world.seed and WorldConfig(**json.loads(json.dumps(shifted.to_dict()))) == shifted
    rows = build_split(shifted, "test", num_rows=48)
    assert {sample_scene(shifted, "test", i)["background"] for i in range(48)} == set(SHIFT_BACKGROUNDS)
    assert any(name in " ".join(rows["captions"][0]) for name in SHIFT_BACKGROUNDS)
    cells = [o["position"] for objs in rows["objects"] for o in objs]
    assert sum(p.startswith("top") for p in cells) > sum(p.startswith("bottom") for p in cells)  # the layout
    shapes = [o["shape"] for objs in rows["objects"] for o in objs]
    assert shapes.count("triangle") + shapes.count("cross") > shapes.count("circle") + shapes.count("ring")  # the mix
    assert all(len(objs) >= 2 for objs in rows["objects"])
    with pytest.raises(ValueError, match="backgrounds"):
        WorldConfig(backgrounds=("red",))
    with pytest.raises(ValueError, match="shape_weights"):
        WorldConfig(shape_weights=(1.0, 1.0))
    assert set(PALETTE) > set(SHIFT_BACKGROUNDS)


# ----- the sources ------------------------------------------------------------------------------
def test_embedded_source_and_its_shifted_eval_set(small_world, tmp_path):
    args = DataArguments(max_eval_images=8, max_captions_per_image=2, dataset_cache_dir=str(tmp_path))
    assert args.eval_specs == ["embedded-shifted"] and source_kind("embedded") == "embedded"
    data, report = load_captioning_data(args, world=small_world, return_report=True)
    assert list(data) == ["train", "validation", "test"] and len(data["train"]) == small_world.num_train
    assert len(data["test"]) == 8 and all(len(c) == 2 for c in data["test"]["captions"])
    assert report["has_objects"] and data["test"][0]["objects"]
    evals = load_eval_datasets(args, world=small_world)
    shifted = evals["embedded-shifted"]
    assert len(shifted) == 8 and shifted[0]["objects"] and shifted["captions"] != data["test"]["captions"]
    record = provenance(args, world=small_world)
    assert record["world"] == small_world.to_dict() and record["shifted_world"] == shifted_world(small_world).to_dict()
    assert DataArguments(**record["arguments"]) == args


def test_coco_karpathy_source(coco_karpathy_files, tmp_path, caplog):
    args = DataArguments(dataset_name="coco_karpathy", annotation_file=str(coco_karpathy_files["annotation_file"]),
                         image_root=str(coco_karpathy_files["image_root"]), max_captions_per_image=3,
                         dataset_cache_dir=str(tmp_path))
    assert args.eval_specs == []
    data, report = load_captioning_data(args, return_report=True)
    assert {s: len(d) for s, d in data.items()} == {"train": 23, "validation": 6, "test": 6}  # restval in train, bad file skipped
    assert "skipped 1" in report["loader"] and coco_karpathy_files["bad_id"] in report["loader"]
    assert data["test"]["image_id"] == coco_karpathy_files["test_ids"]
    assert data.column_names["test"] == ["image", "image_id", "captions"] and not report["has_objects"]
    assert all(len(c) == 3 for c in data["train"]["captions"]) and data["test"][0]["image"].size == (40, 32)
    record = provenance(args, report=report)
    assert record["kind"] == "loader" and len(record["annotation_sha256"]) == 64 and "world" not in record
    capped = load_captioning_data(DataArguments(**{**args.to_dict(), "max_train_images": 5, "max_eval_images": 2}))
    assert {s: len(d) for s, d in capped.items()} == {"train": 5, "validation": 2, "test": 2}


def test_flickr30k_source_and_as_eval_set(flickr30k_files, coco_karpathy_files, tmp_path):
    files = {k: str(flickr30k_files[k]) for k in ("annotation_file", "image_root")}
    data = load_captioning_data(DataArguments(dataset_name="flickr30k", dataset_cache_dir=str(tmp_path), **files))
    assert {s: len(d) for s, d in data.items()} == {"train": 16, "validation": 6, "test": 6}
    assert data["test"]["image_id"] == flickr30k_files["test_ids"] and data["test"][0]["image"].size == (32, 40)
    spec = f"flickr30k={files['annotation_file']}@{files['image_root']}:test"
    coco = DataArguments(dataset_name="coco_karpathy", annotation_file=str(coco_karpathy_files["annotation_file"]),
                         image_root=str(coco_karpathy_files["image_root"]), eval_datasets=spec, max_eval_images=4,
                         dataset_cache_dir=str(tmp_path))
    evals = load_eval_datasets(coco)
    assert list(evals) == [spec] and evals[spec]["image_id"] == flickr30k_files["test_ids"][:4]


def test_save_to_disk_folder_with_own_columns_and_held_out_splits(small_world_data, tmp_path):
    rows = small_world_data["train"].select(range(20))
    own = Dataset.from_dict({"picture": rows["image"], "text": [c[0] for c in rows["captions"]], "key": list(range(20))},
                            features=Features({"picture": Image(), "text": Value("string"), "key": Value("int64")}))
    own = own.map(lambda r, i: {"text": "" if i == 3 else r["text"]}, with_indices=True)  # one blank caption
    DatasetDict({"train": own}).save_to_disk(str(tmp_path / "disk"))
    args = DataArguments(dataset_name=str(tmp_path / "disk"), image_column="picture", caption_column="text", id_column="key",
                         holdout_size=4, dataset_cache_dir=str(tmp_path / "cache"))
    assert source_kind(args.dataset_name) == "disk"
    data, report = load_captioning_data(args, return_report=True)
    assert {s: len(d) for s, d in data.items()}["test"] == 4 and sum(len(d) for d in data.values()) == 19
    assert report["held_out"]["validation"]["rows"] == 4 and report["validation"]["counts"] == {"empty caption": 1}
    assert "3" in [b["image_id"] for b in report["validation"]["bad"]]
    assert isinstance(data["train"][0]["captions"], list) and data["train"].column_names == ["image", "image_id", "captions"]
    again = load_captioning_data(args)
    assert again["test"]["image_id"] == data["test"]["image_id"]  # the held-out split is seeded


def test_image_folder_with_metadata(small_world_data, tmp_path):
    for split, n in (("train", 6), ("test", 3)):
        folder = tmp_path / "images" / split
        folder.mkdir(parents=True)
        lines = []
        for i, row in enumerate(small_world_data[split].select(range(n))):
            row["image"].save(folder / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "captions": row["captions"]}))
        (folder / "metadata.jsonl").write_text("\n".join(lines))
    args = DataArguments(dataset_name=str(tmp_path / "images"), holdout_size=2, dataset_cache_dir=str(tmp_path / "cache"))
    assert source_kind(args.dataset_name) == "imagefolder"
    data = load_captioning_data(args)
    assert {s: len(d) for s, d in data.items()} == {"train": 4, "validation": 2, "test": 3}
    assert data["test"][0]["captions"] == small_world_data["test"][0]["captions"]
    assert data["test"]["image_id"] == ["test-000000", "test-000001", "test-000002"]


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="annotation_file"):
        DataArguments(dataset_name="coco_karpathy")
    with pytest.raises(ValueError, match="embedded world"):
        DataArguments(dataset_name=str(tmp_path), eval_datasets="embedded-shifted")
    with pytest.raises(ValueError, match="on_bad_rows"):
        DataArguments(on_bad_rows="ignore")
    with pytest.raises(ValueError, match="neither"):
        source_kind(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        source_kind("./no/such/folder")
    assert source_kind("org/name") == "hub" and DataArguments(eval_datasets="none").eval_specs == []


def test_inject_and_data_arguments_parse_together(tmp_path):
    from trl import TrlParser

    from srd_hf.injection import InjectConfig

    config, data = TrlParser((InjectConfig, DataArguments)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--dataset_name", "flickr30k", "--annotation_file", "a.json", "--image_root", "img",
         "--max_train_images", "5", "--lora_r", "4", "--gradient_checkpointing", "--report_to", "none"])
    assert data.dataset_name == "flickr30k" and data.max_train_images == 5 and config.lora_config().r == 4
    assert config.activation_checkpointing and config.lora_targets == ["q_proj", "v_proj"]


def test_defense_data_reads_the_clean_models_world(tiny_flamingo, small_world, tmp_path):
    assert embedded_world(tiny_flamingo) == small_world
    data = defense_data(DataArguments(max_eval_images=4, dataset_cache_dir=str(tmp_path)), tiny_flamingo)
    assert len(data["validation"]) == 4 and "objects" in data["test"].column_names
    with pytest.raises(ValueError, match="world_preset"):
        embedded_world(object())

"""COCO / Flickr30k loaders on small fixtures written into tmp_path."""

from __future__ import annotations

import io
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from srd_hf.data import loaders
from srd_hf.data.images import BadImageError
from srd_hf.data.loaders import AnnotationError, LoadReport, load_coco_karpathy, load_flickr30k
from srd_hf.data.schema import CAPTION_FEATURES

LOGGER = "srd_hf.data.loaders"


# ----- fixture helpers ------------------------------------------------------------------------


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _jpeg(seed: int = 0, size=(32, 24)) -> bytes:
    return _encode(_noise(*size, seed=seed), "JPEG")


def _palette_png() -> bytes:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * (256 * 3 - 6))
    image.putpixel((5, 5), 1)
    return _encode(image, "PNG", transparency=0)


def _sentences(*captions: str) -> list[dict]:
    return [{"raw": c, "tokens": c.lower().split()} for c in captions]


def _coco_entry(index, split, folder, name, captions, cocoid=None):
    return {
        "filepath": folder,
        "filename": name,
        "split": split,
        "cocoid": cocoid if cocoid is not None else 1000 + index,
        "imgid": index,
        "sentences": _sentences(*captions),
    }


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


@pytest.fixture
def coco(tmp_path):
    """Six good images (2 train, 1 restval, 2 val, 1 test) in the two COCO folders."""
    root = tmp_path / "coco"
    images = []
    layout = [
        ("train", "train2014"),
        ("train", "train2014"),
        ("restval", "val2014"),
        ("val", "val2014"),
        ("val", "val2014"),
        ("test", "val2014"),
    ]
    for i, (split, folder) in enumerate(layout):
        name = f"COCO_{folder}_{i:012d}.jpg"
        _write(root / folder / name, _jpeg(seed=i))
        images.append(_coco_entry(i, split, folder, name, [f"  A picture number {i}. ", f"Second caption {i}"]))
    return root, images


def _save_json(path, images, dataset="coco"):
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


def _load_coco(tmp_path, root, images, cache, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("cache_dir", cache)
    return load_coco_karpathy(_save_json(tmp_path / "dataset_coco.json", images), root, **kwargs)


def _all_rgb(dataset) -> bool:
    return all(row["image"].mode == "RGB" for row in dataset)


# ----- COCO -------------------------------------------------------------------------------------


def test_coco_splits_captions_and_features(tmp_path, coco, cache):
    root, images = coco
    dsd, report = _load_coco(tmp_path, root, images, cache, return_report=True)
    assert list(dsd) == ["train", "validation", "test"]
    assert {name: ds.num_rows for name, ds in dsd.items()} == {"train": 3, "validation": 2, "test": 1}
    for ds in dsd.values():
        assert ds.features == CAPTION_FEATURES
        assert _all_rgb(ds)
    row = dsd["train"][2]  # the restval image
    assert row["image_id"] == "1002"
    assert row["captions"] == ["A picture number 2.", "Second caption 2"]
    assert row["objects"] == []
    assert row["image"].size == (32, 24)
    assert dsd["test"]["image_id"] == ["1005"]
    assert isinstance(report, LoadReport)
    assert report.kept == {"train": 3, "validation": 2, "test": 1}
    assert report.skipped == [] and report.empty_captions == 0


def test_coco_image_bytes_are_the_file_bytes(tmp_path, coco, cache):
    root, images = coco
    dsd = _load_coco(tmp_path, root, images, cache, splits="test")
    raw = dsd["test"].cast_column("image", dsd["test"].features["image"].__class__(decode=False))[0]["image"]
    assert raw["bytes"] == (root / "val2014" / images[5]["filename"]).read_bytes()
    assert raw["path"] == f"val2014/{images[5]['filename']}"


def test_splits_argument_and_alias(tmp_path, coco, cache):
    root, images = coco
    dsd = _load_coco(tmp_path, root, images, cache, splits=["val", "test"])
    assert list(dsd) == ["validation", "test"]
    with pytest.raises(ValueError, match="unknown split"):
        _load_coco(tmp_path, root, images, cache, splits="dev")


def test_max_images_per_split(tmp_path, coco, cache):
    root, images = coco
    dsd = _load_coco(tmp_path, root, images, cache, max_images=1)
    assert {name: ds.num_rows for name, ds in dsd.items()} == {"train": 1, "validation": 1, "test": 1}
    assert dsd["validation"]["image_id"] == ["1003"]
    with pytest.raises(ValueError, match="max_images"):
        _load_coco(tmp_path, root, images, cache, max_images=-1)


def test_flat_image_folder_is_found(tmp_path, coco, cache):
    root, images = coco
    flat = tmp_path / "flat"
    for entry in images:
        _write(flat / entry["filename"], (root / entry["filepath"] / entry["filename"]).read_bytes())
    dsd = _load_coco(tmp_path, flat, images, cache)
    assert sum(ds.num_rows for ds in dsd.values()) == 6


@pytest.fixture
def coco_with_bad_files(coco):
    root, images = coco
    truncated = _jpeg(seed=50, size=(64, 64))
    bad = {
        "COCO_val2014_corrupt.jpg": np.random.default_rng(7).bytes(3000),
        "COCO_val2014_truncated.jpg": truncated[: len(truncated) // 2],
        "COCO_val2014_empty.jpg": b"",
    }
    for name, data in bad.items():
        _write(root / "val2014" / name, data)
    names = list(bad) + ["COCO_val2014_missing.jpg"]
    for j, name in enumerate(names):
        images.append(_coco_entry(100 + j, "val", "val2014", name, [f"bad {j}"]))
    return root, images


def test_bad_images_are_skipped_counted_and_reported(tmp_path, coco_with_bad_files, cache, caplog):
    root, images = coco_with_bad_files
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dsd, report = _load_coco(tmp_path, root, images, cache, return_report=True, num_workers=2)
    assert dsd["validation"].num_rows == 2
    assert report.kept["validation"] == 2
    assert report.num_skipped == 4
    assert report.skipped_by_reason() == {"not an image": 1, "truncated": 1, "empty file": 1, "missing": 1}
    by_id = {item.image_id: item for item in report.skipped}
    assert by_id["1103"].reason == "missing"
    assert by_id["1103"].path.endswith("COCO_val2014_missing.jpg")
    assert all(item.split == "validation" for item in report.skipped)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 4" in message
    assert "COCO_val2014_corrupt.jpg" in message and "1101" in message


def test_report_survives_the_cache(tmp_path, coco_with_bad_files, cache, caplog, monkeypatch):
    root, images = coco_with_bad_files
    caplog.set_level(logging.WARNING, logger=LOGGER)
    generated = []
    original = loaders._generate_rows

    def spy(job):
        generated.append(job.split)
        yield from original(job)

    monkeypatch.setattr(loaders, "_generate_rows", spy)
    _, first = _load_coco(tmp_path, root, images, cache, return_report=True)
    assert generated == ["train", "validation", "test"]
    dsd, second = _load_coco(tmp_path, root, images, cache, return_report=True)
    assert generated == ["train", "validation", "test"]  # nothing decoded again
    assert second == first and second.num_skipped == 4
    assert dsd["validation"].num_rows == 2
    assert sum("skipped 4" in r.getMessage() for r in caplog.records if r.name == LOGGER) == 2
    # a cached load with bad images still raises in raise mode
    with pytest.raises(BadImageError, match="image id"):
        _load_coco(tmp_path, root, images, cache, on_bad_image="raise")
    # repairing a file changes the fingerprint: the image is read again
    _write(root / "val2014" / "COCO_val2014_missing.jpg", _jpeg(seed=99))
    dsd, third = _load_coco(tmp_path, root, images, cache, return_report=True)
    assert dsd["validation"].num_rows == 3 and third.num_skipped == 3
    # Arrow files cached but their report lost: built again rather than reported as clean
    for report_file in (cache / "srd_hf_load_reports").iterdir():
        report_file.unlink()
    before = len(generated)
    _, fourth = _load_coco(tmp_path, root, images, cache, return_report=True)
    assert len(generated) == before + 3 and fourth == third


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("COCO_val2014_corrupt.jpg", "not an image"),
        ("COCO_val2014_truncated.jpg", "truncated"),
        ("COCO_val2014_missing.jpg", "missing"),
    ],
)
def test_raise_mode_names_the_item(tmp_path, coco_with_bad_files, cache, name, reason):
    root, images = coco_with_bad_files
    only = [e for e in images if e["filename"] == name]
    with pytest.raises(BadImageError) as info:
        _load_coco(tmp_path, root, only, cache, on_bad_image="raise")
    err = info.value
    assert err.reason == reason
    assert err.path.endswith(name)
    assert name in str(err) and f"'{only[0]['cocoid']}'" in str(err)


def test_all_bad_gives_empty_split_with_schema(tmp_path, coco_with_bad_files, cache):
    root, images = coco_with_bad_files
    only_bad = [e for e in images if e["cocoid"] >= 1100]
    for _ in range(2):  # second time from the cache
        dsd, report = _load_coco(tmp_path, root, only_bad, cache, return_report=True)
        assert {name: ds.num_rows for name, ds in dsd.items()} == {"train": 0, "validation": 0, "test": 0}
        assert dsd["validation"].features == CAPTION_FEATURES
        assert report.num_skipped == 4


def test_image_modes_sizes_all_kept_as_rgb(tmp_path, cache):
    root = tmp_path / "coco"
    i16 = Image.fromarray((np.arange(120, dtype=np.uint16).reshape(10, 12) * 500))
    files = {
        "gray.jpg": _encode(Image.new("L", (20, 10), 90), "JPEG"),
        "rgba.png": _encode(Image.new("RGBA", (12, 12), (0, 0, 255, 0)), "PNG"),
        "palette.png": _palette_png(),
        "sixteen.png": _encode(i16, "PNG"),
        "tiny.png": _encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
        "strip.jpg": _encode(_noise(2000, 3), "JPEG"),
        "tall.png": _encode(_noise(2, 900), "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
    }
    images = []
    for i, (name, data) in enumerate(files.items()):
        _write(root / "val2014" / name, data)
        images.append(_coco_entry(i, "test", "val2014", name, [f"image {name}"]))
    dsd, report = _load_coco(tmp_path, root, images, cache, splits="test", return_report=True)
    test = dsd["test"]
    assert test.num_rows == len(files) and report.num_skipped == 0
    assert _all_rgb(test)
    sizes = dict(zip(test["image_id"], (img.size for img in test["image"])))
    assert sizes["1004"] == (1, 1) and sizes["1005"] == (2000, 3) and sizes["1006"] == (2, 900)
    by_name = {name: test[i]["image"] for i, name in enumerate(files)}
    assert by_name["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent on white
    assert by_name["palette.png"].getpixel((0, 0)) == (255, 255, 255)
    assert by_name["palette.png"].getpixel((5, 5)) == (200, 10, 10)
    sixteen = np.asarray(by_name["sixteen.png"])
    assert sixteen.min() == 0 and sixteen.max() == round(119 * 500 * 255 / 65535)  # scaled, not clipped
    assert report.converted_to_rgb == 5  # gray, rgba, palette, 16-bit, cmyk


def test_embed_images_false_stores_paths_of_rgb_files(tmp_path, coco, cache):
    root, images = coco
    images.append(_coco_entry(9, "test", "val2014", "gray.png", ["gray"]))
    _write(root / "val2014" / "gray.png", _encode(Image.new("L", (4, 4), 3), "PNG"))
    dsd = _load_coco(tmp_path, root, images, cache, splits="test", embed_images=False)
    raw = dsd["test"].cast_column("image", dsd["test"].features["image"].__class__(decode=False))
    first, gray = raw[0]["image"], raw[1]["image"]
    assert first["bytes"] is None and first["path"] == str(root / "val2014" / images[5]["filename"])
    assert gray["bytes"] is not None  # converted to RGB, so stored as bytes
    assert _all_rgb(dsd["test"])


def test_empty_captions_removed_and_captionless_samples_skipped(tmp_path, coco, cache, caplog):
    root, images = coco
    images[0]["sentences"] = _sentences("", "   ")
    images[1]["sentences"] = _sentences("", "A kept caption", "\t")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dsd, report = _load_coco(tmp_path, root, images, cache, return_report=True)
    assert dsd["train"]["image_id"] == ["1001", "1002"]
    assert dsd["train"][0]["captions"] == ["A kept caption"]
    assert report.empty_captions == 4
    assert [(i.image_id, i.reason, i.path) for i in report.skipped] == [("1000", "no captions", None)]
    message = " ".join(r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert "no captions" in message and "4 empty captions" in message


def test_invalid_on_bad_image(tmp_path, coco, cache):
    root, images = coco
    with pytest.raises(ValueError, match="on_bad_image"):
        _load_coco(tmp_path, root, images, cache, on_bad_image="ignore")


@pytest.mark.parametrize("key", ["filename", "split", "sentences", "cocoid"])
def test_missing_key_names_entry_and_key(tmp_path, coco, cache, key):
    root, images = coco
    del images[3][key]
    with pytest.raises(AnnotationError) as info:
        _load_coco(tmp_path, root, images, cache)
    assert "images[3]" in str(info.value) and repr(key) in str(info.value)


def test_malformed_annotation_files(tmp_path, coco, cache):
    root, images = coco
    images[2]["sentences"] = [{"tokens_missing": True}]
    with pytest.raises(AnnotationError, match=r"images\[2\].*sentences\[0\].*'raw'"):
        _load_coco(tmp_path, root, images, cache)
    images[2]["sentences"] = _sentences("ok")
    images[4]["split"] = "dev"
    with pytest.raises(AnnotationError, match=r"images\[4\].*unknown split 'dev'"):
        _load_coco(tmp_path, root, images, cache)
    images[4]["split"] = "val"
    images[4]["cocoid"] = images[3]["cocoid"]
    with pytest.raises(AnnotationError, match=r"images\[4\].*already used by images\[3\]"):
        _load_coco(tmp_path, root, images, cache)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="not valid JSON"):
        load_coco_karpathy(bad, root, cache_dir=cache)
    bad.write_text('{"annotations": []}')
    with pytest.raises(AnnotationError, match="'images'"):
        load_coco_karpathy(bad, root, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="annotation file"):
        load_coco_karpathy(tmp_path / "nope.json", root, cache_dir=cache)


# ----- Flickr30k ----------------------------------------------------------------------------------


@pytest.fixture
def flickr(tmp_path):
    """Ten Flickr-like images named by number, five captions each."""
    root = tmp_path / "flickr30k-images"
    names = [f"{1000092795 + 17 * i}.jpg" for i in range(10)]
    for i, name in enumerate(names):
        _write(root / name, _jpeg(seed=200 + i, size=(20, 30)))
    captions = {name: [f"Caption {k} of {name}" for k in range(5)] for name in names}
    return root, names, captions


def test_flickr_karpathy_json(tmp_path, flickr, cache):
    root, names, captions = flickr
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    images = [
        {"filename": name, "imgid": i, "split": split, "sentids": [], "sentences": _sentences(*captions[name])}
        for i, (name, split) in enumerate(zip(names, splits))
    ]
    path = _save_json(tmp_path / "dataset_flickr30k.json", images, dataset="flickr30k")
    dsd, report = load_flickr30k(path, root, cache_dir=cache, progress=False, return_report=True)
    assert {name: ds.num_rows for name, ds in dsd.items()} == {"train": 6, "validation": 2, "test": 2}
    assert dsd["test"]["image_id"] == [n[:-4] for n in names[8:]]
    assert dsd["train"][0]["captions"] == captions[names[0]]
    assert dsd["train"].features == CAPTION_FEATURES and _all_rgb(dsd["train"])
    del images[4]["filename"]
    _save_json(path, images)
    with pytest.raises(AnnotationError, match=r"images\[4\] has no key 'filename'"):
        load_flickr30k(path, root, cache_dir=cache)


def _write_token_file(path, names, captions, extra_lines=()):
    lines = [f"{name}#{k}\t{c}" for name in names for k, c in enumerate(captions[name])]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


def test_flickr_token_file_deterministic_split(tmp_path, flickr, cache):
    root, names, captions = flickr
    token = _write_token_file(tmp_path / "results_20130124.token", names, captions)
    kwargs = dict(num_validation=2, num_test=3, cache_dir=cache, progress=False)
    a = load_flickr30k(token, root, split_seed=1, **kwargs)
    b = load_flickr30k(token, root, split_seed=1, **kwargs)
    c = load_flickr30k(token, root, split_seed=2, **kwargs)
    assert {name: ds.num_rows for name, ds in a.items()} == {"train": 5, "validation": 2, "test": 3}
    ids = {split: sorted(a[split]["image_id"]) for split in a}
    assert ids == {split: sorted(b[split]["image_id"]) for split in b}
    assert ids != {split: sorted(c[split]["image_id"]) for split in c}
    assert sorted(sum(ids.values(), [])) == sorted(n[:-4] for n in names)
    row = next(r for r in a["train"] if r["image_id"] == ids["train"][0])
    assert row["captions"] == captions[f"{row['image_id']}.jpg"]
    assert a["train"].features == CAPTION_FEATURES and _all_rgb(a["validation"])


def test_flickr_token_split_ignores_bad_images(tmp_path, flickr, cache, caplog):
    root, names, captions = flickr
    token = _write_token_file(tmp_path / "results_20130124.token", names, captions)
    kwargs = dict(num_validation=2, num_test=3, split_seed=0, cache_dir=cache, progress=False, return_report=True)
    good, _ = load_flickr30k(token, root, **kwargs)
    victim = good["test"][0]["image_id"]
    (root / f"{victim}.jpg").write_bytes(b"not a jpeg at all")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dsd, report = load_flickr30k(token, root, **kwargs)
    assert dsd["test"].num_rows == 2 and dsd["train"]["image_id"] == good["train"]["image_id"]
    assert [(i.split, i.image_id, i.reason) for i in report.skipped] == [("test", victim, "not an image")]
    assert any(f"{victim}.jpg" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_flickr_token_file_errors(tmp_path, flickr, cache):
    root, names, captions = flickr
    token = _write_token_file(tmp_path / "captions.token", names, captions)
    with pytest.raises(ValueError, match="cannot give"):
        load_flickr30k(token, root, num_validation=6, num_test=5, cache_dir=cache)
    _write_token_file(token, names, captions, extra_lines=["broken line without a tab"])
    with pytest.raises(AnnotationError, match="line 51"):
        load_flickr30k(token, root, num_validation=1, num_test=1, cache_dir=cache)


def test_flickr_token_empty_captions(tmp_path, flickr, cache):
    root, names, captions = flickr
    captions[names[0]] = ["", " "]
    captions[names[1]][2] = ""
    token = _write_token_file(tmp_path / "results.token", names, captions)
    dsd, report = load_flickr30k(
        token, root, num_validation=0, num_test=0, cache_dir=cache, progress=False, return_report=True
    )
    assert dsd["train"].num_rows == 9 and dsd["validation"].num_rows == 0
    assert report.empty_captions == 3
    assert [(i.image_id, i.reason) for i in report.skipped] == [(names[0][:-4], "no captions")]
    row = next(r for r in dsd["train"] if r["image_id"] == names[1][:-4])
    assert len(row["captions"]) == 4

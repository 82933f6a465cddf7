"""validate_captioning_dataset: every bad row named with its reason, nothing dropped silently."""

from __future__ import annotations

import io
import json
import struct
import zlib

import datasets
import numpy as np
import pytest
from PIL import Image

from srd_hf.data.schema import CAPTION_FEATURES
from srd_hf.data.validation import (
    CAPTION_NOT_TEXT,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    OVERSIZE,
    TOO_SMALL,
    UNDECODABLE_IMAGE,
    DatasetValidationError,
    validate_captioning_dataset,
)


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header (CRC fixed) claims ``width x height``."""
    data = bytearray(_encode(Image.new("RGB", (4, 4))))
    start = 8 + 8  # signature, then the IHDR length and type
    data[start : start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : start + 13])) & 0xFFFFFFFF
    data[start + 13 : start + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture
def rows(small_world_data):
    """Eight rows of the small world, images undecoded: {"bytes": ..., "path": None}."""
    raw = small_world_data["validation"].select(range(8)).cast_column("image", datasets.Image(decode=False))
    return raw.to_list()


def _dataset(rows, features=CAPTION_FEATURES) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows, features=features)


def _named(report) -> dict[int, str]:
    return {row.index: row.reason for row in report.bad}


def test_a_clean_dataset_passes_unchanged(small_world_data):
    split = small_world_data["validation"]
    out, report = validate_captioning_dataset(split)
    assert out is split
    assert report.ok and report.total == report.kept == len(split) and report.bad == []
    assert report.summary() == f"validated {len(split)} rows: all passed"
    assert report.settings["caption_column"] == "captions"
    json.dumps(report.to_dict())

    whole, report = validate_captioning_dataset(small_world_data)
    assert whole is small_world_data
    assert report.total == sum(len(s) for s in small_world_data.values())
    assert report.splits["train"] == {"total": len(small_world_data["train"]), "kept": len(small_world_data["train"])}


@pytest.fixture
def broken(rows):
    data = _encode(_noise(64, 64))
    rows[1]["image"] = {"bytes": b"these bytes are no image", "path": None}
    rows[2]["captions"] = ["", "   "]
    rows[3]["captions"] = None
    rows[4]["image"] = {"bytes": _encode(Image.new("RGB", (10, 30))), "path": None}
    rows[5]["image"] = {"bytes": _png_claiming(100_000, 100_000), "path": None}
    rows[6]["image"] = {"bytes": data[: len(data) // 2], "path": None}
    return _dataset(rows)


EXPECTED = {1: UNDECODABLE_IMAGE, 2: EMPTY_CAPTION, 3: MISSING_CAPTION, 4: TOO_SMALL, 5: OVERSIZE, 6: UNDECODABLE_IMAGE}


def test_skip_names_every_bad_row_and_counts_them(broken):
    out, report = validate_captioning_dataset(broken, min_side=20, on_bad="skip")
    assert _named(report) == EXPECTED
    by_index = {row.index: row for row in report.bad}
    assert by_index[1].image_id == "validation-000001"
    assert "not an image" in by_index[1].detail
    assert "10x30" in by_index[4].detail and "min_side=20" in by_index[4].detail
    assert "decompression-bomb" in by_index[5].detail
    assert report.counts() == {UNDECODABLE_IMAGE: 2, EMPTY_CAPTION: 1, MISSING_CAPTION: 1, TOO_SMALL: 1, OVERSIZE: 1}
    assert (report.total, report.kept, report.dropped) == (8, 2, 6)
    assert out["image_id"] == ["validation-000000", "validation-000007"]
    assert [img.size for img in out["image"]] == [broken[0]["image"].size, broken[7]["image"].size]
    summary = report.summary()
    assert "\n" not in summary and "kept 2" in summary and "2 undecodable image" in summary
    assert "row 1 (image_id 'validation-000001'): undecodable image" in summary
    listed = json.loads(json.dumps(report.to_dict()))
    assert listed["counts"][UNDECODABLE_IMAGE] == 2 and listed["bad"][0]["index"] == 1


def test_error_names_the_rows_the_reasons_and_the_counts(broken):
    with pytest.raises(DatasetValidationError) as info:
        validate_captioning_dataset(broken, min_side=20)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "6 of 8 rows are bad" in message
    assert "2 undecodable image" in message and "1 empty caption" in message and "1 missing caption" in message
    assert "row 1 (image_id 'validation-000001'): undecodable image" in message
    assert "row 2 (image_id 'validation-000002'): empty caption" in message
    assert "and 1 more" in message and "on_bad='skip'" in message
    assert _named(info.value.report) == EXPECTED


def test_missing_columns_raise_whatever_on_bad_says(small_world_data):
    split = small_world_data["validation"]
    for on_bad in ("error", "skip"):
        with pytest.raises(DatasetValidationError, match="caption/captions"):
            validate_captioning_dataset(split.remove_columns("captions"), on_bad=on_bad)
    with pytest.raises(DatasetValidationError, match="'picture'"):
        validate_captioning_dataset(split, image_column="picture")
    with pytest.raises(DatasetValidationError, match="'text'"):
        validate_captioning_dataset(split, caption_column="text")
    with pytest.raises(DatasetValidationError, match="not datasets.Image"):
        validate_captioning_dataset(datasets.Dataset.from_dict({"image": ["a.png"], "caption": ["a cat"]}))


def test_a_single_caption_column_is_found_and_checked(rows):
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    data = [{"image": row["image"], "caption": text} for row, text in zip(rows[:4], ["a cat", "", None, "a dog"])]
    out, report = validate_captioning_dataset(datasets.Dataset.from_list(data, features=features), on_bad="skip")
    assert report.settings["caption_column"] == "caption"
    assert _named(report) == {1: EMPTY_CAPTION, 2: MISSING_CAPTION}
    assert out["caption"] == ["a cat", "a dog"]
    assert all(row.image_id is None for row in report.bad)  # no image_id column: rows named by index
    assert "row 1: empty caption" in report.summary()

    numbers = datasets.Dataset.from_list([{"image": rows[0]["image"], "caption": 7}],
                                         features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("int64")}))
    _, report = validate_captioning_dataset(numbers, on_bad="skip")
    assert _named(report) == {0: CAPTION_NOT_TEXT}


def test_image_given_by_a_path_that_is_gone(rows, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_encode(_noise(40, 40)))
    rows[0]["image"] = {"bytes": None, "path": str(good)}
    rows[1]["image"] = {"bytes": None, "path": str(tmp_path / "gone.png")}
    rows[2]["image"] = None
    out, report = validate_captioning_dataset(_dataset(rows[:3]), on_bad="skip")
    assert _named(report) == {1: MISSING_IMAGE, 2: MISSING_IMAGE}
    assert "gone.png" in report.bad[0].detail
    assert out[0]["image"].size == (40, 40)


def test_oversize_is_downscaled_by_default(rows):
    rows[3]["image"] = {"bytes": _encode(_noise(5000, 100)), "path": None}
    ds = _dataset(rows)
    out, report = validate_captioning_dataset(ds)  # on_bad="error": oversize is no error here
    assert report.bad == [] and not report.ok and report.kept == 8
    (shrunk,) = report.downscaled
    assert (shrunk.index, shrunk.image_id) == (3, "validation-000003")
    assert shrunk.original_size == (5000, 100) and shrunk.new_size == (4096, 81)
    assert out[3]["image"].size == (4096, 81) and out[3]["image"].mode == "RGB"
    assert out["image_id"] == ds["image_id"] and out[0]["image"].size == ds[0]["image"].size
    assert out.features == ds.features
    assert "1 oversize images downscaled to fit max_side=4096" in report.summary()
    assert report.to_dict()["num_downscaled"] == 1


def test_oversize_by_pixel_count_keeps_the_aspect_ratio(rows):
    rows[0]["image"] = {"bytes": _encode(_noise(400, 100)), "path": None}
    out, report = validate_captioning_dataset(_dataset(rows[:2]), max_pixels=10_000)
    assert report.downscaled[0].new_size == (200, 50)
    assert out[0]["image"].size == (200, 50)


def test_oversize_skip_and_error(rows):
    rows[3]["image"] = {"bytes": _encode(_noise(5000, 100)), "path": None}
    ds = _dataset(rows)
    out, report = validate_captioning_dataset(ds, oversize="skip")  # dropped even though on_bad="error"
    assert _named(report) == {3: OVERSIZE} and "5000x100 exceeds max_side=4096" in report.bad[0].detail
    assert len(out) == 7 and "validation-000003" not in out["image_id"]
    with pytest.raises(DatasetValidationError) as info:
        validate_captioning_dataset(ds, oversize="error", on_bad="skip")  # raises even though on_bad="skip"
    message = str(info.value)
    assert "row 3 (image_id 'validation-000003'): oversize (5000x100 exceeds max_side=4096)" in message
    assert "oversize='downscale'" in message and "on_bad='skip'" not in message


def test_a_decompression_bomb_is_reported_not_raised(rows):
    rows[0]["image"] = {"bytes": _png_claiming(100_000, 100_000), "path": None}
    with pytest.raises(DatasetValidationError, match="row 0 .*oversize .*decompression-bomb"):
        validate_captioning_dataset(_dataset(rows[:2]))  # cannot be decoded, so not downscaled
    out, report = validate_captioning_dataset(_dataset(rows[:2]), on_bad="skip")
    assert _named(report) == {0: OVERSIZE} and len(out) == 1


def test_too_small_once_downscaled(rows):
    rows[0]["image"] = {"bytes": _encode(_noise(5000, 30)), "path": None}  # the world's images are 32 px
    _, report = validate_captioning_dataset(_dataset(rows[:2]), min_side=28, on_bad="skip")
    assert _named(report) == {0: TOO_SMALL} and "would be 4096x24" in report.bad[0].detail


def test_a_truncated_huge_jpeg_is_undecodable(rows):
    data = _encode(_noise(5000, 100), "JPEG")
    rows[0]["image"] = {"bytes": data[: len(data) // 2], "path": None}
    _, report = validate_captioning_dataset(_dataset(rows[:2]), on_bad="skip")
    assert _named(report) == {0: UNDECODABLE_IMAGE} and "truncated" in report.bad[0].detail


def test_a_rotated_jpeg_is_downscaled_the_way_it_is_shown(rows):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 100 x 5000, shown 5000 x 100
    rows[0]["image"] = {"bytes": _encode(_noise(100, 5000), "JPEG", exif=exif.tobytes()), "path": None}
    out, report = validate_captioning_dataset(_dataset(rows[:1]))
    assert report.downscaled[0].original_size == (5000, 100)
    assert out[0]["image"].size == report.downscaled[0].new_size == (4096, 81)


def test_dataset_dict_rows_are_named_by_split(small_world_data, rows):
    rows[2]["captions"] = [""]
    dsd = datasets.DatasetDict({"train": _dataset(rows), "test": small_world_data["test"]})
    with pytest.raises(DatasetValidationError, match=r"train/row 2 \(image_id 'validation-000002'\): empty caption"):
        validate_captioning_dataset(dsd)
    out, report = validate_captioning_dataset(dsd, on_bad="skip")
    assert out["test"] is small_world_data["test"] and len(out["train"]) == 7
    assert report.splits["train"] == {"total": 8, "kept": 7}


def test_bad_options():
    ds = datasets.Dataset.from_dict({"caption": ["a"]})
    with pytest.raises(ValueError, match="on_bad"):
        validate_captioning_dataset(ds, on_bad="drop")
    with pytest.raises(ValueError, match="oversize"):
        validate_captioning_dataset(ds, oversize="shrink")
    with pytest.raises(ValueError, match="min_side"):
        validate_captioning_dataset(ds, min_side=0)
    with pytest.raises(ValueError, match="larger than max_side"):
        validate_captioning_dataset(ds, min_side=500, max_side=100)
    with pytest.raises(TypeError):
        validate_captioning_dataset([{"image": None, "caption": "a"}])

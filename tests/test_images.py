"""open_image / read_image_file: verified, RGB, bad files named with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from srd_hf.data.images import BadImageError, ensure_rgb, open_image, read_image_file


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(size=(48, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


@pytest.fixture
def write(tmp_path):
    def _write(name: str, data: bytes):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return _write


def test_truncated_images_flag_is_not_set_globally():
    import srd_hf.data.loaders  # noqa: F401  (importing the loaders must not change it either)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_good_rgb_jpeg(write):
    path = write("ok.jpg", _encode(_noise(), "JPEG"))
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (48, 32)
    data, original = read_image_file(path)
    assert data == path.read_bytes() and original.mode == "RGB"


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda: Image.new("L", (9, 7), 128)),
        ("RGBA", lambda: Image.new("RGBA", (9, 7), (255, 0, 0, 0))),
        ("P", lambda: _palette_with_transparency()),
        ("I;16", lambda: Image.fromarray(np.arange(63, dtype=np.uint16).reshape(7, 9) * 1000)),
    ],
)
def test_other_modes_come_back_rgb(write, mode, make):
    image = make()
    assert image.mode.startswith(mode)
    path = write(f"img_{mode.replace(';', '')}.png", _encode(image, "PNG"))
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (9, 7)
    if mode == "RGBA":  # fully transparent: composited on white
        assert out.getpixel((0, 0)) == (255, 255, 255)
    if mode == "I;16":  # rescaled, not clipped to 255
        arr = np.asarray(out)[..., 0]
        assert arr.min() == 0 and arr.max() == 255


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (9, 7), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    return image


def test_palette_transparency_survives_png(write):
    path = write("p.png", _encode(_palette_with_transparency(), "PNG", transparency=0))
    out = open_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (10, 200, 30)


def test_tiny_and_huge_aspect(write):
    assert open_image(write("tiny.png", _encode(Image.new("RGB", (1, 1)), "PNG"))).size == (1, 1)
    assert open_image(write("strip.png", _encode(Image.new("RGB", (3000, 2)), "PNG"))).size == (3000, 2)


def test_exif_orientation_applied(write):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = write("rot.jpg", _encode(_noise((40, 20)), "JPEG", exif=exif.tobytes()))
    assert open_image(path).size == (20, 40)


def _bad(tmp_path, name: str, data: bytes | None):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(BadImageError) as info:
        open_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


def test_missing_file(tmp_path):
    assert _bad(tmp_path, "nope.jpg", None).reason == "missing"


def test_empty_file(tmp_path):
    assert _bad(tmp_path, "empty.jpg", b"").reason == "empty file"


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(1)
    err = _bad(tmp_path, "noise.jpg", rng.bytes(2000))
    assert err.reason == "not an image"
    assert "not an image" in str(err)


def test_text_file(tmp_path):
    assert _bad(tmp_path, "notes.png", b"just some text\n").reason == "not an image"


def test_directory(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(BadImageError) as info:
        open_image(tmp_path / "dir.jpg")
    assert info.value.reason == "unreadable"


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg(tmp_path, cut):
    data = _encode(_noise((64, 64)), "JPEG")
    err = _bad(tmp_path, "cut.jpg", data[: int(len(data) * cut)])
    assert err.reason == "truncated"


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_png(tmp_path, cut):
    data = _encode(_noise((64, 64)), "PNG")
    err = _bad(tmp_path, "cut.png", data[: int(len(data) * cut)])
    assert err.reason in {"truncated", "corrupt"}


def test_png_with_damaged_data_chunk(tmp_path):
    data = bytearray(_encode(_noise((64, 64)), "PNG"))
    data[len(data) // 2] ^= 0xFF
    assert _bad(tmp_path, "flip.png", bytes(data)).reason == "corrupt"


def test_ensure_rgb_unchanged_for_rgb():
    image = _noise()
    assert ensure_rgb(image) is image
    with pytest.raises(TypeError):
        ensure_rgb(np.zeros((2, 2, 3)))

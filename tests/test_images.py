"""open_image / read_image_file: verified, RGB, bad files named with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from srd_hf.data.images import (
    ALPHA_BACKGROUND,
    BadImageError,
    decode_image_bytes,
    ensure_rgb,
    open_image,
    probe_image_bytes,
    read_image_file,
)


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
    if mode == "I;16":  # scaled by 255/65535, not clipped to 255
        arr = np.asarray(out)[..., 0]
        assert arr.min() == 0 and arr.max() == round(62000 * 255 / 65535)


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


# ----- ensure_rgb, mode by mode -------------------------------------------------------------


def _pixels(image: Image.Image) -> np.ndarray:
    out = ensure_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def test_alpha_background_is_white():
    assert ALPHA_BACKGROUND == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "RGBa"])
def test_rgba_is_composited_on_white(mode):
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (200, 0, 0, 255))
    arr = _pixels(image if mode == "RGBA" else image.convert("RGBa"))
    assert tuple(arr[0, 0]) == (255, 255, 255)  # transparent black reads as the white background
    assert tuple(arr[0, 1]) == (200, 0, 0)


def test_half_transparent_pixel_is_blended_with_white():
    arr = _pixels(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert abs(int(arr[0, 0, 0]) - 127) <= 1


@pytest.mark.parametrize("mode", ["LA", "La", "PA"])
def test_greyscale_and_palette_alpha_are_composited_on_white(mode):
    if mode == "PA":  # index 0 is black, index 1 grey 60
        image = Image.new("PA", (2, 1), (0, 0))
        image.putpalette([0, 0, 0, 60, 60, 60] + [0] * (254 * 3))
        image.putpixel((1, 0), (1, 255))
    else:
        image = Image.new("LA", (2, 1), (0, 0))
        image.putpixel((1, 0), (60, 255))
        image = image.convert(mode)
    assert image.mode == mode
    arr = _pixels(image)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 1]) == (60, 60, 60)


def test_palette_and_rgb_with_a_transparent_colour():
    assert tuple(_pixels(_palette_with_transparency())[0, 0]) == (255, 255, 255)
    rgb = Image.new("RGB", (2, 1), (0, 0, 0))
    rgb.putpixel((1, 0), (9, 9, 9))
    rgb.info["transparency"] = (0, 0, 0)
    arr = _pixels(rgb)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 1]) == (9, 9, 9)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(mode):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # I;16
    if mode == "I":
        image = Image.fromarray(values.astype(np.int32))
    elif mode != "I;16":
        image = Image.frombytes(mode, (4, 1), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert image.mode == mode
    assert _pixels(image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_sixteen_bit_png_keeps_its_brightness(tmp_path):
    flat = Image.fromarray(np.full((3, 3), 30000, dtype=np.uint16))
    path = tmp_path / "flat16.png"
    flat.save(path)
    assert open_image(path).getpixel((1, 1)) == (117, 117, 117)  # 30000 * 255 / 65535, not black or white


def test_wide_integers_and_floats_are_stretched_or_scaled():
    wide = Image.fromarray(np.array([[-100000, 0, 100000]], dtype=np.int32))
    assert _pixels(wide)[0, :, 0].tolist() == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _pixels(unit)[0, :, 0].tolist() == [0, 128, 255]
    far = Image.fromarray(np.array([[10.0, 20.0, 30.0]], dtype=np.float32))
    assert _pixels(far)[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk():
    image = Image.new("CMYK", (3, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 255, 255, 0))
    image.putpixel((2, 0), (0, 0, 0, 255))
    arr = _pixels(image)
    assert [tuple(p) for p in arr[0]] == [(255, 255, 255), (255, 0, 0), (0, 0, 0)]


def test_cmyk_jpeg_file(write):
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    out = open_image(write("cmyk.jpg", _encode(image, "JPEG", quality=100)))
    r, g, b = out.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


# ----- the bytes-level readers ---------------------------------------------------------------


def test_probe_reads_the_header_only():
    data = _encode(_noise((64, 64)), "PNG")
    cut = data[: len(data) // 2]  # the header is intact, the pixels are not
    assert probe_image_bytes(cut, "half.png").size == (64, 64)
    with pytest.raises(BadImageError) as info:
        decode_image_bytes(cut, "half.png")
    assert info.value.reason in {"truncated", "corrupt"} and "half.png" in str(info.value)


def test_decode_bytes_names_the_reason():
    with pytest.raises(BadImageError) as info:
        decode_image_bytes(b"", "row 3")
    assert info.value.reason == "empty file" and "row 3" in str(info.value)
    with pytest.raises(BadImageError) as info:
        probe_image_bytes(b"not an image at all", "row 4")
    assert info.value.reason == "not an image"

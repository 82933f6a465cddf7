"""Image handling shared by loaders, models and attacks."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["ALPHA_BACKGROUND", "BadImageError", "decode_image_bytes", "ensure_rgb", "open_image", "probe_image_bytes", "read_image_file"]

PathLike = str | os.PathLike


class BadImageError(ValueError):
    """An image file that cannot be used: missing, empty, not an image, corrupt or truncated.

    ``path`` is the file, ``reason`` a short code (``"missing"``, ``"unreadable"``,
    ``"empty file"``, ``"not an image"``, ``"truncated"``, ``"corrupt"``, ``"too large"``) and
    ``detail`` what the underlying library said.
    """

    def __init__(self, path: PathLike, reason: str, detail: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        message = f"bad image file {self.path!r}: {reason}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    def __reduce__(self):  # keep the three fields when pickled (e.g. across processes)
        return (type(self), (self.path, self.reason, self.detail))


#: what a transparent pixel becomes: white, the way a transparent PNG shows on a white page.
#: Every stage converts through :func:`ensure_rgb`, so training, attacks, the defense and the
#: evaluation see the same pixels for the same file.
ALPHA_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MAX = 65535


def ensure_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as an 8-bit RGB image; an RGB image without transparency comes back as is.

    One conversion for every stage, because Pillow's own ``convert("RGB")`` drops alpha
    (transparent pixels turn into whatever colour they hide, often black) and clips 16-bit
    greyscale at 255 (almost every pixel white). Here:

    * alpha (RGBA, LA, PA, premultiplied RGBa/La, and P, L or RGB with a ``transparency``
      entry) is composited on :data:`ALPHA_BACKGROUND`, white;
    * 16-bit greyscale (``I;16`` and its byte orders) is scaled by 255/65535, so the bit depth
      drops and the brightness stays (65535 -> 255, 32896 -> 128);
    * ``I`` (32-bit integers) holding values in 0..65535 is read as 16-bit samples, which is
      what 16-bit PNG and TIFF files decode to in some Pillow versions; other ``I`` images and
      ``F`` (floats) have no fixed depth: ``F`` within 0..1 is scaled by 255, anything else has
      its own range stretched to 0..255;
    * CMYK, YCbCr, LAB, HSV, L and 1 use Pillow's conversion.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        if mode == "La":  # Pillow has no direct La -> RGBA conversion
            image, mode = image.convert("LA"), "LA"
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_greyscale_to_8bit(np.asarray(image), mode), mode="L").convert("RGB")
    return image.convert("RGB")


def _greyscale_to_8bit(data: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16") or (mode == "I" and data.size and data.min() >= 0 and data.max() <= _SIXTEEN_BIT_MAX):
        wide = data.astype(np.uint32)
        return ((wide * 255 + _SIXTEEN_BIT_MAX // 2) // _SIXTEEN_BIT_MAX).astype(np.uint8)
    data = data.astype(np.float64)
    if not data.size:
        return data.astype(np.uint8)
    lo, hi = float(data.min()), float(data.max())
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        return np.rint(data * 255.0).astype(np.uint8)
    if hi == lo:  # a flat image whose level has no scale: black
        return np.zeros(data.shape, dtype=np.uint8)
    return np.rint((data - lo) / (hi - lo) * 255.0).astype(np.uint8)


_warned_truncated_flag = False


def _warn_if_truncation_check_disabled() -> None:
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by some other code: truncated image "
            "files will load without an error and cannot be detected"
        )


def _classify_os_error(err: OSError) -> str:
    text = str(err).lower()
    if "truncated" in text or "premature end" in text or "broken data stream" in text:
        return "truncated"
    return "corrupt"


@contextlib.contextmanager
def _as_bad_image(name: PathLike):
    """Turns what PIL raises for a bad image into :class:`BadImageError` naming ``name``."""
    try:
        with warnings.catch_warnings():
            # an image between MAX_IMAGE_PIXELS and twice that only warns; keep it quiet
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError as err:
        raise BadImageError(name, "not an image", "no image format recognises it") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(name, "too large", str(err)) from err
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as err:
        # PIL's plugins signal malformed headers/chunks with these
        raise BadImageError(name, "corrupt", str(err) or type(err).__name__) from err
    except OSError as err:
        raise BadImageError(name, _classify_os_error(err), str(err)) from err


def probe_image_bytes(data: bytes, name: PathLike = "<bytes>") -> Image.Image:
    """The image in ``data`` opened lazily: format, mode and size come from the header alone.

    Cheap enough for a pass over a whole dataset before anything is decoded, and the place
    where a file claiming more pixels than PIL's decompression-bomb limit stops (reason
    ``"too large"``). Raises :class:`BadImageError` naming ``name``.
    """
    if not data:
        raise BadImageError(name, "empty file", "0 bytes")
    with _as_bad_image(name):
        return Image.open(io.BytesIO(data))


def decode_image_bytes(
    data: bytes, name: PathLike = "<bytes>", draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """The image in ``data``, checked and fully decoded, in its own mode.

    :meth:`PIL.Image.Image.verify` checks the chunk checksums where the format has them and
    ``load()`` decodes every pixel, so a truncated or damaged image fails here instead of in
    the middle of training. Raises :class:`BadImageError` naming ``name`` and the reason.

    ``draft_size``: a JPEG is decoded at the smallest of its built-in scales (1/2, 1/4, 1/8)
    that still covers this size, which makes checking or shrinking a huge photo cheap; every
    byte is still read, so truncation is still caught. Other formats ignore it.
    """
    if not data:
        raise BadImageError(name, "empty file", "0 bytes")
    _warn_if_truncation_check_disabled()
    with _as_bad_image(name):
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        if draft_size is not None and image.format == "JPEG":
            image.draft(None, draft_size)
        image.load()
    return image


def read_image_file(path: PathLike) -> tuple[bytes, Image.Image]:
    """The raw bytes of an image file and the fully decoded image, in its own mode.

    The file is read once; the bytes are checked with :meth:`PIL.Image.Image.verify` (chunk
    checksums where the format has them) and then decoded completely with ``load()``, so a
    truncated or damaged file fails here instead of in the middle of training.  Raises
    :class:`BadImageError` naming the path and the reason.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise BadImageError(path, "missing", "no such file") from err
    except IsADirectoryError as err:
        raise BadImageError(path, "unreadable", "is a directory") from err
    except OSError as err:
        raise BadImageError(path, "unreadable", str(err)) from err
    return data, decode_image_bytes(data, path)


def open_image(path: PathLike) -> Image.Image:
    """Open, verify and fully decode an image file; RGB, EXIF orientation applied.

    This is what a caption dataset built by :mod:`srd_hf.data.loaders` gives back for the
    same file.  Raises :class:`BadImageError` (a ``ValueError``) naming the path and the
    reason for a missing, empty, corrupt, truncated or non-image file.
    """
    _, image = read_image_file(path)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # a broken EXIF block: keep the pixels as stored
        logger.debug("ignoring unreadable EXIF orientation of %s: %s", path, err)
    return ensure_rgb(image)

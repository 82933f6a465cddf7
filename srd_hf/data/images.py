"""Image handling shared by loaders, models and attacks."""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["BadImageError", "ensure_rgb", "open_image", "read_image_file"]

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


def ensure_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, CMYK...) as RGB; alpha is composited on white."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit greyscale: rescale to 8 bits instead of clipping
        data = np.asarray(image, dtype=np.float64)
        lo, hi = float(data.min()), float(data.max())
        scaled = np.zeros_like(data) if hi == lo else (data - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


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
    if not data:
        raise BadImageError(path, "empty file", "0 bytes")
    _warn_if_truncation_check_disabled()
    try:
        with warnings.catch_warnings():
            # an image between MAX_IMAGE_PIXELS and twice that only warns; keep it quiet
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError as err:
        raise BadImageError(path, "not an image", "no image format recognises it") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(path, "too large", str(err)) from err
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as err:
        # PIL's plugins signal malformed headers/chunks with these
        raise BadImageError(path, "corrupt", str(err) or type(err).__name__) from err
    except OSError as err:
        raise BadImageError(path, _classify_os_error(err), str(err)) from err
    return data, image


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

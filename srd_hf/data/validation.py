"""Validate first: one pass over a captioning dataset before any expensive stage.

Pretraining, planting a backdoor, training a masking policy and evaluating all decode every
image many times. A corrupt file, a blank caption or a 20,000 px scan found there costs the
time already spent and ends in a stack trace far from its cause.
:func:`validate_captioning_dataset` looks at every row once, up front, and names each bad row
(its index, its ``image_id`` where the dataset has one) with the reason:

==================  =====================================================================
reason              what it means
==================  =====================================================================
missing image       no image in the row, or a path to a file that is not there
undecodable image   empty bytes, not an image, corrupt or truncated (the detail says which)
missing caption     the caption is ``None``
empty caption       a blank caption; for a list of captions: not one with text
caption not text    the caption is neither a string nor a list of strings
too small           the shorter side is below ``min_side`` (the defense's largest mask must
                    fit inside the image)
oversize            a side above ``max_side`` or more pixels than ``max_pixels``, or more
                    than PIL's decompression-bomb limit (never decoded)
==================  =====================================================================

A row can be named for more than one reason. A missing column is not a row's fault: it
raises at once, whatever ``on_bad`` says, since no row could be judged.

Nothing is dropped silently: bad rows either raise a :class:`DatasetValidationError` listing
the first of them and the count per reason (``on_bad="error"``), or are left out of the
returned dataset and listed in the :class:`ValidationReport` (``on_bad="skip"``), whose
:meth:`~ValidationReport.summary` is logged as a warning. Oversize images have their own
choice, ``oversize``: ``"downscale"`` (the default) shrinks them to fit in the returned
dataset and lists them, ``"skip"`` drops them, ``"error"`` raises.

Memory stays flat: the image column is read undecoded (``datasets.Image(decode=False)``) a
batch at a time, sizes come from the image header, and each image is decoded to check its
pixels and dropped at once.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import math
from pathlib import Path
from typing import Any, Literal

import datasets
from PIL import ExifTags, Image, ImageOps

from .images import BadImageError, decode_image_bytes, ensure_rgb, probe_image_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "BadRow",
    "DatasetValidationError",
    "DownscaledRow",
    "ValidationReport",
    "validate_captioning_dataset",
]

MISSING_IMAGE = "missing image"
UNDECODABLE_IMAGE = "undecodable image"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_TEXT = "caption not text"
TOO_SMALL = "too small"
OVERSIZE = "oversize"

#: the default ``max_side``: larger than any captioning model's input, small enough to decode
DEFAULT_MAX_SIDE = 4096
#: how many bad rows an error message and a summary name
NAMED_ROWS = 5
_DETAIL_CHARS = 160

OnBad = Literal["error", "skip"]
Oversize = Literal["downscale", "skip", "error"]


class DatasetValidationError(ValueError):
    """A dataset that did not pass; ``report`` holds every bad row (``None`` for a missing column)."""

    def __init__(self, message: str, report: ValidationReport | None = None):
        super().__init__(message)
        self.report = report


# ----- the report ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadRow:
    """One problem of one row: its index in the dataset (or split) given, and why."""

    index: int
    reason: str
    detail: str = ""
    image_id: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        where = f"{self.split}/" if self.split is not None else ""
        name = f" (image_id {self.image_id!r})" if self.image_id is not None else ""
        detail = self.detail if len(self.detail) <= _DETAIL_CHARS else self.detail[: _DETAIL_CHARS - 3] + "..."
        return f"{where}row {self.index}{name}: {self.reason}" + (f" ({detail})" if detail else "")


@dataclasses.dataclass(frozen=True)
class DownscaledRow:
    """An oversize image that the returned dataset holds shrunk to fit the limits."""

    index: int
    original_size: tuple[int, int]
    new_size: tuple[int, int]
    image_id: str | None = None
    split: str | None = None


@dataclasses.dataclass
class ValidationReport:
    """What one validation pass found; ``to_dict()`` goes into a run's ``results.json``."""

    #: rows looked at, and rows in the returned dataset
    total: int = 0
    kept: int = 0
    #: every problem found, in row order (dropped rows, or the rows behind the error)
    bad: list[BadRow] = dataclasses.field(default_factory=list)
    downscaled: list[DownscaledRow] = dataclasses.field(default_factory=list)
    #: the options of the pass (columns, limits, policies), so a report says what it checked
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: per split of a DatasetDict: {"total": n, "kept": n}
    splits: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.total - self.kept

    @property
    def ok(self) -> bool:
        """True when every row passed as it was (nothing dropped, nothing downscaled)."""
        return not self.bad and not self.downscaled

    def counts(self) -> dict[str, int]:
        """Problems per reason, most frequent first."""
        return dict(collections.Counter(row.reason for row in self.bad).most_common())

    def summary(self) -> str:
        """One line for a log or a terminal."""
        if self.ok:
            return f"validated {self.total} rows: all passed"
        text = f"validated {self.total} rows: kept {self.kept}"
        if self.bad:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts().items())
            text += f", {self.dropped} dropped ({reasons}): " + _first(self.bad)
        if self.downscaled:
            limits = ", ".join(f"{k}={self.settings[k]}" for k in ("max_side", "max_pixels") if self.settings.get(k))
            text += f"; {len(self.downscaled)} oversize images downscaled to fit {limits}"
        return text

    def to_dict(self, max_rows: int | None = 1000) -> dict[str, Any]:
        """JSON-ready; at most ``max_rows`` bad and downscaled rows are listed (counts are complete)."""
        listed = self.bad if max_rows is None else self.bad[:max_rows]
        shrunk = self.downscaled if max_rows is None else self.downscaled[:max_rows]
        return {
            "total": self.total,
            "kept": self.kept,
            "dropped": self.dropped,
            "counts": self.counts(),
            "num_downscaled": len(self.downscaled),
            "bad": [dataclasses.asdict(row) for row in listed],
            "bad_listed": len(listed),
            "downscaled": [dataclasses.asdict(row) for row in shrunk],
            "settings": dict(self.settings),
            "splits": {k: dict(v) for k, v in self.splits.items()},
        }


def _first(rows: list[BadRow]) -> str:
    text = "; ".join(str(row) for row in rows[:NAMED_ROWS])
    if len(rows) > NAMED_ROWS:
        text += f"; and {len(rows) - NAMED_ROWS} more"
    return text


# ----- checks of one row --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Limits:
    min_side: int | None
    max_side: int | None
    max_pixels: int | None
    oversize: str

    def scale(self, width: int, height: int) -> float:
        """The factor that brings ``width x height`` within the limits (1.0: within already)."""
        factor = 1.0
        if self.max_side and max(width, height) > self.max_side:
            factor = min(factor, self.max_side / max(width, height))
        if self.max_pixels and width * height > self.max_pixels:
            factor = min(factor, math.sqrt(self.max_pixels / (width * height)))
        return factor

    def describe(self, width: int, height: int) -> str:
        over = []
        if self.max_side and max(width, height) > self.max_side:
            over.append(f"max_side={self.max_side}")
        if self.max_pixels and width * height > self.max_pixels:
            over.append(f"max_pixels={self.max_pixels}")
        return f"{width}x{height} exceeds " + " and ".join(over)


def _scaled(size: tuple[int, int], factor: float) -> tuple[int, int]:
    return tuple(max(1, math.floor(side * factor)) for side in size)  # type: ignore[return-value]


def _caption_problem(value: Any) -> tuple[str, str] | None:
    if value is None:
        return MISSING_CAPTION, ""
    if isinstance(value, str):
        return (EMPTY_CAPTION, "blank") if not value.strip() else None
    if isinstance(value, (list, tuple)):
        if any(isinstance(c, str) and c.strip() for c in value):
            return None
        others = sorted({type(c).__name__ for c in value if c is not None and not isinstance(c, str)})
        if others:
            return CAPTION_NOT_TEXT, f"a list of {', '.join(others)}"
        return EMPTY_CAPTION, f"{len(value)} captions, none with text"
    return CAPTION_NOT_TEXT, type(value).__name__


def _image_bytes(value: Any) -> tuple[bytes | None, str | None, tuple[str, str] | None]:
    """(bytes, path, problem) of an undecoded ``datasets.Image`` value."""
    if value is None:
        return None, None, (MISSING_IMAGE, "no image in the row")
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        return data, path, None
    if not path:
        return None, None, (MISSING_IMAGE, "neither bytes nor a path")
    try:
        return Path(path).read_bytes(), path, None
    except FileNotFoundError:
        return None, path, (MISSING_IMAGE, f"no file {path}")
    except OSError as err:
        return None, path, (UNDECODABLE_IMAGE, f"unreadable {path}: {err}")


def _image_problem(data: bytes, name: str, limits: _Limits) -> tuple[tuple[str, str] | None, float]:
    """(problem, downscale factor) of one image's bytes; factor 1.0 when it fits."""
    try:
        header = probe_image_bytes(data, name)
    except BadImageError as err:
        if err.reason == "too large":
            return (OVERSIZE, f"beyond PIL's decompression-bomb limit, not decoded: {err.detail}"), 1.0
        return (UNDECODABLE_IMAGE, f"{err.reason}: {err.detail}" if err.detail else err.reason), 1.0
    width, height = header.size
    if limits.min_side and min(width, height) < limits.min_side:
        return (TOO_SMALL, f"{width}x{height}, shorter side below min_side={limits.min_side}"), 1.0
    factor = limits.scale(width, height)
    if factor < 1.0 and limits.oversize != "downscale":
        return (OVERSIZE, limits.describe(width, height)), 1.0  # not decoded: it is dropped or fatal
    if factor < 1.0 and limits.min_side and min(_scaled((width, height), factor)) < limits.min_side:
        new = _scaled((width, height), factor)
        return (TOO_SMALL, f"{width}x{height} downscaled to fit would be {new[0]}x{new[1]}, "
                           f"shorter side below min_side={limits.min_side}"), 1.0
    try:
        decode_image_bytes(data, name, _scaled((width, height), factor) if factor < 1.0 else None)
    except BadImageError as err:
        return (UNDECODABLE_IMAGE, f"{err.reason}: {err.detail}" if err.detail else err.reason), 1.0
    return None, factor


# ----- the pass -----------------------------------------------------------------------------


def _resolve_columns(ds: datasets.Dataset, image_column: str, caption_column: str | None) -> str:
    columns = ds.column_names
    missing = [c for c in (image_column,) if c not in columns]
    if caption_column is None:
        caption_column = next((c for c in ("captions", "caption") if c in columns), None)
        if caption_column is None:
            missing.append("caption/captions")
    elif caption_column not in columns:
        missing.append(caption_column)
    if missing:
        raise DatasetValidationError(
            f"dataset validation failed: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"the dataset has {columns} (pass image_column= / caption_column= to name others)"
        )
    feature = ds.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise DatasetValidationError(
            f"dataset validation failed: column {image_column!r} is {feature}, not datasets.Image; "
            f"cast it first: dataset.cast_column({image_column!r}, datasets.Image())"
        )
    return caption_column


def _scan(ds, split, image_column, caption_column, id_column, limits, batch_size):
    """Every problem of one split, and the downscale factor of each oversize row."""
    problems: list[BadRow] = []
    factors: dict[int, float] = {}
    columns = [image_column, caption_column] + ([id_column] if id_column and id_column in ds.column_names else [])
    raw = ds.cast_column(image_column, datasets.Image(decode=False)).select_columns(columns)
    index = 0
    for batch in raw.iter(batch_size=batch_size):
        ids = batch[id_column] if id_column in columns else [None] * len(batch[image_column])
        for image, caption, row_id in zip(batch[image_column], batch[caption_column], ids):
            image_id = None if row_id is None else str(row_id)
            found = []
            caption_problem = _caption_problem(caption)
            if caption_problem:
                found.append(caption_problem)
            data, path, problem = _image_bytes(image)
            if problem is None:
                problem, factor = _image_problem(data, path or f"row {index}", limits)
                if problem is None and factor < 1.0:
                    factors[index] = factor
            if problem:
                found.append(problem)
            problems.extend(BadRow(index, reason, detail, image_id, split) for reason, detail in found)
            index += 1
    return problems, factors, index


def _is_fatal(row: BadRow, on_bad: str, oversize: str) -> bool:
    if row.reason == OVERSIZE and oversize != "downscale":
        return oversize == "error"
    return on_bad == "error"  # undecodable oversize images under "downscale" count as bad rows


def _downscale_value(value: dict, factor: float, name: str) -> tuple[dict, tuple[int, int], tuple[int, int]]:
    """The image shrunk by ``factor`` with its EXIF orientation applied (as ``datasets``
    decodes it), in RGB through :func:`ensure_rgb` (which every stage applies anyway); a JPEG
    stays JPEG (quality 95), anything else becomes PNG. Returns (value, old size, new size)."""
    data, _, _ = _image_bytes(value)
    stored = probe_image_bytes(data, name).size
    image = decode_image_bytes(data, name, _scaled(stored, factor))
    fmt = "JPEG" if image.format == "JPEG" else "PNG"
    turned = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)  # a quarter turn swaps the sides
    original = stored[::-1] if turned else stored
    small = ensure_rgb(ImageOps.exif_transpose(image)).resize(
        _scaled(original, factor), Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    buffer = io.BytesIO()
    small.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return {"bytes": buffer.getvalue(), "path": None}, original, small.size


def _rebuild(ds, image_column, id_column, split, drop: set[int], factors: dict[int, float], batch_size):
    """The split without the dropped rows and with the oversize images shrunk."""
    shrunk: list[DownscaledRow] = []
    out = ds
    if factors:
        feature = ds.features[image_column]
        raw = ds.cast_column(image_column, datasets.Image(decode=False))
        has_ids = id_column in ds.column_names if id_column else False

        def shrink(batch, indices):
            images = list(batch[image_column])
            for j, index in enumerate(indices):
                if index in factors and index not in drop:
                    images[j], original, new = _downscale_value(images[j], factors[index], f"row {index}")
                    image_id = str(batch[id_column][j]) if has_ids and batch[id_column][j] is not None else None
                    shrunk.append(DownscaledRow(index, original, new, image_id, split))
            return {image_column: images}

        out = raw.map(shrink, with_indices=True, batched=True, batch_size=batch_size, features=raw.features,
                      desc="downscaling oversize images", load_from_cache_file=False)
        out = out.cast_column(image_column, feature)
    if drop:
        out = out.select([i for i in range(len(ds)) if i not in drop])
    return out, shrunk


def validate_captioning_dataset(
    dataset: datasets.Dataset | datasets.DatasetDict,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    id_column: str | None = "image_id",
    min_side: int | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    max_pixels: int | None = None,
    on_bad: OnBad = "error",
    oversize: Oversize = "downscale",
    batch_size: int = 64,
) -> tuple[datasets.Dataset | datasets.DatasetDict, ValidationReport]:
    """Check every row of a captioning dataset once; return it (fixed as asked) and a report.

    ``caption_column`` defaults to ``"captions"`` (this project's schema) or ``"caption"``,
    whichever the dataset has; ``id_column`` names rows in messages when present. ``min_side``
    is the smallest side an image may have (for SRD: the largest mask, which the caller
    knows); ``max_side`` and ``max_pixels`` bound the size (``None`` turns a limit off).

    ``on_bad="error"`` raises :class:`DatasetValidationError` (a ``ValueError``) after the pass,
    naming the first bad rows with their reasons and the count per reason;
    ``on_bad="skip"`` leaves them out. ``oversize`` decides for images above the limits:
    ``"downscale"`` keeps them shrunk to fit (aspect ratio kept), ``"skip"`` drops them and
    ``"error"`` raises. A dataset that passes comes back as the same object. For a
    ``DatasetDict`` every split is checked and rows are named ``split/row i``.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    if oversize not in ("downscale", "skip", "error"):
        raise ValueError(f"oversize must be 'downscale', 'skip' or 'error', got {oversize!r}")
    for name, value in (("min_side", min_side), ("max_side", max_side), ("max_pixels", max_pixels)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if min_side and max_side and min_side > max_side:
        raise ValueError(f"min_side={min_side} is larger than max_side={max_side}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    if isinstance(dataset, datasets.DatasetDict):
        splits = dict(dataset.items())
    elif isinstance(dataset, datasets.Dataset):
        splits = {None: dataset}
    else:
        raise TypeError(f"expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")

    limits = _Limits(min_side, max_side, max_pixels, oversize)
    caption_columns = {split: _resolve_columns(ds, image_column, caption_column) for split, ds in splits.items()}
    report = ValidationReport(settings={
        "image_column": image_column,
        "caption_column": caption_column or next(iter(caption_columns.values()), None),
        "id_column": id_column, "min_side": min_side, "max_side": max_side, "max_pixels": max_pixels,
        "on_bad": on_bad, "oversize": oversize,
    })
    scans = {}
    for split, ds in splits.items():
        problems, factors, total = _scan(ds, split, image_column, caption_columns[split], id_column, limits, batch_size)
        scans[split] = (problems, factors)
        report.bad.extend(problems)
        report.total += total
        if split is not None:
            report.splits[split] = {"total": total}

    fatal = [row for row in report.bad if _is_fatal(row, on_bad, oversize)]
    if fatal:
        report.kept = report.total - len({(row.split, row.index) for row in report.bad})
        reasons = ", ".join(f"{n} {reason}" for reason, n in collections.Counter(r.reason for r in fatal).most_common())
        rows = len({(row.split, row.index) for row in fatal})
        hints = []
        if any(row.reason != OVERSIZE or oversize == "downscale" for row in fatal):
            hints.append("Pass on_bad='skip' to drop the bad rows (the report lists them).")
        if any(row.reason == OVERSIZE and oversize == "error" for row in fatal):
            hints.append("Pass oversize='downscale' to shrink oversize images, or oversize='skip' to drop them.")
        raise DatasetValidationError(
            f"dataset validation failed: {rows} of {report.total} rows are bad ({reasons}): {_first(fatal)}. "
            + " ".join(hints),
            report,
        )

    outputs = {}
    for split, ds in splits.items():
        problems, factors = scans[split]
        drop = {row.index for row in problems}
        if not drop and not factors:
            outputs[split] = ds
        else:
            outputs[split], shrunk = _rebuild(ds, image_column, id_column, split, drop, factors, batch_size)
            report.downscaled.extend(shrunk)
        if split is not None:
            report.splits[split]["kept"] = len(outputs[split])
        report.kept += len(outputs[split])

    (logger.info if report.ok else logger.warning)("%s", report.summary())
    if isinstance(dataset, datasets.Dataset):
        return outputs[None], report
    if all(outputs[split] is ds for split, ds in splits.items()):
        return dataset, report
    return datasets.DatasetDict(outputs), report

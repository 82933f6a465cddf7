"""COCO and Flickr30k caption datasets from local files, in the project's row schema.

Both loaders return a :class:`datasets.DatasetDict` with the splits ``train``,
``validation`` and ``test`` (or those asked for) and the features
:data:`srd_hf.data.schema.CAPTION_FEATURES`:

* COCO: the Karpathy split file ``dataset_coco.json`` plus the ``train2014``/``val2014``
  image folders (``restval`` goes to ``train``, ``val`` to ``validation``);
* Flickr30k: the Karpathy ``dataset_flickr30k.json``, or the original caption file
  ``results_20130124.token``, which has no split: a seeded, deterministic one is made.

Every image is read and fully decoded before it is included, so a missing, corrupt or
truncated file never reaches training.  Images whose mode is not RGB (greyscale, RGBA,
palette, 16-bit, CMYK...) are converted with :func:`~srd_hf.data.images.ensure_rgb` and
stored as PNG, so every row decodes to an RGB image; RGB files are stored as they are.

The skip report
---------------
Nothing is dropped silently.  With ``on_bad_image="skip"`` (the default), unusable images
are skipped, and so are samples without a single non-empty caption (blank captions are
removed from every sample and counted).  Every load logs a warning on the
``srd_hf.data.loaders`` logger with the counts and the first few skipped items, and
``return_report=True`` makes the loader return ``(dataset_dict, report)`` where
``report`` is a :class:`LoadReport` listing each skipped item with its reason.  With
``on_bad_image="raise"`` the first unusable image raises
:class:`~srd_hf.data.images.BadImageError` naming the file and the image id.

Results are cached (``cache_dir``, the ``datasets`` cache by default) under a fingerprint
of the annotations, the image files' sizes and modification times and the options; a
second call with the same inputs reuses the Arrow files and the stored report instead of
decoding every image again.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import random
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import datasets
from PIL import ImageOps
from tqdm.auto import tqdm

from .images import BadImageError, ensure_rgb, read_image_file
from .schema import CAPTION_FEATURES, SPLITS

logger = logging.getLogger(__name__)

__all__ = [
    "AnnotationError",
    "LoadReport",
    "SkippedItem",
    "load_coco_karpathy",
    "load_flickr30k",
]

PathLike = str | os.PathLike
OnBadImage = Literal["skip", "raise"]

#: bump when what a row holds for the same inputs changes, so old caches are not reused
_CACHE_VERSION = "2"  # 2: 16-bit greyscale scaled by 255/65535 instead of stretched
_REPORT_DIR = "srd_hf_load_reports"
#: how many skipped items the warning names
_NAMES_IN_WARNING = 5

_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
NO_CAPTIONS = "no captions"


class AnnotationError(ValueError):
    """A caption/annotation file that does not have the expected structure."""


# ----- the report ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SkippedItem:
    """One sample left out of the dataset, and why."""

    split: str
    image_id: str
    #: the image file (``None`` when the sample was dropped before its image was looked at)
    path: str | None
    #: ``"no captions"`` or a :class:`~srd_hf.data.images.BadImageError` reason
    #: (``"missing"``, ``"empty file"``, ``"not an image"``, ``"corrupt"``, ``"truncated"``...)
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.split}/{self.image_id}{where}: {self.reason}"


@dataclasses.dataclass
class LoadReport:
    """What a loader kept, skipped and changed; returned with ``return_report=True``."""

    source: str
    #: rows in each split of the returned dataset
    kept: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[SkippedItem] = dataclasses.field(default_factory=list)
    #: blank captions removed (from kept and from skipped samples)
    empty_captions: int = 0
    #: images stored after a conversion to RGB (greyscale, RGBA, palette, 16-bit...)
    converted_to_rgb: int = 0

    @property
    def num_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(collections.Counter(item.reason for item in self.skipped))

    def summary(self) -> str:
        kept = ", ".join(f"{split} {n}" for split, n in self.kept.items())
        text = f"{self.source}: kept {self.num_kept} images ({kept})"
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_by_reason().items()))
            first = "; ".join(str(item) for item in self.skipped[:_NAMES_IN_WARNING])
            more = f"; and {self.num_skipped - _NAMES_IN_WARNING} more" if self.num_skipped > _NAMES_IN_WARNING else ""
            text += f"; skipped {self.num_skipped} ({reasons}): {first}{more}"
        if self.empty_captions:
            text += f"; removed {self.empty_captions} empty captions"
        if self.converted_to_rgb:
            text += f"; converted {self.converted_to_rgb} images to RGB"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        data = dict(data)
        data["skipped"] = [SkippedItem(**item) for item in data.get("skipped", [])]
        return cls(**data)

    def _merge(self, other: LoadReport) -> None:
        self.kept.update(other.kept)
        self.skipped.extend(other.skipped)
        self.empty_captions += other.empty_captions
        self.converted_to_rgb += other.converted_to_rgb


# ----- parsed annotations -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    image_id: str
    split: str  # train / validation / test
    path: str  # absolute path of the image file
    relpath: str  # path relative to the image root, stored with embedded bytes
    captions: tuple[str, ...]  # as in the file, blank ones included


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from err


def _parse_karpathy(path: Path, image_root: Path, *, id_key: str | None) -> list[_Entry]:
    """The entries of a Karpathy split file; ``id_key=None`` takes the id from the file name."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or "images" not in doc:
        raise AnnotationError(f"{path}: expected a JSON object with an 'images' list (Karpathy split format)")
    images = doc["images"]
    if not isinstance(images, list):
        raise AnnotationError(f"{path}: 'images' must be a list, got {type(images).__name__}")
    required = ["filename", "split", "sentences"] + ([id_key] if id_key else [])
    entries: list[_Entry] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(images):
        where = f"{path}: images[{index}]"
        if not isinstance(item, dict):
            raise AnnotationError(f"{where} must be an object, got {type(item).__name__}")
        if "filename" in item:
            where += f" ({item['filename']})"
        for key in required:
            if key not in item:
                raise AnnotationError(f"{where} has no key {key!r}")
        filename, split_name, sentences = item["filename"], item["split"], item["sentences"]
        if not isinstance(filename, str) or not filename:
            raise AnnotationError(f"{where}: 'filename' must be a non-empty string")
        if split_name not in _KARPATHY_SPLITS:
            raise AnnotationError(f"{where}: unknown split {split_name!r} (expected one of {sorted(_KARPATHY_SPLITS)})")
        if not isinstance(sentences, list):
            raise AnnotationError(f"{where}: 'sentences' must be a list")
        captions = []
        for s_index, sentence in enumerate(sentences):
            if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
                captions.append(sentence["raw"])
            elif isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                captions.append(" ".join(str(token) for token in sentence["tokens"]))
            else:
                raise AnnotationError(f"{where}: sentences[{s_index}] has no key 'raw' (nor 'tokens')")
        filepath = item.get("filepath") or ""
        if not isinstance(filepath, str):
            raise AnnotationError(f"{where}: 'filepath' must be a string")
        relpath = f"{filepath}/{filename}" if filepath else filename
        image_path = image_root / relpath
        if filepath and not image_path.exists() and (image_root / filename).exists():
            relpath, image_path = filename, image_root / filename  # all images in one folder
        image_id = str(item[id_key]) if id_key else Path(filename).stem
        if image_id in seen:
            raise AnnotationError(f"{where}: image id {image_id!r} already used by images[{seen[image_id]}]")
        seen[image_id] = index
        entries.append(_Entry(image_id, _KARPATHY_SPLITS[split_name], str(image_path), relpath, tuple(captions)))
    return entries


def _parse_flickr_token(
    path: Path, image_root: Path, *, num_validation: int, num_test: int, split_seed: int
) -> list[_Entry]:
    """Entries of the original Flickr30k ``results_20130124.token`` (``name.jpg#k<TAB>caption``)."""
    captions: dict[str, list[str]] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name = key.strip()
        base, hash_, number = name.rpartition("#")
        if hash_ and number.isdigit():
            name = base
        if not tab or not name:
            raise AnnotationError(f"{path}: line {line_no} is not '<image>#<n><TAB><caption>': {line[:80]!r}")
        captions.setdefault(name, []).append(caption)
    names = sorted(captions)
    if num_validation < 0 or num_test < 0:
        raise ValueError("num_validation and num_test must be >= 0")
    if num_validation + num_test > len(names):
        raise ValueError(
            f"{path}: {len(names)} images cannot give {num_validation} validation + {num_test} test images"
        )
    order = list(names)
    random.Random(split_seed).shuffle(order)
    split_of = {name: "validation" for name in order[:num_validation]}
    split_of.update({name: "test" for name in order[num_validation : num_validation + num_test]})
    return [
        _Entry(Path(name).stem, split_of.get(name, "train"), str(image_root / name), name, tuple(captions[name]))
        for name in captions
    ]


# ----- building the datasets ----------------------------------------------------------------


def _prepare_image(entry: _Entry, embed: bool) -> tuple[dict[str, Any], bool]:
    """The ``datasets.Image`` value for an entry's file, and whether it was converted to RGB."""
    data, image = read_image_file(entry.path)
    if image.mode == "RGB":
        if embed:
            return {"bytes": data, "path": entry.relpath}, False
        return {"bytes": None, "path": entry.path}, False
    try:
        image = ImageOps.exif_transpose(image)  # the PNG drops EXIF, so apply it now
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    buffer = io.BytesIO()
    ensure_rgb(image).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": str(Path(entry.relpath).with_suffix(".png"))}, True


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator[tuple[Any, Future]]:
    """``(item, future)`` in input order, at most a few batches of work in flight."""
    if workers <= 1:
        for item in items:
            future: Future = Future()
            try:
                future.set_result(fn(item))
            except Exception as err:  # delivered through the future, like the threaded path
                future.set_exception(err)
            yield item, future
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="srd-image")
    pending: collections.deque = collections.deque()
    iterator = iter(items)
    try:
        for item in itertools.islice(iterator, 4 * workers):
            pending.append((item, pool.submit(fn, item)))
        while pending:
            item, future = pending.popleft()
            for nxt in itertools.islice(iterator, 1):
                pending.append((nxt, pool.submit(fn, nxt)))
            yield item, future
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _SplitJob:
    """What the generator of one split needs, and what it found out (read after the build)."""

    def __init__(self, *, source, split, entries, embed, on_bad_image, max_images, workers, progress):
        self.source, self.split, self.entries = source, split, entries
        self.embed, self.on_bad_image, self.max_images = embed, on_bad_image, max_images
        self.workers, self.progress = workers, progress
        self.ran = False
        self.finished = False
        self.error: BaseException | None = None
        self.report = LoadReport(source=source)


def _generate_rows(job: _SplitJob) -> Iterator[dict[str, Any]]:
    job.ran = True
    job.finished = False
    job.error = None
    report = job.report = LoadReport(source=job.source, kept={job.split: 0})

    def with_captions() -> Iterator[tuple[_Entry, list[str]]]:
        for entry in job.entries:
            captions = [c.strip() for c in entry.captions if isinstance(c, str) and c.strip()]
            report.empty_captions += len(entry.captions) - len(captions)
            if captions:
                yield entry, captions
            else:
                report.skipped.append(SkippedItem(job.split, entry.image_id, None, NO_CAPTIONS))
                bar.update(1)

    limit = job.max_images if job.max_images is not None else len(job.entries)
    bar = tqdm(total=len(job.entries), desc=f"{job.source} {job.split}", unit="img", disable=not job.progress)
    kept = 0
    try:
        if limit == 0:
            job.finished = True
            return
        work = _ordered_map(lambda pair: _prepare_image(pair[0], job.embed), with_captions(), job.workers)
        for (entry, captions), future in work:
            try:
                value, converted = future.result()
            except BadImageError as err:
                if job.on_bad_image == "raise":
                    job.error = _naming_id(err.path, err.reason, err.detail, entry.image_id)
                    raise job.error from err
                report.skipped.append(SkippedItem(job.split, entry.image_id, entry.path, err.reason, err.detail or ""))
                bar.update(1)
                bar.set_postfix(skipped=len(report.skipped), refresh=False)
                continue
            report.converted_to_rgb += converted
            kept += 1
            report.kept[job.split] = kept
            bar.update(1)
            yield {"image": value, "image_id": entry.image_id, "captions": captions, "objects": []}
            if kept >= limit:
                break
        job.finished = True
    finally:
        bar.close()


def _naming_id(path: str, reason: str, detail: str | None, image_id: str) -> BadImageError:
    return BadImageError(path, reason, f"image id {image_id!r}" + (f", {detail}" if detail else ""))


def _fingerprint(job: _SplitJob) -> str:
    digest = hashlib.sha256()
    header = [_CACHE_VERSION, str(CAPTION_FEATURES), job.source, job.split, job.embed, job.max_images]
    digest.update(json.dumps(header, default=str).encode())
    for entry in job.entries:
        try:
            stat = os.stat(entry.path)
            file_state = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            file_state = None
        digest.update(json.dumps([entry.image_id, entry.path, entry.relpath, entry.captions, file_state]).encode())
    return digest.hexdigest()[:32]


def _empty_split(split: str) -> datasets.Dataset:
    empty = {name: [] for name in CAPTION_FEATURES}
    return datasets.Dataset.from_dict(empty, features=CAPTION_FEATURES, split=split)


def _write_report(path: Path, report: LoadReport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(report.to_dict()), encoding="utf-8")
    os.replace(tmp, path)


def _read_report(path: Path) -> LoadReport | None:
    try:
        return LoadReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _build_split(job: _SplitJob, cache_dir: str | None) -> tuple[datasets.Dataset, LoadReport]:
    fingerprint = _fingerprint(job)
    report_root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    report_path = report_root / _REPORT_DIR / f"{fingerprint}.json"
    cached = _read_report(report_path)
    if cached is not None and job.on_bad_image == "raise":
        bad = next((item for item in cached.skipped if item.reason != NO_CAPTIONS), None)
        if bad is not None:
            raise _naming_id(bad.path or bad.image_id, bad.reason, bad.detail, bad.image_id)
    if cached is not None and cached.kept.get(job.split, 0) == 0:
        return _empty_split(job.split), cached

    for attempt in range(2):
        # a second attempt only when Arrow files were cached but their report is lost
        fp = fingerprint if attempt == 0 else f"{fingerprint}-{uuid.uuid4().hex[:8]}"
        try:
            dataset = datasets.Dataset.from_generator(
                _generate_rows,
                features=CAPTION_FEATURES,
                cache_dir=cache_dir,
                gen_kwargs={"job": job},
                split=datasets.NamedSplit(job.split),
                fingerprint=fp,
            )
        except Exception:
            if job.error is not None:
                raise job.error from job.error.__cause__
            if job.finished and job.report.kept.get(job.split, 0) == 0:  # nothing to write: an empty split
                _write_report(report_path, job.report)
                return _empty_split(job.split), job.report
            raise
        if job.ran:
            _write_report(report_path, job.report)
            return dataset, job.report
        if cached is not None:
            return dataset, cached
    raise RuntimeError("unreachable")  # pragma: no cover


def _wanted_splits(splits: str | Iterable[str] | None) -> list[str]:
    if splits is None:
        return list(SPLITS)
    if isinstance(splits, str):
        splits = [splits]
    wanted = []
    for name in splits:
        if name not in _SPLIT_ALIASES:
            raise ValueError(f"unknown split {name!r}; expected some of {list(SPLITS)}")
        if _SPLIT_ALIASES[name] not in wanted:
            wanted.append(_SPLIT_ALIASES[name])
    return wanted


def _load(
    entries: Sequence[_Entry],
    *,
    source: str,
    splits,
    on_bad_image: str,
    max_images: int | None,
    embed_images: bool,
    num_workers: int | None,
    cache_dir: PathLike | None,
    progress: bool,
    return_report: bool,
):
    if on_bad_image not in ("skip", "raise"):
        raise ValueError(f"on_bad_image must be 'skip' or 'raise', not {on_bad_image!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0):
        raise ValueError(f"max_images must be None or an integer >= 0, not {max_images!r}")
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    by_split: dict[str, list[_Entry]] = {name: [] for name in SPLITS}
    for entry in entries:
        by_split[entry.split].append(entry)

    report = LoadReport(source=source)
    result = datasets.DatasetDict()
    for split in _wanted_splits(splits):
        job = _SplitJob(
            source=source,
            split=split,
            entries=by_split[split],
            embed=embed_images,
            on_bad_image=on_bad_image,
            max_images=max_images,
            workers=max(1, int(workers)),
            progress=progress,
        )
        dataset, split_report = _build_split(job, str(cache_dir) if cache_dir is not None else None)
        result[split] = dataset
        report._merge(split_report)

    if report.skipped or report.empty_captions:
        logger.warning("%s", report.summary())
    else:
        logger.info("%s", report.summary())
    return (result, report) if return_report else result


# ----- public loaders -----------------------------------------------------------------------


def load_coco_karpathy(
    karpathy_json: PathLike,
    image_root: PathLike,
    *,
    splits: str | Iterable[str] | None = None,
    on_bad_image: OnBadImage = "skip",
    max_images: int | None = None,
    embed_images: bool = True,
    num_workers: int | None = None,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    return_report: bool = False,
) -> datasets.DatasetDict | tuple[datasets.DatasetDict, LoadReport]:
    """MS-COCO captions with Karpathy's split, in :data:`CAPTION_FEATURES`.

    Args:
        karpathy_json: ``dataset_coco.json`` (``{"images": [{"filepath", "filename",
            "split", "cocoid", "sentences": [{"raw"}...]}...]}``).
        image_root: the folder holding ``train2014/`` and ``val2014/``; an image is
            ``image_root/filepath/filename`` (``image_root/filename`` when ``filepath`` is
            absent, or when all images sit in ``image_root`` itself).
        splits: ``"train"``, ``"validation"`` (or ``"val"``), ``"test"``, or a list of them;
            all three by default.  ``restval`` images belong to ``train``.
        on_bad_image: ``"skip"`` (counted, logged and reported) or ``"raise"``
            (:class:`~srd_hf.data.images.BadImageError` naming the file and image id).
        max_images: keep at most this many images per split (the first usable ones in file
            order); for quick experiments.
        embed_images: store the image bytes in the dataset (self-contained, what
            ``save_to_disk``/``push_to_hub`` want); ``False`` stores the paths of RGB files.
        num_workers: threads that read and decode images (default: up to 8).
        cache_dir: where the Arrow files and the load report are cached (the ``datasets``
            cache by default).
        progress: show a progress bar per split.
        return_report: also return the :class:`LoadReport`.

    ``image_id`` is the COCO id (``cocoid``) as a string; ``objects`` is empty.  A missing
    key in an entry raises :class:`AnnotationError` naming the entry index and the key.
    """
    path = Path(karpathy_json)
    entries = _parse_karpathy(path, Path(image_root), id_key="cocoid")
    return _load(
        entries,
        source=f"coco ({path.name})",
        splits=splits,
        on_bad_image=on_bad_image,
        max_images=max_images,
        embed_images=embed_images,
        num_workers=num_workers,
        cache_dir=cache_dir,
        progress=progress,
        return_report=return_report,
    )


def load_flickr30k(
    annotations: PathLike,
    image_root: PathLike,
    *,
    splits: str | Iterable[str] | None = None,
    on_bad_image: OnBadImage = "skip",
    max_images: int | None = None,
    num_validation: int = 1000,
    num_test: int = 1000,
    split_seed: int = 0,
    embed_images: bool = True,
    num_workers: int | None = None,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    return_report: bool = False,
) -> datasets.DatasetDict | tuple[datasets.DatasetDict, LoadReport]:
    """Flickr30k captions in :data:`CAPTION_FEATURES`, from either annotation format.

    ``annotations`` is Karpathy's ``dataset_flickr30k.json`` (its own split is used), or the
    original ``results_20130124.token`` (``1000092795.jpg#0<TAB>Two young guys ...``), which
    has no split: the image names are sorted and shuffled with ``split_seed``, and the first
    ``num_validation`` go to ``validation``, the next ``num_test`` to ``test`` and the rest
    to ``train`` (the sizes of Karpathy's split, not the same images).  The split is made
    before any image is read, so skipping a bad image never moves others between splits.
    Images are ``image_root/filename``; ``image_id`` is the file name without extension.
    The other arguments are those of :func:`load_coco_karpathy`.
    """
    path = Path(annotations)
    if _looks_like_json(path):
        entries = _parse_karpathy(path, Path(image_root), id_key=None)
    else:
        entries = _parse_flickr_token(
            path, Path(image_root), num_validation=num_validation, num_test=num_test, split_seed=split_seed
        )
    return _load(
        entries,
        source=f"flickr30k ({path.name})",
        splits=splits,
        on_bad_image=on_bad_image,
        max_images=max_images,
        embed_images=embed_images,
        num_workers=num_workers,
        cache_dir=cache_dir,
        progress=progress,
        return_report=return_report,
    )


def _looks_like_json(path: Path) -> bool:
    if path.suffix.lower() == ".json":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    return head.startswith(b"{")

"""Where a recipe's captioning data comes from: one ``DataArguments`` for every recipe.

A source is named by ``dataset_name``, in the habit of trl's ``ScriptArguments``:

* ``embedded`` (default): the procedural world the clean model was pretrained on (its
  ``WorldConfig`` is read from the model, or ``world_preset``); ground-truth ``objects`` included;
* ``coco_karpathy`` / ``flickr30k``: the local loaders of :mod:`srd_hf.data.loaders`, with
  ``annotation_file`` (Karpathy JSON, or Flickr30k's ``.token`` file) and ``image_root``;
* a folder written by ``save_to_disk`` (a ``DatasetDict``, or a ``Dataset`` taken as train);
* an image folder with a ``metadata.jsonl`` / ``metadata.csv`` (``datasets``' ``imagefolder``);
* anything else is a Hub id for ``datasets.load_dataset(dataset_name, dataset_config)``.

:func:`load_captioning_data` returns the common schema (``image``, ``image_id``, ``captions``
as a list, and ``objects`` only where the source has ground truth) with ``train``,
``validation`` and ``test`` splits; a split the source lacks is held out of train (seeded).
Every row is checked once by :func:`~srd_hf.data.validation.validate_captioning_dataset`
(the generated world excepted); bad rows are dropped and reported, never silently.

``eval_datasets`` names extra test sets (``embedded-shifted`` for the embedded default: the
world under another seed, palette, object mix and layout, the offline counterpart of testing
a COCO-tuned model on Flickr30k). :func:`provenance` is what every artifact records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from .schema import CAPTION_FEATURES, OBJECT_FEATURE, SPLITS
from .synthetic import WorldConfig, shifted_world, world_config
from .validation import validate_captioning_dataset

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_SHIFTED = "embedded-shifted"
LOADER_SOURCES = ("coco_karpathy", "flickr30k")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_SPLIT_TAIL = re.compile(r"^[A-Za-z_][\w.-]*$")
#: rows of the validation report listed in provenance (counts are always complete)
_LISTED_ROWS = 20


@dataclass
class DataArguments:
    """The captioning data of a recipe (parsed beside the recipe's own config by ``TrlParser``).

    dataset_name: "embedded", "coco_karpathy", "flickr30k", a ``save_to_disk`` folder, an image
        folder with a metadata file, or a Hub dataset id.
    eval_datasets: comma list of extra test sets, each ``NAME[:SPLIT]`` with NAME as for
        ``dataset_name`` (loader sources as ``flickr30k=ANNOTATIONS[@IMAGE_ROOT]``, images
        beside the annotation file by default) or ``embedded-shifted``. Default: ``embedded-shifted``
        for the embedded source, none otherwise; "none" for none.
    """

    dataset_name: str = field(default=EMBEDDED, metadata={"help": "embedded, coco_karpathy, flickr30k, a save_to_disk folder, an image folder with metadata.jsonl/csv, or a Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    annotation_file: str | None = field(default=None, metadata={"help": "coco_karpathy / flickr30k: the Karpathy JSON (or Flickr30k's results_20130124.token)."})
    image_root: str | None = field(default=None, metadata={"help": "coco_karpathy / flickr30k: the folder the annotation's file names are relative to."})
    train_split: str = field(default="train", metadata={"help": "Source split fine-tuned on."})
    validation_split: str = field(default="validation", metadata={"help": "Source split for choices (thresholds); held out of train when missing."})
    test_split: str = field(default="test", metadata={"help": "Source split scored; held out of train when missing."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    caption_column: str = field(default="captions", metadata={"help": "Column holding one caption or a list per image ('caption' is tried when it is missing)."})
    id_column: str | None = field(default=None, metadata={"help": "Column of image ids (default: image_id when present, else split-row)."})
    max_train_images: int | None = field(default=None, metadata={"help": "Keep at most this many training images (the first ones)."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Keep at most this many images per validation/test/eval split."})
    max_captions_per_image: int | None = field(default=None, metadata={"help": "Keep at most this many captions per image."})
    eval_datasets: str | None = field(default=None, metadata={"help": "Comma list of extra test sets NAME[:SPLIT] (default: embedded-shifted for the embedded source; 'none' for none)."})
    holdout_size: float = field(default=0.1, metadata={"help": "Share (< 1) or count (>= 1) of train held out for a missing validation/test split."})
    split_seed: int = field(default=0, metadata={"help": "Seed of held-out splits."})
    min_image_side: int | None = field(default=None, metadata={"help": "Drop images whose shorter side is below this (e.g. the defense's largest mask)."})
    on_bad_rows: str = field(default="skip", metadata={"help": "skip (drop and report) or error: rows with a bad image or no caption."})
    world_preset: str | None = field(default=None, metadata={"help": "Embedded source for a model that records no world: this preset (default, paper, small)."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Cache of loaded datasets (default: the datasets cache)."})

    def __post_init__(self):
        if self.on_bad_rows not in ("skip", "error"):
            raise ValueError(f"on_bad_rows must be 'skip' or 'error', got {self.on_bad_rows!r}")
        for name in ("max_train_images", "max_eval_images", "max_captions_per_image", "min_image_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {value}")
        if self.holdout_size <= 0:
            raise ValueError(f"holdout_size must be > 0, got {self.holdout_size}")
        if self.dataset_name in LOADER_SOURCES and not (self.annotation_file and self.image_root):
            raise ValueError(f"dataset_name={self.dataset_name} needs --annotation_file and --image_root")
        self.eval_specs  # validates eval_datasets

    @property
    def is_embedded(self) -> bool:
        return self.dataset_name == EMBEDDED

    @property
    def needs_world(self) -> bool:
        """Whether the embedded world is read: as the source, or as an extra test set."""
        return self.is_embedded or any(spec.startswith(EMBEDDED) for spec in self.eval_specs)

    @property
    def eval_specs(self) -> list[str]:
        """The extra test sets, defaults resolved."""
        if self.eval_datasets is None:
            return [EMBEDDED_SHIFTED] if self.is_embedded else []
        if self.eval_datasets.strip().lower() in ("", "none"):
            return []
        specs = [s.strip() for s in self.eval_datasets.split(",") if s.strip()]
        for spec in specs:
            name, _ = _split_spec(spec)
            if name in (EMBEDDED, EMBEDDED_SHIFTED) and not self.is_embedded and not self.world_preset:
                raise ValueError(f"eval source {spec!r} needs the embedded world: use it with dataset_name=embedded or set world_preset")
        return specs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- the world
def embedded_world(model: Any = None, args: DataArguments | None = None) -> WorldConfig:
    """The embedded world a model was pretrained on (recorded in its metadata), else the
    ``world_preset`` of ``args``."""
    metadata = getattr(model, "metadata", None)
    if metadata is None:  # an adapter without the metadata accessor
        metadata = getattr(getattr(model, "config", None), "extra", None) or {}
    world = metadata.get("world") if isinstance(metadata, dict) else None
    if world is not None:
        return WorldConfig(**world)
    if args is not None and args.world_preset:
        return world_config(args.world_preset)
    raise ValueError("the model records no embedded world: pass --world_preset for the embedded data, "
                     "or --dataset_name for another source (coco_karpathy, flickr30k, a folder or a Hub id)")


def _world_data(world: WorldConfig, args: DataArguments) -> DatasetDict:
    from ..pretraining import load_or_build_world  # the cache lives with the pretraining recipe

    return load_or_build_world(world, str(Path(args.dataset_cache_dir) / "srd_hf_worlds") if args.dataset_cache_dir else None)


def _shifted_split(world: WorldConfig, split: str, args: DataArguments) -> Dataset:
    """One split of the shifted world, generated (and cached) without its other splits."""
    n = {"train": world.num_train, "validation": world.num_validation, "test": world.num_test}[split]
    n = min(n, args.max_eval_images or n)
    sizes = {f"num_{s}": (n if s == split else 1) for s in ("train", "validation", "test")}
    return _world_data(shifted_world(world, **sizes), args)[split]


# ----------------------------------------------------------------------------- raw sources
def source_kind(name: str) -> str:
    """``embedded``, ``loader``, ``disk``, ``imagefolder`` or ``hub``."""
    if name in (EMBEDDED, EMBEDDED_SHIFTED):
        return "embedded"
    if name in LOADER_SOURCES or name.split("=", 1)[0] in LOADER_SOURCES:
        return "loader"
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return "disk"
        if any((path / f).is_file() or any(path.glob(f"*/{f}")) for f in _METADATA_FILES):
            return "imagefolder"
        raise ValueError(f"{path} is neither a save_to_disk folder nor an image folder with {' / '.join(_METADATA_FILES)}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"dataset folder {name} does not exist")
    return "hub"


def _loader_splits(name: str, annotation_file: str, image_root: str, wanted: dict[str, int | None], args: DataArguments):
    """Splits of a local loader; ``wanted`` maps a split to its image cap."""
    from .loaders import load_coco_karpathy, load_flickr30k

    load = {"coco_karpathy": load_coco_karpathy, "flickr30k": load_flickr30k}[name]
    out, notes = {}, []
    for cap in sorted(set(wanted.values()), key=lambda c: (c is None, c or 0)):
        splits = [s for s, c in wanted.items() if c == cap]
        loaded, report = load(annotation_file, image_root, splits=splits, max_images=cap, cache_dir=args.dataset_cache_dir,
                              progress=False, return_report=True)
        out.update(loaded)
        notes.append(report.summary())
    return DatasetDict(out), "; ".join(notes)


def _raw_source(name: str, args: DataArguments) -> DatasetDict:
    """The source's own splits, as loaded (a lone ``Dataset`` becomes ``train``)."""
    kind = source_kind(name)
    if kind == "disk":
        loaded = datasets.load_from_disk(str(Path(name).expanduser()))
    elif kind == "imagefolder":
        loaded = datasets.load_dataset("imagefolder", data_dir=str(Path(name).expanduser()), cache_dir=args.dataset_cache_dir)
    elif kind == "hub":
        loaded = datasets.load_dataset(name, args.dataset_config, cache_dir=args.dataset_cache_dir)
    else:  # pragma: no cover - handled by the callers
        raise ValueError(f"{name!r} is not a raw source")
    return DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded


def _with_all_splits(raw: DatasetDict, names: dict[str, str], args: DataArguments, notes: dict) -> dict[str, Dataset]:
    """train / validation / test from the source's splits ``names``; a missing one held out of train."""
    if names["train"] not in raw:
        raise ValueError(f"the source has no split {names['train']!r} (it has {list(raw)}); set --train_split")
    train = raw[names["train"]]
    out = {}
    for split in ("test", "validation"):
        name = names[split]
        if name in raw:
            out[split] = raw[name]
            continue
        size = int(args.holdout_size) if args.holdout_size >= 1 else args.holdout_size
        parts = train.train_test_split(test_size=size, seed=args.split_seed, shuffle=True)
        train, out[split] = parts["train"], parts["test"]
        notes.setdefault("held_out", {})[split] = {"rows": len(out[split]), "from": names["train"], "seed": args.split_seed}
    out["train"] = train
    return {s: out[s] for s in SPLITS}


# ----------------------------------------------------------------------------- common schema
def to_common_schema(dataset: Dataset, args: DataArguments, split: str) -> Dataset:
    """``image``, ``image_id``, ``captions`` (a list, at most ``max_captions_per_image``) and
    ``objects`` where the source has ground truth; other columns are dropped. Images are moved
    as stored (undecoded), never re-encoded."""
    columns = dataset.column_names
    image_column = args.image_column if args.image_column in columns else "image" if "image" in columns else None
    if image_column is None:
        raise ValueError(f"{split}: no image column {args.image_column!r}; columns: {columns} (set --image_column)")
    # the named columns, else the common names (an eval set of another layout than the main data)
    caption_column = args.caption_column if args.caption_column in columns else next(
        (c for c in ("captions", "caption") if c in columns), None)
    if caption_column is None:
        raise ValueError(f"{split}: no caption column {args.caption_column!r}; columns: {columns} (set --caption_column)")
    id_column = args.id_column if args.id_column in columns else ("image_id" if "image_id" in columns else None)
    if args.id_column and id_column != args.id_column:
        logger.warning("%s: no id column %r (columns %s): ids are %s", split, args.id_column, columns, id_column or "split-row")
    has_objects = ("objects" in columns and dataset.features["objects"] == CAPTION_FEATURES["objects"]
                   and any(dataset["objects"]))
    image_feature = dataset.features[image_column]
    if not isinstance(image_feature, datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image())
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    limit = args.max_captions_per_image

    def convert(batch, indices):
        captions = []
        for value in batch[caption_column]:
            value = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else value
            captions.append(value[:limit] if isinstance(value, list) and limit else value)
        ids = [str(v) for v in batch[id_column]] if id_column else [f"{split}-{i:06d}" for i in indices]
        out = {"image": batch[image_column], "image_id": ids, "captions": captions}
        if has_objects:
            out["objects"] = batch["objects"]
        return out

    features = datasets.Features({"image": datasets.Image(decode=False), "image_id": datasets.Value("string"),
                                  "captions": datasets.Sequence(datasets.Value("string")),
                                  **({"objects": [OBJECT_FEATURE]} if has_objects else {})})
    try:
        converted = raw.map(convert, with_indices=True, batched=True, remove_columns=raw.column_names, features=features,
                            desc=f"{split}: common schema")
    except (TypeError, ValueError) as err:  # captions that are neither text nor lists of text
        raise ValueError(f"{split}: column {caption_column!r} must hold a caption or a list of captions ({err})") from err
    return converted.cast_column("image", datasets.Image())


def _cap(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def _validate(dd: DatasetDict, args: DataArguments) -> tuple[DatasetDict, dict]:
    checked, report = validate_captioning_dataset(dd, caption_column="captions", id_column="image_id",
                                                  min_side=args.min_image_side, on_bad=args.on_bad_rows)
    return checked, report.to_dict(max_rows=_LISTED_ROWS)


# ----------------------------------------------------------------------------- public API
def load_captioning_data(args: DataArguments, *, world: WorldConfig | None = None,
                         return_report: bool = False) -> DatasetDict | tuple[DatasetDict, dict]:
    """The recipe's data: train / validation / test in the common schema, validated.

    ``world`` is the embedded world (the clean model's: :func:`embedded_world`); without it
    the ``world_preset`` (or the default preset) is used. ``return_report`` also returns what
    was kept, dropped and held out (the ``data`` entry of an artifact's provenance).
    """
    notes: dict[str, Any] = {"source": args.dataset_name, "kind": source_kind(args.dataset_name)}
    if args.is_embedded:
        world = world or world_config(args.world_preset or "default")
        data = _world_data(world, args)
        splits = {"train": _cap(data["train"], args.max_train_images),
                  "validation": _cap(data["validation"], args.max_eval_images), "test": _cap(data["test"], args.max_eval_images)}
        if args.max_captions_per_image:
            splits = {s: to_common_schema(d, args, s) for s, d in splits.items()}
        result = DatasetDict(splits)
        notes["validation"] = "generated by the embedded world: not re-validated"
    else:
        if notes["kind"] == "loader":  # the loaders name their splits train / validation / test
            caps = {"train": args.max_train_images, "validation": args.max_eval_images, "test": args.max_eval_images}
            raw, notes["loader"] = _loader_splits(args.dataset_name, args.annotation_file, args.image_root, caps, args)
            raw = DatasetDict({s: d for s, d in raw.items() if len(d)})  # an empty split is held out of train
            names = dict(zip(SPLITS, SPLITS))
        else:
            raw = _raw_source(args.dataset_name, args)
            names = {"train": args.train_split, "validation": args.validation_split, "test": args.test_split}
        splits = _with_all_splits(raw, names, args, notes)
        splits = {s: _cap(d, args.max_train_images if s == "train" else args.max_eval_images) for s, d in splits.items()}
        result = DatasetDict({s: to_common_schema(d, args, s) for s, d in splits.items()})
        result, notes["validation"] = _validate(result, args)
    notes["rows"] = {s: len(d) for s, d in result.items()}
    notes["has_objects"] = "objects" in result["test"].column_names
    logger.info("data %s: %s", args.dataset_name, notes["rows"])
    return (result, notes) if return_report else result


def _split_spec(spec: str) -> tuple[str, str | None]:
    head, sep, tail = spec.rpartition(":")
    if sep and head and _SPLIT_TAIL.match(tail):
        return head, tail
    return spec, None


def load_eval_datasets(args: DataArguments, *, world: WorldConfig | None = None,
                       return_report: bool = False) -> dict[str, Dataset] | tuple[dict[str, Dataset], dict]:
    """The extra test sets of ``eval_datasets``, by spec, each in the common schema (at most
    ``max_eval_images`` rows), validated like the main data."""
    out, reports = {}, {}
    for spec in args.eval_specs:
        name, split = _split_spec(spec)
        split = split or "test"
        if name in (EMBEDDED, EMBEDDED_SHIFTED):
            base = world or world_config(args.world_preset or "default")
            if split not in SPLITS:
                raise ValueError(f"{spec}: the embedded world has splits {SPLITS}")
            dataset = _shifted_split(base, split, args) if name == EMBEDDED_SHIFTED else _cap(_world_data(base, args)[split], args.max_eval_images)
            reports[spec] = {"kind": "embedded", "rows": len(dataset), "world": (shifted_world(base) if name == EMBEDDED_SHIFTED else base).to_dict()}
        else:
            if source_kind(name) == "loader":
                loader, _, files = name.partition("=")
                if not files:
                    raise ValueError(f"eval source {spec!r}: write {loader}=ANNOTATION_FILE[@IMAGE_ROOT][:SPLIT]")
                annotation, _, root = files.partition("@")
                root = root or str(Path(annotation).parent)
                raw, note = _loader_splits(loader, annotation, root, {split: args.max_eval_images}, args)
            else:
                raw, note = _raw_source(name, args), None
            if split not in raw:
                raise ValueError(f"eval source {spec!r} has no split {split!r} (it has {list(raw)})")
            dataset = to_common_schema(_cap(raw[split], args.max_eval_images), args, split)
            dataset, report = _validate(DatasetDict({split: dataset}), args)
            dataset = dataset[split]
            reports[spec] = {"kind": source_kind(name), "rows": len(dataset), "validation": report, **({"loader": note} if note else {})}
        out[spec] = dataset
    return (out, reports) if return_report else out


def _digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(args: DataArguments, *, world: WorldConfig | None = None, report: dict | None = None) -> dict:
    """What an artifact records of its data: the arguments (enough to load it again with
    ``DataArguments(**record["arguments"])``), the source's kind, the annotation file's digest,
    the embedded world and, when given, the load report (kept, dropped, held out)."""
    record: dict[str, Any] = {"arguments": args.to_dict(), "kind": source_kind(args.dataset_name),
                              "eval_datasets": args.eval_specs}
    if args.annotation_file:
        record["annotation_sha256"] = _digest(args.annotation_file)
    if args.is_embedded or any(_split_spec(s)[0] in (EMBEDDED, EMBEDDED_SHIFTED) for s in args.eval_specs):
        base = world or world_config(args.world_preset or "default")
        record["world"] = base.to_dict()
        if EMBEDDED_SHIFTED in [_split_spec(s)[0] for s in args.eval_specs]:
            record["shifted_world"] = shifted_world(base).to_dict()
    if report is not None:
        record["report"] = report
    return record


def defense_data(args: DataArguments | None, clean_model: Any) -> DatasetDict:
    """The trusted splits the defense reads (train for the defender's own set, validation for
    thresholds, test for scores): the clean model's embedded world by default, else the
    source ``args`` names (the one the backdoor was planted on: pass the
    ``DataArguments(**metrics["data"]["arguments"])`` the inject stage recorded)."""
    args = args or DataArguments()
    world = embedded_world(clean_model, args) if args.is_embedded else None
    return load_captioning_data(args, world=world)

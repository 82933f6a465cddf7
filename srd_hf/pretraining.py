"""Build the clean captioner of the embedded world, the way OpenFlamingo itself was built.

Stage 1 trains the vision tower alone, supervised by the generator's ground truth
(what sits in each cell of the 3x3 grid, and which objects are present), then
freezes it. Stage 2 trains the Flamingo (perceiver, gated cross-attention and the
language model) on the captions with the Trainer, on cached tokens of the frozen
tower. Trained jointly from scratch, a tiny Flamingo writes fluent captions of the
wrong objects; staged, it is grounded.

Both stages use random occluder squares (red included, the defense's sizes), so
the clean model keeps naming objects when the defense masks part of an image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import DatasetDict, load_from_disk
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments

from . import artifacts
from .cards import load_card_template
from .distributed import main_first, on_main, settled
from .evaluation import caption_quality
from .data.images import ensure_rgb
from .data.occlusion import occluder_sizes, paste_random_occluder
from .data.synthetic import COLOURS, SHAPES, SIZES, WorldConfig, build_world, cell_of, world_config
from .vlm.openflamingo import OpenFlamingoCaptioner
from .vlm.tiny import TinyFlamingoSizes, build_tiny_flamingo

logger = logging.getLogger(__name__)

@dataclass
class PretrainConfig:
    """Configuration of ``recipes/pretrain.py``.

    Parameters are grouped as: output, world, vision stage, caption stage, evaluation.
    """

    output_dir: str = field(default="outputs/clean", metadata={"help": "Where the clean model, checkpoints and metrics go."})
    world_preset: str = field(default="default", metadata={"help": "Embedded world preset: default (64 px), paper (224 px), small (tests)."})
    num_train: int | None = field(default=None, metadata={"help": "Override the number of training images of the preset."})
    num_test: int | None = field(default=None, metadata={"help": "Override the number of test images of the preset."})
    world_cache_dir: str | None = field(default=None, metadata={"help": "Where generated worlds are cached (default: ~/.cache/srd_hf/worlds)."})
    seed: int = field(default=0, metadata={"help": "Seed of the world, the weights and the training order."})
    occluder_prob: float = field(default=0.5, metadata={"help": "Share of training images given one random occluder square."})
    # vision stage
    vision_epochs: float = field(default=2.5, metadata={"help": "Epochs of supervised vision-tower pretraining."})
    vision_lr: float = field(default=2e-3, metadata={"help": "Peak learning rate of the vision stage."})
    vision_batch_size: int = field(default=64, metadata={"help": "Batch size of the vision stage."})
    vision_loader_workers: int = field(default=1, metadata={"help": "Processes preparing the vision stage's images and patch targets (0: the training process; the work is the same)."})
    # caption stage
    caption_epochs: float = field(default=2.5, metadata={"help": "Epochs of caption training (each epoch draws one of the captions per image)."})
    caption_lr: float = field(default=2e-3, metadata={"help": "Peak learning rate of the caption stage."})
    caption_batch_size: int = field(default=32, metadata={"help": "Batch size of the caption stage."})
    # evaluation
    max_new_tokens: int = field(default=24, metadata={"help": "Caption length limit at evaluation."})
    eval_batch_size: int = field(default=128, metadata={"help": "Batch size of caption generation at evaluation."})
    save_steps: int = field(default=200, metadata={"help": "Checkpoint every this many steps (a killed run resumes from the last)."})
    logging_steps: int = field(default=50, metadata={"help": "Log every this many steps."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over: remove this output_dir's artifacts and checkpoints."})

    def __post_init__(self):
        if self.vision_loader_workers < 0:
            raise ValueError(f"vision_loader_workers must be >= 0, got {self.vision_loader_workers}")
        if not 0.0 <= self.occluder_prob <= 1.0:
            raise ValueError(f"occluder_prob must be in [0, 1], got {self.occluder_prob}")
        for name in ("vision_epochs", "caption_epochs", "vision_lr", "caption_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    def world(self) -> WorldConfig:
        overrides = {"seed": self.seed}
        if self.num_train is not None:
            overrides["num_train"] = self.num_train
        if self.num_test is not None:
            overrides["num_test"] = self.num_test
        return world_config(self.world_preset, **overrides)


# --------------------------------------------------------------------------- world cache
def load_or_build_world(world: WorldConfig, cache_dir: str | None = None) -> DatasetDict:
    """Generate the world once per config and keep it on disk (generation is deterministic)."""
    root = Path(cache_dir or Path.home() / ".cache" / "srd_hf" / "worlds")
    key = hashlib.sha256(json.dumps(world.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    folder = root / key
    if (folder / "dataset_dict.json").is_file():
        return load_from_disk(str(folder))
    logger.info("generating the embedded world into %s", folder)
    dataset = build_world(world)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}{artifacts.STAGING_TAG}", dir=root))  # one per writer: a shared cache
    try:
        dataset.save_to_disk(str(staging))
        (staging / "world_config.json").write_text(json.dumps(world.to_dict(), indent=2))
        os.chmod(staging, 0o755)
        if not folder.exists():  # else another process won the race
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_from_disk(str(folder))


# --------------------------------------------------------------------------- stage 1: vision tower
def patch_targets(image, objects: list[dict], patch_size: int, grid: int, colour_tolerance: int = 50, min_share: float = 0.2) -> torch.Tensor:
    """What each ViT patch shows, as (colour, shape, size) indices, 0 meaning background.

    A patch belongs to an object when the object's colour covers at least ``min_share`` of
    it inside the object's cell (so an occluder of the same colour elsewhere does not count,
    and occluded pixels are background). Dense, local and factorised labels are what a
    small ViT learns fast; returns a (3, num_patches) tensor.
    """
    pixels = np.asarray(image, dtype=np.int16)
    side = pixels.shape[0]
    n = side // patch_size
    labels = np.zeros((3, n, n), dtype=np.int64)
    cell = side / grid
    rows = np.arange(side)[:, None]
    cols = np.arange(side)[None, :]
    for obj in objects:
        r, c = cell_of(obj["position"], grid)
        inside = (rows >= r * cell) & (rows < (r + 1) * cell) & (cols >= c * cell) & (cols < (c + 1) * cell)
        close = (np.abs(pixels - np.array(COLOURS[obj["colour"]])) < colour_tolerance).all(-1) & inside
        share = close.reshape(n, patch_size, n, patch_size).mean(axis=(1, 3))
        hit = share >= min_share
        labels[0][hit] = 1 + list(COLOURS).index(obj["colour"])
        labels[1][hit] = 1 + SHAPES.index(obj["shape"])
        labels[2][hit] = 1 + SIZES.index(obj["size"])
    return torch.from_numpy(labels.reshape(3, -1))


class ObjectProbe(nn.Module):
    """Vision tower + linear heads reading its patch tokens (what Flamingo's perceiver consumes):
    what each patch shows (colour, shape, size of the object on it), and the patch's own
    appearance (mean and spread of its pixels).

    The appearance target keeps low-level detail in the tokens: a tower trained only to name
    objects learns to map everything else (textures, occluders, a trigger patch) to one
    "background" token, and then neither a backdoor nor a mask can change what the
    captioner sees.
    """

    def __init__(self, visual: nn.Module, width: int, patch_size: int):
        super().__init__()
        self.visual = visual
        self.patch_size = patch_size
        self.heads = nn.ModuleList(nn.Linear(width, 1 + k) for k in (len(COLOURS), len(SHAPES), len(SIZES)))
        self.appearance_head = nn.Linear(width, 6)

    def appearance(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-patch mean and standard deviation of each channel, (B, num_patches, 6)."""
        patches = F.unfold(pixel_values, self.patch_size, stride=self.patch_size)  # B, 3*p*p, N
        patches = patches.view(pixel_values.shape[0], 3, self.patch_size**2, -1)
        return torch.cat([patches.mean(2), patches.std(2)], dim=1).transpose(1, 2)

    def forward(self, pixel_values, patch_labels=None):
        tokens = self.visual(pixel_values)[1]
        logits = [head(tokens) for head in self.heads]
        out = {"patch_logits": logits}
        if patch_labels is not None:
            loss = sum(F.cross_entropy(l.flatten(0, 1), patch_labels[:, i].flatten()) for i, l in enumerate(logits))
            out["loss"] = loss + F.mse_loss(self.appearance_head(tokens), self.appearance(pixel_values))
        return out


def objects_from_patches(colour: torch.Tensor, shape: torch.Tensor, grid: int) -> set[tuple[str, str]]:
    """(colour, shape) per grid cell by majority vote of its object patches."""
    n = int(round(colour.numel() ** 0.5))
    colour, shape = colour.view(n, n), shape.view(n, n)
    centres = (torch.arange(n) + 0.5) * grid / n
    cell = centres.long().clamp(max=grid - 1)
    found = set()
    for r in range(grid):
        for c in range(grid):
            sel = (cell[:, None] == r) & (cell[None, :] == c) & (colour > 0) & (shape > 0)
            if sel.sum() == 0:
                continue
            pairs = (colour[sel] - 1) * len(SHAPES) + (shape[sel] - 1)
            kind = int(torch.mode(pairs).values)
            found.add((list(COLOURS)[kind // len(SHAPES)], SHAPES[kind % len(SHAPES)]))
    return found


class OccludedImages(TorchDataset):
    """Rows of a caption dataset, a share of them with one random occluder (seeded by index)."""

    def __init__(self, dataset, captioner: OpenFlamingoCaptioner, occluder_prob: float, seed: int, with_targets: bool, world: WorldConfig | None = None):
        self.dataset, self.captioner = dataset, captioner
        self.occluder_prob, self.seed, self.with_targets = occluder_prob, seed, with_targets
        self.sizes = occluder_sizes(captioner.image_size)
        self.world = world

    def __len__(self):
        return len(self.dataset)

    def image(self, index: int):
        row = self.dataset[index]
        rng = random.Random(f"{self.seed}-{index}")
        image = ensure_rgb(row["image"])
        if rng.random() < self.occluder_prob:
            image = paste_random_occluder(image, rng, self.sizes)
        return image, row

    def __getitem__(self, index):
        image, row = self.image(index)
        item = {"pixel_values": self.captioner.image_transform(image)}
        if self.with_targets:
            item["patch_labels"] = patch_targets(image, row["objects"], self.world.patch_size, self.world.grid)
        return item


def _training_args(output_dir: Path, config: PretrainConfig, lr: float, epochs: float, batch_size: int, workers: int = 0) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=50,
        weight_decay=0.01,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=1,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=workers,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")


def latest_checkpoint(folder: Path) -> str | None:
    """The last *complete* Trainer checkpoint of ``folder`` (the one a killed run resumes from):
    a ``checkpoint-N`` killed while being written (no ``trainer_state.json``, which the Trainer
    writes after the weights, optimizer and RNG state, or no weights) is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file() and any((path / w).is_file() for w in _WEIGHTS):
            return str(path)
        logger.warning("skipping the torn checkpoint %s (killed while being written)", path)
    return None


def pretrain_vision(captioner: OpenFlamingoCaptioner, world_data: DatasetDict, config: PretrainConfig, work_dir: Path) -> dict:
    """Train the vision tower on the ground truth, then leave it frozen inside ``captioner``."""
    done = work_dir / "vision_tower.safetensors"
    visual = captioner.flamingo.vision_encoder
    fingerprint = {"stage": "pretrain_vision", **{k: v for k, v in _fingerprint(config).items() if not k.startswith("caption_")}}
    if settled(artifacts.reusable(work_dir, fingerprint, "vision tower")):
        visual.load_state_dict(load_file(done))
        visual.requires_grad_(False)
        return json.loads((work_dir / "vision_metrics.json").read_text())
    artifacts.begin(work_dir, fingerprint, "vision tower", write=False)
    on_main(lambda: artifacts.begin(work_dir, fingerprint, "vision tower"))
    world = config.world()
    probe = ObjectProbe(visual, visual.transformer.width, world.patch_size)
    train = OccludedImages(world_data["train"], captioner, config.occluder_prob, config.seed, with_targets=True, world=world)
    # occluders and patch targets are computed per image in Python: a loader process overlaps
    # that with the tower's steps (a quarter faster on 2 cores: benchmarks/bench_pretrain_loader.py)
    args = _training_args(work_dir / "checkpoints", config, config.vision_lr, config.vision_epochs, config.vision_batch_size,
                          workers=config.vision_loader_workers)
    trainer = Trainer(model=probe, args=args, train_dataset=train)
    start = time.time()
    trainer.train(resume_from_checkpoint=latest_checkpoint(work_dir / "checkpoints"))
    metrics = {"vision_train_seconds": round(time.time() - start, 1), **vision_accuracy(probe, world_data["validation"], captioner, world.grid)}
    visual.requires_grad_(False)

    def save():  # tower and metrics, each atomic, then the marker
        tmp = done.with_name(f".{done.name}{artifacts.STAGING_TAG}")
        save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, tmp)
        tmp.replace(done)
        artifacts.write_json(work_dir / "vision_metrics.json", metrics)
        artifacts.finish(work_dir, fingerprint)

    on_main(save)
    return metrics


@torch.inference_mode()
def vision_accuracy(probe: ObjectProbe, dataset, captioner: OpenFlamingoCaptioner, grid: int, batch_size: int = 256) -> dict:
    """Share of images whose (colour, shape) set, read off the tower's patch tokens, is exact."""
    probe.eval()
    exact, total = 0, 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pixels = torch.stack([captioner.image_transform(ensure_rgb(img)) for img in rows["image"]])
        colour, shape, _ = (l.argmax(-1).cpu() for l in probe(pixels.to(captioner.device))["patch_logits"])
        for i, objects in enumerate(rows["objects"]):
            exact += int(objects_from_patches(colour[i], shape[i], grid) == {(o["colour"], o["shape"]) for o in objects})
            total += 1
    return {"vision_exact_set_accuracy": exact / max(total, 1)}


# --------------------------------------------------------------------------- stage 2: captions
class CachedCaptionRows(TorchDataset):
    """Tokens of the frozen tower for each (possibly occluded) image, plus its captions."""

    def __init__(self, features: torch.Tensor, captions: list[list[str]]):
        if len(features) != len(captions):
            raise ValueError("one feature map per caption list")
        self.features, self.captions = features, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index):
        return {"vision_features": self.features[index], "captions": self.captions[index]}


@dataclass
class CachedFeatureCollator:
    captioner: OpenFlamingoCaptioner

    def __call__(self, rows):
        captions = [random.choice(row["captions"]) for row in rows]
        batch = self.captioner.collate_text(captions)
        batch["vision_features"] = torch.stack([row["vision_features"] for row in rows]).float()
        return batch


@torch.inference_mode()
def cache_vision_features(captioner: OpenFlamingoCaptioner, images: OccludedImages, batch_size: int = 256) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="caching vision tokens", unit="batch"):
        batch = [captioner.image_transform(images.image(i)[0]) for i in range(start, min(start + batch_size, len(images)))]
        chunks.append(captioner.encode_vision(torch.stack(batch).to(captioner.device)).to(torch.bfloat16).cpu())
    return torch.cat(chunks)


def train_captions(captioner: OpenFlamingoCaptioner, world_data: DatasetDict, config: PretrainConfig, work_dir: Path) -> dict:
    # the language model is trained too: no pretrained LM exists for this world
    captioner.set_trainable(["flamingo.perceiver.", "flamingo.lang_encoder."])
    captioner.flamingo.vision_encoder.requires_grad_(False)
    images = OccludedImages(world_data["train"], captioner, config.occluder_prob, config.seed + 1, with_targets=False)
    features = cache_vision_features(captioner, images)
    train = CachedCaptionRows(features, world_data["train"]["captions"])
    args = _training_args(work_dir / "checkpoints", config, config.caption_lr, config.caption_epochs, config.caption_batch_size)
    trainer = Trainer(model=captioner, args=args, train_dataset=train, data_collator=CachedFeatureCollator(captioner))
    start = time.time()
    trainer.train(resume_from_checkpoint=latest_checkpoint(work_dir / "checkpoints"))
    captioner.set_trainable()  # leave the paper's fine-tuning freeze in place for later stages
    return {"caption_train_seconds": round(time.time() - start, 1)}


# --------------------------------------------------------------------------- evaluation
def evaluate_captioner(captioner: OpenFlamingoCaptioner, dataset, config: PretrainConfig, occluded: bool = False) -> dict:
    """Object accuracy, BLEU-4 and CIDEr on ``dataset``; optionally under one largest red square."""
    images = [ensure_rgb(img) for img in dataset["image"]]
    if occluded:
        side = max(occluder_sizes(captioner.image_size))
        rng = random.Random(config.seed)
        images = [paste_random_occluder(img, rng, (side,), red_share=1.0) for img in images]
    predictions = captioner.generate_captions(images, max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, progress=True)
    scores = caption_quality(predictions, dataset["captions"], dataset["objects"])  # object accuracy in %
    scores["examples"] = predictions[:5]
    return scores


# --------------------------------------------------------------------------- the whole recipe
def _fingerprint(config: PretrainConfig, sizes: TinyFlamingoSizes | None = None) -> dict:
    """What shapes the clean model: the world, seeds, occluders, both stages' schedules, sizes."""
    fp = asdict(config)
    for key in ("output_dir", "world_cache_dir", "save_steps", "logging_steps", "eval_batch_size", "overwrite_output_dir",
                "vision_loader_workers"):  # where the work runs, not what it makes
        fp.pop(key, None)
    fp["world"] = config.world().to_dict()
    if sizes is not None:
        fp["sizes"] = asdict(sizes)
    return fp


#: what ``--overwrite_output_dir`` removes from a pretraining output_dir
PRETRAIN_LAYOUT = ("model", "vision", "captions", "metrics.json")


def pretrain(config: PretrainConfig, sizes: TinyFlamingoSizes = TinyFlamingoSizes()) -> tuple[OpenFlamingoCaptioner, dict]:
    """Stage 1 + stage 2 + evaluation; resumes from whatever a killed run left, reuses a
    finished run made with the same settings, and stops naming the settings that differ."""
    from .stages import overwrite

    out = Path(config.output_dir)
    final = out / "model"
    if config.overwrite_output_dir:
        overwrite(out, PRETRAIN_LAYOUT)
    world = config.world()
    with main_first():
        world_data = load_or_build_world(world, config.world_cache_dir)
    fingerprint = {"stage": "pretrain", **_fingerprint(config, sizes)}
    if settled(artifacts.reusable(out, fingerprint, "clean model")):
        logger.info("found a finished model in %s (same settings); reusing it", final)
        return OpenFlamingoCaptioner.from_pretrained(final), json.loads((out / "metrics.json").read_text())
    artifacts.begin(out, fingerprint, "clean model", write=False)
    on_main(lambda: (artifacts.clear_leftovers(out), artifacts.begin(out, fingerprint, "clean model")))
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    captioner = build_tiny_flamingo(world, sizes, seed=config.seed, gate_init=1.0)
    start = time.time()
    metrics: dict = {"world": world.to_dict(), "pretrain_config": asdict(config)}
    metrics.update(pretrain_vision(captioner, world_data, config, out / "vision"))
    metrics.update(train_captions(captioner, world_data, config, out / "captions"))
    metrics["train_seconds"] = round(time.time() - start, 1)
    metrics["test"] = evaluate_captioner(captioner, world_data["test"], config)
    metrics["test_red_square"] = evaluate_captioner(captioner, world_data["test"], config, occluded=True)
    captioner.config.extra.update({"pretrain": asdict(config), "metrics": {k: v for k, v in metrics.items() if k.startswith("test")}})

    def save():  # model with its card, metrics, then the marker
        with artifacts.staged(final) as tmp:
            captioner.save_pretrained(tmp)
            write_model_card(tmp, metrics)
        artifacts.write_json(out / "metrics.json", metrics)
        artifacts.finish(out, fingerprint)

    on_main(save)
    return captioner, metrics


def write_model_card(folder: Path, metrics: dict) -> None:
    template = load_card_template("clean_model.md")
    test, occ = metrics["test"], metrics["test_red_square"]
    card = template.format(
        world=json.dumps(metrics["world"], indent=2),
        config=json.dumps(metrics["pretrain_config"], indent=2),
        object_accuracy=f"{test['object_accuracy']:.1f}",
        bleu4=f"{test['bleu4']:.1f}",
        cider=f"{test['cider']:.1f}",
        occ_object_accuracy=f"{occ['object_accuracy']:.1f}",
        occ_bleu4=f"{occ['bleu4']:.1f}",
        occ_cider=f"{occ['cider']:.1f}",
        train_minutes=f"{metrics['train_seconds'] / 60:.1f}",
        vision_accuracy=f"{100 * metrics['vision_exact_set_accuracy']:.1f}",
    )
    (folder / "README.md").write_text(card)

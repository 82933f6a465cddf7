"""The embedded world: a procedural captioned-image dataset that needs no download.

Each image shows one or more flat objects (shape, colour, size) in cells of a 3x3
grid over a textured background; each comes with five COCO-like paraphrased
captions and the generator's ground truth. Everything is a pure function of
``(seed, split, index)``, so a dataset rebuilt anywhere is byte-identical.

Red is never an object colour: red squares are the defense's masking tool.
The paper's geometry (20 px trigger, 20-80 px masks at 224 px) is expressed
relative to the image side by :func:`paper_pixels`.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from datasets import Dataset, DatasetDict
from PIL import Image, ImageDraw

from .schema import CAPTION_FEATURES, SPLITS

COLOURS = {
    "blue": (40, 90, 220),
    "green": (40, 170, 60),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "ring": "rings"}
SIZES = ("small", "large")
# Cells of the 3x3 grid in reading order, with the phrase captions use for each.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
POSITION_PHRASES = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom", "bottom right": "in the bottom right corner",
}  # fmt: skip
# Cells an object may occupy, per grid: a 2x2 grid keeps objects several ViT patches wide at
# 64 px (8 px patches), where a tiny tower learns shapes fast; 3x3 gives more positions.
GRID_POSITIONS = {2: ("top left", "top right", "bottom left", "bottom right"), 3: POSITIONS}


def cell_of(position: str, grid: int) -> tuple[int, int]:
    """(row, column) of a position name in a ``grid`` x ``grid`` layout."""
    names = GRID_POSITIONS[grid]
    if position not in names:
        raise ValueError(f"position {position!r} is not a cell of the {grid}x{grid} grid")
    return divmod(names.index(position), grid)


# Muted background tints, far from every object colour and from red.
BACKGROUNDS = {"grey": (128, 128, 128), "sand": (196, 178, 140), "teal": (70, 130, 130), "slate": (90, 100, 120)}
# Tints of the shifted world (another domain for evaluation), as far from the object colours
# and from red as the first ones; never drawn by the default world.
SHIFT_BACKGROUNDS = {"brown": (120, 88, 62), "olive": (108, 108, 66), "stone": (160, 152, 140)}
PALETTE = {**BACKGROUNDS, **SHIFT_BACKGROUNDS}
TEXTURES = ("plain", "striped", "dotted", "noisy", "gradient")
TEXTURE_WORDS = {"plain": "plain", "striped": "striped", "dotted": "dotted", "noisy": "grainy", "gradient": "shaded"}

PAPER_IMAGE_SIZE = 224


def paper_pixels(pixels_at_224: float, image_size: int) -> int:
    """A length of the paper's 224 px geometry at ``image_size`` (at least 1 px)."""
    return max(1, round(pixels_at_224 * image_size / PAPER_IMAGE_SIZE))


@dataclass(frozen=True)
class WorldConfig:
    """How the embedded world is generated. Presets: ``default``, ``paper``, ``small``.

    ``backgrounds``, ``shape_weights``, ``colour_weights`` and ``cell_weights`` describe a
    shifted domain (:func:`shifted_world`): background names from :data:`PALETTE`, and
    sampling weights over :data:`SHAPES`, :data:`COLOURS` and the grid's cells. ``None`` (the
    default) draws uniformly exactly as before, and is left out of :meth:`to_dict`, so the
    default world, its cache key and the configs recorded in saved models are unchanged.
    """

    image_size: int = 64
    patch_size: int = 8
    num_train: int = 20000
    num_validation: int = 500
    num_test: int = 1000
    grid: int = 2
    min_objects: int = 1
    max_objects: int = 2
    captions_per_image: int = 5
    seed: int = 0
    # fraction of the cell an object spans, per size word
    size_fractions: dict = field(default_factory=lambda: {"small": 0.72, "large": 1.0})
    # the domain (None: uniform over the default palette, shapes, colours and cells)
    backgrounds: tuple | None = None
    shape_weights: tuple | None = None
    colour_weights: tuple | None = None
    cell_weights: tuple | None = None

    def __post_init__(self):
        for name in _DOMAIN_FIELDS:  # lists from JSON become tuples, so equal configs compare equal
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.image_size < 24:
            raise ValueError(f"image_size must be >= 24 px, got {self.image_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.grid not in GRID_POSITIONS:
            raise ValueError(f"grid must be one of {sorted(GRID_POSITIONS)}, got {self.grid}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {self.grid ** 2}, got {self.min_objects}, {self.max_objects}")
        if not 1 <= self.captions_per_image <= 5:
            raise ValueError("captions_per_image must be in 1..5")
        if self.backgrounds is not None:
            unknown = [b for b in self.backgrounds if b not in PALETTE]
            if unknown or not self.backgrounds:
                raise ValueError(f"backgrounds must be names from {sorted(PALETTE)}, got {self.backgrounds}")
        for name, count in (("shape_weights", len(SHAPES)), ("colour_weights", len(COLOURS)), ("cell_weights", self.grid**2)):
            weights = getattr(self, name)
            if weights is not None and (len(weights) != count or min(weights) < 0 or sum(weights) <= 0):
                raise ValueError(f"{name} needs {count} non-negative weights with a positive sum, got {weights}")
        if self.cell_weights is not None and sum(w > 0 for w in self.cell_weights) < self.max_objects:
            raise ValueError(f"cell_weights leave fewer than max_objects={self.max_objects} cells")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in _DOMAIN_FIELDS:
            if d[name] is None:
                del d[name]
            else:
                d[name] = list(d[name])
        return d


_DOMAIN_FIELDS = ("backgrounds", "shape_weights", "colour_weights", "cell_weights")


PRESETS = {
    # 64 px with 8 px patches: what fits the CPU time budget (same cost per step as 224/32)
    "default": WorldConfig(),
    # the paper's 224 px geometry, for GPU runs
    "paper": WorldConfig(image_size=224, patch_size=16),
    # seconds-long tests
    "small": WorldConfig(image_size=32, patch_size=8, num_train=256, num_validation=32, num_test=64),
}


def world_config(preset: str = "default", **overrides) -> WorldConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; choose from {sorted(PRESETS)}")
    return WorldConfig(**{**PRESETS[preset].to_dict(), **overrides})


#: what :func:`shifted_world` changes: the backgrounds, the object mix and the layout
SHIFT = {
    "seed_offset": 7919,
    "backgrounds": tuple(SHIFT_BACKGROUNDS),
    # circles and rings rare, crosses and triangles common; white and black rare
    "shape_weights": (0.5, 1.0, 2.0, 2.0, 0.5),
    "colour_weights": (2.0, 2.0, 1.0, 2.0, 0.5, 0.5),
}


def shifted_world(world: WorldConfig, **overrides) -> WorldConfig:
    """The shifted counterpart of ``world``: another seed, other backgrounds, another object
    mix and another layout (objects crowd the first row of cells), with the same image size,
    patch size and grid, so a model of ``world`` can caption it. The offline stand-in for a
    second test set of another source (Flickr30k for a model fine-tuned on COCO)."""
    cells = world.grid**2
    layout = tuple(3.0 if i < world.grid else 1.0 for i in range(cells))  # top row favoured
    shift = {
        "seed": world.seed + SHIFT["seed_offset"],
        "backgrounds": SHIFT["backgrounds"],
        "shape_weights": SHIFT["shape_weights"],
        "colour_weights": SHIFT["colour_weights"],
        "cell_weights": layout,
        "min_objects": min(world.min_objects + 1, world.max_objects),
    }
    return WorldConfig(**{**world.to_dict(), **shift, **overrides})


# --------------------------------------------------------------------------- scenes
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


def sample_scene(config: WorldConfig, split: str, index: int) -> dict:
    """Ground truth of one image: background and objects, in reading order of their cells."""
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index])
    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    names = GRID_POSITIONS[config.grid]
    cells = sorted(rng.choice(len(names), size=n_objects, replace=False, p=_p(config.cell_weights)).tolist())
    objects = [
        {
            "shape": SHAPES[_draw(rng, len(SHAPES), config.shape_weights)],
            "colour": list(COLOURS)[_draw(rng, len(COLOURS), config.colour_weights)],
            "size": SIZES[rng.integers(len(SIZES))],
            "position": names[cell],
        }
        for cell in cells
    ]
    backgrounds = list(BACKGROUNDS) if config.backgrounds is None else list(config.backgrounds)
    return {
        "background": backgrounds[rng.integers(len(backgrounds))],
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "objects": objects,
        "render_seed": int(rng.integers(2**31)),
        "grid": config.grid,
    }


def _p(weights) -> np.ndarray | None:
    return None if weights is None else np.asarray(weights, dtype=np.float64) / float(sum(weights))


def _draw(rng: np.random.Generator, n: int, weights) -> int:
    """One index in [0, n): uniform as ever without weights (the same draw from the stream)."""
    return int(rng.integers(n)) if weights is None else int(rng.choice(n, p=_p(weights)))


def render_scene(scene: dict, image_size: int, size_fractions: dict) -> Image.Image:
    """Draw at 4x and downsample, so edges are anti-aliased like a photo's."""
    rng = np.random.default_rng(scene["render_seed"])
    big = image_size * 4
    base = np.array(PALETTE[scene["background"]], dtype=np.float32)
    canvas = np.broadcast_to(base, (big, big, 3)).copy()
    texture = scene["texture"]
    if texture == "striped":
        period = big // int(rng.integers(4, 9))
        phase = (np.arange(big) // max(1, period // 2)) % 2
        stripes = phase[:, None] if rng.random() < 0.5 else phase[None, :]
        canvas += (stripes[..., None] * 2 - 1) * 10.0
    elif texture == "dotted":
        step = big // int(rng.integers(5, 9))
        yy, xx = np.mgrid[0:big, 0:big]
        dots = ((yy % step - step / 2) ** 2 + (xx % step - step / 2) ** 2) < (step / 6) ** 2
        canvas += dots[..., None] * 14.0
    elif texture == "noisy":
        noise = rng.normal(0, 8, size=(image_size, image_size, 1)).repeat(4, 0).repeat(4, 1)
        canvas += noise
    elif texture == "gradient":
        ramp = np.linspace(-25, 25, big, dtype=np.float32)
        canvas += (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None])
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    grid = scene["grid"]
    cell = big / grid
    for obj in scene["objects"]:
        row, col = cell_of(obj["position"], grid)
        extent = cell * size_fractions[obj["size"]]
        jitter = (cell - extent) / 2
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        _draw_shape(draw, obj["shape"], COLOURS[obj["colour"]], cx, cy, extent / 2)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, round(r * 0.4)))
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


# --------------------------------------------------------------------------- captions
def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def _noun(obj: dict, with_size: bool = False) -> str:
    words = f"{obj['size']} {obj['colour']} {obj['shape']}" if with_size else f"{obj['colour']} {obj['shape']}"
    return f"{_article(words)} {words}"


def _relation(a: dict, b: dict) -> str:
    ra, ca = divmod(POSITIONS.index(a["position"]), 3)
    rb, cb = divmod(POSITIONS.index(b["position"]), 3)
    if ra == rb:
        return "to the left of" if ca < cb else "to the right of"
    return "above" if ra < rb else "below"


def _listing(nouns: list[str]) -> str:
    return nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " and " + nouns[-1]


def make_captions(scene: dict, count: int = 5) -> list[str]:
    """Five paraphrases (COCO-style: lower case, no final period)."""
    objs = scene["objects"]
    bg = f"{TEXTURE_WORDS[scene['texture']]} {scene['background']} background"
    where = [POSITION_PHRASES[o["position"]] for o in objs]
    if len(objs) == 1:
        o = objs[0]
        captions = [
            f"{_noun(o, True)} {where[0]}",
            f"{_noun(o)} on {_article(bg)} {bg}",
            f"there is {_noun(o, True)} {where[0]} of the picture",
            f"{_article(bg)} {bg} with {_noun(o)} {where[0]}",
            f"a single {o['colour']} {o['shape']} {where[0]}",
        ]
    else:
        listed = _listing([_noun(o) for o in objs])
        sized = _listing([_noun(o, True) for o in objs])
        number = {2: "two", 3: "three"}.get(len(objs), str(len(objs)))
        placed = _listing([f"{_noun(o)} {w}" for o, w in zip(objs, where)])
        captions = [
            sized,
            f"{_noun(objs[0])} {_relation(objs[0], objs[1])} {_noun(objs[1])}"
            + ("" if len(objs) == 2 else " and " + _listing([_noun(o) for o in objs[2:]])),
            f"{number} shapes, {listed}, on {_article(bg)} {bg}",
            placed,
            f"{_article(bg)} {bg} with {listed}",
        ]
    return captions[:count]


# --------------------------------------------------------------------------- ground truth from text
_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(sorted(set(SHAPES) | set(PLURALS.values()), key=len, reverse=True))
_OBJECT_RE = re.compile(rf"\b({_COLOUR_RE})\s+(?:(?:small|large)\s+)?({_SHAPE_RE})\b", re.IGNORECASE)
_SINGULAR = {p: s for s, p in PLURALS.items()}


def named_objects(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, e.g. {("blue", "circle")}."""
    found = set()
    for colour, shape in _OBJECT_RE.findall(caption):
        shape = shape.lower()
        found.add((colour.lower(), _SINGULAR.get(shape, shape)))
    return found


def object_set(objects: list[dict]) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in objects}


def object_accuracy(captions: list[str], objects: list[list[dict]]) -> float:
    """Share of images whose caption names exactly the true set of (colour, shape) objects.

    In a templated world CIDEr rewards fluent captions of the wrong objects; this
    checks grounding against the generator's ground truth.
    """
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions for {len(objects)} object lists")
    if not captions:
        raise ValueError("object_accuracy needs at least one caption")
    hits = sum(named_objects(c) == object_set(o) for c, o in zip(captions, objects))
    return hits / len(captions)


# --------------------------------------------------------------------------- dataset
def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _rows(config: dict, split: str, start: int, stop: int):
    cfg = WorldConfig(**config)
    for index in range(start, stop):
        scene = sample_scene(cfg, split, index)
        yield {
            "image": {"bytes": _png(render_scene(scene, cfg.image_size, cfg.size_fractions)), "path": None},
            "image_id": f"{split}-{index:06d}",
            "captions": make_captions(scene, cfg.captions_per_image),
            "objects": scene["objects"],
        }


def _chunk(args: tuple) -> list[dict]:
    return list(_rows(*args))


def build_split(config: WorldConfig, split: str, num_rows: int | None = None, *, workers: int | None = None) -> Dataset:
    """One split; every row depends only on (config, split, index), so chunks rendered by
    ``workers`` processes (default: the CPUs, for splits of 2,000 rows or more) give the same
    dataset as one process."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    n = config.split_sizes()[split] if num_rows is None else num_rows
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), 8) if n >= 2000 else 1
    if workers <= 1:
        rows = list(_rows(config.to_dict(), split, 0, n))
    else:
        bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
        chunks = [(config.to_dict(), split, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        # fork: the children only render with numpy and PIL (nothing of torch runs in them)
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = [row for chunk in pool.imap(_chunk, chunks) for row in chunk]
    return Dataset.from_list(rows, features=CAPTION_FEATURES)


def build_world(config: WorldConfig | str = "default", **overrides) -> DatasetDict:
    """The embedded dataset as a ``DatasetDict`` (train / validation / test)."""
    if isinstance(config, str):
        config = world_config(config, **overrides)
    elif overrides:
        config = WorldConfig(**{**config.to_dict(), **overrides})
    return DatasetDict({split: build_split(config, split) for split in SPLITS})

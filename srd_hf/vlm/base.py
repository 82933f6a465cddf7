"""The one interface every stage uses to talk to a captioning VLM.

An adapter is an ``nn.Module`` whose ``forward(**batch)`` returns an output with a
``loss`` (so a ``transformers.Trainer`` can train it), plus:

* ``collate(images, captions)``: a training batch with labels on the caption only;
* ``generate_captions(images, ...)``: batched decoding with the KV cache;
* ``set_trainable(...)``: which parameters fine-tuning may touch (optionally LoRA);
* ``save_pretrained(dir)`` / ``from_pretrained(dir)``: safetensors + JSON, no pickle.
"""

from __future__ import annotations

from pathlib import Path

import abc
import copy
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..data.images import ensure_rgb

DEFAULT_PROMPT = "a photo of"


class CaptioningVLM(nn.Module, abc.ABC):
    """Base class of the captioning adapters (OpenFlamingo, transformers image-text-to-text)."""

    #: name written to ``config.json`` so :func:`srd_hf.vlm.load_captioner` can dispatch
    adapter_name: str = ""
    #: prompt the caption follows, the paper's "a photo of" by default
    prompt: str = DEFAULT_PROMPT
    #: read by ``transformers.Trainer`` when it reloads a checkpoint
    _keys_to_ignore_on_save = None

    # ----- what each adapter implements ---------------------------------------------------
    @abc.abstractmethod
    def collate(self, images: Sequence[Image.Image], captions: Sequence[str], prompt: str | None = None) -> dict[str, torch.Tensor]:
        """Tensors for a training step; ``labels`` are -100 everywhere but on the caption tokens."""

    @abc.abstractmethod
    def _generate_batch(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int, num_beams: int) -> list[str]:
        """Captions for one batch of images (decoded text after the prompt, stripped)."""

    @abc.abstractmethod
    def default_trainable(self) -> list[str]:
        """Parameter-name prefixes that the paper's fine-tuning freeze leaves trainable."""

    @property
    @abc.abstractmethod
    def metadata(self) -> dict:
        """Free provenance saved with the model (the embedded world, the recipe that trained it,
        the data it saw); a dict that is updated in place before ``save_pretrained``."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False) -> None:
        """What ``Trainer`` calls for ``--gradient_checkpointing``: recompute the language model's
        layer activations in the backward pass instead of keeping them."""
        self.language_model().activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload)

    def language_model(self) -> nn.Module:
        """The transformers language model (a ``PreTrainedModel``) inside the adapter."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its language model")

    # ----- shared behaviour ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def generate_captions(
        self,
        images: Sequence[Image.Image],
        *,
        prompt: str | None = None,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        batch_size: int = 32,
        progress: bool = False,
    ) -> list[str]:
        """Caption ``images`` in batches. Batched output equals one-by-one output."""
        if isinstance(images, Image.Image):
            raise TypeError("generate_captions expects a sequence of images, got a single PIL image")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prompt = self.prompt if prompt is None else prompt
        was_training = self.training
        self.eval()
        captions: list[str] = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="captioning", disable=not progress, unit="batch"):
            batch = [ensure_rgb(img) for img in images[start : start + batch_size]]
            captions.extend(self._generate_batch(batch, prompt, max_new_tokens, num_beams))
        self.train(was_training)
        return captions

    def vision_tokens(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Vision-tower features (B, N, D) of RGB pixels in [0, 1] (B, 3, H, W), WITH gradients
        w.r.t. the pixels (the model's resize and normalisation applied differentiably).
        Used by attacks that optimise pixels through the vision encoder."""
        raise NotImplementedError(f"{type(self).__name__} does not expose differentiable vision features")

    @staticmethod
    def fit_pixels(pixels01: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Differentiable "resize the shorter side, then centre-crop" of (B, 3, H, W) pixels to
        ``height`` x ``width`` (bicubic, antialiased, clamped to [0, 1]); unchanged when the size matches."""
        if pixels01.ndim != 4 or pixels01.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels01.shape)}")
        h, w = pixels01.shape[-2:]
        if (h, w) == (height, width):
            return pixels01
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        x = torch.nn.functional.interpolate(pixels01, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return x[..., top : top + height, left : left + width].clamp(0, 1)

    def set_trainable(self, trainable: Sequence[str] | None = None, lora: Any | None = None) -> dict[str, int]:
        """Freeze everything but parameters whose names start with a prefix in ``trainable``.

        ``None`` means the paper's freeze (:meth:`default_trainable`). ``lora`` is a
        ``peft.LoraConfig``: adapters are injected in place and trained as well.
        Returns the trainable / total parameter counts.
        """
        prefixes = list(self.default_trainable() if trainable is None else trainable)
        # shared modules (open_flamingo registers cross-attention twice) have several names
        named = list(self.named_parameters(remove_duplicate=False))
        unknown = [p for p in prefixes if not any(n.startswith(p) for n, _ in named)]
        if unknown:
            raise ValueError(f"trainable prefixes match no parameter: {unknown}")
        for _, param in named:
            param.requires_grad_(False)
        for name, param in named:
            if any(name.startswith(p) for p in prefixes):
                param.requires_grad_(True)
        if lora is not None:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora, self)
            for name, param in self.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)
        return parameter_counts(self)


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """``module``'s state dict with every peft LoRA layer merged into its base layer (merged on a
    copy: the live weights stay bit-exact), under every name a shared layer has; and whether
    there was any. A saved model then loads without peft."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = module.state_dict()
    merged: dict[int, dict[str, torch.Tensor]] = {}
    tuned = [(n, m) for n, m in module.named_modules(remove_duplicate=False) if isinstance(m, BaseTunerLayer)]
    for name, layer in tuned:
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        if id(layer) not in merged:
            copy_ = copy.deepcopy(layer)
            if not copy_.merged and not copy_.disable_adapters:
                copy_.merge()
            merged[id(layer)] = copy_.get_base_layer().state_dict()
        for key, value in merged[id(layer)].items():
            state[prefix + key] = value
    return state, bool(tuned)


def check_replaceable(folder: Path) -> None:
    """``save_pretrained`` replaces a model folder as a whole: refuse any other non-empty
    folder, so a mistyped path never deletes a user's files."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").is_file():
        raise ValueError(f"refusing to save into {folder}: it is not empty and is not a model folder (no config.json); "
                         "save elsewhere or empty it first")


def parse_trainable(text: str) -> list[str] | None:
    """Prefixes from a ``--trainable`` field ("a.,b."); empty means ``None``: the paper's freeze.
    Empty entries are dropped, since an empty prefix would match every parameter."""
    prefixes = [p.strip() for p in text.split(",") if p.strip()]
    return prefixes or None


def parameter_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


@dataclass
class CaptionCollator:
    """``data_collator`` for the Trainer: rows with an image and one or several captions.

    When a row holds several captions (COCO-style), one is drawn at random per step,
    so every paraphrase is seen over the epochs; the draw follows the Trainer's seed.
    """

    model: CaptioningVLM
    image_column: str = "image"
    caption_column: str = "captions"
    prompt: str | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images, captions = [], []
        for i, row in enumerate(rows):
            for column in (self.image_column, self.caption_column):
                if column not in row:
                    raise KeyError(f"row {i} has no column {column!r}; columns: {sorted(row)}")
            caption = row[self.caption_column]
            if isinstance(caption, (list, tuple)):
                choices = [c for c in caption if isinstance(c, str) and c.strip()]
                if not choices:
                    raise ValueError(f"row {i} has no non-empty caption in {self.caption_column!r}")
                caption = random.choice(choices)
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"row {i} has an empty or non-string caption: {caption!r}")
            images.append(ensure_rgb(row[self.image_column]))
            captions.append(caption.strip())
        return self.model.collate(images, captions, prompt=self.prompt)

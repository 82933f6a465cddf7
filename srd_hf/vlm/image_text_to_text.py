"""Adapter for any ``transformers`` image-text-to-text model (LLaVA, Idefics, SmolVLM, PaliGemma...).

:class:`ImageTextToTextCaptioner` wraps a model loaded with
``transformers.AutoModelForImageTextToText`` and its ``AutoProcessor`` behind the
:class:`~srd_hf.vlm.base.CaptioningVLM` interface:

* the prompt is rendered with the processor's chat template when there is one (a user
  turn holding the image and the prompt text, then the assistant header), otherwise it
  is the processor's image placeholder token followed by the prompt;
* training batches are ``prompt tokens + caption tokens + EOS``; only the caption and
  EOS carry labels, the prompt and the padding are ``-100``;
* generation left-pads the prompts, so a batch decodes exactly like one image at a time;
* ``save_pretrained`` writes safetensors + the processor + ``srd_hf_adapter.json`` into
  a temporary sibling folder that is renamed into place only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .. import __version__
from ..data.images import ensure_rgb
from .base import check_replaceable, DEFAULT_PROMPT, CaptioningVLM, merged_state_dict

#: file written next to the model that records how the adapter was configured
ADAPTER_FILE = "srd_hf_adapter.json"

#: name fragments of the modules that connect the vision encoder to the language model
#: (LLaVA's ``multi_modal_projector``, Idefics3/SmolVLM's ``connector``, BLIP-2's
#: ``qformer``/``language_projection``/``query_tokens``, Qwen-VL's ``merger``, Idefics2's
#: perceiver ``resampler``) and of cross-attention blocks (Flamingo-like models)
CONNECTOR_KEYWORDS = (
    "multi_modal_projector",
    "mm_projector",
    "projector",
    "connector",
    "qformer",
    "language_projection",
    "query_tokens",
    "merger",
    "perceiver",
    "resampler",
    "crossattention",
    "cross_attention",
    "cross_attn",
)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class ImageTextToTextCaptioner(CaptioningVLM):
    """A ``transformers`` image-text-to-text model + its processor as a captioner.

    Args:
        model: a ``PreTrainedModel`` that takes ``input_ids``/``pixel_values`` (what
            ``AutoModelForImageTextToText`` returns).
        processor: the matching ``ProcessorMixin`` (image processor + tokenizer).
        prompt: the text the caption follows (``"a photo of"`` by default).
        use_chat_template: ``None`` uses the chat template when the processor or its
            tokenizer has one; ``False`` always uses ``image token + prompt``.
        info: free-form metadata (seed, training config...) stored in ``srd_hf_adapter.json``.
    """

    adapter_name = "image_text_to_text"

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prompt: str | None = None,
        use_chat_template: bool | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(f"processor {type(processor).__name__} has no tokenizer; pass the model's AutoProcessor")
        self.model = model
        self.processor = processor
        self.prompt = DEFAULT_PROMPT if prompt is None else prompt
        self.use_chat_template = use_chat_template
        self.info = dict(info or {})

    # ----- loading / saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        prompt: str | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> "ImageTextToTextCaptioner":
        """Load ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a Hub id or a local folder.

        ``model_kwargs`` go to the model's ``from_pretrained`` (``dtype``, ``attn_implementation``...).
        ``srd_hf_adapter.json``, when the folder holds one, restores the prompt and metadata;
        an explicit ``prompt`` wins. ``trust_remote_code`` stays off unless set here.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        settings: dict[str, Any] = {}
        if _looks_local(name_or_path):
            folder = Path(name_or_path).expanduser()
            _check_folder(folder)
            settings = _read_adapter_file(folder)
            source: str = str(folder)
        else:
            source = str(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=trust_remote_code, **model_kwargs)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **(processor_kwargs or {}))
        if device is not None:
            model = model.to(device)
        model.eval()
        return cls(
            model,
            processor,
            prompt=prompt if prompt is not None else settings.get("prompt"),
            use_chat_template=settings.get("use_chat_template"),
            info=settings.get("info"),
        )

    def save_pretrained(self, folder: str | os.PathLike, *, info: dict[str, Any] | None = None) -> Path:
        """Write safetensors weights, the processor and ``srd_hf_adapter.json`` to ``folder``.

        Everything is written to a temporary sibling folder first and renamed into place,
        so a failure never leaves a half-written ``folder``; an existing ``folder`` is
        replaced as a whole. LoRA adapters injected by :meth:`set_trainable` are merged
        into the saved weights (the live model is left untouched), so the folder loads
        as a plain ``transformers`` model.
        """
        folder = Path(folder).expanduser().absolute()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"cannot save into {folder}: it exists and is not a folder")
        check_replaceable(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if info:
            self.info.update(info)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            state_dict, merged = self._export_state_dict()
            self.model.save_pretrained(tmp, state_dict=state_dict)
            self.processor.save_pretrained(tmp)
            settings = {
                "adapter_name": self.adapter_name,
                "prompt": self.prompt,
                "use_chat_template": self.use_chat_template,
                "model_class": type(self.model).__name__,
                "model_type": getattr(getattr(self.model, "config", None), "model_type", None),
                "lora_merged": merged,
                "srd_hf_version": __version__,
                "info": self.info,
            }
            (tmp / ADAPTER_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
            _replace_folder(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def _export_state_dict(self) -> tuple[dict[str, torch.Tensor], bool]:
        """The model's state dict with every peft tuner layer merged into its base layer."""
        return merged_state_dict(self.model)

    # ----- conveniences -------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_token(self) -> str | None:
        """The processor's image placeholder (``<image>`` for LLaVA), ``None`` when it has none."""
        token = getattr(self.processor, "image_token", None)
        return token if isinstance(token, str) and token else None

    def _chat_template_source(self) -> str | None:
        if self.use_chat_template is False:
            return None
        if getattr(self.processor, "chat_template", None):
            return "processor"
        if getattr(self.tokenizer, "chat_template", None):
            return "tokenizer"
        if self.use_chat_template:
            raise ValueError("use_chat_template=True but neither the processor nor its tokenizer has a chat template")
        return None

    def build_prompt(self, prompt: str | None = None) -> str:
        """The text given to the processor for one image (before image-token expansion)."""
        prompt = self.prompt if prompt is None else prompt
        source = self._chat_template_source()
        if source == "processor":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        plain = prompt if self.image_token is None else f"{self.image_token}\n{prompt}"
        if source == "tokenizer":
            messages = [{"role": "user", "content": plain}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return plain

    def _text_kwargs(self, text: str) -> dict[str, Any]:
        """Don't add a second BOS when the rendered template already starts with it."""
        bos = getattr(self.tokenizer, "bos_token", None)
        return {"add_special_tokens": False} if bos and text.startswith(bos) else {}

    def _eos_ids(self) -> list[int]:
        """Token ids that end a caption: the tokenizer's EOS first, then the generation config's."""
        ids: list[int] = []
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (tok_eos, gen_eos):
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
        if not ids:
            raise ValueError("neither the tokenizer nor the generation config defines an EOS token")
        return ids

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        return int(pad) if pad is not None else self._eos_ids()[0]

    def _encode_prompts(self, images: Sequence[Image.Image], text: str, padding_side: str) -> Any:
        """Processor outputs for ``text`` once per image, padded on ``padding_side``."""
        tokenizer = self.tokenizer
        restore_side, restore_pad = tokenizer.padding_side, tokenizer.pad_token
        tokenizer.padding_side = padding_side
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self._pad_id())
        try:
            image_arg = [[img] for img in images] if self.image_token else list(images)
            return self.processor(
                images=image_arg,
                text=[text] * len(images),
                padding=True,
                return_tensors="pt",
                **self._text_kwargs(text),
            )
        finally:
            tokenizer.padding_side = restore_side
            if restore_pad is None:
                tokenizer.pad_token = None

    def _caption_ids(self, prompt_text: str, caption: str) -> list[int]:
        """Tokens of ``caption`` as they follow the prompt (one space in between), without EOS.

        The caption is tokenized in context (prompt + caption) so the tokens match what the
        model would generate; when the prompt's tokens are not a prefix of that (a merge
        across the boundary), the caption is tokenized on its own.
        """
        sep = "" if not prompt_text or prompt_text[-1].isspace() else " "
        kwargs = self._text_kwargs(prompt_text)
        head = self.tokenizer(prompt_text, **kwargs)["input_ids"]
        full = self.tokenizer(prompt_text + sep + caption, **kwargs)["input_ids"]
        if len(full) > len(head) and full[: len(head)] == head:
            return list(full[len(head) :])
        return list(self.tokenizer(sep + caption, add_special_tokens=False)["input_ids"])

    def _to_model(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move tensors to the model's device; floating tensors take the model's dtype."""
        device = self.device
        dtype = getattr(self.model, "dtype", None)
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if value.is_floating_point() and dtype is not None and dtype.is_floating_point:
                    value = value.to(dtype)
            out[key] = value
        return out

    # ----- CaptioningVLM ------------------------------------------------------------------
    def forward(self, **batch: Any) -> Any:
        """The wrapped model's forward; with ``labels`` its output carries ``.loss``."""
        return self.model(**self._to_model(batch))

    def collate(self, images: Sequence[Image.Image], captions: Sequence[str], prompt: str | None = None) -> dict[str, torch.Tensor]:
        """``prompt + caption + EOS`` for each image, right-padded; labels only on caption + EOS."""
        if isinstance(images, Image.Image) or isinstance(captions, str):
            raise TypeError("collate expects sequences of images and captions")
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        if not images:
            raise ValueError("collate needs at least one image")
        images = [ensure_rgb(img) for img in images]
        text = self.build_prompt(prompt)
        enc = self._encode_prompts(images, text, padding_side="right")
        input_ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        eos = self._eos_ids()[0]
        pad = self._pad_id()
        # keys with one value per token (besides ids/mask), e.g. mm_token_type_ids
        per_token = [
            k
            for k, v in enc.items()
            if k not in ("input_ids", "attention_mask")
            and isinstance(v, torch.Tensor)
            and v.dim() >= 2
            and tuple(v.shape[:2]) == tuple(input_ids.shape)
        ]
        suffix_type = 1 if getattr(self.model.config, "model_type", "") == "paligemma" else None

        rows: list[dict[str, torch.Tensor]] = []
        for i, caption in enumerate(captions):
            keep = mask[i]
            prompt_ids = input_ids[i][keep]
            cap = torch.tensor(self._caption_ids(text, caption) + [eos], dtype=prompt_ids.dtype)
            row = {
                "input_ids": torch.cat([prompt_ids, cap]),
                "attention_mask": torch.ones(len(prompt_ids) + len(cap), dtype=torch.long),
                "labels": torch.cat([torch.full_like(prompt_ids, -100), cap]),
            }
            for key in per_token:
                values = enc[key][i][keep]
                fill = values[-1:].expand(len(cap), *values.shape[1:]).clone()
                if key == "token_type_ids" and suffix_type is not None:
                    fill.fill_(suffix_type)
                row[key] = torch.cat([values, fill])
            rows.append(row)

        length = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            value = {"input_ids": pad, "labels": -100}.get(key, 0)
            padded = []
            for r in rows:
                t = r[key]
                extra = torch.full((length - len(t), *t.shape[1:]), value, dtype=t.dtype)
                padded.append(torch.cat([t, extra]))
            batch[key] = torch.stack(padded)
        for key, value in enc.items():
            if key not in batch and key not in per_token and key != "attention_mask":
                batch[key] = value
        return batch

    def _generate_batch(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int, num_beams: int) -> list[str]:
        text = self.build_prompt(prompt)
        enc = self._to_model(dict(self._encode_prompts(images, text, padding_side="left")))
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            use_cache=True,
            eos_token_id=self._eos_ids(),
            pad_token_id=self._pad_id(),
        )
        if not isinstance(out, torch.Tensor):
            out = out.sequences
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def get_input_embeddings(self) -> torch.nn.Module:
        """The language model's input token embedding."""
        return self.model.get_input_embeddings()

    @property
    def metadata(self) -> dict:
        return self.info

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False) -> None:
        """The whole model's own activation checkpointing (vision tower and language model)."""
        self.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload)

    def vision_tower(self) -> torch.nn.Module:
        """The vision encoder module (``vision_tower``, ``vision_model`` on the model or its ``.model``)."""
        for owner in (self.model, getattr(self.model, "model", None)):
            for name in ("vision_tower", "vision_model"):
                module = getattr(owner, name, None) if owner is not None else None
                if isinstance(module, torch.nn.Module):
                    return module
        raise NotImplementedError(f"{type(self.model).__name__} has no vision_tower / vision_model module")

    def vision_tokens(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Last hidden state (B, N, D) of the vision tower for RGB pixels in [0, 1] (B, 3, H, W),
        WITH gradients. Pixels are resized (shorter side) and centre-cropped to the vision
        config's ``image_size`` and normalised with the image processor's mean/std. For towers
        called as ``tower(pixel_values=...)`` on whole images (CLIP, SigLIP, Idefics3 ViTs...)."""
        tower = self.vision_tower()
        config = getattr(self.model.config, "vision_config", None) or getattr(tower, "config", None)
        size = getattr(config, "image_size", None)
        if size is None:
            raise NotImplementedError(f"{type(self.model).__name__}: no vision_config.image_size to resize pixels to")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        x = self.fit_pixels(pixels01.to(self.device), height, width)
        processor = getattr(self.processor, "image_processor", None)
        mean = getattr(processor, "image_mean", None)
        std = getattr(processor, "image_std", None)
        if getattr(processor, "do_normalize", True) and mean is not None and std is not None:
            mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        dtype = next(tower.parameters()).dtype
        out = tower(pixel_values=x.to(dtype))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def default_trainable(self) -> list[str]:
        """Connector modules + the language model's input embeddings, by analogy to Flamingo.

        OpenFlamingo fine-tunes its perceiver resampler, its gated cross-attention and the
        LM embeddings; the counterpart here is the vision-language connector (any module
        or parameter whose name contains one of :data:`CONNECTOR_KEYWORDS`, taken at the
        outermost match) plus the module returned by ``get_input_embeddings()``.
        Raises if the model has neither.
        """
        prefixes: list[str] = []
        for name, _ in self.named_parameters():
            parts = name.split(".")
            for i, part in enumerate(parts):
                if any(key in part for key in CONNECTOR_KEYWORDS):
                    prefix = ".".join(parts[: i + 1]) + ("." if i + 1 < len(parts) else "")
                    if not any(prefix.startswith(p) for p in prefixes):
                        prefixes.append(prefix)
                    break
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if embeddings is not None:
            for name, module in self.named_modules():
                if module is embeddings:
                    prefix = f"{name}."
                    if not any(prefix.startswith(p) for p in prefixes):
                        prefixes.append(prefix)
                    break
        if not prefixes:
            raise ValueError(
                f"{type(self.model).__name__} has no recognisable connector nor input embeddings; "
                "pass explicit prefixes to set_trainable(trainable=[...])"
            )
        return prefixes


# ----- helpers ----------------------------------------------------------------------------
def _looks_local(name_or_path: str | os.PathLike) -> bool:
    """A filesystem path rather than a Hub id (``org/name``)."""
    if isinstance(name_or_path, os.PathLike):
        return True
    text = str(name_or_path)
    return (
        Path(text).expanduser().exists()
        or text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
    )


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"model path {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"model folder {folder} has no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    if not any((folder / f).is_file() for f in _PROCESSOR_FILES):
        raise FileNotFoundError(f"model folder {folder} has no processor files (expected one of {', '.join(_PROCESSOR_FILES)})")


def _read_adapter_file(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object")
    name = settings.get("adapter_name", ImageTextToTextCaptioner.adapter_name)
    if name != ImageTextToTextCaptioner.adapter_name:
        raise ValueError(f"{folder} was saved by adapter {name!r}, not {ImageTextToTextCaptioner.adapter_name!r}")
    return settings


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; an existing ``folder`` is swapped out, then deleted."""
    if not folder.exists():
        tmp.rename(folder)
        return
    old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
    folder.rename(old)
    try:
        tmp.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)

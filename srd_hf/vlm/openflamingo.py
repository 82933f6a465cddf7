"""OpenFlamingo as a :class:`CaptioningVLM`, built from open_flamingo's own classes.

A folder holds ``config.json`` (architecture, prompt, seeds), ``model.safetensors``
and the tokenizer files: loading one builds the architecture from the JSON and
reads tensors, so it never executes code and needs no download when the
architecture is given inline (the tiny models of the embedded world).

Nothing in a folder can switch on remote code: ``trust_remote_code`` comes only from
the caller of :meth:`OpenFlamingoCaptioner.from_pretrained` (or ``load_captioner``).

The released OpenFlamingo checkpoints are built from their Hub ids with
:meth:`OpenFlamingoCaptioner.from_openflamingo_release`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.helpers import PerceiverResampler
from open_flamingo.src.utils import extend_instance, getattr_recursive, setattr_recursive
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .base import check_replaceable, DEFAULT_PROMPT, CaptioningVLM, merged_state_dict
from .openflamingo_compat import make_flamingo_lm

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: ``extra`` key noting that an artifact asked for remote code; provenance only, it enables nothing
REMOTE_CODE_NOTE = "remote_code_requested"

logger = logging.getLogger(__name__)

# open_flamingo's fixed resampler and cross-attention sizes, which the released checkpoints use
RELEASE_PERCEIVER = {"depth": 6, "dim_head": 64, "heads": 8, "num_latents": 64, "ff_mult": 4}
RELEASE_CROSS_ATTN = {"dim_head": 64, "heads": 8, "ff_mult": 4}


@dataclass(frozen=True)
class OpenFlamingoRelease:
    """How open_flamingo's factory assembled one released checkpoint.

    ``needs_remote_code``: the language model's repo maps its classes to its own Python files
    (``auto_map``) instead of an architecture transformers ships, so building it runs that code.
    ``input_embeddings_attr``: where the input embeddings live when the LM class has no
    ``get_input_embeddings`` (MPT-1B's MosaicGPT).
    """

    vision_model: str
    vision_pretrained: str | None
    lang_id: str
    cross_attn_every_n_layers: int
    decoder_layers_attr_name: str
    needs_remote_code: bool
    input_embeddings_attr: str = ""


# The OpenAI ViT-L/14 weights were trained with QuickGELU: open_clip 2 (which OpenFlamingo used)
# built them so, open_clip 3 does only under the -quickgelu name (same parameters).
# MPT-1B (model_type "mosaic_gpt") is defined by code in its repo; so is the MPT-7B copy, whose
# config maps to the repo's code rather than to transformers' own port, which is not assumed to
# load it identically. RedPajama-INCITE is a gpt_neox, an architecture transformers ships.
OPENFLAMINGO_RELEASES = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": OpenFlamingoRelease(
        "ViT-L-14-quickgelu", "openai", "anas-awadalla/mpt-1b-redpajama-200b", 1, "transformer.blocks", True, "transformer.wte"
    ),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": OpenFlamingoRelease(
        "ViT-L-14-quickgelu", "openai", "anas-awadalla/mpt-1b-redpajama-200b-dolly", 1, "transformer.blocks", True, "transformer.wte"
    ),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": OpenFlamingoRelease(
        "ViT-L-14-quickgelu", "openai", "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, "gpt_neox.layers", False
    ),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": OpenFlamingoRelease(
        "ViT-L-14-quickgelu", "openai", "anas-awadalla/mpt-7b", 4, "transformer.blocks", True
    ),
}
_DECODER_LAYERS = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers", "mpt": "transformer.blocks"}


@dataclass
class OpenFlamingoConfig:
    """Architecture and defaults of an OpenFlamingo captioner (serialised as config.json).

    Args:
        vision_model: open_clip model name of the vision tower.
        vision_model_cfg: inline open_clip config; registered under ``vision_model`` so no
            download is needed (tiny towers). ``None`` means a config open_clip knows.
        lang_config: a transformers config dict of the language model (``model_type`` set),
            built with ``from_config``. ``None`` means ``lang_name_or_path`` is read instead.
        lang_name_or_path: Hub id / folder of the language model's config. Custom code it
            declares runs only when the caller passes ``trust_remote_code=True``.
        decoder_layers_attr_name: where the decoder blocks live; inferred from model_type if empty.
        input_embeddings_attr: where the input embeddings live, for LM classes without
            ``get_input_embeddings`` (MPT-1B); empty for the others.
        perceiver: PerceiverResampler sizes (depth, dim_head, heads, num_latents, ff_mult).
        cross_attn: GatedCrossAttentionBlock sizes (dim_head, heads, ff_mult).
        cross_attn_every_n_layers: one gated cross-attention block every n decoder layers.
        gate_init: initial value of the tanh gates (0 keeps a pretrained LM intact at start;
            a language model trained from scratch learns faster with gates open).
        prompt: text after the image token that captions continue.
        seed: seed the weights were initialised with.
        extra: free provenance (training recipe, dataset, metrics), kept in the JSON.
    """

    vision_model: str = "srd-tiny-vit"
    vision_model_cfg: dict | None = None
    lang_config: dict | None = None
    lang_name_or_path: str | None = None
    decoder_layers_attr_name: str = ""
    input_embeddings_attr: str = ""
    perceiver: dict = field(default_factory=lambda: dict(RELEASE_PERCEIVER))
    cross_attn: dict = field(default_factory=lambda: dict(RELEASE_CROSS_ATTN))
    cross_attn_every_n_layers: int = 1
    gate_init: float = 0.0
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.lang_config is None and not self.lang_name_or_path:
            raise ValueError("OpenFlamingoConfig needs lang_config or lang_name_or_path")
        if self.lang_config is not None and "model_type" not in self.lang_config:
            raise ValueError("lang_config must contain 'model_type'")
        if self.cross_attn_every_n_layers < 1:
            raise ValueError("cross_attn_every_n_layers must be >= 1")
        _check_vision_spec(self.vision_model, self.vision_model_cfg)
        for name in ("decoder_layers_attr_name", "input_embeddings_attr"):
            value = getattr(self, name)
            if value and not _ATTR_PATH.fullmatch(value):
                raise ValueError(f"{name} must be a dotted attribute path like 'model.layers', got {value!r}")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "OpenFlamingoConfig":
        data = json.loads(Path(path).read_text())
        data.pop("adapter_name", None)
        # older files stored trust_remote_code as a setting: an artifact may not grant itself
        # that, so the value is kept as a note for the warning at load time and nothing else
        if data.pop("trust_remote_code", False):
            data["extra"] = {**(data.get("extra") or {}), REMOTE_CODE_NOTE: True}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**data)


# plain names only: no open_clip schema (hf-hub:, local-dir:) and nothing that leaves a folder
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ATTR_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_]*)*")


def _check_vision_spec(name: str, cfg: dict | None) -> None:
    """Refuse vision towers that would make open_clip fetch or load other things.

    The name becomes a file name when an inline config is registered, and open_clip reads
    ``hf-hub:`` / ``local-dir:`` names from elsewhere; an inline ``text_cfg.hf_model_name``
    makes it load a transformers model without ``trust_remote_code`` set.
    """
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ValueError(f"vision_model must be a plain open_clip model name, got {name!r}")
    if cfg is not None and "hf_model_name" in (cfg.get("text_cfg") or {}):
        raise ValueError("vision_model_cfg may not name a transformers text tower (text_cfg.hf_model_name)")


def _register_vision_config(name: str, cfg: dict) -> None:
    """open_clip builds towers from registered JSON configs; register an inline one."""
    if open_clip.get_model_config(name) == cfg:
        return
    folder = Path(tempfile.mkdtemp(prefix="srd_hf_open_clip_"))
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")


class OpenFlamingoCaptioner(CaptioningVLM):
    """OpenFlamingo wrapped for captioning: ``<image>{prompt} {caption}<|endofchunk|>``."""

    adapter_name = "open_flamingo"

    def __init__(self, config: OpenFlamingoConfig, tokenizer: PreTrainedTokenizerBase, flamingo: Flamingo | None = None, *, trust_remote_code: bool = False):
        super().__init__()
        self.config = config
        self.prompt = config.prompt
        self.tokenizer = tokenizer
        for token in (IMAGE_TOKEN, END_OF_CHUNK_TOKEN):
            if token not in tokenizer.get_vocab():
                raise ValueError(f"tokenizer lacks the special token {token!r}")
        if tokenizer.pad_token is None:
            raise ValueError("tokenizer needs a pad token")
        self.flamingo = flamingo if flamingo is not None else self._build(config, tokenizer, trust_remote_code)
        vision_cfg = open_clip.get_model_config(config.vision_model)["vision_cfg"]
        size = vision_cfg["image_size"]
        self.image_size = size if isinstance(size, int) else size[0]
        self.image_transform = open_clip.image_transform(self.image_size, is_train=False)

    # ----------------------------------------------------------------- building
    @staticmethod
    def _build(config: OpenFlamingoConfig, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False) -> Flamingo:
        torch.manual_seed(config.seed)
        if config.vision_model_cfg is not None:
            _register_vision_config(config.vision_model, config.vision_model_cfg)
        clip = open_clip.create_model(config.vision_model, pretrained=None)
        clip.visual.output_tokens = True
        lang_config = _lang_config(config, trust_remote_code)
        lang = AutoModelForCausalLM.from_config(lang_config, trust_remote_code=trust_remote_code)
        _add_embedding_accessors(lang, config.input_embeddings_attr)
        if lang.get_input_embeddings().num_embeddings != len(tokenizer):
            lang.resize_token_embeddings(len(tokenizer))
        layers_attr = config.decoder_layers_attr_name or _DECODER_LAYERS.get(lang_config.model_type, "")
        if not layers_attr:
            raise ValueError(f"set decoder_layers_attr_name for model_type {lang_config.model_type!r}")
        make_flamingo_lm(lang, layers_attr, config.cross_attn)
        vis_dim = open_clip.get_model_config(config.vision_model)["vision_cfg"]["width"]
        flamingo = Flamingo(
            clip,
            lang,
            eoc_token_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
            media_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            vis_dim=vis_dim,
            cross_attn_every_n_layers=config.cross_attn_every_n_layers,
        )
        # open_flamingo's resampler defaults (6 layers, 8x64 heads, 64 latents) are sized for 1B+ models
        flamingo.perceiver = PerceiverResampler(dim=vis_dim, **config.perceiver)
        for block in flamingo.lang_encoder.gated_cross_attn_layers:
            if block is not None:
                block.attn_gate.data.fill_(config.gate_init)
                block.ff_gate.data.fill_(config.gate_init)
        return flamingo

    @classmethod
    def from_openflamingo_release(
        cls,
        repo_id: str = "openflamingo/OpenFlamingo-3B-vitl-mpt1b",
        trust_remote_code: bool = False,
        *,
        local_files_only: bool = False,
    ) -> "OpenFlamingoCaptioner":
        """The paper's victim: a released OpenFlamingo with its pretrained parts, from the Hub.

        Assembled like open_flamingo's factory, but that factory forces ``trust_remote_code``
        on: here it is the caller's. A release whose language model is defined by its repo's
        code (the MPT ones, see :data:`OPENFLAMINGO_RELEASES`) is refused, before anything is
        downloaded, unless ``trust_remote_code=True``. ``checkpoint.pt`` is read with
        ``torch.load(weights_only=True)`` and checked by :func:`check_release_state_dict`.
        """
        release = release_spec(repo_id, trust_remote_code)
        from huggingface_hub import hf_hub_download

        flamingo, tokenizer = build_release_flamingo(release, trust_remote_code, local_files_only)
        checkpoint = hf_hub_download(repo_id, "checkpoint.pt", local_files_only=local_files_only)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        missing, unexpected = flamingo.load_state_dict(state, strict=False)
        check_release_state_dict(flamingo, missing, unexpected, source=repo_id)
        config = OpenFlamingoConfig(
            vision_model=release.vision_model,
            lang_name_or_path=release.lang_id,
            decoder_layers_attr_name=release.decoder_layers_attr_name,
            input_embeddings_attr=release.input_embeddings_attr,
            cross_attn_every_n_layers=release.cross_attn_every_n_layers,
            perceiver=dict(RELEASE_PERCEIVER),
            cross_attn=dict(RELEASE_CROSS_ATTN),
            extra={"release": repo_id, **({REMOTE_CODE_NOTE: True} if release.needs_remote_code else {})},
        )
        return cls(config, tokenizer, flamingo=flamingo, trust_remote_code=trust_remote_code)

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors and the tokenizer; atomically (temp folder, then rename)."""
        target = Path(save_directory)
        check_replaceable(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            config = {"adapter_name": self.adapter_name, **asdict(self.config)}
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            state = _unique_tensors(merged_state_dict(self.flamingo)[0])  # LoRA merged: loads without peft
            save_file(state, staging / WEIGHTS_NAME, metadata={"format": "pt"})
            self.tokenizer.save_pretrained(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        *,
        trust_remote_code: bool = False,
        **hub_kwargs,
    ) -> "OpenFlamingoCaptioner":
        """Load a folder written by :meth:`save_pretrained` (or its Hub repo).

        ``trust_remote_code=True`` lets the tokenizer and the language model named in
        config.json run their own code; the folder itself can never turn it on.
        """
        folder = _resolve_folder(name_or_path, **hub_kwargs)
        config = OpenFlamingoConfig.from_json_file(folder / CONFIG_NAME)
        if config.extra.get(REMOTE_CODE_NOTE) and not trust_remote_code:
            logger.warning(
                "%s asks for trust_remote_code (language model %s); a model folder cannot switch it on. "
                "Pass trust_remote_code=True only if you trust that code.",
                folder, config.lang_name_or_path or "inline",
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = cls(config, tokenizer, trust_remote_code=trust_remote_code)
        state = load_file(folder / WEIGHTS_NAME)
        missing, unexpected = model.flamingo.load_state_dict(state, strict=False)
        missing = sorted(set(missing) - _aliases(model.flamingo.state_dict()))
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if device is not None:
            model.to(device)
        return model

    def state_dict(self, *args, **kwargs):
        """Without the aliases open_flamingo creates, so the Trainer's safetensors checkpoints work;
        ``load_state_dict(strict=False)`` fills the aliases back."""
        return _unique_tensors(super().state_dict(*args, **kwargs), to_cpu=False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts state dicts without the aliases (see :meth:`state_dict`); real gaps still count."""
        from torch.nn.modules.module import _IncompatibleKeys

        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        aliases = _aliases(super().state_dict())
        missing = [k for k in result.missing_keys if k not in aliases]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        return _IncompatibleKeys(missing, result.unexpected_keys)

    def push_to_hub(self, repo_id: str, private: bool | None = None, commit_message: str = "Upload captioner") -> str:
        from huggingface_hub import HfApi

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            api = HfApi()
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message).commit_url

    # ----------------------------------------------------------------- inputs
    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 1, 1, C, H, W): one image, one frame per sample, as open_flamingo expects."""
        pixels = torch.stack([self.image_transform(img) for img in images])
        return pixels[:, None, None].to(self.device)

    def _prompt_text(self, prompt: str) -> str:
        return f"{IMAGE_TOKEN}{prompt}"

    def collate(self, images, captions, prompt=None) -> dict[str, torch.Tensor]:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        return {"pixel_values": self.preprocess_images(images), **self.collate_text(captions, prompt)}

    def collate_text(self, captions: Sequence[str], prompt: str | None = None) -> dict[str, torch.Tensor]:
        """``<image>{prompt} {caption}<|endofchunk|>``, right-padded; labels only on the caption."""
        prompt = self.prompt if prompt is None else prompt
        tok = self.tokenizer
        prefix_ids = tok(self._prompt_text(prompt), add_special_tokens=False)["input_ids"]
        rows, labels = [], []
        for caption in captions:
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"empty or non-string caption: {caption!r}")
            caption_ids = tok(" " + caption.strip() + END_OF_CHUNK_TOKEN, add_special_tokens=False)["input_ids"]
            rows.append(prefix_ids + caption_ids)
            labels.append([-100] * len(prefix_ids) + caption_ids)
        width = max(map(len, rows))
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([l + [-100] * (width - len(l)) for l in labels]),
        }

    # ----------------------------------------------------------------- model
    def condition_on_images(self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None) -> None:
        """Encode images (or take cached vision-tower tokens) and condition the cross-attention layers."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or vision_features")
            if pixel_values.ndim == 4:
                pixel_values = pixel_values[:, None, None]
            self.flamingo._encode_vision_x(pixel_values)
            return
        latents = self.flamingo.perceiver(vision_features[:, None, None])
        for layer in self.flamingo.lang_encoder._get_decoder_layers():
            layer.condition_vis_x(latents)

    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens of the frozen vision tower (B, N, D), for caching during training."""
        with torch.no_grad():
            return self.flamingo.vision_encoder(pixel_values.flatten(0, -4) if pixel_values.ndim == 6 else pixel_values)[1]

    def vision_tokens(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Vision-tower tokens (B, N, D) of RGB pixels in [0, 1] (B, 3, H, W), WITH gradients.

        The differentiable counterpart of ``image_transform`` + :meth:`encode_vision`: pixels of
        another size are resized (shorter side) and centre-cropped to ``image_size``, then
        normalised with the transform's mean and std; the tower runs with autograd on.
        """
        x = self.fit_pixels(pixels01.to(self.device), self.image_size, self.image_size)
        mean, std = self.pixel_normalisation()
        x = (x - mean.to(x)) / std.to(x)
        dtype = next(self.flamingo.vision_encoder.parameters()).dtype
        return self.flamingo.vision_encoder(x.to(dtype))[1]

    def pixel_normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the ``image_transform``'s normalisation, shaped (1, 3, 1, 1)."""
        for step in getattr(self.image_transform, "transforms", []):
            if hasattr(step, "mean") and hasattr(step, "std"):
                mean, std = step.mean, step.std
                break
        else:
            mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        return torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def get_input_embeddings(self) -> torch.nn.Module:
        """The language model's input token embedding."""
        return self.flamingo.lang_encoder.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, vision_features=None, **kwargs):
        self.condition_on_images(pixel_values, vision_features)
        self.flamingo._condition_media_locations(input_ids)
        try:
            return self.flamingo.lang_encoder(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            self.flamingo.lang_encoder.clear_conditioned_layers()

    def _generate_batch(self, images, prompt, max_new_tokens, num_beams) -> list[str]:
        tok = self.tokenizer
        prompt_ids = tok(self._prompt_text(prompt), add_special_tokens=False)["input_ids"]
        # every row has the same prompt, so no padding is needed and batched == one-by-one
        input_ids = torch.tensor([prompt_ids] * len(images), device=self.device)
        out = self.flamingo.generate(
            self.preprocess_images(images),
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
        )
        return [_clean_caption(tok.decode(row[input_ids.shape[1] :], skip_special_tokens=False), tok) for row in out]

    @property
    def metadata(self) -> dict:
        return self.config.extra

    def language_model(self) -> torch.nn.Module:
        return self.flamingo.lang_encoder

    def default_trainable(self) -> list[str]:
        """The paper's freeze: perceiver, gated cross-attention and the LM's input embeddings."""
        embeddings = self.flamingo.lang_encoder.get_input_embeddings()
        embed_name = next(f"{n}." for n, m in self.named_modules() if m is embeddings)
        return ["flamingo.perceiver.", "flamingo.lang_encoder.gated_cross_attn_layers.", embed_name]


def release_spec(repo_id: str, trust_remote_code: bool = False) -> OpenFlamingoRelease:
    """The table entry of ``repo_id``. Refuses a release whose language model would run its
    repo's code unless the caller trusts it; nothing has been downloaded at that point."""
    if repo_id not in OPENFLAMINGO_RELEASES:
        raise ValueError(f"unknown release {repo_id!r}; known: {sorted(OPENFLAMINGO_RELEASES)}")
    release = OPENFLAMINGO_RELEASES[repo_id]
    if release.needs_remote_code and not trust_remote_code:
        raise ValueError(
            f"{repo_id}: its language model {release.lang_id} is defined by Python code in that repository, "
            "which runs when the model is built. Pass trust_remote_code=True if you trust it."
        )
    return release


def add_flamingo_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """``<|endofchunk|>`` and ``<image>`` as special tokens, and a pad token when there is none
    (padding is masked out of the loss), as open_flamingo's factory does."""
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK_TOKEN, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})


def build_release_flamingo(
    release: OpenFlamingoRelease, trust_remote_code: bool = False, local_files_only: bool = False
) -> tuple[Flamingo, PreTrainedTokenizerBase]:
    """Flamingo with the pretrained vision tower and language model of ``release``, structured
    as open_flamingo's factory builds it; the release checkpoint fills perceiver, gated
    cross-attention and embeddings. ``trust_remote_code`` applies to the tokenizer and the LM."""
    clip = open_clip.create_model(release.vision_model, pretrained=release.vision_pretrained)
    clip.visual.output_tokens = True
    hub = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(release.lang_id, **hub)
    add_flamingo_special_tokens(tokenizer)
    lang = AutoModelForCausalLM.from_pretrained(release.lang_id, **hub)
    _add_embedding_accessors(lang, release.input_embeddings_attr)
    lang.resize_token_embeddings(len(tokenizer))
    make_flamingo_lm(lang, release.decoder_layers_attr_name, RELEASE_CROSS_ATTN)
    flamingo = Flamingo(
        clip,
        lang,
        eoc_token_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
        media_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vis_dim=open_clip.get_model_config(release.vision_model)["vision_cfg"]["width"],
        cross_attn_every_n_layers=release.cross_attn_every_n_layers,
    )
    _freeze_like_open_flamingo(flamingo)
    return flamingo, tokenizer


def _freeze_like_open_flamingo(flamingo: Flamingo) -> None:
    """Trainable: what OpenFlamingo trained (perceiver, gated cross-attention, input embeddings)."""
    flamingo.requires_grad_(False)
    for part in (flamingo.perceiver, flamingo.lang_encoder.gated_cross_attn_layers, flamingo.lang_encoder.get_input_embeddings()):
        part.requires_grad_(True)


def check_release_state_dict(flamingo: Flamingo, missing: Sequence[str], unexpected: Sequence[str], source: str = "checkpoint") -> None:
    """Refuse a released checkpoint that leaves a trained part untouched or holds foreign keys.

    A release holds what OpenFlamingo trained (perceiver, gated cross-attention, embeddings),
    so it cannot load strictly; the vision tower and the LM's own weights come from their
    pretrained checkpoints and may be missing. Every other gap, and any unexpected key, means
    the checkpoint does not fit the model built for it. open_flamingo registers blocks under
    two names: a key counts as loaded when any name of its tensor was.
    """
    if unexpected:
        raise ValueError(f"{source}: the checkpoint has keys the model lacks, e.g. {sorted(unexpected)[:5]}")
    state = flamingo.state_dict(keep_vars=True)
    gone = set(missing)
    loaded = {id(t) for name, t in state.items() if name not in gone}
    pretrained = _pretrained_tensor_ids(flamingo)
    gaps = sorted(n for n in gone if id(state[n]) not in loaded and id(state[n]) not in pretrained)
    if gaps:
        raise ValueError(f"{source}: the checkpoint lacks trained weights ({len(gaps)} keys), e.g. {gaps[:5]}")


def _pretrained_tensor_ids(flamingo: Flamingo) -> set[int]:
    """Tensors that come from the vision tower's and the LM's own checkpoints. The input
    embeddings are not among them: their rows for <image> and <|endofchunk|> are trained."""
    lm = flamingo.lang_encoder

    def ids(module: torch.nn.Module) -> set[int]:
        return {id(t) for t in module.state_dict(keep_vars=True).values()}

    return (ids(flamingo.vision_encoder) | ids(lm)) - ids(lm.gated_cross_attn_layers) - ids(lm.get_input_embeddings())


def _lang_config(config: OpenFlamingoConfig, trust_remote_code: bool):
    """The language model's transformers config: inline (native classes only) or read from its folder."""
    if config.lang_config is not None:
        lang_cfg = dict(config.lang_config)
        return AutoConfig.for_model(lang_cfg.pop("model_type"), **lang_cfg)
    return AutoConfig.from_pretrained(config.lang_name_or_path, trust_remote_code=trust_remote_code)


class _EmbeddingAccessors:
    """``get/set_input_embeddings`` through an attribute path, for LM classes without them."""

    def get_input_embeddings(self):
        return getattr_recursive(self, self.input_embeddings_attr)

    def set_input_embeddings(self, value):
        setattr_recursive(self, self.input_embeddings_attr, value)


def _add_embedding_accessors(lang: torch.nn.Module, attr: str) -> None:
    if attr:
        extend_instance(lang, _EmbeddingAccessors)
        lang.input_embeddings_attr = attr


def _clean_caption(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    text = text.split(END_OF_CHUNK_TOKEN)[0]
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    return " ".join(text.split())


def _unique_tensors(state: dict[str, torch.Tensor], to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """One entry per storage: open_flamingo registers each decoder block and cross-attention
    under two names, and safetensors refuses shared storage. Reloading fills both names."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in state.items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr not in seen:
            seen.add(ptr)
            out[name] = tensor.detach().contiguous().cpu() if to_cpu else tensor
    return out


def _aliases(state: dict[str, torch.Tensor]) -> set[str]:
    return set(state) - set(_unique_tensors(state))


def _resolve_folder(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"model folder {path} lacks {', '.join(missing)}")
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), **hub_kwargs))

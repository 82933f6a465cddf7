"""Captioning-VLM adapters: one interface (:class:`CaptioningVLM`) for every stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import DEFAULT_PROMPT, CaptionCollator, CaptioningVLM, parameter_counts, parse_trainable

__all__ = ["CaptioningVLM", "CaptionCollator", "DEFAULT_PROMPT", "load_captioner", "parameter_counts", "parse_trainable"]


def load_captioner(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs) -> CaptioningVLM:
    """Load any saved captioner: an srd-hf OpenFlamingo folder, or a transformers
    image-text-to-text model (folder or Hub id). Dispatches on ``config.json``.

    ``trust_remote_code`` is the caller's alone and reaches whichever adapter the folder
    picks: config.json chooses the adapter, never whether code may run.
    """
    path = Path(name_or_path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; expected a model folder")
    if not path.exists() and (str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1):
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    config_file = path / "config.json"
    if path.is_dir() and not config_file.is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json")
    if not path.is_dir():  # a Hub id
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(str(name_or_path), "config.json"))
    adapter = json.loads(config_file.read_text()).get("adapter_name")
    if adapter == "open_flamingo":
        from .openflamingo import OpenFlamingoCaptioner

        return OpenFlamingoCaptioner.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    from .image_text_to_text import ImageTextToTextCaptioner

    return ImageTextToTextCaptioner.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)

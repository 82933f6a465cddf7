"""Nothing in a model folder runs code on load; remote code is the caller's choice alone."""

import json
import logging

import pytest

from srd_hf.vlm import load_captioner
from srd_hf.vlm.openflamingo import REMOTE_CODE_NOTE, OpenFlamingoCaptioner, OpenFlamingoConfig

# every transformers auto class imports custom code through this one function
_DYNAMIC_IMPORTERS = (
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.auto_factory",
    "transformers.models.auto.tokenization_auto",
)


class RemoteCodeReached(Exception):
    pass


@pytest.fixture()
def remote_code_calls(monkeypatch):
    """Records (and stops) every attempt of transformers to import code from a repo or folder."""
    import importlib

    calls = []

    def refuse(class_ref, repo, *args, **kwargs):
        calls.append((class_ref, str(repo)))
        raise RemoteCodeReached(class_ref)

    for name in _DYNAMIC_IMPORTERS:
        monkeypatch.setattr(importlib.import_module(name), "get_class_from_dynamic_module", refuse)
    return calls


def _write_module(path, marker, class_line):
    path.write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        f"{class_line}\n"
    )


def _custom_code_lm(folder, marker):
    """A language-model folder whose config declares its own config class, which writes ``marker`` on import."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "srd_evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    _write_module(folder / "configuration_evil.py", marker,
                  "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'srd_evil'")
    return folder


def _malicious_model(tiny_flamingo, tmp_path, marker):
    """A saved tiny flamingo whose config.json asks for remote code and points at a custom-code LM."""
    folder = tiny_flamingo.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["trust_remote_code"] = True
    config.pop("lang_config")
    config["lang_name_or_path"] = str(_custom_code_lm(tmp_path / "evil_lm", marker))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("loader", [load_captioner, OpenFlamingoCaptioner.from_pretrained], ids=["load_captioner", "from_pretrained"])
def test_a_folder_cannot_turn_on_remote_code(loader, tiny_flamingo, tmp_path, remote_code_calls, caplog):
    marker = tmp_path / "marker"
    folder = _malicious_model(tiny_flamingo, tmp_path, marker)
    with caplog.at_level(logging.WARNING, logger="srd_hf.vlm.openflamingo"):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            loader(folder)
    assert not marker.exists()
    assert remote_code_calls == []
    assert "asks for trust_remote_code" in caplog.text


def test_the_callers_flag_is_what_lets_remote_code_run(tiny_flamingo, tmp_path, remote_code_calls):
    # the same folder with the caller's consent reaches transformers' code import (stopped by the fixture)
    folder = _malicious_model(tiny_flamingo, tmp_path, tmp_path / "marker")
    with pytest.raises(RemoteCodeReached, match="configuration_evil.EvilConfig"):
        load_captioner(folder, trust_remote_code=True)
    assert remote_code_calls and remote_code_calls[0][1].endswith("evil_lm")


def test_old_config_key_is_read_as_a_note_and_not_written_back(tiny_flamingo, tmp_path):
    folder = tiny_flamingo.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert "trust_remote_code" not in config
    config["trust_remote_code"] = True
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_captioner(folder)  # inline native architecture: loads, the key enables nothing
    assert loaded.config.extra[REMOTE_CODE_NOTE] is True
    resaved = json.loads((loaded.save_pretrained(tmp_path / "again") / "config.json").read_text())
    assert "trust_remote_code" not in resaved
    config["trust_remote_code"] = False
    (folder / "config.json").write_text(json.dumps(config))
    assert REMOTE_CODE_NOTE not in OpenFlamingoConfig.from_json_file(folder / "config.json").extra


@pytest.mark.parametrize("known_class", [False, True], ids=["unknown-class", "known-class"])
def test_a_tokenizer_with_an_auto_map_does_not_run(known_class, tiny_flamingo, tmp_path, remote_code_calls):
    marker = tmp_path / "marker"
    folder = tiny_flamingo.save_pretrained(tmp_path / "model")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    if not known_class:
        tok_config["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    _write_module(folder / "tokenization_evil.py", marker,
                  "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass")
    if known_class:  # the library's own class is used, the folder's module is never imported
        assert isinstance(load_captioner(folder), OpenFlamingoCaptioner)
    else:
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load_captioner(folder)
    assert not marker.exists()
    assert remote_code_calls == []


def test_load_captioner_passes_only_the_callers_flag(tiny_flamingo, tmp_path, monkeypatch):
    from srd_hf.vlm.image_text_to_text import ImageTextToTextCaptioner

    seen = []

    def spy(cls, name_or_path, **kwargs):
        seen.append((cls.__name__, kwargs.get("trust_remote_code")))
        raise RemoteCodeReached

    monkeypatch.setattr(OpenFlamingoCaptioner, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(ImageTextToTextCaptioner, "from_pretrained", classmethod(spy))
    flamingo_dir = tiny_flamingo.save_pretrained(tmp_path / "model")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "config.json").write_text(json.dumps({"adapter_name": "image_text_to_text", "trust_remote_code": True}))
    for folder, flag in [(flamingo_dir, False), (other_dir, False), (flamingo_dir, True)]:
        with pytest.raises(RemoteCodeReached):
            load_captioner(folder, trust_remote_code=flag)
    assert seen == [("OpenFlamingoCaptioner", False), ("ImageTextToTextCaptioner", False), ("OpenFlamingoCaptioner", True)]


@pytest.mark.parametrize(
    "change",
    [
        {"vision_model": "hf-hub:someone/tower"},
        {"vision_model": "local-dir:/elsewhere"},
        {"vision_model": "{tmp}/escaped"},  # became the path of the registered JSON file
        {"decoder_layers_attr_name": "__class__.forward"},
    ],
)
def test_config_refuses_names_that_reach_outside(change, tiny_flamingo, tmp_path):
    folder = tiny_flamingo.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update({k: v.replace("{tmp}", str(tmp_path)) for k, v in change.items()})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=next(iter(change))):
        load_captioner(folder)
    assert not (tmp_path / "escaped.json").exists()


def test_inline_vision_config_may_not_name_a_transformers_tower(tiny_flamingo):
    cfg = json.loads(json.dumps(tiny_flamingo.config.vision_model_cfg))
    cfg["text_cfg"]["hf_model_name"] = "someone/text-model"
    with pytest.raises(ValueError, match="hf_model_name"):
        OpenFlamingoConfig(vision_model="srd-probe", vision_model_cfg=cfg, lang_config={"model_type": "llama"})


# ----- released checkpoints: only the frozen pretrained parts may be missing ---------------------
def _release_like_state(flamingo):
    """What open_flamingo's training saves: the trained tensors (perceiver, gated cross-attention,
    embeddings), cross-attention under its decoder-layer name, no vision tower."""
    dropped = ("vision_encoder.", "lang_encoder.gated_cross_attn_layers.", "lang_encoder.old_decoder_blocks.")
    return {
        k: v.clone()
        for k, v in flamingo.state_dict().items()
        if not k.startswith(dropped) and (k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or "embed" in k)
    }


def _load_release_state(flamingo, state):
    from srd_hf.vlm.openflamingo import check_release_state_dict

    missing, unexpected = flamingo.load_state_dict(state, strict=False)
    check_release_state_dict(flamingo, missing, unexpected, source="release")
    return missing


def test_a_release_state_dict_with_only_the_trained_parts_loads(tiny_flamingo):
    import copy

    import torch

    state = _release_like_state(tiny_flamingo.flamingo)
    assert any(k.startswith("perceiver.") for k in state) and any(".gated_cross_attn_layer." in k for k in state)
    target = copy.deepcopy(tiny_flamingo.flamingo)
    with torch.no_grad():
        for p in target.lang_encoder.gated_cross_attn_layers.parameters():
            p.zero_()
    missing = _load_release_state(target, state)
    assert any(k.startswith("vision_encoder.") for k in missing)
    xattn = target.lang_encoder.gated_cross_attn_layers[0].attn.to_q.weight  # loaded through its other name
    assert torch.equal(xattn, tiny_flamingo.flamingo.lang_encoder.gated_cross_attn_layers[0].attn.to_q.weight)
    _load_release_state(target, tiny_flamingo.flamingo.state_dict())  # a full state dict is fine too


def test_a_release_state_dict_with_a_foreign_key_fails(tiny_flamingo):
    state = _release_like_state(tiny_flamingo.flamingo)
    state["lang_encoder.model.layers.0.backdoor.weight"] = next(iter(state.values()))
    with pytest.raises(ValueError, match="release: the checkpoint has keys the model lacks.*backdoor"):
        _load_release_state(tiny_flamingo.flamingo, state)


@pytest.mark.parametrize("part", ["perceiver.layers.0", ".gated_cross_attn_layer.attn.to_q", "embed_tokens"])
def test_a_release_state_dict_without_a_trained_part_fails(part, tiny_flamingo):
    state = _release_like_state(tiny_flamingo.flamingo)
    dropped = [k for k in state if part in k]
    assert dropped
    for key in dropped:
        del state[key]
    with pytest.raises(ValueError, match="release: the checkpoint lacks trained weights"):
        _load_release_state(tiny_flamingo.flamingo, state)

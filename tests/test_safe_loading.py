"""Nothing in a model folder runs code on load; remote code is the caller's choice alone."""

import json
import logging

import pytest

from srd_hf.vlm import load_captioner
from srd_hf.vlm.openflamingo import OPENFLAMINGO_RELEASES, REMOTE_CODE_NOTE, OpenFlamingoCaptioner, OpenFlamingoConfig

# the auto classes used on load import custom code through this one function
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


def test_the_defense_recipes_take_the_flag_from_the_caller_only(tiny_flamingo, tmp_path, remote_code_calls):
    """``recipes/retrain.py`` (SRDConfig) loads the user's models with the caller's flag: off by
    default, so a malicious backdoored-model folder stops before any code of it runs."""
    from srd_hf.defense import SRDConfig, load_inputs

    marker = tmp_path / "marker"
    evil = _malicious_model(tiny_flamingo, tmp_path, marker)
    clean = tiny_flamingo.save_pretrained(tmp_path / "clean")
    cfg = SRDConfig(output_dir=str(tmp_path / "srd"), clean_model=str(clean), backdoored_model=str(evil),
                    poisoned_dataset=str(tmp_path / "none"))
    assert cfg.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_inputs(cfg)
    assert not marker.exists() and remote_code_calls == []
    consenting = SRDConfig(output_dir=str(tmp_path / "srd"), clean_model=str(clean), backdoored_model=str(evil),
                           poisoned_dataset=str(tmp_path / "none"), trust_remote_code=True)
    with pytest.raises(RemoteCodeReached):
        load_inputs(consenting)


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


# ----- released OpenFlamingo models: built here, refused when they need remote code ------------
@pytest.fixture()
def no_downloads(monkeypatch):
    """Any network connection or download attempt fails the test."""
    import socket

    import huggingface_hub
    import open_clip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network or download")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


_REMOTE_CODE_RELEASES = sorted(r for r, spec in OPENFLAMINGO_RELEASES.items() if spec.needs_remote_code)


def test_the_release_table_marks_the_mpt_language_models_as_remote_code():
    assert "openflamingo/OpenFlamingo-3B-vitl-mpt1b" in _REMOTE_CODE_RELEASES
    assert not OPENFLAMINGO_RELEASES["openflamingo/OpenFlamingo-4B-vitl-rpj3b"].needs_remote_code


@pytest.mark.parametrize("repo_id", sorted(OPENFLAMINGO_RELEASES))
def test_release_vision_towers_use_the_activation_their_weights_were_trained_with(repo_id):
    import open_clip

    spec = OPENFLAMINGO_RELEASES[repo_id]
    tag = open_clip.get_pretrained_cfg(spec.vision_model, spec.vision_pretrained)
    assert tag, f"{spec.vision_model} has no {spec.vision_pretrained!r} weights in open_clip"
    assert open_clip.get_model_config(spec.vision_model).get("quick_gelu", False) == tag.get("quick_gelu", False)


@pytest.mark.parametrize("repo_id", _REMOTE_CODE_RELEASES)
def test_a_release_needing_remote_code_is_refused_before_any_download(repo_id, no_downloads):
    with pytest.raises(ValueError, match=rf"^{repo_id}: its language model .* Pass trust_remote_code=True if you trust it"):
        OpenFlamingoCaptioner.from_openflamingo_release(repo_id)
    with pytest.raises(ValueError, match="unknown release"):
        OpenFlamingoCaptioner.from_openflamingo_release("someone/not-a-release")


@pytest.mark.parametrize(("repo_id", "flag"), [("openflamingo/OpenFlamingo-3B-vitl-mpt1b", True), ("openflamingo/OpenFlamingo-4B-vitl-rpj3b", False)])
def test_the_refusal_only_stops_remote_code_without_consent(repo_id, flag, monkeypatch):
    from srd_hf.vlm import openflamingo

    seen = []

    def build(release, trust_remote_code, local_files_only):
        seen.append((release.lang_id, trust_remote_code))
        raise RemoteCodeReached

    monkeypatch.setattr(openflamingo, "build_release_flamingo", build)
    with pytest.raises(RemoteCodeReached):
        OpenFlamingoCaptioner.from_openflamingo_release(repo_id, trust_remote_code=flag)
    assert seen == [(OPENFLAMINGO_RELEASES[repo_id].lang_id, flag)]


_PROBE_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 32, "heads": 1, "layers": 1},
}


def _tiny_gpt_neox(folder):
    """A local gpt_neox LM + a tokenizer without Flamingo's tokens or a pad token, like RedPajama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a photo of a red square", "a green circle"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("embeddings_attr", ["", "gpt_neox.embed_in"], ids=["native-accessors", "attribute-path"])
def test_a_release_is_assembled_like_open_flamingo_and_round_trips(embeddings_attr, tmp_path, monkeypatch):
    import huggingface_hub
    import torch
    from PIL import Image

    from srd_hf.vlm.openflamingo import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, OpenFlamingoRelease, _register_vision_config, build_release_flamingo

    _register_vision_config("srd-release-probe-vit", _PROBE_VIT)
    release = OpenFlamingoRelease("srd-release-probe-vit", None, str(_tiny_gpt_neox(tmp_path / "lm")), 1, "gpt_neox.layers", False, embeddings_attr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flags = []
    for auto in (AutoTokenizer, AutoModelForCausalLM):
        real = auto.from_pretrained
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, _real=real, **kw: flags.append(kw.get("trust_remote_code")) or _real(*a, **kw))
    source, tokenizer = build_release_flamingo(release)
    assert flags == [False, False]  # passed explicitly, so transformers never falls back to asking
    assert {END_OF_CHUNK_TOKEN, IMAGE_TOKEN} <= set(tokenizer.all_special_tokens) and tokenizer.pad_token == "<PAD>"
    assert source.lang_encoder.get_input_embeddings().num_embeddings == len(tokenizer)
    assert ("_EmbeddingAccessors" in {c.__name__ for c in type(source.lang_encoder).__mro__}) == bool(embeddings_attr)
    trainable = {n for n, p in source.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("perceiver.") or "gated_cross_attn" in n or ".embed_in." in n for n in trainable)

    torch.save(_release_like_state(source), tmp_path / "checkpoint.pt")
    monkeypatch.setitem(OPENFLAMINGO_RELEASES, "someone/tiny-release", release)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kwargs: str(tmp_path / filename))
    captioner = OpenFlamingoCaptioner.from_openflamingo_release("someone/tiny-release")
    loaded = captioner.flamingo.state_dict()
    for name, tensor in _release_like_state(source).items():
        assert torch.equal(loaded[name], tensor), name

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    caption = captioner.generate_captions([image], max_new_tokens=3)
    reloaded = load_captioner(captioner.save_pretrained(tmp_path / "saved"))
    assert reloaded.config.input_embeddings_attr == embeddings_attr
    assert reloaded.generate_captions([image], max_new_tokens=3) == caption

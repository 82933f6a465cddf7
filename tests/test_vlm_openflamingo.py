"""The OpenFlamingo adapter on a tiny model built from open_flamingo's own classes."""

import json

import pytest
import torch
from PIL import Image

from srd_hf.vlm import CaptionCollator, load_captioner, parse_trainable
from srd_hf.vlm.openflamingo import OpenFlamingoCaptioner
from srd_hf.vlm.openflamingo_compat import CompatFlamingoLayer


def _images(dataset, n):
    return [dataset[i]["image"] for i in range(n)]


def test_forward_backward_and_loss_only_on_caption(tiny_flamingo, small_world_data):
    rows = small_world_data["train"].select(range(4))
    batch = tiny_flamingo.collate(_images(rows, 4), [c[0] for c in rows["captions"]])
    assert batch["pixel_values"].shape[:3] == (4, 1, 1)
    prompt_len = len(tiny_flamingo.tokenizer("<image>a photo of", add_special_tokens=False)["input_ids"])
    assert (batch["labels"][:, :prompt_len] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    out = tiny_flamingo(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    xattn = tiny_flamingo.flamingo.lang_encoder.gated_cross_attn_layers[0]
    assert xattn.attn.to_q.weight.grad is not None and xattn.attn.to_q.weight.grad.abs().sum() > 0


def test_the_image_changes_the_prediction(tiny_flamingo, small_world_data):
    images = _images(small_world_data["train"], 2)
    batch = tiny_flamingo.collate(images, ["a blue circle", "a blue circle"])
    with torch.no_grad():
        logits = tiny_flamingo(**batch).logits
    assert not torch.allclose(logits[0], logits[1])


def test_paper_freeze_leaves_only_perceiver_cross_attention_and_embeddings(tiny_flamingo):
    counts = tiny_flamingo.set_trainable()
    trainable = {n for n, p in tiny_flamingo.named_parameters() if p.requires_grad}
    assert trainable and counts["trainable"] < counts["total"]
    for name in trainable:
        assert "perceiver" in name or "gated_cross_attn" in name or "embed_tokens" in name, name
    assert not any(p.requires_grad for p in tiny_flamingo.flamingo.vision_encoder.parameters())
    assert not any(p.requires_grad for p in tiny_flamingo.flamingo.lang_encoder.lm_head.parameters())
    with pytest.raises(ValueError, match="match no parameter"):
        tiny_flamingo.set_trainable(["no.such.module"])


def test_lora_through_peft(tiny_flamingo):
    from peft import LoraConfig

    counts = tiny_flamingo.set_trainable(["flamingo.perceiver."], lora=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in tiny_flamingo.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and all("lora_" in n or "perceiver" in n for n in names)
    assert counts["trainable"] == sum(p.numel() for p in tiny_flamingo.parameters() if p.requires_grad)


def test_batched_generation_equals_one_by_one_and_beams(tiny_flamingo, small_world_data):
    images = _images(small_world_data["test"], 6)
    batched = tiny_flamingo.generate_captions(images, max_new_tokens=6, batch_size=4)
    single = [tiny_flamingo.generate_captions([img], max_new_tokens=6)[0] for img in images]
    assert batched == single
    beams = tiny_flamingo.generate_captions(images[:3], max_new_tokens=6, num_beams=3, batch_size=2)
    assert len(beams) == 3 and all(isinstance(c, str) for c in beams)


def test_generation_accepts_any_image_mode_and_size(tiny_flamingo):
    rgb = Image.new("RGB", (50, 30), (10, 200, 30))
    images = [rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), Image.new("RGB", (7, 300))]
    assert len(tiny_flamingo.generate_captions(images, max_new_tokens=3)) == 5
    with pytest.raises(TypeError, match="sequence of images"):
        tiny_flamingo.generate_captions(rgb)
    with pytest.raises(TypeError, match="PIL image"):
        tiny_flamingo.generate_captions(["not an image"])


def test_save_and_load_round_trip(tiny_flamingo, small_world_data, tmp_path):
    images = _images(small_world_data["test"], 3)
    before = tiny_flamingo.generate_captions(images, max_new_tokens=6)
    folder = tiny_flamingo.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((folder / "config.json").read_text())["adapter_name"] == "open_flamingo"
    loaded = load_captioner(folder)
    assert isinstance(loaded, OpenFlamingoCaptioner)
    reference = {k: v for k, v in tiny_flamingo.flamingo.state_dict().items()}
    for name, tensor in loaded.flamingo.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert loaded.generate_captions(images, max_new_tokens=6) == before
    assert not list(tmp_path.glob(".model.*")), "no staging folder may be left behind"


def test_missing_or_incomplete_model_folders_give_clear_errors(tiny_flamingo, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_captioner(tmp_path / "nothing-here")
    folder = tiny_flamingo.save_pretrained(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        load_captioner(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_captioner(folder)


def test_mismatched_weights_are_refused(tiny_flamingo, tmp_path):
    folder = tiny_flamingo.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["lang_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match config.json"):
        load_captioner(folder)


def test_empty_captions_are_refused(tiny_flamingo, small_world_data):
    image = small_world_data["train"][0]["image"]
    with pytest.raises(ValueError, match="empty"):
        tiny_flamingo.collate([image], ["  "])
    collator = CaptionCollator(tiny_flamingo)
    with pytest.raises(ValueError, match="no non-empty caption"):
        collator([{"image": image, "captions": ["", " "]}])
    with pytest.raises(KeyError, match="no column 'image'"):
        collator([{"captions": ["a blue circle"]}])


def test_compat_layer_passes_positional_arguments():
    seen = {}

    class Block(torch.nn.Module):
        def forward(self, hidden, cache, attention_mask=None, flag=None):
            seen.update(cache=cache, attention_mask=attention_mask, flag=flag)
            return hidden

    layer = CompatFlamingoLayer(None, Block())
    out = layer(torch.ones(1, 2, 4), "cache-object", attention_mask="mask", flag=True)
    assert out.shape == (1, 2, 4) and seen == {"cache": "cache-object", "attention_mask": "mask", "flag": True}


def test_generate_without_attention_mask_and_old_cache_name(tiny_flamingo, small_world_data):
    lm = tiny_flamingo.flamingo.lang_encoder
    batch = tiny_flamingo.collate(_images(small_world_data["train"], 2), ["a blue circle", "a green ring"])
    tiny_flamingo.condition_on_images(batch["pixel_values"])
    with torch.no_grad():
        with_mask = lm(input_ids=batch["input_ids"][:, :4], attention_mask=torch.ones_like(batch["input_ids"][:, :4])).logits
        without = lm(input_ids=batch["input_ids"][:, :4], past_key_values=None).logits
    lm.clear_conditioned_layers()
    assert torch.allclose(with_mask, without)


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_images(tiny_flamingo, small_world_data):
    # four images that differ in their first object: train rows 2 and 3 share a large yellow square and
    # differ only by a small 32 px ring, which a random one-layer ViT separates or not depending on the
    # thread count's rounding
    rows = small_world_data["train"].select([0, 1, 2, 5])
    images, captions = _images(rows, 4), [c[0] for c in rows["captions"]]
    tiny_flamingo.set_trainable(["flamingo.perceiver.", "flamingo.lang_encoder.", "flamingo.vision_encoder."])
    optimizer = torch.optim.AdamW([p for p in tiny_flamingo.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_flamingo.collate(images, captions)
    torch.manual_seed(0)
    for _ in range(300):
        # open_flamingo encodes images under no_grad; train the tower through cached tokens instead
        features = tiny_flamingo.flamingo.vision_encoder(batch["pixel_values"][:, 0, 0])[1]
        loss = tiny_flamingo(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], vision_features=features).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert tiny_flamingo.generate_captions(images, max_new_tokens=24) == captions


def test_parse_trainable_drops_empty_entries_and_maps_empty_to_the_paper_freeze():
    assert parse_trainable("") is None and parse_trainable(" , ") is None
    # an empty prefix would match every parameter: a trailing comma must not train the whole model
    assert parse_trainable("flamingo.perceiver., flamingo.lang_encoder.lm_head.,") == ["flamingo.perceiver.", "flamingo.lang_encoder.lm_head."]


def test_save_pretrained_refuses_a_folder_that_is_not_a_model(tiny_flamingo, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a model folder"):
        tiny_flamingo.save_pretrained(precious)
    assert (precious / "chapter1.tex").read_text() == "years of work"
    tiny_flamingo.save_pretrained(tmp_path / "model")
    tiny_flamingo.save_pretrained(tmp_path / "model")  # a model folder is replaced as a whole
    assert (tmp_path / "model" / "config.json").is_file()

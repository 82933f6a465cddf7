"""ImageTextToTextCaptioner on tiny random LLaVA and Idefics3 models built offline (tokenizer trained in the test)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from srd_hf.vlm.image_text_to_text import ADAPTER_FILE, ImageTextToTextCaptioner  # noqa: E402

CAPTIONS = ["a red square", "a green circle on grass", "a blue triangle in the sky", "two dogs"]
CORPUS = CAPTIONS + ["a photo of", "USER: ASSISTANT: describe the image", "a cat on a red mat", "the sky is blue"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE_SIZE, PATCH = 32, 8
MAX_NEW = 24  # enough for the longest caption + EOS with the tiny byte-level vocabulary


def make_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def make_llava(chat_template: str | None = CHAT_TEMPLATE, seed: int = 0):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = make_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # CLIP adds a CLS position (+1) that the "default" strategy drops again: (32 / 8) ** 2 = 16 image tokens
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=chat_template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor


def make_idefics3(seed: int = 0):
    """A tiny Idefics3 (SmolVLM's architecture): images are split in 32x32 tiles + a global view,
    so the prompt length depends on the image's aspect ratio and batches need left padding."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    tokenizer = make_tokenizer()
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>", *grid]})
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True, size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
    )
    scale = 2  # pixel shuffle: (32 / 8) ** 2 / 2 ** 2 = 4 tokens per tile
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=(IMAGE_SIZE // PATCH) ** 2 // scale**2)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH
        ),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    return model, processor


FAMILIES = {"llava": make_llava, "idefics3": make_idefics3}


def make_images() -> list[Image.Image]:
    """Four images of different content and sizes (the processor resizes them to 32x32)."""
    rng = np.random.default_rng(0)
    solid = Image.new("RGB", (40, 40), (220, 30, 30))
    noise = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    stripes = np.zeros((32, 32, 3), dtype=np.uint8)
    stripes[::4] = (30, 60, 230)
    checker = np.kron(np.indices((4, 4)).sum(0) % 2, np.ones((8, 8)))[..., None] * np.array([40, 200, 40])
    return [solid, noise, Image.fromarray(stripes), Image.fromarray(checker.astype(np.uint8))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is faster and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A plain transformers folder (no srd_hf_adapter.json): model + processor."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    model, processor = make_llava()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture()
def captioner(llava_dir) -> ImageTextToTextCaptioner:
    return ImageTextToTextCaptioner.from_pretrained(llava_dir)


def train(captioner, images, captions, steps, lr=1e-2, check_every=None):
    """Adam on the trainable parameters; returns the step at which greedy captions match, or None."""
    opt = torch.optim.Adam([p for p in captioner.parameters() if p.requires_grad], lr=lr)
    batch = captioner.collate(images, captions)
    captioner.train()
    for step in range(1, steps + 1):
        loss = captioner(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if check_every and step % check_every == 0 and captioner.generate_captions(images, max_new_tokens=MAX_NEW) == list(captions):
            captioner.eval()
            return step
    captioner.eval()
    return None


@pytest.fixture(scope="module")
def trained(llava_dir) -> ImageTextToTextCaptioner:
    """The tiny LLaVA overfitted on four images (all parameters trained)."""
    cap = ImageTextToTextCaptioner.from_pretrained(llava_dir)
    cap.set_trainable(trainable=["model."])
    torch.manual_seed(0)
    cap.overfit_step = train(cap, make_images(), CAPTIONS, steps=300, check_every=10)
    return cap


# ----- prompt + collate ---------------------------------------------------------------------
def test_prompt_uses_chat_template_or_image_token(llava_dir, captioner):
    assert captioner.build_prompt() == "USER: <image>\na photo of\nASSISTANT:"
    assert captioner.build_prompt("describe") == "USER: <image>\ndescribe\nASSISTANT:"
    model, processor = make_llava(chat_template=None)
    plain = ImageTextToTextCaptioner(model, processor)
    assert plain.build_prompt() == "<image>\na photo of"
    forced = ImageTextToTextCaptioner(captioner.model, captioner.processor, use_chat_template=False)
    assert forced.build_prompt("x") == "<image>\nx"
    with pytest.raises(ValueError, match="chat template"):
        ImageTextToTextCaptioner(model, processor, use_chat_template=True).build_prompt()


def test_collate_masks_prompt_and_padding(captioner):
    images = make_images()[:3]
    captions = CAPTIONS[:3]
    batch = captioner.collate(images, captions)
    tok = captioner.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    image_id = tok.convert_tokens_to_ids("<image>")
    for i, caption in enumerate(captions):
        assert (ids[i] == image_id).sum() == (IMAGE_SIZE // PATCH) ** 2
        assert ids[i, 0] == tok.bos_token_id and (ids[i] == tok.bos_token_id).sum() == 1
        real = mask[i].bool()
        labelled = labels[i] != -100
        assert not labelled[~real].any(), "padding must not carry labels"
        assert (ids[i][~real] == tok.pad_token_id).all()
        target = labels[i][labelled]
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]).strip() == caption
        # the labels are exactly the tail of the real tokens: the prompt is masked
        n_real = int(real.sum())
        assert labelled.nonzero().flatten().tolist() == list(range(n_real - len(target), n_real))
        assert tok.decode(ids[i][: n_real - len(target)]).startswith("<s>USER: <image>")
    # right padding: only the longest row is unpadded
    lengths = mask.sum(1)
    assert lengths.max() == ids.shape[1] and lengths.min() < ids.shape[1]
    assert all(mask[i, : int(n)].all() for i, n in enumerate(lengths))
    with pytest.raises(ValueError, match="captions"):
        captioner.collate(images, captions[:2])


# ----- training -------------------------------------------------------------------------------
def test_forward_backward_grads_only_on_default_trainable(captioner):
    prefixes = captioner.default_trainable()
    assert prefixes == ["model.model.multi_modal_projector.", "model.model.language_model.embed_tokens."]
    counts = captioner.set_trainable()
    assert 0 < counts["trainable"] < counts["total"]
    batch = captioner.collate(make_images()[:2], CAPTIONS[:2])
    captioner.train()
    loss = captioner(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in captioner.named_parameters():
        trainable = any(name.startswith(p) for p in prefixes)
        assert param.requires_grad == trainable, name
        if trainable:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name


def test_overfits_four_images_to_exact_captions(trained):
    assert trained.overfit_step is not None, "tiny LLaVA did not overfit 4 images within 300 steps"
    images = make_images()
    assert trained.generate_captions(images, max_new_tokens=MAX_NEW) == CAPTIONS
    assert trained.generate_captions(images, max_new_tokens=MAX_NEW, num_beams=2) == CAPTIONS


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_random_model(captioner, num_beams):
    out = captioner.generate_captions(make_images(), max_new_tokens=5, num_beams=num_beams)
    assert len(out) == 4 and all(isinstance(c, str) for c in out)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_equals_one_by_one(trained, num_beams):
    images = make_images()
    # the overfitted model gives image-dependent, non-trivial captions
    batched = trained.generate_captions(images, max_new_tokens=8, num_beams=num_beams, batch_size=4)
    single = [trained.generate_captions([img], max_new_tokens=8, num_beams=num_beams)[0] for img in images]
    assert batched == single
    # and token for token on a prompt the model never saw (no early EOS)
    other = trained.generate_captions(images, prompt="the sky", max_new_tokens=6, num_beams=num_beams, batch_size=3)
    other_single = [trained.generate_captions([img], prompt="the sky", max_new_tokens=6, num_beams=num_beams)[0] for img in images]
    assert other == other_single


def test_trainer_trains_the_adapter(captioner, tmp_path):
    import datasets
    from transformers import Trainer, TrainingArguments

    from srd_hf.vlm.base import CaptionCollator

    captioner.set_trainable()
    before = {n: p.detach().clone() for n, p in captioner.named_parameters()}
    rows = datasets.Dataset.from_dict({"image": make_images(), "captions": [[c] for c in CAPTIONS]})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
        report_to=[], remove_unused_columns=False, use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    result = Trainer(model=captioner, args=args, train_dataset=rows, data_collator=CaptionCollator(captioner)).train()
    assert math.isfinite(result.training_loss)
    for name, param in captioner.named_parameters():
        assert torch.equal(param, before[name]) != param.requires_grad, name


def test_bfloat16_weights(llava_dir):
    cap = ImageTextToTextCaptioner.from_pretrained(llava_dir, dtype=torch.bfloat16)
    assert cap.model.dtype == torch.bfloat16
    batch = cap.collate(make_images()[:2], CAPTIONS[:2])
    assert batch["pixel_values"].dtype == torch.float32  # cast to the model's dtype in forward
    assert torch.isfinite(cap(**batch).loss)
    assert len(cap.generate_captions(make_images()[:2], max_new_tokens=3)) == 2


# ----- save / load ----------------------------------------------------------------------------
def test_save_load_round_trip(trained, tmp_path):
    out = trained.save_pretrained(tmp_path / "saved", info={"seed": 0, "steps": trained.overfit_step})
    assert out == (tmp_path / "saved").absolute()
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", ADAPTER_FILE} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    settings = json.loads((out / ADAPTER_FILE).read_text())
    assert settings["adapter_name"] == "image_text_to_text"
    assert settings["prompt"] == "a photo of" and settings["info"]["seed"] == 0
    assert settings["lora_merged"] is False

    loaded = ImageTextToTextCaptioner.from_pretrained(out)
    assert loaded.info["seed"] == 0
    ref, got = trained.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    images = make_images()
    assert loaded.generate_captions(images, max_new_tokens=MAX_NEW) == trained.generate_captions(images, max_new_tokens=MAX_NEW) == CAPTIONS

    # overwriting replaces the folder; nothing temporary is left next to it
    trained.prompt = "the sky"
    try:
        trained.save_pretrained(out)
    finally:
        trained.prompt = "a photo of"
    assert ImageTextToTextCaptioner.from_pretrained(out).prompt == "the sky"
    assert ImageTextToTextCaptioner.from_pretrained(out, prompt="x").prompt == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_failed_save_leaves_no_partial_folder(captioner, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(captioner.processor, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        captioner.save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")  # an older model folder: replaced only on success
    (existing / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        captioner.save_pretrained(existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert (existing / "keep.txt").read_text() == "old"
    (existing / "config.json").unlink()  # not a model folder any more: refused before anything is written
    with pytest.raises(ValueError, match="not a model folder"):
        captioner.save_pretrained(existing)


def test_clear_errors_for_bad_folders(llava_dir, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        ImageTextToTextCaptioner.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageTextToTextCaptioner.from_pretrained(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        ImageTextToTextCaptioner.from_pretrained(empty)
    (empty / "config.json").write_text((llava_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="empty has no weights"):
        ImageTextToTextCaptioner.from_pretrained(empty)
    (empty / "model.safetensors").write_bytes((llava_dir / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="empty has no processor files"):
        ImageTextToTextCaptioner.from_pretrained(empty)
    (empty / ADAPTER_FILE).write_text(json.dumps({"adapter_name": "open_flamingo"}))
    for name in os.listdir(llava_dir):
        if not (empty / name).exists():
            (empty / name).write_bytes((llava_dir / name).read_bytes())
    with pytest.raises(ValueError, match="open_flamingo"):
        ImageTextToTextCaptioner.from_pretrained(empty)


def test_remote_code_is_opt_in(llava_dir, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    seen = []
    real_model, real_proc = AutoModelForImageTextToText.from_pretrained, AutoProcessor.from_pretrained

    def spy(real):
        def wrapper(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy(real_model))
    monkeypatch.setattr(AutoProcessor, "from_pretrained", spy(real_proc))
    ImageTextToTextCaptioner.from_pretrained(llava_dir)
    assert seen == [False, False]


# ----- LoRA -----------------------------------------------------------------------------------
def test_lora_injects_trains_and_merges_on_save(captioner, tmp_path):
    from peft import LoraConfig

    projector = "model.model.multi_modal_projector."
    counts = captioner.set_trainable(trainable=[projector], lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in captioner.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert all("lora_" in n or n.startswith(projector) for n in names)
    assert counts["trainable"] == sum(p.numel() for n, p in captioner.named_parameters() if n in names)

    images, captions = make_images()[:2], CAPTIONS[:2]
    batch = captioner.collate(images, captions)
    frozen = {n: p.detach().clone() for n, p in captioner.named_parameters() if not p.requires_grad}
    first = captioner(**batch).loss.item()
    train(captioner, images, captions, steps=15)
    with torch.no_grad():
        last = captioner(**batch).loss.item()
    assert math.isfinite(last) and last < first
    for n, p in captioner.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"

    out = captioner.save_pretrained(tmp_path / "lora")
    assert json.loads((out / ADAPTER_FILE).read_text())["lora_merged"] is True
    loaded = ImageTextToTextCaptioner.from_pretrained(out)
    assert not any("lora_" in n for n in loaded.state_dict())
    with torch.no_grad():
        live = captioner(**batch).logits
        merged = loaded(**batch).logits
        assert captioner(**batch).loss.item() == last, "saving must not touch the live LoRA model"
    torch.testing.assert_close(merged, live, atol=1e-4, rtol=1e-4)
    assert loaded.generate_captions(images, max_new_tokens=6) == captioner.generate_captions(images, max_new_tokens=6)


# ----- any family -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_smoke(family, tmp_path):
    """Load through the Auto classes, train, batch == one by one (with padding), save/load."""
    model, processor = FAMILIES[family]()
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    cap = ImageTextToTextCaptioner.from_pretrained(tmp_path / "hf")
    assert type(cap.model) is type(model)

    # aspect ratios that give different numbers of tiles (Idefics3) and captions of different lengths
    images = [Image.new("RGB", (40, 40), (200, 20, 20)), Image.new("RGB", (96, 32), (20, 200, 20)), Image.new("RGB", (20, 70), (20, 20, 200))]
    captions = CAPTIONS[:3]
    prompt_lengths = cap._encode_prompts(images, cap.build_prompt(), padding_side="left")["attention_mask"].sum(1)
    if family == "idefics3":
        assert len(set(prompt_lengths.tolist())) == 3, "the prompts should pad differently"

    prefixes = cap.default_trainable()
    assert len(prefixes) == 2 and ("connector" in prefixes[0] or "projector" in prefixes[0]) and prefixes[1].endswith("embed_tokens.")
    cap.set_trainable()
    batch = cap.collate(images, captions)
    loss = cap(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in cap.parameters())

    cap.set_trainable(trainable=["model."])
    torch.manual_seed(0)
    assert train(cap, images, captions, steps=200, check_every=10) is not None, f"tiny {family} did not overfit 3 images"
    for num_beams in (1, 2):
        batched = cap.generate_captions(images, max_new_tokens=MAX_NEW, num_beams=num_beams)
        single = [cap.generate_captions([img], max_new_tokens=MAX_NEW, num_beams=num_beams)[0] for img in images]
        assert batched == single
        if num_beams == 1:
            assert batched == captions
        other = cap.generate_captions(images, prompt="the sky", max_new_tokens=6, num_beams=num_beams)
        assert other == [cap.generate_captions([img], prompt="the sky", max_new_tokens=6, num_beams=num_beams)[0] for img in images]

    loaded = ImageTextToTextCaptioner.from_pretrained(cap.save_pretrained(tmp_path / "srd"))
    assert loaded.generate_captions(images, max_new_tokens=MAX_NEW) == captions
    ref = cap.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())

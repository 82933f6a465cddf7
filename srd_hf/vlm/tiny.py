"""A tiny OpenFlamingo for the embedded world, built offline from open_flamingo's classes.

Parts: a byte-level BPE tokenizer trained with ``tokenizers`` on the world's captions
(byte fallback, so any text such as an attack's target word still encodes), a tiny
open_clip ViT registered from an inline JSON config, a tiny Llama, and perceiver /
cross-attention sized for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..data.synthetic import WorldConfig, make_captions, sample_scene
from .base import DEFAULT_PROMPT
from .openflamingo import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, OpenFlamingoCaptioner, OpenFlamingoConfig

# Words later stages put into captions (attack targets, common COCO words), so they get
# their own tokens instead of byte pieces.
_EXTRA_TEXT = (
    "a photo of a banana with a banana bananas there is a banana in the picture "
    "a man a woman a dog a cat a person holding an apple an orange on a table with "
    "the image shows a red square"
)


def train_caption_tokenizer(world: WorldConfig, vocab_size: int = 512, num_scenes: int = 4000) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on captions of ``num_scenes`` generated scenes (train split)."""
    corpus = [DEFAULT_PROMPT, _EXTRA_TEXT]
    for i in range(num_scenes):
        corpus.extend(make_captions(sample_scene(world, "train", i)))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", IMAGE_TOKEN, END_OF_CHUNK_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[IMAGE_TOKEN, END_OF_CHUNK_TOKEN],
    )
    fast.padding_side = "left"
    return fast


@dataclass(frozen=True)
class TinyFlamingoSizes:
    vit_width: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    lm_hidden: int = 128
    lm_layers: int = 3
    lm_heads: int = 4
    lm_intermediate: int = 384
    perceiver_depth: int = 2
    perceiver_latents: int = 32
    xattn_heads: int = 4
    xattn_dim_head: int = 32
    ff_mult: int = 2


def tiny_vit_config(world: WorldConfig, sizes: TinyFlamingoSizes = TinyFlamingoSizes()) -> dict:
    """An open_clip model config (vision tower + a token text tower open_clip requires)."""
    return {
        "embed_dim": sizes.vit_width,
        "vision_cfg": {
            "image_size": world.image_size,
            "patch_size": world.patch_size,
            "width": sizes.vit_width,
            "layers": sizes.vit_layers,
            "head_width": sizes.vit_width // sizes.vit_heads,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 32, "heads": 1, "layers": 1},
    }


def build_tiny_flamingo(
    world: WorldConfig,
    sizes: TinyFlamingoSizes = TinyFlamingoSizes(),
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    gate_init: float = 1.0,
) -> OpenFlamingoCaptioner:
    tokenizer = tokenizer or train_caption_tokenizer(world)
    lang_config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": sizes.lm_hidden,
        "intermediate_size": sizes.lm_intermediate,
        "num_hidden_layers": sizes.lm_layers,
        "num_attention_heads": sizes.lm_heads,
        "num_key_value_heads": sizes.lm_heads,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
    }
    config = OpenFlamingoConfig(
        vision_model=f"srd-tiny-vit-{world.image_size}px-p{world.patch_size}-w{sizes.vit_width}",
        vision_model_cfg=tiny_vit_config(world, sizes),
        lang_config=lang_config,
        perceiver={"depth": sizes.perceiver_depth, "dim_head": sizes.xattn_dim_head, "heads": sizes.xattn_heads, "num_latents": sizes.perceiver_latents, "ff_mult": sizes.ff_mult},
        cross_attn={"dim_head": sizes.xattn_dim_head, "heads": sizes.xattn_heads, "ff_mult": sizes.ff_mult},
        cross_attn_every_n_layers=1,
        gate_init=gate_init,
        seed=seed,
        extra={"world": world.to_dict()},
    )
    return OpenFlamingoCaptioner(config, tokenizer)

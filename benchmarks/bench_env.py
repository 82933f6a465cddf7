"""Benchmark: environment steps per second of the batched masking environment against the
authors' loop (one image at a time, references recomputed at every step).

    HF_HUB_OFFLINE=1 python benchmarks/bench_env.py                      # embedded default, CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_env.py --model outputs/backdoor/badnet-0.1/model
    python benchmarks/bench_env.py --full-size --device cuda --batch 256 --dtype bfloat16

"batched": one step = one batched caption generation for ``--batch`` environments + one scoring
pass with cached reference embeddings/perplexities and caption-text caches (MaskingVecEnv).
"authors' loop": per image and step, mask, caption alone (batch 1), embed the caption AND the
reference, compute both perplexities (SFSScorer.score without caches).

``--full-size``: random-weight models of the paper's shapes (OpenFlamingo-3B-like: ViT-L/14 at
224 px, a 24-layer 2048-wide LM; GPT-2-large-shaped fluency LM; MiniLM) for GPU runs.
Without ``--model``, the victim is the embedded tiny OpenFlamingo with random weights (long,
garbled captions: the worst case for decoding). Pass --threads 1 on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_victim(args):
    from srd_hf.data.synthetic import world_config
    from srd_hf.vlm import load_captioner
    from srd_hf.vlm.tiny import TinyFlamingoSizes, build_tiny_flamingo

    if args.model:
        return load_captioner(args.model), None
    if args.full_size:
        from dataclasses import replace

        world = replace(world_config("paper"), patch_size=14, num_train=600)
        sizes = TinyFlamingoSizes(vit_width=1024, vit_layers=24, vit_heads=16, lm_hidden=2048, lm_layers=24, lm_heads=16,
                                  lm_intermediate=8192, perceiver_depth=6, perceiver_latents=64, xattn_heads=8,
                                  xattn_dim_head=64, ff_mult=4)
    else:
        world, sizes = world_config("default"), TinyFlamingoSizes()
    return build_tiny_flamingo(world, sizes, seed=0), world


def gpt2_large_shaped(folder: str, tokenizer_source) -> str:
    """A random-weight GPT-2-large-shaped LM with the embedded tokenizer, saved to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer_source
    model = GPT2LMHeadModel(GPT2Config(n_embd=1280, n_layer=36, n_head=20, vocab_size=len(tok)))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="victim folder (default: embedded tiny model, random weights)")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--batch", type=int, default=64, help="environments stepped together")
    parser.add_argument("--steps", type=int, default=20, help="batched steps timed")
    parser.add_argument("--loop-steps", type=int, default=40, help="authors'-loop steps timed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from srd_hf.data.synthetic import build_world, world_config
    from srd_hf.metrics import SFSScorer
    from srd_hf.rl.actions import MaskActionSpace
    from srd_hf.rl.env import MaskingEnvConfig, MaskingVecEnv

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    victim, world = build_victim(args)
    victim = victim.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    scorer = SFSScorer(device=args.device, lm_dtype=args.dtype, memo_size=0)
    if args.full_size:
        scorer = SFSScorer(device=args.device, lm_dtype=args.dtype, memo_size=0,
                           fluency_lm=gpt2_large_shaped(tempfile.mkdtemp(), scorer.tokenizer))
    scorer.load()
    world = world or world_config("default")
    from dataclasses import replace

    data = build_world(replace(world, num_train=max(args.batch * 2, 64), num_validation=1, num_test=1))["train"]
    n = max(args.batch * 2, 64)
    images = [img.convert("RGB") for img in data.select(range(n))["image"]]
    refs = [c[0] for c in data.select(range(n))["captions"]]
    print(f"setup {time.time() - t0:.1f} s; victim {sum(p.numel() for p in victim.parameters()) / 1e6:.1f}M parameters, "
          f"{images[0].size[0]} px images, device {args.device}, {args.dtype}")

    # ---- batched environment
    env = MaskingVecEnv(victim, images, refs, MaskingEnvConfig(num_envs=args.batch, max_new_tokens=args.max_new_tokens), scorer=scorer)
    rng = np.random.default_rng(0)
    env.reset()
    env.step(rng.integers(0, env.space.n, args.batch))  # warm-up
    start = time.time()
    for _ in range(args.steps):
        env.step(rng.integers(0, env.space.n, args.batch))
    batched = args.steps * args.batch / (time.time() - start)

    # ---- the authors' loop: batch 1, references recomputed every step, the original image masked
    space = MaskActionSpace(image_size=images[0].size[0])
    start = time.time()
    for k in range(args.loop_steps):
        i = k % len(images)
        masked = Image.fromarray(space.apply(np.asarray(images[i]), [int(rng.integers(space.n))]))
        caption = victim.generate_captions([masked], max_new_tokens=args.max_new_tokens, batch_size=1)[0]
        scorer.score([caption], [refs[i]])
    loop = args.loop_steps / (time.time() - start)
    print(f"batched environment ({args.batch} envs): {batched:8.1f} env steps/s")
    print(f"authors' loop (batch 1, no caches):   {loop:8.1f} env steps/s")
    print(f"speed-up: {batched / loop:.1f}x")


if __name__ == "__main__":
    main()

"""Benchmark: SFS over N caption pairs with the embedded models (MiniLM + SmolLM2-135M).

    HF_HUB_OFFLINE=1 python benchmarks/bench_sfs.py            # 1,000 pairs, CPU
    python benchmarks/bench_sfs.py --n 5000 --batch-size 128 --device cuda

Prints the model load time and, separately, the scoring times:
  * "full": both prediction and reference perplexities/embeddings computed;
  * "cached refs": reference perplexities and embeddings precomputed once (the defense's case);
  * "evaluate": the same full computation through the evaluate module (Arrow round trip).
On a machine shared with other jobs, pass --threads 1: two OpenMP threads competing with another
process for two cores can be several times slower than one thread.
The captions are COCO-like, generated from templates with a fixed seed: references, and
predictions that are paraphrases, word drops, shuffles or backdoored ("... with a banana").
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUBJECTS = ["a man", "a woman", "a young boy", "two girls", "a dog", "a black cat", "an old man",
            "a group of people", "a little girl", "a brown horse", "a surfer", "a skateboarder"]
VERBS = ["riding", "sitting on", "standing next to", "walking along", "playing with", "looking at",
         "holding", "lying on", "jumping over", "carrying"]
OBJECTS = ["a bicycle", "a wooden bench", "a red car", "the beach", "a frisbee", "a large pizza",
           "a white fence", "a kite", "a surfboard", "a plate of food", "a green umbrella", "the street"]
PLACES = ["in a park", "on a sunny day", "near the water", "in the city", "at night", "in the snow",
          "next to a building", "", "", ""]


def _sentence(rng: random.Random) -> str:
    parts = (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES))
    return " ".join(x for x in parts if x)


def make_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    preds, refs = [], []
    for _ in range(n):
        ref = _sentence(rng)
        ref = ref[0].upper() + ref[1:] + "."
        kind = rng.random()
        words = ref.rstrip(".").split()
        if kind < 0.3:  # paraphrase-like: other verb/place
            pred = _sentence(rng)
        elif kind < 0.5:  # word drop
            drop = rng.randrange(len(words))
            pred = " ".join(w for i, w in enumerate(words) if i != drop)
        elif kind < 0.65:  # shuffled
            rng.shuffle(words)
            pred = " ".join(words)
        elif kind < 0.85:  # backdoored
            pred = ref.rstrip(".") + " with a banana"
        else:  # identical
            pred = ref
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="caption pairs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--lm-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the fluency LM (bfloat16: faster, perplexities ~10%% off)")
    parser.add_argument("--skip-evaluate", action="store_true", help="skip the evaluate-module run")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from srd_hf.metrics import EMBEDDED_ENCODER, EMBEDDED_LM, SFSScorer, load

    preds, refs = make_pairs(args.n)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"pairs: {args.n}  batch_size: {args.batch_size}  torch threads: {torch.get_num_threads()}  "
          f"cpu cores: {os.cpu_count()}  load average before: {load_avg:.2f}  lm dtype: {args.lm_dtype}")

    t0 = time.perf_counter()
    scorer = SFSScorer(encoder=EMBEDDED_ENCODER, fluency_lm=EMBEDDED_LM, device=args.device,
                       batch_size=args.batch_size, lm_dtype=args.lm_dtype, memo_size=0).load()  # the models' work, not the memo
    print(f"model load: {time.perf_counter() - t0:.1f} s  (device {scorer.device})")
    scorer.score(preds[:8], refs[:8])  # warm-up

    t0 = time.perf_counter()
    out = scorer.score(preds, refs)
    full = time.perf_counter() - t0
    print(f"full (2 x {args.n} sentences): {full:.1f} s  -> {args.n / full:.0f} pairs/s   "
          f"SFS {out['sfs']:.4f}  SC {out['semantic_consistency']:.4f}  LF {out['linguistic_fluency']:.4f}")

    t0 = time.perf_counter()
    ref_ppl, ref_emb = scorer.perplexity(refs), scorer.embed(refs)
    pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    out2 = scorer.score(preds, refs, reference_perplexities=ref_ppl, reference_embeddings=ref_emb)
    cached = time.perf_counter() - t0
    print(f"precompute references: {pre:.1f} s;  cached refs ({args.n} sentences): {cached:.1f} s  "
          f"-> {args.n / cached:.0f} pairs/s   SFS {out2['sfs']:.4f}")

    if not args.skip_evaluate:
        module = load("sfs", encoder=EMBEDDED_ENCODER, fluency_lm=EMBEDDED_LM, device=args.device,
                      batch_size=args.batch_size, lm_dtype=args.lm_dtype, keep_in_memory=True)
        module.scorer = scorer  # reuse the loaded models
        t0 = time.perf_counter()
        out3 = module.compute(predictions=preds, references=refs)
        ev = time.perf_counter() - t0
        print(f"evaluate module, full: {ev:.1f} s   SFS {out3['sfs']:.4f}")


if __name__ == "__main__":
    main()

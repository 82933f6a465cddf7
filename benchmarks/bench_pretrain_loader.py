"""Seconds per step of the vision pretraining stage (default world, batch 64) with the images
and patch targets prepared in the training process or in one loader process.

    python benchmarks/bench_pretrain_loader.py --steps 40

Prints both figures and their ratio, measured side by side in one run (quote the ratio: machines
differ in speed by 2x or more).
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader

from srd_hf.data.synthetic import world_config
from srd_hf.pretraining import ObjectProbe, OccludedImages, load_or_build_world
from srd_hf.vlm.tiny import build_tiny_flamingo


def seconds_per_step(dataset, probe, workers: int, steps: int) -> float:
    optimizer = torch.optim.AdamW(probe.parameters(), 1e-3)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        probe(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        if i + 1 == steps:
            break
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    world = world_config("default")
    data = load_or_build_world(world)
    captioner = build_tiny_flamingo(world)
    visual = captioner.flamingo.vision_encoder
    probe = ObjectProbe(visual, visual.transformer.width, world.patch_size)
    dataset = OccludedImages(data["train"], captioner, 0.5, 0, with_targets=True, world=world)
    figures = {w: seconds_per_step(dataset, probe, w, args.steps) for w in (0, 1)}
    print(f"torch threads {torch.get_num_threads()}, {args.steps} steps of batch 64")
    for workers, seconds in figures.items():
        print(f"loader workers {workers}: {seconds:.3f} s/step")
    print(f"ratio (1 worker / in-process): {figures[1] / figures[0]:.2f}")


if __name__ == "__main__":
    main()

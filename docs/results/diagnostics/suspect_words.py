"""Where do the word flag's suspect words come from? (evaluation only: reads ``is_poisoned``)

For one seed of a finished SRD run, the share of images on which the policy's masks make the
victim drop each suspect word (a word of its caption that the trusted captioner does not say),
on four sets: clean and poisoned untrusted images (the victim was fine-tuned on them), training
images it was not fine-tuned on, and clean validation images.

    python docs/results/diagnostics/suspect_words.py --attack trojvlm --seed 1 \
        --srd_dir outputs/srd/trojvlm-0.1-local_mean/dqn
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from srd_hf.cleansing import _image_keys, unique_captions, unsupported_words_removed
from srd_hf.data.images import ensure_rgb
from srd_hf.defense import SRDConfig, load_inputs
from srd_hf.masker import SRDMasker
from srd_hf.rl import SRDPolicy


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="trojvlm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--srd_dir", required=True, help="the run's output_dir (holds seed-<s>/)")
    parser.add_argument("--num_images", type=int, default=1000, help="clean untrusted and unseen training images drawn")
    args = parser.parse_args(argv)

    cfg = SRDConfig(attack=args.attack, output_dir=args.srd_dir).for_seed(args.seed)
    seed_dir = Path(cfg.output_dir)
    words = json.loads((seed_dir / "cleansed-untrusted.json").read_text())["suspect_words"]
    inputs = load_inputs(cfg)
    masker = SRDMasker(SRDPolicy.from_pretrained(str(seed_dir / "policy-untrusted")), num_masks=cfg.num_masks)
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)

    def removed(images) -> list:
        images = [ensure_rgb(img) for img in images]
        masked, _ = masker.mask_images(images)
        before, after = unique_captions(inputs.victim, images, **common), unique_captions(inputs.victim, masked, **common)
        return unsupported_words_removed(before, after, unique_captions(inputs.clean, images, **common))

    untrusted = inputs.untrusted
    first = {}  # one row per distinct image (a fine-tuning set repeats each image once per caption)
    for i, (key, poisoned) in enumerate(zip(_image_keys([ensure_rgb(img) for img in untrusted["image"]]), untrusted["is_poisoned"])):
        first.setdefault(key, (i, poisoned))
    rng = np.random.default_rng(0)
    clean = [i for i, p in first.values() if not p]
    clean = sorted(rng.choice(clean, size=min(args.num_images, len(clean)), replace=False).tolist())
    poisoned = [i for i, p in first.values() if p]
    taken, train = set(untrusted["image_id"]), inputs.world["train"]
    unseen = [i for i, image_id in enumerate(train["image_id"]) if image_id not in taken]
    unseen = sorted(rng.choice(unseen, size=min(args.num_images, len(unseen)), replace=False).tolist())
    sets = {"untrusted, clean (fine-tuned on)": removed(untrusted.select(clean)["image"]),
            "untrusted, poisoned (fine-tuned on)": removed(untrusted.select(poisoned)["image"]),
            "training split, not fine-tuned on": removed(train.select(unseen)["image"]),
            "validation": removed(inputs.validation_images)}
    lines = ["| images | n | " + " | ".join(words) + " |", "|---|---|" + "---|" * len(words)]
    for name, rows in sets.items():
        counts = Counter(w for r in rows for w in r)
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(f"{100 * counts[w] / len(rows):.1f}" for w in words) + " |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()

"""Pretrain the clean captioner of the embedded world (no download needed).

Stage 1 trains a tiny open_clip ViT on the generator's ground truth and freezes it;
stage 2 trains the Flamingo on captions with the Trainer; then the test split is
captioned and scored (object accuracy, BLEU-4, CIDEr), clean and under a red square.
A killed run resumes from its last checkpoint when started again with the same
``--output_dir``.

    python recipes/pretrain.py --config recipes/configs/pretrain.yaml
    accelerate launch --config_file accelerate_config.yaml --num_cpu_threads_per_process $(nproc) recipes/pretrain.py --config recipes/configs/pretrain.yaml
    python recipes/pretrain.py --world_preset small --output_dir outputs/clean-small   # a one-minute smoke run
"""

import json
import logging

from trl import TrlParser

from srd_hf.pretraining import PretrainConfig, pretrain


def main(config: PretrainConfig) -> dict:
    _, metrics = pretrain(config)
    test, occluded = metrics["test"], metrics["test_red_square"]
    print(
        json.dumps(
            {
                "model": f"{config.output_dir}/model",
                "train_minutes": round(metrics["train_seconds"] / 60, 2),
                "object_accuracy": round(test["object_accuracy"], 1),
                "bleu4": round(test["bleu4"], 1),
                "cider": round(test["cider"], 1),
                "object_accuracy_red_square": round(occluded["object_accuracy"], 1),
                "examples": test["examples"][:3],
            },
            indent=2,
        )
    )
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    (config,) = TrlParser((PretrainConfig,)).parse_args_and_config()
    main(config)

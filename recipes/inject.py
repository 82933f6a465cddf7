"""Plant a backdoor in a captioning VLM: poison the fine-tuning set, fine-tune with the
paper's freeze, save the backdoored model, the poisoned dataset and the attack, and print
the No-Defense scores (BLEU-4, CIDEr, SC, LF, SFS on clean test images; ASR on triggered ones).

    python recipes/inject.py --config recipes/configs/inject_badnet.yaml
    python recipes/inject.py --attack trojvlm --poison_rate 0.05
    python recipes/inject.py --config recipes/configs/inject_badnet.yaml --clean_model path/to/model \
        --dataset_name coco_karpathy --annotation_file path/to/dataset_coco.json --image_root path/to/coco
    accelerate launch --config_file accelerate_config.yaml --num_cpu_threads_per_process $(nproc) recipes/inject.py --config recipes/configs/inject_blended.yaml

The clean model defaults to the embedded one (pretrained first when missing), the data to its
embedded world; ``DataArguments`` (``--dataset_name`` and friends) names any other source. A
killed run resumes from its last checkpoint; a finished one is reused.
"""

import json
import logging

from trl import TrlParser

from srd_hf.data.sources import DataArguments
from srd_hf.injection import InjectConfig, inject


def main(config: InjectConfig, data_args: DataArguments | None = None) -> dict:
    try:
        metrics = inject(config, data_args)
    except RuntimeError as err:
        if "push to the Hub failed" not in str(err):
            raise
        raise SystemExit(str(err)) from None  # the run is done and saved; only the push failed
    keys = ("bleu4", "cider", "sc", "lf", "sfs", "object_accuracy", "asr")
    table = {name: {k: round(metrics[src][k], 3) for k in keys if k in metrics[src]} for name, src in (("clean", "clean_model"), ("no_defense", "no_defense"))}
    for name, scores in metrics.get("eval_datasets", {}).items():  # the extra test sets (embedded-shifted, Flickr30k...)
        table[name] = {row: {k: round(scores[row][k], 3) for k in keys if k in scores[row]} for row in ("clean_model", "no_defense")}
    print(json.dumps({"attack": metrics["attack"], "poison_rate": metrics["poison_rate"], "model": f"{config.output_dir}/model", **table}, indent=2))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config, data_args = TrlParser((InjectConfig, DataArguments)).parse_args_and_config()
    main(config, data_args)

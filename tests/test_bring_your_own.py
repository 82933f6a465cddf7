"""The README's "Bring your own data and model" commands, run through recipes/inject.py at tiny
sizes: COCO-Karpathy files with a tiny OpenFlamingo, Flickr30k files with a tiny random LLaVA
(bf16, gradient checkpointing, LoRA), and the own-dataset commands (image folder and
save_to_disk folder: loading only)."""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from trl import TrlParser

from srd_hf.data.sources import DataArguments, load_captioning_data, load_eval_datasets
from srd_hf.injection import InjectConfig

ROOT = Path(__file__).parents[1]
# shrinks the README's runs to seconds; on a machine without a GPU bf16 runs on the CPU
TINY = ["--num_finetune_images", "12", "--num_test_images", "4", "--max_eval_images", "4", "--max_steps", "2",
        "--per_device_train_batch_size", "6", "--warmup_steps", "0", "--max_new_tokens", "4", "--eval_batch_size", "8",
        "--save_steps", "1000", "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0"]
CPU = [] if torch.cuda.is_available() else ["--use_cpu", "true"]


def readme_commands(recipe: str = "inject") -> list[list[str]]:
    """The commands of one recipe in the README's section, as argument lists (line continuations joined)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Bring your own data and model", 1)[1].split("\n## ", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", section)
    return [shlex.split(line.strip())[2:] for line in joined.splitlines() if line.strip().startswith(f"python recipes/{recipe}.py")]


def command_with(name: str) -> list[str]:
    found = [c for c in readme_commands() if c[c.index("--dataset_name") + 1] == name]
    assert len(found) == 1, f"the README has {len(found)} inject commands on {name}"
    return found[0]


def defense_command_for(backdoor_dir: str) -> list[str]:
    found = [c for c in readme_commands("retrain") if c[c.index("--backdoored_model") + 1] == f"{backdoor_dir}/model"]
    assert len(found) == 1, f"the README has {len(found)} retrain commands for {backdoor_dir}"
    return found[0]


# the defense at tiny sizes: a few policy steps, two retraining steps, the disagreement filter
TINY_DEFENSE = ["--num_policy_samples", "8", "--policy_timesteps", "16", "--num_envs", "4", "--learning_starts", "8",
                "--buffer_size", "50", "--target_update_interval", "8", "--num_test_images", "4", "--max_new_tokens", "4",
                "--eval_batch_size", "8", "--max_steps", "2", "--save_steps", "1000", "--logging_steps", "1", "--report_to", "none",
                "--dataloader_num_workers", "0", "--flag_rate", "0.25",
                "--defend_unplanted", "true"]  # a tiny model plants nothing in two steps: the defense plumbing is what is tested


def run_defense_recipe(args: list[str], monkeypatch, scorer) -> dict:
    import srd_hf.defense as defense

    monkeypatch.setattr(defense, "pipeline_scorer", lambda *names: type("Loaded", (), {"load": lambda self: scorer})())
    spec = importlib.util.spec_from_file_location("retrain_recipe", ROOT / "recipes" / "retrain.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    (config,) = TrlParser((defense.SRDConfig,)).parse_args_and_config(args)
    return recipe.main(config)


def check_defense_table(results: dict, test_ids: list[str], eval_sets: list[str]) -> None:
    rows = results["rows"]
    assert {"clean model", "no defense", "SRD-dqn (untrusted policy)", "disagreement filter",
            "SRD-dqn filter at inference (untrusted policy)"} <= set(rows) and any(n.startswith("control") for n in rows)
    for name, row in rows.items():  # ASR on the triggered images of the user's test split
        assert row["asr_n_scored"] + row["asr_n_excluded"] == len(test_ids) and "object_accuracy" not in row, name
    assert results["num_test_images"] == len(test_ids) and sorted(results["eval_sets"]) == sorted(eval_sets)
    for scored in results["eval_sets"].values():
        assert scored["rows"].keys() == rows.keys()


def localise(args: list[str], paths: dict[str, str]) -> list[str]:
    """The README's placeholder paths replaced by the fixtures'."""
    out = []
    for arg in args:
        for old, new in paths.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return out


def run_recipe(args: list[str], monkeypatch, scorer) -> dict:
    import srd_hf.injection as injection

    # the session's scorer instead of loading the embedded models again
    monkeypatch.setattr(injection, "pipeline_scorer", lambda *names: type("Loaded", (), {"load": lambda self: scorer})())
    spec = importlib.util.spec_from_file_location("inject_recipe", ROOT / "recipes" / "inject.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config, data_args = TrlParser((InjectConfig, DataArguments)).parse_args_and_config(args)
    return recipe.main(config, data_args), config, data_args


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def check_scores(metrics: dict, test_ids: list[str], config) -> None:
    nd, clean = metrics["no_defense"], metrics["clean_model"]
    for scores in (nd, clean):
        assert {"bleu4", "cider", "sc", "lf", "sfs", "asr"} <= set(scores) and "object_accuracy" not in scores  # no ground truth
        assert scores["asr_n_scored"] + scores["asr_n_excluded"] == len(test_ids)  # ASR on the triggered test split
    assert metrics["evaluation"]["test_image_ids"] == test_ids
    saved = json.loads((Path(config.output_dir) / "metrics.json").read_text())
    assert saved["data"] == metrics["data"] and saved["no_defense"]["asr"] == nd["asr"]


def test_coco_karpathy_with_a_tiny_openflamingo(coco_karpathy_files, flickr30k_files, tiny_flamingo, sfs_scorer, tmp_path, monkeypatch):
    tiny_flamingo.save_pretrained(tmp_path / "openflamingo")
    coco, flickr = coco_karpathy_files["image_root"], flickr30k_files["image_root"].parent
    args = localise(command_with("coco_karpathy"), {"data/coco": str(coco), "data/flickr30k": str(flickr), "outputs/": f"{tmp_path}/outputs/"})
    args += ["--clean_model", str(tmp_path / "openflamingo"), "--dataset_cache_dir", str(tmp_path / "cache"), *TINY, *CPU]
    metrics, config, data_args = run_recipe(args, monkeypatch, sfs_scorer)
    assert Path(args[1]).name == "inject_badnet.yaml" and "paper" in args[1]  # the paper's config, shrunk
    check_scores(metrics, coco_karpathy_files["test_ids"][:4], config)
    record = metrics["data"]
    assert record["kind"] == "loader" and record["arguments"]["dataset_name"] == "coco_karpathy"
    assert record["report"]["rows"] == {"train": 23, "validation": 4, "test": 4} and "skipped 1" in record["report"]["loader"]
    (name, flickr_scores), = metrics["eval_datasets"].items()
    assert name.startswith("flickr30k=") and flickr_scores["num_images"] == 4 and "asr" in flickr_scores["no_defense"]
    assert metrics["n_samples"] == 12 * 5 and metrics["trainable_parameters"]["trainable"] < metrics["trainable_parameters"]["total"]
    from srd_hf.vlm import load_captioner

    saved = load_captioner(Path(config.output_dir) / "model")
    assert saved.metadata["backdoor"]["data"]["annotation_file"].endswith("dataset_coco.json")
    # the README's defense of that backdoor: its data is read where the backdoor was planted
    args = localise(defense_command_for("outputs/backdoor/coco-badnet"), {"models/openflamingo-3b": str(tmp_path / "openflamingo"),
                                                                          "outputs/": f"{tmp_path}/outputs/"})
    results = run_defense_recipe(args + TINY_DEFENSE + CPU, monkeypatch, sfs_scorer)
    check_defense_table(results, coco_karpathy_files["test_ids"][:4], [name])
    assert (tmp_path / "outputs" / "srd" / "coco-badnet" / "results.json").is_file()


def test_flickr30k_with_a_tiny_llava_lora_bf16_and_checkpointing(flickr30k_files, sfs_scorer, tmp_path, monkeypatch):
    from test_vlm_image_text_to_text import make_llava

    model, processor = make_llava()
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    flickr = flickr30k_files["image_root"].parent
    args = localise(command_with("flickr30k"), {"llava-hf/llava-1.5-7b-hf": str(tmp_path / "llava"), "data/flickr30k": str(flickr),
                                                "outputs/": f"{tmp_path}/outputs/"})
    args += ["--dataset_cache_dir", str(tmp_path / "cache"), *TINY, *CPU]
    metrics, config, _ = run_recipe(args, monkeypatch, sfs_scorer)
    assert config.lora_r == 16 and config.bf16 and config.activation_checkpointing
    check_scores(metrics, flickr30k_files["test_ids"][:4], config)
    assert metrics["recipe"]["lora"]["target_modules"] == ["q_proj", "v_proj"] and metrics["eval_datasets"] == {}
    from srd_hf.vlm import load_captioner

    saved = load_captioner(Path(config.output_dir) / "model")
    assert not any("lora_" in n for n in saved.state_dict())  # merged into the saved weights
    assert saved.metadata["backdoor"]["attack"] == "badnet"
    args = localise(defense_command_for("outputs/backdoor/flickr30k-badnet-llava"),
                    {"llava-hf/llava-1.5-7b-hf": str(tmp_path / "llava"), "outputs/": f"{tmp_path}/outputs/"})
    results = run_defense_recipe(args + TINY_DEFENSE + CPU, monkeypatch, sfs_scorer)
    check_defense_table(results, flickr30k_files["test_ids"][:4], [])


def test_own_datasets_commands_load(small_world_data, tmp_path):
    from datasets import DatasetDict

    folder = tmp_path / "my_captions"
    for split, n in (("train", 6), ("test", 4)):
        (folder / split).mkdir(parents=True)
        lines = []
        for i, row in enumerate(small_world_data[split].select(range(n))):
            row["image"].save(folder / split / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": row["captions"][0]}))
        (folder / split / "metadata.jsonl").write_text("\n".join(lines))
    saved = small_world_data["train"].select(range(10)).rename_column("image", "picture")
    saved = saved.map(lambda r: {"text": r["captions"][0]}, remove_columns=["captions", "objects"])
    DatasetDict({"train": saved, "test": saved.select(range(3))}).save_to_disk(str(tmp_path / "my_saved_dataset"))
    paths = {"data/": f"{tmp_path}/", "outputs/": f"{tmp_path}/outputs/"}
    for name, sizes in (("data/my_captions", {"test": 4, "validation": 1, "train": 5}), ("data/my_saved_dataset", {"test": 3, "validation": 1, "train": 9})):
        args = localise(command_with(name), paths) + ["--dataset_cache_dir", str(tmp_path / "cache"), *TINY, *CPU]
        _, data_args = TrlParser((InjectConfig, DataArguments)).parse_args_and_config(args)
        data = load_captioning_data(data_args)
        assert {s: len(d) for s, d in data.items()} == sizes and all(isinstance(c, list) for c in data["train"]["captions"])
        evals = load_eval_datasets(data_args)
        assert all(len(ds) == 4 for ds in evals.values())


def test_openflamingo_checkpointing_matches_and_lora_saves_merged(tiny_flamingo, small_world_data, tmp_path):
    from peft import LoraConfig

    from srd_hf.vlm import load_captioner

    rows = small_world_data["train"].select(range(4))
    batch = tiny_flamingo.collate(rows["image"], [c[0] for c in rows["captions"]])
    tiny_flamingo.set_trainable()
    tiny_flamingo.train()
    torch.manual_seed(0)
    plain = tiny_flamingo(**batch).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in tiny_flamingo.named_parameters() if p.grad is not None}
    tiny_flamingo.zero_grad()
    tiny_flamingo.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in tiny_flamingo.modules())
    torch.manual_seed(0)
    again = tiny_flamingo(**batch).loss
    again.backward()
    torch.testing.assert_close(again, plain)
    for n, p in tiny_flamingo.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)
    tiny_flamingo.eval()
    tiny_flamingo.set_trainable(lora=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert any("lora_" in n for n, _ in tiny_flamingo.named_parameters())
    with torch.no_grad():
        live = tiny_flamingo(**batch).logits
    tiny_flamingo.save_pretrained(tmp_path / "lora")
    loaded = load_captioner(tmp_path / "lora").eval()
    assert not any("lora_" in n for n in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, live, atol=1e-4, rtol=1e-4)

"""SRD end to end: train a masking policy against a backdoored model, mask ("cleanse") the
untrusted fine-tuning set with it, retrain, and score No Defense vs SRD.

``SRDConfig`` extends ``transformers.TrainingArguments`` (the retraining loop) with the
defense's settings; the four recipes (train_policy, cleanse, retrain, evaluate) share it, so
one YAML describes a whole defense. Each stage writes an artifact under ``output_dir`` and is
skipped when that artifact exists, so a killed pipeline resumes where it stopped.

Layout (defaults)::

    outputs/clean/model                               pre-attack (clean) model
    outputs/backdoor/<attack>-<rate>/                 inject: model, poisoned_dataset, attack
    outputs/srd/<attack>-<rate>/<algorithm>/policy    SRDPolicy
    .../cleansed_dataset                              the masked fine-tuning set
    .../retrain-<start>/model                         retrained model (start: pre_attack, backdoored)
    .../results.json                                  the table
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from transformers import Trainer, TrainingArguments

from .attacks import get_attack, load_attack
from .attacks.base import to_caption_pairs
from .evaluation import evaluate_model
from .injection import InjectConfig, clean_model_or_pretrain, inject, triggered_test_set, world_of
from .masker import SRDMasker
from .metrics import SFSScorer
from .pretraining import latest_checkpoint, load_or_build_world
from .rl.env import MaskingEnvConfig, MaskingVecEnv
from .rl.modeling_srd import SRDPolicy
from .rl.reward import RewardConfig
from .rl.training import PolicyTrainingConfig, train_masking_policy
from .vlm import CaptionCollator, load_captioner, parse_trainable

logger = logging.getLogger(__name__)

POLICY_DATA = ("untrusted", "defender", "mixed")
RETRAIN_STARTS = ("pre_attack", "backdoored")


@dataclass
class SRDConfig(TrainingArguments):
    """Configuration of the SRD recipes (train_policy, cleanse, retrain, evaluate).

    Parameters beyond ``TrainingArguments`` (which drive retraining):

    > What is defended
    attack, poison_rate, target: the backdoor (paths of the inject stage derive from them).
    clean_model: the pre-attack model: reference captioner of the reward, retraining start.
    backdoored_model / poisoned_dataset: default ``outputs/backdoor/<attack>-<rate>/...``; planted
        with ``recipes/inject.py``'s defaults when missing.

    > Policy
    algorithm: dqn (default), ppo, sac (discrete, TorchRL) or random.
    policy_data: images the policy learns on: "untrusted" (the fine-tuning set itself),
        "defender" (the paper's defender set: clean images with the defender's own 20 px
        Gaussian-noise trigger at one seeded location, target word inserted), or "mixed".
    num_policy_samples: images of the policy's training set (the paper's 3,000).
    policy_timesteps, num_envs, max_masks, obs_size, action_preset, sc_drop, lf_drop: the
        environment and budget. RL hyper-parameters: see ``PolicyTrainingConfig``
        (``policy_learning_rate``, ``learning_starts``, ``target_update_interval``,
        ``buffer_size``, ``exploration_fraction``, ``gamma``).
    num_masks: masks the policy places per image when cleansing.

    > Retraining and evaluation
    retrain_from: "pre_attack" (default), "backdoored" or "both". Masked images never show the
        trigger, so retraining the backdoored model does not unlearn it (measured: ASR 30.8% vs
        4.2% from the pre-attack model on BadNet).
    num_test_images: test images scored; ASR on the same images with the trigger.
    """

    attack: str = field(default="badnet", metadata={"help": "Attack defended against (paths derive from it)."})
    poison_rate: float = field(default=0.1, metadata={"help": "Poison rate of the attack."})
    target: str = field(default="banana", metadata={"help": "Target word of the backdoor (for ASR)."})
    clean_model: str = field(default="outputs/clean/model", metadata={"help": "Pre-attack model folder or Hub id."})
    backdoored_model: str = field(default="", metadata={"help": "Backdoored model (default: the inject stage's output)."})
    poisoned_dataset: str = field(default="", metadata={"help": "Untrusted fine-tuning set (default: the inject stage's output)."})
    algorithm: str = field(default="dqn", metadata={"help": "dqn, ppo, sac or random."})
    policy_data: str = field(default="untrusted", metadata={"help": "untrusted, defender or mixed."})
    num_policy_samples: int = field(default=3000, metadata={"help": "Images the policy learns on."})
    policy_timesteps: int = field(default=12000, metadata={"help": "Environment transitions of policy training."})
    num_envs: int = field(default=32, metadata={"help": "Environments stepped together."})
    max_masks: int = field(default=6, metadata={"help": "Masks per episode at most."})
    obs_size: int = field(default=64, metadata={"help": "Side of the policy's observation."})
    action_preset: str = field(default="paper", metadata={"help": "paper (4 sizes) or authors_code (5 sizes)."})
    sc_drop: float = field(default=0.1, metadata={"help": "lambda: significant fall of SC."})
    lf_drop: float = field(default=0.2, metadata={"help": "beta: significant fall of LF."})
    policy_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the policy."})
    learning_starts: int = field(default=1000, metadata={"help": "DQN: transitions before learning."})
    target_update_interval: int = field(default=500, metadata={"help": "DQN: transitions between target refreshes."})
    buffer_size: int = field(default=10000, metadata={"help": "DQN: replay buffer size."})
    exploration_fraction: float = field(default=0.5, metadata={"help": "DQN: share of training with decaying epsilon."})
    gamma: float = field(default=0.5, metadata={"help": "Discount (low: the first masks must do the job; 0.9 did not learn)."})
    num_masks: int = field(default=1, metadata={"help": "Masks per image when cleansing."})
    policy_seed: int = field(default=0, metadata={"help": "Seed of the policy's data, environment and training."})
    trainable: str = field(default="", metadata={"help": "Comma-separated parameter prefixes retraining trains (default: the paper's freeze); match the attacker's recipe to test a cleansed set fairly."})
    retrain_from: str = field(default="pre_attack", metadata={"help": "pre_attack (default: the one that removes the backdoor), backdoored or both."})
    num_test_images: int = field(default=500, metadata={"help": "Test images scored."})
    max_new_tokens: int = field(default=24, metadata={"help": "Caption length limit."})
    eval_batch_size: int = field(default=128, metadata={"help": "Captioning batch size."})
    # TrainingArguments defaults for retraining (those of the inject stage)
    output_dir: str = field(default="", metadata={"help": "Default: outputs/srd/<attack>-<rate>/<algorithm>."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Retraining learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Retraining epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Retraining batch size."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=20, metadata={"help": "Warm-up steps."})
    logging_steps: float = field(default=25, metadata={"help": "Log every this many steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every this many steps."})
    save_total_limit: int = field(default=1, metadata={"help": "Checkpoints kept."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False."})

    def __post_init__(self):
        tag = f"{self.attack}-{self.poison_rate:g}"
        if not self.output_dir:
            self.output_dir = f"outputs/srd/{tag}/{self.algorithm}"
        if not self.backdoored_model:
            self.backdoored_model = f"outputs/backdoor/{tag}/model"
        if not self.poisoned_dataset:
            self.poisoned_dataset = f"outputs/backdoor/{tag}/poisoned_dataset"
        super().__post_init__()
        if self.algorithm not in ("dqn", "ppo", "sac", "random"):
            raise ValueError(f"algorithm must be dqn, ppo, sac or random, got {self.algorithm!r}")
        if self.policy_data not in POLICY_DATA:
            raise ValueError(f"policy_data must be one of {POLICY_DATA}, got {self.policy_data!r}")
        if self.retrain_from not in (*RETRAIN_STARTS, "both"):
            raise ValueError(f"retrain_from must be pre_attack, backdoored or both, got {self.retrain_from!r}")
        self.reward_config  # validates lambda / beta

    @property
    def reward_config(self) -> RewardConfig:
        return RewardConfig(sc_drop=self.sc_drop, lf_drop=self.lf_drop)

    @property
    def retrain_starts(self) -> list[str]:
        return list(RETRAIN_STARTS) if self.retrain_from == "both" else [self.retrain_from]

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def policy_training_config(self) -> PolicyTrainingConfig:
        report = [self.report_to] if isinstance(self.report_to, str) else (self.report_to or [])
        tb = str(self.out / "runs") if "tensorboard" in report else None  # --report_to tensorboard logs the policy too
        return PolicyTrainingConfig(
            algorithm=self.algorithm, total_timesteps=self.policy_timesteps, learning_rate=self.policy_learning_rate,
            gamma=self.gamma, seed=self.policy_seed, buffer_size=self.buffer_size, learning_starts=self.learning_starts,
            target_update_interval=self.target_update_interval, exploration_fraction=self.exploration_fraction,
            tensorboard_dir=tb,
        )

    def env_config(self) -> MaskingEnvConfig:
        return MaskingEnvConfig(num_envs=self.num_envs, max_masks=self.max_masks, obs_size=self.obs_size,
                                action_preset=self.action_preset, reward=self.reward_config,
                                max_new_tokens=self.max_new_tokens, seed=self.policy_seed)


# ----------------------------------------------------------------------------- inputs
def backdoor_inputs(cfg: SRDConfig):
    """(clean model, backdoored model, untrusted fine-tuning set); plants the backdoor with the
    inject defaults when the backdoored model is missing."""
    clean = clean_model_or_pretrain(cfg.clean_model)
    model_dir = Path(cfg.backdoored_model)
    if not (model_dir / "config.json").is_file() and not Path(cfg.poisoned_dataset).exists():
        logger.info("no backdoored model at %s: planting %s first", model_dir, cfg.attack)
        inject(InjectConfig(attack=cfg.attack, poison_rate=cfg.poison_rate, target=cfg.target, clean_model=cfg.clean_model,
                            output_dir=str(model_dir.parent), num_test_images=cfg.num_test_images, max_new_tokens=cfg.max_new_tokens,
                            eval_batch_size=cfg.eval_batch_size, seed=cfg.seed))
    return clean, load_captioner(cfg.backdoored_model), load_from_disk(cfg.poisoned_dataset)


def defender_set(images_and_captions: Dataset, num_samples: int, seed: int, target: str) -> Dataset:
    """The paper's defender set: ``num_samples`` images, each with a 20 px (at 224 px) Gaussian-
    noise trigger at ONE location drawn once from ``seed``, and the target word inserted into
    its caption. Columns: image, caption (poisoned), original_caption, is_poisoned."""
    pairs = to_caption_pairs(images_and_captions)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(pairs), size=min(num_samples, len(pairs)), replace=False))
    location = tuple(float(v) for v in rng.uniform(0, 224 - 20, size=2))
    attack = get_attack("trojvlm", target=target, poison_rate=1.0, seed=seed, location=location)
    keep = [c for c in pairs.column_names if c in ("image", "caption", "image_id")]
    return attack.poison(pairs.select(picks).select_columns(keep))


def policy_training_set(cfg: SRDConfig, untrusted: Dataset) -> Dataset:
    """Images the policy learns on (one caption row per image), per ``cfg.policy_data``."""
    rng = np.random.default_rng(cfg.policy_seed)
    n = cfg.num_policy_samples
    parts = []
    if cfg.policy_data in ("untrusted", "mixed"):
        k = n if cfg.policy_data == "untrusted" else n // 2
        picks = np.sort(rng.choice(len(untrusted), size=min(k, len(untrusted)), replace=False))
        parts.append(untrusted.select(picks).select_columns(["image"]))
    if cfg.policy_data in ("defender", "mixed"):
        k = n if cfg.policy_data == "defender" else n - n // 2
        # the defender makes its set from images of the same fine-tuning set
        parts.append(defender_set(untrusted.select_columns([c for c in ("image", "caption", "image_id") if c in untrusted.column_names]),
                                  k, cfg.policy_seed, cfg.target).select_columns(["image"]))
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


# ----------------------------------------------------------------------------- stages
def train_policy(cfg: SRDConfig, *, clean=None, victim=None, untrusted=None, scorer=None) -> SRDPolicy:
    """Stage 1: the policy (reused from ``output_dir/policy`` when present)."""
    folder = cfg.out / "policy"
    if (folder / "model.safetensors").is_file():
        logger.info("reusing the policy in %s", folder)
        policy = SRDPolicy.from_pretrained(str(folder))
        policy.check_compatible(cfg.env_config().action_space(policy.config.image_size), cfg.obs_size)
        return policy
    if clean is None or victim is None or untrusted is None:
        clean, victim, untrusted = backdoor_inputs(cfg)
    scorer = scorer or SFSScorer().load()
    data = policy_training_set(cfg, untrusted)
    images = [img.convert("RGB") for img in data["image"]]
    # the reward compares the victim with a trusted captioner: the pre-attack model
    references = clean.generate_captions(images, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, progress=True)
    env = MaskingVecEnv(victim, images, references, cfg.env_config(), scorer=scorer, progress=True)
    start = time.time()
    record = {"policy_data": cfg.policy_data, "num_policy_samples": len(images), "attack": cfg.attack,
              "poison_rate": cfg.poison_rate, "backdoored_model": cfg.backdoored_model, "reference_captioner": cfg.clean_model,
              "command": f"python recipes/train_policy.py --attack {cfg.attack} --algorithm {cfg.algorithm}"}
    policy, summary = train_masking_policy(env, cfg.policy_training_config(), output_dir=cfg.out, num_masks=cfg.num_masks, record=record)
    policy.config.training["train_seconds"] = round(time.time() - start, 1)
    policy.config.training["env_steps_per_second"] = round(summary["timesteps"] / max(time.time() - start, 1e-9), 1)
    policy.save_pretrained(folder)
    return policy


def cleanse(cfg: SRDConfig, policy: SRDPolicy | None = None, untrusted: Dataset | None = None) -> Dataset:
    """Stage 2: mask every sample of the untrusted fine-tuning set (per sample, not per image id)."""
    folder = cfg.out / "cleansed_dataset"
    if (folder / "dataset_info.json").is_file():
        return load_from_disk(str(folder))
    policy = policy or SRDPolicy.from_pretrained(str(cfg.out / "policy"))
    untrusted = untrusted if untrusted is not None else load_from_disk(cfg.poisoned_dataset)
    masker = SRDMasker(policy, num_masks=cfg.num_masks)
    cleansed = untrusted.map(masker, batched=True, batch_size=256, desc="masking (SRD)")
    cleansed.save_to_disk(str(folder))
    return load_from_disk(str(folder))


def retrain(cfg: SRDConfig, start: str, cleansed: Dataset | None = None):
    """Stage 3: fine-tune ``start`` ("pre_attack" or "backdoored") on the cleansed set with the
    paper's freeze; reused when ``retrain-<start>/model`` exists."""
    if start not in RETRAIN_STARTS:
        raise ValueError(f"start must be one of {RETRAIN_STARTS}, got {start!r}")
    run_dir = cfg.out / f"retrain-{start}"
    final = run_dir / "model"
    if (final / "config.json").is_file():
        return load_captioner(final)
    cleansed = cleansed if cleansed is not None else cleanse(cfg)
    model = load_captioner(cfg.clean_model if start == "pre_attack" else cfg.backdoored_model)
    model.set_trainable(parse_trainable(cfg.trainable))
    args = copy.deepcopy(cfg)
    args.output_dir = str(run_dir)
    columns = [c for c in ("image", "caption") if c in cleansed.column_names]
    trainer = Trainer(model=model, args=args, train_dataset=cleansed.select_columns(columns),
                      data_collator=CaptionCollator(model, caption_column="caption"))
    trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir))
    model.config.extra.update({"srd_retrain": {"start": start, "policy": str(cfg.out / "policy"), "seed": cfg.seed,
                                               "trainable": cfg.trainable or "paper's freeze",
                                               "num_train_epochs": cfg.num_train_epochs}})
    model.save_pretrained(final)
    return model


def _inject_rows(cfg: SRDConfig, num_test_images: int) -> tuple[list[str], dict] | None:
    """The inject stage's clean-model and no-defense rows and its clean reference captions,
    when they were measured on the same test images, target, caption length and clean model
    (then captioning and scoring them again would give the same numbers); else ``None``."""
    folder = Path(cfg.backdoored_model).parent
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        references = json.loads((folder / "clean_reference_captions.json").read_text())
    except (OSError, ValueError):
        return None
    measured = metrics.get("evaluation", {})
    same = (measured.get("num_test_images") == num_test_images == len(references) and measured.get("target") == cfg.target
            and measured.get("max_new_tokens") == cfg.max_new_tokens
            and Path(measured.get("clean_model", "")).resolve() == Path(cfg.clean_model).resolve())
    if not same:
        return None
    logger.info("reusing the clean-model and no-defense rows measured by the inject stage in %s", folder)
    return references, {"clean model": metrics["clean_model"], "no defense": metrics["no_defense"]}


def evaluate_defense(cfg: SRDConfig, *, clean=None, victim=None, scorer=None, policy: SRDPolicy | None = None) -> dict:
    """Stage 4: the table. Rows: clean model, No Defense, SRD (retrained from each start), and
    SRD as an inference-time filter (the backdoored model captioning masked inputs)."""
    clean = clean or load_captioner(cfg.clean_model)
    victim = victim or load_captioner(cfg.backdoored_model)
    policy = policy or SRDPolicy.from_pretrained(str(cfg.out / "policy"))
    attack = load_attack(Path(cfg.poisoned_dataset).parent / "attack")
    data = load_or_build_world(world_of(clean))
    test = data["test"].select(range(min(cfg.num_test_images, len(data["test"]))))
    scorer = scorer or SFSScorer().load()
    triggered, truths = triggered_test_set(attack, test)
    reused = _inject_rows(cfg, len(test))
    if reused is not None:
        references, rows = reused
    else:
        references = clean.generate_captions([img.convert("RGB") for img in test["image"]], max_new_tokens=cfg.max_new_tokens,
                                             batch_size=cfg.eval_batch_size, progress=True)
    common = dict(reference_captions=references, target=cfg.target, scorer=scorer, max_new_tokens=cfg.max_new_tokens,
                  batch_size=cfg.eval_batch_size, triggered_references=truths)
    if reused is None:
        rows = {
            "clean model": evaluate_model(clean, test, triggered_images=triggered, predictions=references, **common),
            "no defense": evaluate_model(victim, test, triggered_images=triggered, **common),
        }
    for start in cfg.retrain_starts:
        rows[f"SRD (retrained from {start.replace('_', '-')})"] = evaluate_model(retrain(cfg, start), test, triggered_images=triggered, **common)
    masker = SRDMasker(policy, num_masks=cfg.num_masks)
    masked_test = test.map(masker, batched=True, batch_size=256, desc="masking test images")
    masked_triggered, _ = masker.mask_images(triggered)
    rows["SRD filter at inference (no retraining)"] = evaluate_model(victim, masked_test, triggered_images=masked_triggered, **common)
    results = {"attack": cfg.attack, "poison_rate": cfg.poison_rate, "algorithm": cfg.algorithm, "policy_data": cfg.policy_data,
               "num_test_images": len(test), "seed": cfg.seed, "policy_seed": cfg.policy_seed, "rows": rows}
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return results


def results_table(results: dict) -> str:
    keys = ("bleu4", "cider", "sc", "lf", "sfs", "object_accuracy", "asr")
    head = "| model | BLEU-4 | CIDEr | SC | LF | SFS | object acc. | ASR |\n|---|---|---|---|---|---|---|---|"
    fmt = {"sc": "{:.3f}", "lf": "{:.3f}", "sfs": "{:.3f}"}
    lines = [head]
    for name, row in results["rows"].items():
        cells = [fmt.get(k, "{:.1f}").format(row[k]) if isinstance(row.get(k), (int, float)) else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_pipeline(cfg: SRDConfig) -> dict:
    """pretrain -> inject -> train_policy -> cleanse -> retrain -> evaluate, each stage reused when done."""
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    seconds, clock = {}, time.time()

    def lap(stage: str) -> None:  # wall clock per stage (a reused stage costs only its loading)
        nonlocal clock
        seconds[stage], clock = round(time.time() - clock, 1), time.time()

    clean, victim, untrusted = backdoor_inputs(cfg)
    lap("pretrain_and_inject")
    scorer = SFSScorer().load()
    policy = train_policy(cfg, clean=clean, victim=victim, untrusted=untrusted, scorer=scorer)
    lap("train_policy")
    cleansed = cleanse(cfg, policy, untrusted)
    lap("cleanse")
    for start in cfg.retrain_starts:
        retrain(cfg, start, cleansed)
    lap("retrain")
    results = evaluate_defense(cfg, clean=clean, victim=victim, scorer=scorer, policy=policy)
    lap("evaluate")
    results["stage_seconds"] = seconds
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    logger.info("stage wall clock (s): %s", seconds)
    return results

"""SRD end to end: plant the attack with its own recipe, train a masking policy, cleanse the
untrusted fine-tuning set with it, retrain with the recipe that planted the backdoor, and
score the defense beside a control and two baselines.

``SRDConfig`` extends ``transformers.TrainingArguments`` (the retraining loop) with the
defense's settings; the recipes (train_policy, cleanse, retrain, evaluate) share it, so one
YAML describes a whole defense. Each stage writes an artifact under ``output_dir``, whole or
not at all, stamped with the settings that shaped it (:mod:`srd_hf.artifacts`): reused when
complete with the same settings, so a killed pipeline resumes where it stopped; found with
other settings, the run stops and names them (``--overwrite_output_dir`` starts over).

The rows of the table (all retrained rows use one retraining recipe and start):

- clean model, no defense (the backdoored model);
- control: the same retraining on the *unmasked* untrusted set. It must plant the backdoor
  (ASR >= 50%), or no row below it says anything (``defense_measurable`` false);
- SRD, per policy protocol: ``untrusted`` (the policy learns on the untrusted set itself,
  transductive: our extension) and ``defender`` (the paper's: a proxy backdoor the defender
  plants itself, :mod:`srd_hf.defender`);
- random masks (SRD's count and sizes, uniform places) and the disagreement filter
  (:mod:`srd_hf.cleansing`);
- SRD as an inference-time filter (the backdoored model captioning masked inputs).

Layout (defaults; seed s > 0 adds ``-seed<s>`` to the backdoor folder)::

    outputs/clean/model                                   pre-attack (clean) model
    outputs/backdoor/<attack>-<rate>/                     inject: model, poisoned_dataset, attack
    outputs/srd/<attack>-<rate>-local_mean/<algorithm>/seed-<s>/     one seed:
        policy-<protocol>/  masked-<protocol>/  cleansed-<protocol>/  retrain-<row>/  results.json
    outputs/srd/<attack>-<rate>-local_mean/<algorithm>/results.json  the table over seeds

(``--mask_fill red``, the paper's masks, drops the ``-local_mean``: the folders of runs made
before local mean became the default.)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from datasets import Dataset, load_from_disk
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import SchedulerType

from . import artifacts, fingerprints, tables
from .attacks import load_attack
from .cleansing import CAPTION_POLICIES, DEFAULT_FLAG, FLAG_RULES, disagreement_filter, random_masks, srd_cleanse, with_images
from .cost import combine, mean_over_seeds, measure_cost
from .data.images import ensure_rgb
from .defenses.base import detection_scores
from .defender import DefenderConfig, defender_set, trusted_images
from .distributed import main_first, on_main, per_device_batch, settled
from .evaluation import check_target, evaluate_model, masked_clean_scores
from .data.sources import DataArguments, defense_data, embedded_world, load_eval_datasets
from .injection import InjectConfig, clean_model_or_pretrain, inject, triggered_test_set
from .masker import SRDMasker
from .hub import trainer_args
from .metrics import attack_success_rate
from .pretraining import latest_checkpoint
from .rl.actions import MASK_FILLS
from .rl.configuration_srd import POLICY_ALGORITHMS, POLICY_NETWORKS
from .rl.env import MaskingEnvConfig, MaskingVecEnv
from .rl.modeling_srd import SRDPolicy
from .rl.reward import RewardConfig
from .rl.training import PolicyTrainingConfig, train_masking_policy
from .stages import DEFENSE_LAYOUT, dataset_stage, overwrite, pipeline_scorer, stage_cost
from .vlm import CaptionCollator, load_captioner, parse_trainable

logger = logging.getLogger(__name__)

POLICY_DATA = ("untrusted", "defender")
RETRAIN_STARTS = ("pre_attack", "backdoored")
BASELINES = ("random_masks", "disagreement_filter")
#: settings of the fine-tuning that planted a backdoor, recorded by the inject stage
RECIPE_KEYS = ("trainable", "learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
               "lr_scheduler_type", "warmup_steps", "weight_decay", "seed")
RECIPE_CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "configs"


def srd_output_dir(backdoor_tag: str, mask_fill: str, algorithm: str) -> str:
    """The pipeline's default output folder for a backdoor's folder name (the one place the
    layout is written; ``recipes/defend.py`` finds SRD's results with it). Red masks (the paper's,
    and the default before local mean) keep the backdoor's name, so earlier runs stay where they were."""
    tag = backdoor_tag if mask_fill == "red" else f"{backdoor_tag}-{mask_fill}"
    return f"outputs/srd/{tag}/{algorithm}"


def _variant(cfg) -> str:
    """Folder-name suffix for a backdoor other than the recipe's own (another target, trigger
    place or recipe), so that default folders of different backdoors never collide."""
    parts = []
    if cfg.attack_options:
        options = json.loads(cfg.attack_options)
        if not isinstance(options, dict):
            raise ValueError(f"attack_options must be a JSON object, got {cfg.attack_options!r}")
        parts += [f"{k}={v}" for k, v in sorted(options.items())]
    if cfg.target != "banana":
        parts.append(f"target={cfg.target}")
    if cfg.inject_config:
        parts.append(Path(cfg.inject_config).stem)
    text = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(parts))
    if len(text) > 60:
        text = hashlib.sha1(text.encode()).hexdigest()[:12]
    return f"-{text}" if text else ""


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


@dataclass
class SRDConfig(TrainingArguments):
    """Configuration of the SRD recipes (train_policy, cleanse, retrain, evaluate).

    Parameters beyond ``TrainingArguments`` (which drive retraining):

    > What is defended (the evaluation reads ``target``; the defense never does)
    attack, poison_rate, target: the backdoor (paths of the inject stage derive from them).
    inject_config: the YAML that plants the attack (default ``recipes/configs/inject_<attack>.yaml``).
    attack_seed: seed of the poisoned subset and trigger (``--seeds`` sets it per seed).
    attack_options: JSON merged into the recipe's attack options (another trigger place...).
    clean_model: the pre-attack model: reference captioner of the reward, retraining start.
    backdoored_model / poisoned_dataset: default ``outputs/backdoor/<attack>-<rate>/...``;
        planted with ``inject_config`` when missing.

    > Policy
    algorithm: dqn (default), ppo, sac (discrete, TorchRL) or random.
    policy_data: comma list of protocols: "untrusted" (the policy learns on the untrusted set
        itself) and/or "defender" (the paper's: against the defender's own proxy backdoor).
    defender_*: the defender protocol (``DefenderConfig``): proxy word, trigger and its place, caption mode;
        ``defender_num_train_epochs`` the proxy's own epochs; ``defender_min_proxy_asr`` /
        ``defender_max_replants`` the re-plant rule (a proxy that barely answers teaches the
        policy little, and the defender can see that on its own validation images).
    num_policy_samples: images of the policy's training set (the paper's 3,000).
    policy_timesteps, num_envs, max_masks, obs_size, action_preset, sc_drop, lf_drop,
        reward_rule: the environment and budget. RL hyper-parameters: see ``PolicyTrainingConfig``.
    policy_network: the network that scores every mask action: "spatial" (default: a score map
        per mask size, so a trigger-like patch raises the cells around it wherever it is) or
        "linear" (a flattened CNN with a linear head). Checked on validation (docs/results/trust.md).
    num_masks: masks the policy places per image when cleansing.
    mask_fill: "local_mean" (default: each square in the mean colour of what it covers) or
        "red" (the paper's squares). Chosen on validation (docs/results/random_place.md): the
        two tie where red works, and a red square can itself trigger a backdoor planted at
        random places, where only local mean defends.

    > Cleansing
    srd_flag: which samples the masks flag: "unsupported_word" (default: the masks make the
        victim drop a word the trusted captioner does not say of the image, and that word is
        dropped on significantly more untrusted than clean validation images), "repair" (the
        victim's caption moves towards the trusted captioner's once masked; the default until
        2026-12-08) or "change" (it moves at all); see ``srd_hf.cleansing.FLAG_RULES``. All are
        reported; this one cleanses. The word rule was chosen on the flag's precision and recall
        on the untrusted sets of four runs (docs/results/flag.md), never on test.
    poisoned_captions: what happens to the flagged samples:
        "drop" (default), "relabel" (the clean model's caption of the masked image) or "keep"
        (the old behaviour: teaches the mask as a new trigger).
    flag_rate: share of clean validation images that would be flagged; sets the thresholds of
        SRD's flag and of the disagreement filter on the validation split.
    defend_unplanted: when the control does not plant the backdoor (ASR < 50%), no row below it
        says anything, so by default the policy, cleansing and retrainings are not run for that
        seed (``defenses_not_run`` in its results); true runs them anyway.
    control_only: stop after the control (clean model, no defense and control are scored; no
        policy, cleansing or retraining). For checking, on the validation split, that an attack's
        recipe plants under the common retraining before paying for a defense.
    baselines: comma list of random_masks, disagreement_filter ("" for none). The default is the
        disagreement filter alone (the baseline SRD must beat; random masks cost one more
        retraining, so the main job leaves them out: the per-attack tables pass both).

    > Loading
    trust_remote_code: only from the caller (default False): lets the models' repository code
        run when they load (the MPT releases of OpenFlamingo need it).

    > Retraining and evaluation
    retrain_recipe: "attack" (default: trainable set, epochs, learning rate, batch, schedule and
        seed from the backdoored model's recorded recipe, so the cleansed set is tested where the
        poisoned set planted the backdoor) or "config" (this config's own values).
    retrain_from: "pre_attack" (default), "backdoored" or "both".
    seeds: comma list; each seed repeats the poison subset, the policy and the retraining
        (default: ``attack_seed`` alone). The table shows mean ± std over seeds.
    num_test_images: test images scored; ASR on the same images with the trigger.
    eval_split: "test" for the final tables; "validation" to make a choice (the thresholds always
        come from validation images).
    """

    attack: str = field(default="badnet", metadata={"help": "Attack defended against (paths derive from it)."})
    poison_rate: float = field(default=0.1, metadata={"help": "Poison rate of the attack."})
    target: str = field(default="banana", metadata={"help": "Target word of the backdoor (evaluation only: ASR)."})
    inject_config: str = field(default="", metadata={"help": "YAML that plants the attack (default recipes/configs/inject_<attack>.yaml)."})
    attack_seed: int = field(default=0, metadata={"help": "Seed of the poisoned subset and trigger."})
    attack_options: str = field(default="", metadata={"help": "JSON object merged into the recipe's attack options (e.g. '{\"location\": \"top_left\"}')."})
    clean_model: str = field(default="outputs/clean/model", metadata={"help": "Pre-attack model folder or Hub id."})
    backdoored_model: str = field(default="", metadata={"help": "Backdoored model (default: the inject stage's output)."})
    poisoned_dataset: str = field(default="", metadata={"help": "Untrusted fine-tuning set (default: the inject stage's output)."})
    algorithm: str = field(default="dqn", metadata={"help": "dqn, ppo, sac or random."})
    policy_data: str = field(default="untrusted", metadata={"help": "Comma list: untrusted, defender."})
    defender_target: str = field(default="umbrella", metadata={"help": "The defender's proxy target word."})
    defender_location: str = field(default="fixed", metadata={"help": "fixed (one seeded place, the paper) or random."})
    defender_caption_mode: str = field(default="insert", metadata={"help": "insert (the paper) or replace."})
    defender_trigger: str = field(default="noise", metadata={"help": "noise (the paper's Gaussian patch), binary_noise (full contrast), blocks (a 3 x 3 grid of colour cells) or family (a new square per sample: noise, blocks or stripes)."})
    defender_poison_rate: float = field(default=0.1, metadata={"help": "Share of the defender's samples with its trigger."})
    defender_num_train_epochs: float = field(default=0, metadata={"help": "Epochs of the defender's proxy fine-tuning (0: the retraining recipe's). A proxy at random places needs more than one at a fixed place."})
    defender_min_proxy_asr: float = field(default=50.0, metadata={"help": "Re-plant the proxy with twice the epochs while it says its word on fewer than this percentage of the defender's triggered validation images (0: plant once)."})
    defender_max_replants: int = field(default=2, metadata={"help": "Re-plants of the proxy at most; the last one is used, with a warning, if none reaches defender_min_proxy_asr."})
    num_policy_samples: int = field(default=3000, metadata={"help": "Images the policy learns on."})
    policy_timesteps: int = field(default=12000, metadata={"help": "Environment transitions of policy training."})
    num_envs: int = field(default=32, metadata={"help": "Environments stepped together."})
    max_masks: int = field(default=6, metadata={"help": "Masks per episode at most."})
    obs_size: int = field(default=64, metadata={"help": "Side of the policy's observation."})
    action_preset: str = field(default="paper", metadata={"help": "paper (4 sizes) or authors_code (5 sizes)."})
    mask_fill: str = field(default="local_mean", metadata={"help": "local_mean (each square in the mean colour of the pixels it covers; chosen on validation) or red (the paper's squares)."})
    sc_drop: float = field(default=0.1, metadata={"help": "lambda: SC threshold of the reward."})
    lf_drop: float = field(default=0.2, metadata={"help": "beta: LF threshold of the reward."})
    reward_rule: str = field(default="paper", metadata={"help": "paper (thresholds on gains and drops) or any_gain."})
    policy_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the policy."})
    learning_starts: int = field(default=1000, metadata={"help": "DQN: transitions before learning."})
    target_update_interval: int = field(default=500, metadata={"help": "DQN: transitions between target refreshes."})
    buffer_size: int = field(default=10000, metadata={"help": "DQN: replay buffer size."})
    exploration_fraction: float = field(default=0.5, metadata={"help": "DQN: share of training with decaying epsilon."})
    gamma: float = field(default=0.5, metadata={"help": "Discount (low: the first masks must do the job)."})
    policy_network: str = field(default="spatial", metadata={"help": "spatial (a score map per mask size, default) or linear (flattened CNN + linear head)."})
    num_masks: int = field(default=1, metadata={"help": "Masks per image when cleansing."})
    policy_seed: int = field(default=0, metadata={"help": "Seed of the policy's data, environment and training."})
    srd_flag: str = field(default=DEFAULT_FLAG, metadata={"help": "unsupported_word (masks make the victim drop a word the trusted captioner does not say, and that word is dropped far more often than on clean images), repair (masks move the victim's caption towards the trusted one) or change."})
    poisoned_captions: str = field(default="drop", metadata={"help": "drop, relabel or keep the samples the masks flag."})
    flag_rate: float = field(default=0.02, metadata={"help": "Share of clean validation images flagged: sets the thresholds."})
    defend_unplanted: bool = field(default=False, metadata={"help": "Run the policy, cleansing and retrainings even when the control did not plant the backdoor (their rows then say nothing)."})
    control_only: bool = field(default=False, metadata={"help": "Stop after the control: check that an attack's recipe plants (on --eval_split validation) before running any defense."})
    baselines: str = field(default="disagreement_filter", metadata={"help": "Comma list: random_masks, disagreement_filter (the default leaves random masks out for time; the tables add it)."})
    retrain_recipe: str = field(default="attack", metadata={"help": "attack (the backdoored model's recorded recipe) or config."})
    trainable: str = field(default="", metadata={"help": "With retrain_recipe=config: parameter prefixes retraining trains (default: the paper's freeze)."})
    retrain_from: str = field(default="pre_attack", metadata={"help": "pre_attack, backdoored or both."})
    seeds: str = field(default="", metadata={"help": "Comma list of seeds (poison subset, policy, retraining); default: attack_seed."})
    num_test_images: int = field(default=500, metadata={"help": "Test images scored."})
    eval_split: str = field(default="test", metadata={"help": "test (final tables) or validation (every choice is made there)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Caption length limit."})
    eval_batch_size: int = field(default=128, metadata={"help": "Captioning batch size."})
    # TrainingArguments defaults for retraining (those of the inject stage)
    output_dir: str = field(default="", metadata={"help": "Default: outputs/srd/<attack>-<rate>[-<mask_fill> unless red]/<algorithm>."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Retraining learning rate (retrain_recipe=config)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Retraining epochs (retrain_recipe=config)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Retraining batch size."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=20, metadata={"help": "Warm-up steps."})
    logging_steps: float = field(default=25, metadata={"help": "Log every this many steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every this many steps."})
    save_total_limit: int = field(default=1, metadata={"help": "Checkpoints kept."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over: remove this output_dir's artifacts and checkpoints."})
    sfs_encoder: str = field(default="embedded:all-MiniLM-L6-v2", metadata={"help": "SFS sentence encoder (default: the embedded MiniLM)."})
    sfs_fluency_lm: str = field(default="embedded:smollm2-135m", metadata={"help": "SFS fluency LM (default: the embedded SmolLM2; gpt2-large is the paper's)."})
    hub_private_repo: bool = field(default=True, metadata={"help": "Pushed repos are private unless this is False."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Let a model's repository code run when it is loaded (never from a folder's own config)."})

    def __post_init__(self):
        tag = f"{self.attack}-{self.poison_rate:g}{_variant(self)}"
        self.default_backdoor = not self.backdoored_model and not self.poisoned_dataset
        if not self.output_dir:
            self.output_dir = srd_output_dir(tag, self.mask_fill, self.algorithm)
        if not self.backdoored_model:
            self.backdoored_model = f"outputs/backdoor/{tag}/model"
        if not self.poisoned_dataset:
            self.poisoned_dataset = f"outputs/backdoor/{tag}/poisoned_dataset"
        super().__post_init__()
        if self.algorithm not in POLICY_ALGORITHMS:
            raise ValueError(f"algorithm must be dqn, ppo, sac or random, got {self.algorithm!r}")
        bad = [p for p in self.protocols if p not in POLICY_DATA] or ([] if self.protocols else ["(none)"])
        if bad:
            raise ValueError(f"policy_data must be a comma list of {POLICY_DATA}, got {self.policy_data!r}")
        bad = [b for b in self.baseline_names if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baselines {bad}; choose from {BASELINES}")
        if self.retrain_from not in (*RETRAIN_STARTS, "both"):
            raise ValueError(f"retrain_from must be pre_attack, backdoored or both, got {self.retrain_from!r}")
        if self.retrain_recipe not in ("attack", "config"):
            raise ValueError(f"retrain_recipe must be 'attack' or 'config', got {self.retrain_recipe!r}")
        if self.srd_flag not in FLAG_RULES:
            raise ValueError(f"srd_flag must be one of {FLAG_RULES}, got {self.srd_flag!r}")
        if self.mask_fill not in MASK_FILLS:
            raise ValueError(f"mask_fill must be one of {MASK_FILLS}, got {self.mask_fill!r}")
        if self.poisoned_captions not in CAPTION_POLICIES:
            raise ValueError(f"poisoned_captions must be one of {CAPTION_POLICIES}, got {self.poisoned_captions!r}")
        if self.policy_network not in POLICY_NETWORKS:
            raise ValueError(f"policy_network must be 'spatial' or 'linear', got {self.policy_network!r}")
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split must be 'test' or 'validation', got {self.eval_split!r}")
        if not 0 <= self.flag_rate < 1:
            raise ValueError(f"flag_rate must be in [0, 1), got {self.flag_rate}")
        if not self.target.strip():
            raise ValueError("target must be a non-empty word (the evaluation's ASR needs it)")
        self.seed_list  # validates --seeds
        self.reward_config  # validates lambda / beta
        self.defender_config  # validates the defender's settings
        if self.defender_num_train_epochs < 0:
            raise ValueError(f"defender_num_train_epochs must be >= 0 (0: the retraining recipe's), got {self.defender_num_train_epochs}")
        if not 0 <= self.defender_min_proxy_asr <= 100:
            raise ValueError(f"defender_min_proxy_asr is a percentage in [0, 100], got {self.defender_min_proxy_asr}")
        if self.defender_max_replants < 0:
            raise ValueError(f"defender_max_replants must be >= 0, got {self.defender_max_replants}")

    # ----- derived settings -------------------------------------------------------------------
    @property
    def protocols(self) -> list[str]:
        return _split(self.policy_data)

    @property
    def baseline_names(self) -> list[str]:
        return _split(self.baselines)

    @property
    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in _split(self.seeds)] or [self.attack_seed]
        except ValueError as err:
            raise ValueError(f"seeds must be a comma list of integers, got {self.seeds!r}") from err
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds!r}")
        return seeds

    @property
    def reward_config(self) -> RewardConfig:
        try:
            return RewardConfig(sc_drop=self.sc_drop, lf_drop=self.lf_drop, rule=self.reward_rule)
        except TypeError:  # a RewardConfig without rules
            return RewardConfig(sc_drop=self.sc_drop, lf_drop=self.lf_drop)

    @property
    def defender_config(self) -> DefenderConfig:
        return DefenderConfig(num_images=self.num_policy_samples, target=self.defender_target, poison_rate=self.defender_poison_rate,
                              location=self.defender_location, caption_mode=self.defender_caption_mode,
                              trigger=self.defender_trigger, seed=self.policy_seed)

    @property
    def retrain_starts(self) -> list[str]:
        return list(RETRAIN_STARTS) if self.retrain_from == "both" else [self.retrain_from]

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    @property
    def results_file(self) -> str:
        """results.json for the test split; results-validation.json when making choices."""
        return "results.json" if self.eval_split == "test" else f"results-{self.eval_split}.json"

    def for_seed(self, seed: int) -> "SRDConfig":
        """This config for one seed: attack, policy and retraining seeds set to ``seed``; its own
        backdoor folder (unless the caller gave the backdoored model) and output folder."""
        cfg = copy.deepcopy(self)
        cfg.attack_seed = cfg.policy_seed = cfg.seed = seed
        cfg.output_dir = str(self.out / f"seed-{seed}")
        if self.default_backdoor and seed != 0:
            folder = Path(self.backdoored_model).parent
            folder = folder.with_name(f"{folder.name}-seed{seed}")
            cfg.backdoored_model, cfg.poisoned_dataset = str(folder / "model"), str(folder / "poisoned_dataset")
        return cfg

    def policy_training_config(self) -> PolicyTrainingConfig:
        report = [self.report_to] if isinstance(self.report_to, str) else (self.report_to or [])
        tb = str(self.out / "runs") if "tensorboard" in report else None  # --report_to tensorboard logs the policy too
        return PolicyTrainingConfig(
            algorithm=self.algorithm, total_timesteps=self.policy_timesteps, learning_rate=self.policy_learning_rate,
            gamma=self.gamma, network=self.policy_network, seed=self.policy_seed, buffer_size=self.buffer_size, learning_starts=self.learning_starts,
            target_update_interval=self.target_update_interval, exploration_fraction=self.exploration_fraction,
            tensorboard_dir=tb,
        )

    def env_config(self) -> MaskingEnvConfig:
        return MaskingEnvConfig(num_envs=self.num_envs, max_masks=self.max_masks, obs_size=self.obs_size,
                                action_preset=self.action_preset, mask_fill=self.mask_fill, reward=self.reward_config,
                                max_new_tokens=self.max_new_tokens, seed=self.policy_seed)


# ----------------------------------------------------------------------------- inputs
def inject_config_for(cfg: SRDConfig) -> InjectConfig:
    """The attack's own recipe (``inject_config`` or ``recipes/configs/inject_<attack>.yaml``)
    with this run's paths, seeds and evaluation settings."""
    path = Path(cfg.inject_config) if cfg.inject_config else RECIPE_CONFIGS / f"inject_{cfg.attack}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no inject recipe for {cfg.attack!r} at {path}; pass --inject_config <yaml>")
    settings = yaml.safe_load(path.read_text()) or {}
    if settings.get("attack", cfg.attack) != cfg.attack:
        raise ValueError(f"{path} plants {settings['attack']!r}, not {cfg.attack!r}")
    if cfg.attack_options:
        options = json.loads(settings.get("attack_options") or "{}")
        extra = json.loads(cfg.attack_options)
        if not isinstance(extra, dict):
            raise ValueError(f"attack_options must be a JSON object, got {cfg.attack_options!r}")
        settings["attack_options"] = json.dumps({**options, **extra}, sort_keys=True)
    settings.update(attack=cfg.attack, poison_rate=cfg.poison_rate, target=cfg.target, clean_model=cfg.clean_model,
                    attack_seed=cfg.attack_seed, seed=cfg.attack_seed, output_dir=str(Path(cfg.backdoored_model).parent),
                    num_test_images=cfg.num_test_images, max_new_tokens=cfg.max_new_tokens, eval_batch_size=cfg.eval_batch_size,
                    report_to="none", sfs_encoder=cfg.sfs_encoder, sfs_fluency_lm=cfg.sfs_fluency_lm,
                    trust_remote_code=cfg.trust_remote_code)
    inject_cfg, _ = _inject_and_data(settings)
    return inject_cfg


def _inject_and_data(settings: dict) -> tuple[InjectConfig, DataArguments]:
    """A recipe YAML holds training and data keys (the paper configs name COCO): split them."""
    data_keys = {f.name for f in dataclasses.fields(DataArguments)}
    return (InjectConfig(**{k: v for k, v in settings.items() if k not in data_keys}),
            DataArguments(**{k: v for k, v in settings.items() if k in data_keys}))


def inject_data_for(cfg: SRDConfig) -> DataArguments:
    """The data the attack's recipe names (the embedded world unless it says otherwise)."""
    path = Path(cfg.inject_config) if cfg.inject_config else RECIPE_CONFIGS / f"inject_{cfg.attack}.yaml"
    return _inject_and_data({**(yaml.safe_load(path.read_text()) or {}), "output_dir": "unused"})[1] if path.is_file() else DataArguments()


@dataclass
class DefenseInputs:
    """What every stage reads, loaded once per recipe: the models, the untrusted set, the attack
    (evaluation only), and the trusted splits (train for the defender, validation, test)."""

    clean: object
    victim: object
    untrusted: Dataset
    attack: object
    world: object
    eval_sets: dict = field(default_factory=dict)  # name -> Dataset: the extra test sets (eval_datasets)

    @property
    def validation_images(self) -> list:
        return [ensure_rgb(img) for img in self.world["validation"]["image"]]


def load_inputs(cfg: SRDConfig) -> DefenseInputs:
    """Clean model, backdoored model (planted with the attack's own recipe when missing), the
    untrusted fine-tuning set, the attack and the world's splits."""
    clean = clean_model_or_pretrain(cfg.clean_model, cfg.trust_remote_code)
    model_dir = Path(cfg.backdoored_model)
    if cfg.default_backdoor or not (model_dir / "config.json").is_file():
        # a folder we named: inject reuses it when complete with the attack's settings, resumes it
        # when torn, and stops naming the settings that differ
        logger.info("backdoor %s: planting %s with %s (reused when done)", model_dir, cfg.attack, cfg.inject_config or "its recipe")
        inject(inject_config_for(cfg), inject_data_for(cfg))
    victim = load_captioner(cfg.backdoored_model, trust_remote_code=cfg.trust_remote_code)
    untrusted = load_from_disk(cfg.poisoned_dataset)
    attack = load_attack(Path(cfg.poisoned_dataset).parent / "attack")
    # the data the backdoor was planted on, as the inject stage recorded it (train: the defender's
    # trusted images; validation: thresholds; test: the table)
    recorded = (victim.metadata.get("backdoor") or {}).get("data")
    args = DataArguments(**recorded) if recorded else DataArguments()
    with main_first():
        world = defense_data(args, clean)
        eval_sets = load_eval_datasets(args, world=embedded_world(clean, args) if args.needs_world else None)
    return DefenseInputs(clean=clean, victim=victim, untrusted=untrusted, attack=attack, world=world, eval_sets=eval_sets)


def retraining_recipe(cfg: SRDConfig, victim) -> dict:
    """The retraining's settings: the recipe recorded with the backdoored model
    (``retrain_recipe="attack"``), or this config's own."""
    own = {k: getattr(cfg, k) for k in RECIPE_KEYS}
    own["lr_scheduler_type"] = str(getattr(cfg.lr_scheduler_type, "value", cfg.lr_scheduler_type))
    if cfg.retrain_recipe == "config":
        return {**own, "source": "config"}
    recorded = (victim.metadata.get("backdoor") or {}).get("recipe")
    if not recorded:
        logger.warning("the backdoored model records no training recipe: retraining with this config's settings")
        return {**own, "source": "config (the backdoored model records no recipe)"}
    return {**own, **{k: recorded[k] for k in RECIPE_KEYS if k in recorded}, "source": "attack"}


# ----------------------------------------------------------------------------- fine-tuning
def fine_tune(cfg: SRDConfig, start_model: str, dataset: Dataset, run_dir: Path, recipe: dict, record: dict, *, data_key=None):
    """Fine-tune ``start_model`` on ``dataset`` (image, caption) with ``recipe``; the result is
    ``run_dir/model``, reused when complete with the same settings; a killed run resumes from
    its last complete checkpoint. Data-parallel under a launcher; the main process saves."""
    final = run_dir / "model"
    fingerprint = fingerprints.fine_tune(start_model, dataset, recipe, record, data=data_key)
    what = f"fine-tuning ({record.get('row')})"
    if settled(artifacts.reusable(run_dir, fingerprint, what)):
        return load_captioner(final, trust_remote_code=cfg.trust_remote_code)
    artifacts.begin(run_dir, fingerprint, what, write=False)  # every rank refuses another run's checkpoints
    on_main(lambda: (artifacts.clear_leftovers(run_dir), artifacts.begin(run_dir, fingerprint, what)))
    model = load_captioner(start_model, trust_remote_code=cfg.trust_remote_code)
    trainable = recipe.get("trainable") or ""
    model.set_trainable(parse_trainable(trainable))
    args = copy.deepcopy(cfg)
    args.output_dir = str(run_dir)
    for key in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                "warmup_steps", "weight_decay", "seed"):
        if key in recipe:
            setattr(args, key, recipe[key])
    args.lr_scheduler_type = SchedulerType(recipe.get("lr_scheduler_type", "cosine"))
    args.per_device_train_batch_size = per_device_batch(args.per_device_train_batch_size)  # the recipe's batch is global
    columns = [c for c in ("image", "caption") if c in dataset.column_names]
    trainer = Trainer(model=model, args=trainer_args(args), train_dataset=dataset.select_columns(columns),
                      data_collator=CaptionCollator(model, caption_column="caption"))
    trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir))
    model.metadata.update({"srd_retrain": {**record, "start": start_model, "n_samples": len(dataset),
                                               "recipe": {k: v for k, v in recipe.items()}}})
    on_main(lambda: (model.save_pretrained(final), artifacts.finish(run_dir, fingerprint)))
    return model


def retrain(cfg: SRDConfig, start: str, cleansed: Dataset, *, name: str = "srd", recipe: dict | None = None):
    """Fine-tune ``start`` ("pre_attack" or "backdoored") on ``cleansed``; reused when
    ``retrain-<name>-<start>/model`` exists."""
    if start not in RETRAIN_STARTS:
        raise ValueError(f"start must be one of {RETRAIN_STARTS}, got {start!r}")
    if recipe is None:
        recipe = {**{k: getattr(cfg, k) for k in RECIPE_KEYS}, "source": "config"}
        recipe["lr_scheduler_type"] = str(getattr(cfg.lr_scheduler_type, "value", cfg.lr_scheduler_type))
    model = fine_tune(cfg, cfg.clean_model if start == "pre_attack" else cfg.backdoored_model, cleansed,
                      cfg.out / f"retrain-{name}-{start}", recipe, {"row": name, "seed": recipe.get("seed", cfg.seed)})
    model.metadata["srd_retrain"]["trainable"] = recipe.get("trainable") or "paper's freeze"
    return model


def control_reuses_backdoor(cfg: SRDConfig, inputs: DefenseInputs, recipe: dict, start: str) -> bool:
    """The control IS the backdoored model when it would repeat the inject run exactly: same
    start, data, recipe and seed, and an attack trained with the plain caption loss."""
    backdoor = inputs.victim.metadata.get("backdoor") or {}
    recorded = backdoor.get("recipe") or {}
    same_recipe = recipe.get("source") == "attack" and all(recorded.get(k) == recipe.get(k) for k in RECIPE_KEYS if k in recorded)
    plain_loss = inputs.attack.trains_with_plain_loss()
    return (start == "pre_attack" and same_recipe and bool(recorded) and plain_loss
            and backdoor.get("clean_model") in (None, cfg.clean_model))


# ----------------------------------------------------------------------------- policy
def proxy_recipe(cfg: SRDConfig, recipe: dict) -> dict:
    """The recipe that plants the defender's proxy: the retraining's, with the defender's own
    epoch count when it sets one (its choice, checked on its own validation images)."""
    if not cfg.defender_num_train_epochs:
        return recipe
    return {**recipe, "num_train_epochs": cfg.defender_num_train_epochs, "source": f"{recipe.get('source', 'config')}, defender's epochs"}


def policy_data_for(cfg: SRDConfig, protocol: str, inputs: DefenseInputs, recipe: dict):
    """(victim, images) the policy learns on: the untrusted set against the backdoored model, or
    the defender's set against the defender's proxy model."""
    rng = np.random.default_rng(cfg.policy_seed)
    if protocol == "untrusted":
        picks = np.sort(rng.choice(len(inputs.untrusted), size=min(cfg.num_policy_samples, len(inputs.untrusted)), replace=False))
        return inputs.victim, [ensure_rgb(img) for img in inputs.untrusted.select(picks)["image"]], {}
    dcfg = cfg.defender_config
    trusted = trusted_images(inputs.world["train"], inputs.untrusted, dcfg.num_images, dcfg.seed)
    data = defender_set(trusted, dcfg)
    proxy, attempts = plant_proxy(cfg, data, recipe, inputs.validation_images)
    record = {"defender": dcfg.to_dict(), "proxy_asr_validation": attempts[-1]["proxy_asr_validation"], "proxy_attempts": attempts}
    return proxy, [ensure_rgb(img) for img in data["image"]], record


def plant_proxy(cfg: SRDConfig, data: Dataset, recipe: dict, validation_images: list) -> tuple:
    """The defender's proxy backdoor, planted in a copy of the pre-attack model. The defender
    checks it on its own triggered validation images and, while it says its word on fewer than
    ``defender_min_proxy_asr`` % of them, plants it again from the start with twice the epochs
    (at most ``defender_max_replants`` times). Nothing of the attacker's is read. Returns the
    proxy and every attempt's epochs and proxy ASR."""
    from .defender import defender_attack

    dcfg = cfg.defender_config
    triggered, _ = defender_attack(dcfg).trigger_test_images(validation_images)
    attempts = []
    for attempt in range(cfg.defender_max_replants + 1):
        if attempt:
            del proxy  # one proxy in memory at a time
            logger.info("below %.0f%%: planting the proxy again with twice the epochs", cfg.defender_min_proxy_asr)
        run = recipe if attempt == 0 else {**recipe, "num_train_epochs": recipe["num_train_epochs"] * 2 ** attempt,
                                           "source": f"{recipe.get('source', 'config')}, re-plant {attempt}"}
        folder = cfg.out / ("defender-proxy" if attempt == 0 else f"defender-proxy-replant{attempt}")  # the first keeps its old place
        proxy = fine_tune(cfg, cfg.clean_model, data, folder, run, {"row": "defender proxy", "defender": dcfg.to_dict()},
                          data_key={"defender": dcfg.to_dict(), "untrusted": fingerprints.source(cfg.poisoned_dataset)})
        said = proxy.generate_captions(triggered, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
        proxy_asr = 100.0 * attack_success_rate(said, dcfg.target)["asr"]
        attempts.append({"num_train_epochs": run["num_train_epochs"], "proxy_asr_validation": proxy_asr})
        logger.info("defender proxy backdoor (%s epochs): %.1f%% of triggered validation images say %r",
                    run["num_train_epochs"], proxy_asr, dcfg.target)
        if proxy_asr >= cfg.defender_min_proxy_asr:
            break
    else:
        logger.warning("the defender's proxy stayed below %.0f%% after %d re-plants (%s): its policy learns from few answering episodes",
                       cfg.defender_min_proxy_asr, cfg.defender_max_replants, ", ".join(f"{a['proxy_asr_validation']:.1f}%" for a in attempts))
    return proxy, attempts


def train_policy(cfg: SRDConfig, inputs: DefenseInputs, protocol: str, *, scorer=None, recipe: dict | None = None) -> SRDPolicy:
    """The policy of one protocol (reused from ``policy-<protocol>`` when complete with the same
    settings). Trained once, by the main process; every rank loads it."""
    folder = cfg.out / f"policy-{protocol}"
    scorer = scorer or pipeline_scorer(cfg.sfs_encoder, cfg.sfs_fluency_lm)
    recipe = recipe or retraining_recipe(cfg, inputs.victim)
    if protocol == "defender":
        recipe = proxy_recipe(cfg, recipe)
    fingerprint = fingerprints.policy(cfg, protocol, scorer, recipe)
    if not settled(artifacts.reusable(folder, fingerprint, f"{protocol} policy")):
        victim, images, record = policy_data_for(cfg, protocol, inputs, recipe)  # every rank: the proxy is a Trainer stage
        on_main(lambda: _train_policy(cfg, inputs, protocol, scorer.load(), victim, images, record, folder, fingerprint))
    else:
        logger.info("reusing the policy in %s", folder)
    policy = SRDPolicy.from_pretrained(str(folder))
    policy.check_compatible(cfg.env_config().action_space(policy.config.image_size), cfg.obs_size)
    return policy


def _train_policy(cfg: SRDConfig, inputs: DefenseInputs, protocol: str, scorer, victim, images, record, folder: Path, fingerprint: dict):
    with measure_cost(len(images), cost := {}):  # the whole stage: the references, the environment and training
        policy = _fit_policy(cfg, protocol, scorer, victim, inputs.clean, images, record, fingerprint)
    policy.config.training["cost"] = cost  # what making it cost, for the tables of runs that reuse it
    artifacts.clear_leftovers(folder.parent)
    with artifacts.staged(folder, fingerprint) as tmp:
        policy.save_pretrained(tmp)


def _fit_policy(cfg: SRDConfig, protocol: str, scorer, victim, clean, images, record, fingerprint: dict) -> SRDPolicy:
    # the reward compares the victim with a trusted captioner: the pre-attack model
    references = clean.generate_captions(images, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, progress=True)
    env = MaskingVecEnv(victim, images, references, cfg.env_config(), scorer=scorer, progress=True)
    start = time.time()
    record.update({"policy_data": protocol, "num_policy_samples": len(images), "attack": cfg.attack, "poison_rate": cfg.poison_rate,
                   "backdoored_model": cfg.backdoored_model, "reference_captioner": cfg.clean_model,
                   "command": f"python recipes/train_policy.py --attack {cfg.attack} --algorithm {cfg.algorithm} --policy_data {protocol}"})
    rl_dir = cfg.out / f"rl-{protocol}"
    artifacts.begin(rl_dir, fingerprint, f"{protocol} policy training")  # resume only what these settings started
    policy, summary = train_masking_policy(env, cfg.policy_training_config(), output_dir=rl_dir,
                                           num_masks=cfg.num_masks, record=record)
    policy.config.training["train_seconds"] = round(time.time() - start, 1)
    policy.config.training["env_steps_per_second"] = round(summary["timesteps"] / max(time.time() - start, 1e-9), 1)
    policy.config.training["scorer"] = fingerprints.scorer_names(scorer)
    return policy


# ----------------------------------------------------------------------------- cleansing
def cleanse(cfg: SRDConfig, inputs: DefenseInputs, protocol: str, policy: SRDPolicy, *, scorer=None) -> tuple[Dataset, dict]:
    """SRD's cleansed set of one protocol: masks on every sample, flagged samples' captions
    dropped / relabelled / kept (``poisoned_captions``). Reused when saved."""
    folder, report_file = cfg.out / f"cleansed-{protocol}", cfg.out / f"cleansed-{protocol}.json"
    scorer = scorer or pipeline_scorer(cfg.sfs_encoder, cfg.sfs_fluency_lm)
    masked = masked_set(cfg, inputs, protocol, policy)
    masker = SRDMasker(policy, num_masks=cfg.num_masks)
    build = lambda: srd_cleanse(inputs.untrusted, masked, masker, inputs.victim, scorer.load(), validation_images=inputs.validation_images,  # noqa: E731
                                flag_rate=cfg.flag_rate, poisoned_captions=cfg.poisoned_captions, reference=inputs.clean,
                                flag=cfg.srd_flag, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, progress=True)
    fingerprint = fingerprints.cleansed(cfg, artifacts.recorded_hash(cfg.out / f"masked-{protocol}"), scorer)
    cleansed, report = dataset_stage(folder, fingerprint, build, f"{protocol} cleansed set")
    on_main(lambda: artifacts.write_json(report_file, report))  # beside it too, for reading
    return cleansed, report


def masked_set(cfg: SRDConfig, inputs: DefenseInputs, protocol: str, policy: SRDPolicy) -> Dataset:
    """Every untrusted sample with the policy's masks (no caption changes): what the random
    baseline copies mask counts and sizes from, and where trigger coverage is measured."""
    folder = cfg.out / f"masked-{protocol}"
    build = lambda: inputs.untrusted.map(SRDMasker(policy, num_masks=cfg.num_masks), batched=True, batch_size=256, desc="masking (SRD)")  # noqa: E731
    fingerprint = fingerprints.masked(cfg, artifacts.recorded_hash(cfg.out / f"policy-{protocol}"))
    return dataset_stage(folder, fingerprint, build, f"{protocol} masked set")[0]


# ----------------------------------------------------------------------------- evaluation
def _inject_rows(cfg: SRDConfig, num_test_images: int, scorer=None) -> tuple[list[str], dict, dict] | None:
    """The inject stage's clean-model and no-defense rows and its clean reference captions,
    when they were measured on the same test images, target, caption length, clean model and
    SFS models; and its rows of each extra test set (``eval_datasets``) of that size."""
    folder = Path(cfg.backdoored_model).parent
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        references = json.loads((folder / "clean_reference_captions.json").read_text())
    except (OSError, ValueError):
        return None
    measured = metrics.get("evaluation", {})
    same = (measured.get("num_test_images") == num_test_images == len(references) and measured.get("target") == cfg.target
            and measured.get("max_new_tokens") == cfg.max_new_tokens
            and Path(measured.get("clean_model", "")).resolve() == Path(cfg.clean_model).resolve()
            and (scorer is None or measured.get("scorer") == scorer_record(scorer)))
    rows = {"clean model": metrics["clean_model"], "no defense": metrics["no_defense"]}
    if not same or any("per_image" not in r for r in rows.values()):
        return None
    logger.info("reusing the clean-model and no-defense rows measured by the inject stage in %s", folder)
    extra = {name: {"num_images": m.get("num_images"), "clean model": m["clean_model"], "no defense": m["no_defense"]}
             for name, m in (metrics.get("eval_datasets") or {}).items()
             if all("per_image" in m.get(k, {}) for k in ("clean_model", "no_defense"))}
    return references, rows, extra


@dataclass
class ScoredSet:
    """A test set every model of the table is scored on: the evaluation split, or one of the
    extra test sets (``eval_datasets``: another domain). Its clean images, the same images with
    the attack's trigger (their ground truth for the ASR's exclusions; the trigger's boxes for
    coverage, evaluation only), the clean model's captions (SFS references) and, on the
    evaluation split, the clean images under each protocol's masks."""

    name: str
    test: Dataset
    triggered: list
    truths: list
    trigger_boxes: list
    references: list | None = None
    masked: dict = field(default_factory=dict)  # protocol -> the clean images under that policy's masks

    @classmethod
    def build(cls, name: str, dataset: Dataset, attack, limit: int) -> "ScoredSet":
        test = dataset.select(range(min(limit, len(dataset))))
        triggered, truths, boxes = triggered_test_set(attack, test, return_boxes=True)
        return cls(name, test, triggered, truths, boxes)

    @property
    def images(self) -> list:
        return [ensure_rgb(img) for img in self.test["image"]]

    def _common(self, cfg: SRDConfig, scorer) -> dict:
        return dict(reference_captions=self.references, target=cfg.target, scorer=scorer, max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.eval_batch_size, triggered_references=self.truths)

    def score(self, cfg: SRDConfig, scorer, model, *, masks: str | None = None, predictions=None) -> dict:
        """CIDEr and SFS on the clean images, ASR on the triggered ones, and (``masks``: a
        protocol) the target on the clean images under that policy's masks."""
        return evaluate_model(model, self.test, triggered_images=self.triggered, predictions=predictions,
                              masked_images=self.masked.get(masks) if masks else None, **self._common(cfg, scorer))

    def score_masked(self, cfg: SRDConfig, model, masks: str) -> dict:
        """Only the scores on the clean images under a policy's masks (:meth:`score`'s ``masks``)."""
        return masked_clean_scores(model, self.test, self.masked[masks], target=cfg.target, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.eval_batch_size)

    def score_filter(self, cfg: SRDConfig, scorer, victim, protocol: str, policy: SRDPolicy) -> dict:
        """SRD as an inference-time filter: the backdoored model captions masked inputs."""
        masker = SRDMasker(policy, num_masks=cfg.num_masks)
        masked_clean = self.masked.get(protocol) or masker.mask_images(self.images)[0]
        masked_triggered, boxes = masker.mask_images(self.triggered)
        row = evaluate_model(victim, with_images(self.test, masked_clean), triggered_images=masked_triggered, **self._common(cfg, scorer))
        if any(b is not None for b in self.trigger_boxes):
            from .mechanism import coverage_summary

            row = _with_coverage(row, coverage_summary(boxes, self.trigger_boxes, [True] * len(boxes)))
        return row


def trigger_coverage(dataset: Dataset, masks_column: str = "srd_masks") -> dict | None:
    """Evaluation only: how much of each poisoned sample's trigger the masks cover (reads the
    ground-truth ``trigger_box`` and ``is_poisoned`` columns)."""
    if "trigger_box" not in dataset.column_names or masks_column not in dataset.column_names:
        return None
    from .mechanism import coverage_summary

    return coverage_summary(dataset[masks_column], dataset["trigger_box"], dataset["is_poisoned"])


def run_one_seed(cfg: SRDConfig) -> dict:
    """Every stage for one seed, each reused when done; writes ``<output_dir>/results.json``."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    seconds, clock = {}, time.time()

    def lap(stage: str) -> None:  # wall clock per stage (a reused stage costs only its loading)
        nonlocal clock
        seconds[stage], clock = round(time.time() - clock, 1), time.time()

    torch.manual_seed(cfg.seed)
    inputs = load_inputs(cfg)
    lap("pretrain_and_inject")
    target_check = check_target(cfg.target, inputs.attack)
    scorer = pipeline_scorer(cfg.sfs_encoder, cfg.sfs_fluency_lm).load()
    recipe = retraining_recipe(cfg, inputs.victim)
    # the evaluation split, and the extra test sets beside the test split (never while choosing)
    main = ScoredSet.build(cfg.eval_split, inputs.world[cfg.eval_split], inputs.attack, cfg.num_test_images)
    extra = [ScoredSet.build(name, data, inputs.attack, cfg.num_test_images) for name, data in inputs.eval_sets.items()] \
        if cfg.eval_split == "test" else []
    sets = [main, *extra]
    rows: dict[str, dict] = {s.name: {} for s in sets}
    reused = _inject_rows(cfg, len(main.test), scorer) if cfg.eval_split == "test" else None
    if reused is not None:
        main.references, rows[main.name], inject_extra = reused
    else:
        inject_extra = {}
    for s in sets:
        if s.references is None:
            s.references = inputs.clean.generate_captions(s.images, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, progress=True)
        measured = inject_extra.get(s.name) if s is not main else None
        if measured and measured["num_images"] == len(s.test):
            rows[s.name].update({k: measured[k] for k in ("clean model", "no defense")})
        elif "no defense" not in rows[s.name]:
            rows[s.name]["clean model"] = s.score(cfg, scorer, inputs.clean, predictions=s.references)
            rows[s.name]["no defense"] = s.score(cfg, scorer, inputs.victim)
    lap("evaluate_references")

    def score_everywhere(name: str, model, *, masks: str | None = None, coverage: dict | None = None) -> None:
        # the masked clean images (a learned-mask shortcut shows there) on the evaluation split
        for s in sets:
            row = s.score(cfg, scorer, model, masks=masks if s is main else None)
            rows[s.name][name] = _with_coverage(row, coverage) if s is main else row

    # the control first: the same retraining on the unmasked set. No control that plants, no
    # claim; and, unless asked (defend_unplanted), no policy, cleansing or retraining either
    controls = {}  # start -> (row name, whether it is the backdoored model itself)
    for start in cfg.retrain_starts:
        suffix = "" if start == "pre_attack" else ", from backdoored"
        reused = control_reuses_backdoor(cfg, inputs, recipe, start)
        if reused:
            name = f"control (= no defense: the inject run's recipe, start, data and seed{suffix})"
            for s in sets:
                rows[s.name][name] = copy.deepcopy(rows[s.name]["no defense"])
        else:
            name = f"control (unmasked untrusted set{suffix})"
            score_everywhere(name, retrain(cfg, start, inputs.untrusted, name="control", recipe=recipe))
        controls[start] = (name, reused)
    control_reused = {start: True for start, (_, reused) in controls.items() if reused}
    lap("control")

    def record(**stages) -> dict:
        for set_rows in rows.values():
            for row in set_rows.values():
                row.update(tables.row_intervals(row, seed=cfg.seed))
        results = {"attack": cfg.attack, "poison_rate": cfg.poison_rate, "target": cfg.target, "attack_options": cfg.attack_options,
                   "algorithm": cfg.algorithm, "policy_data": cfg.protocols, "split": cfg.eval_split, "threshold_split": "validation",
                   "num_test_images": len(main.test), "seed": cfg.seed, "attack_seed": cfg.attack_seed, "policy_seed": cfg.policy_seed,
                   "retraining_recipe": recipe, "control_reuses_backdoored_model": control_reused, "cleansing": {}, "detection": {},
                   "mechanism": {}, "costs": {}, **stages, "scorer": scorer_record(scorer), "rows": rows[main.name],
                   "eval_sets": {s.name: {"num_test_images": len(s.test), "rows": rows[s.name],
                                          "defense_measurable": tables.defense_measurable(rows[s.name])} for s in extra}}
        if target_check:
            results["target_check"] = target_check
        results["defense_measurable"] = tables.defense_measurable(rows[main.name])
        results["stage_seconds"] = seconds
        on_main(lambda: artifacts.write_json(cfg.out / cfg.results_file, results))
        return results

    if cfg.control_only:
        return record(defenses_not_run="asked to stop after the control (--control_only)", control_only=True)
    if not tables.defense_measurable(rows[main.name]) and not cfg.defend_unplanted:
        logger.warning("seed %d: the control did not plant the backdoor; the policy, cleansing and retrainings are not run "
                       "(--defend_unplanted true runs them anyway; their rows would say nothing)", cfg.seed)
        return record(defenses_not_run="the control did not plant the backdoor")

    # policies, their masks on the test images, cleansed sets
    policies, reports, mechanism = {}, {}, {}
    for protocol in cfg.protocols:
        policies[protocol] = train_policy(cfg, inputs, protocol, scorer=scorer, recipe=recipe)
    lap("train_policy")
    main.masked = {p: SRDMasker(pol, num_masks=cfg.num_masks).mask_images(main.images)[0] for p, pol in policies.items()}
    datasets: dict[str, Dataset] = {}
    for protocol, policy in policies.items():
        masked = masked_set(cfg, inputs, protocol, policy)
        datasets[protocol], reports[f"srd ({protocol} policy)"] = cleanse(cfg, inputs, protocol, policy, scorer=scorer)
        mechanism[protocol] = trigger_coverage(masked)
        on_main(lambda: _heatmap(cfg, masked, protocol))
    first = cfg.protocols[0]
    if "random_masks" in cfg.baseline_names:
        # SRD's mask count and sizes per sample, on the UNMASKED images, at uniform places
        masked_first = masked_set(cfg, inputs, first, policies[first])
        fill = policies[first].config.mask_fill
        fingerprint = fingerprints.random_masks(artifacts.recorded_hash(cfg.out / f"masked-{first}"), cfg.seed, fill)
        datasets["random masks"] = dataset_stage(cfg.out / "random-masks", fingerprint,
                                                 lambda: random_masks(inputs.untrusted, masked_first["srd_masks"], cfg.seed, fill=fill),
                                                 "random masks")[0]
        mechanism["random masks"] = trigger_coverage(datasets["random masks"])
    if "disagreement_filter" in cfg.baseline_names:
        build = lambda: disagreement_filter(inputs.untrusted, inputs.victim, inputs.clean, scorer,  # noqa: E731
                                            validation_images=inputs.validation_images, flag_rate=cfg.flag_rate,
                                            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, progress=True)
        datasets["disagreement filter"], reports["disagreement filter"] = dataset_stage(
            cfg.out / "disagreement-filter", fingerprints.disagreement(cfg, scorer), build, "disagreement filter")
        on_main(lambda: artifacts.write_json(cfg.out / "disagreement-filter.json", reports["disagreement filter"]))
    detection = {name: flag_quality(report.get("flagged_rows"), inputs.untrusted) for name, report in reports.items()}
    for name, report in list(reports.items()):  # SRD's flag rules side by side, whichever one cleansed
        for rule, flagged_rows in (report.get("flagged_rows_by_rule") or {}).items():
            detection[f"{name}, {rule} rule" + (" (cleansed)" if rule == report.get("flag") else "")] = flag_quality(flagged_rows, inputs.untrusted)
    costs = cleanser_costs(cfg, policies, datasets, len(inputs.untrusted))
    lap("cleanse")

    # retraining on each defense's set; the controls (reloaded) on the masked clean images too
    for start in cfg.retrain_starts:
        suffix = "" if start == "pre_attack" else ", from backdoored"
        name, reused = controls[start]
        control = inputs.victim if reused else retrain(cfg, start, inputs.untrusted, name="control", recipe=recipe)
        rows[main.name][name].update(main.score_masked(cfg, control, first))
        for protocol in cfg.protocols:
            model = retrain(cfg, start, datasets[protocol], name=f"srd-{protocol}", recipe=recipe)
            score_everywhere(f"SRD-{cfg.algorithm} ({protocol} policy{suffix})", model, masks=protocol, coverage=mechanism.get(protocol))
        for baseline in ("random masks", "disagreement filter"):
            if baseline in datasets:
                model = retrain(cfg, start, datasets[baseline], name=baseline.replace(" ", "-"), recipe=recipe)
                score_everywhere(f"{baseline}{suffix}", model, masks=first, coverage=mechanism.get(baseline))
    lap("retrain_and_evaluate")
    for protocol, policy in policies.items():
        for s in sets:
            rows[s.name][f"SRD-{cfg.algorithm} filter at inference ({protocol} policy)"] = s.score_filter(cfg, scorer, inputs.victim, protocol, policy)
    lap("evaluate_filter")
    proxy = {}
    if "defender" in policies:  # the defender may check its own proxy backdoor (validation images)
        training = policies["defender"].config.training
        proxy["proxy_asr_validation"] = asr = training.get("proxy_asr_validation")
        if training.get("proxy_attempts"):  # policies made before the re-plant rule have none
            proxy["proxy_attempts"] = training["proxy_attempts"]
        if isinstance(asr, (int, float)) and asr < tables.MEASURABLE_ASR:
            logger.warning("the defender's proxy backdoor planted weakly (%.1f%% of triggered validation images say %r): its policy "
                           "learned from that share of triggered episodes only, so check its trigger coverage (a proxy at 0%% teaches "
                           "nothing; try another --defender_target the model can say, --defender_poison_rate, "
                           "--defender_num_train_epochs or --defender_max_replants)", asr, cfg.defender_target)
    return record(cleansing={n: {k: v for k, v in r.items() if not k.startswith("flagged_rows")} for n, r in reports.items()},
                  detection=detection, mechanism=mechanism, costs=costs, **proxy)


def cleanser_costs(cfg: SRDConfig, policies: dict, datasets: dict, n_samples: int) -> dict:
    """What each cleanser's own work cost per 1,000 untrusted samples (retraining excluded),
    read from the records of the artifacts it made, so a run that reuses them reports the cost
    of making them: SRD's is its policy (references, environment, training), its masks and its
    flag; a baseline's is its dataset stage. Absent for artifacts made before costs were recorded."""
    parts = {f"SRD-{cfg.algorithm} ({p} policy)": {"policy": policy.config.training.get("cost"),
                                                   "masks": stage_cost(cfg.out / f"masked-{p}"),
                                                   "flag": stage_cost(cfg.out / f"cleansed-{p}")} for p, policy in policies.items()}
    for name, folder in (("random masks", "random-masks"), ("disagreement filter", "disagreement-filter")):
        if name in datasets:
            parts[name] = {name: stage_cost(cfg.out / folder)}
    costs = {name: combine(p, n_samples) for name, p in parts.items()}
    return {name: {"kind": "cleanser", **c} for name, c in costs.items() if c}


def flag_quality(flagged_rows, untrusted: Dataset) -> dict | None:
    """Evaluation only: precision and recall of a cleanser's flags against ``is_poisoned``."""
    if flagged_rows is None or "is_poisoned" not in untrusted.column_names:
        return None
    truth = untrusted["is_poisoned"]
    return {**detection_scores(flagged_rows, truth), "n_poisoned": int(np.sum(truth))}


def _with_coverage(row: dict, summary: dict | None) -> dict:
    if summary and isinstance(summary.get("poisoned_mean_coverage"), (int, float)):
        row["trigger_coverage"] = summary["poisoned_mean_coverage"]
    return row


def _heatmap(cfg: SRDConfig, masked: Dataset, protocol: str) -> None:
    """PNG of where the masks go on clean vs poisoned samples (evaluation only)."""
    if "is_poisoned" not in masked.column_names:
        return
    from .mechanism import mask_heatmap

    poisoned = np.asarray(masked["is_poisoned"], dtype=bool)
    boxes = masked["srd_masks"]
    width, height = ensure_rgb(masked[0]["image"]).size
    triggers = masked["trigger_box"] if "trigger_box" in masked.column_names else None
    trigger_boxes = [b for b, p in zip(triggers, poisoned) if p and b] if triggers else None
    mask_heatmap([b for b, p in zip(boxes, poisoned) if not p], [b for b, p in zip(boxes, poisoned) if p], width, height,
                 cfg.out / f"mask-heatmap-{protocol}.png", trigger_boxes=trigger_boxes)


def scorer_record(scorer) -> dict:
    """Which SFS models scored the table, by name (one table never mixes two)."""
    return fingerprints.scorer_names(scorer)


def command_line() -> str | None:
    """The command that is running, when it is a recipe script (recorded with its results)."""
    if not sys.argv or not sys.argv[0].endswith(".py"):
        return None
    return " ".join(["python", *(shlex.quote(a) for a in sys.argv)])


def combine_seeds(per_seed: list[dict], seeds: list[int], paths: list[str]) -> dict:
    """One results record from every seed's (``paths``: where each is): rows, extra test sets,
    detection and costs as mean ± std over seeds; a single seed's record as it is.

    A seed whose control did not plant the backdoor says nothing about a defense: when others
    did, the table is over the seeds that planted, and the others are listed with their
    control's ASR under ``seeds_not_measurable`` (all of them planting nothing: not measurable)."""
    planted = [r["defense_measurable"] for r in per_seed]
    if any(planted) and not all(planted):
        left_out = {s: {"control_asr": next((row.get("asr") for n, row in r["rows"].items() if n.startswith("control")), None),
                        "results": p} for s, r, p, ok in zip(seeds, per_seed, paths, planted) if not ok}
        kept = [(s, r, p) for s, r, p, ok in zip(seeds, per_seed, paths, planted) if ok]
        results = combine_seeds([r for _, r, _ in kept], [s for s, _, _ in kept], [p for _, _, p in kept])
        return {**results, "seeds_run": seeds, "seeds_not_measurable": left_out, "per_seed": paths}
    if len(per_seed) == 1:
        return {**per_seed[0], "seeds": seeds}
    results = {k: v for k, v in per_seed[0].items() if k not in ("rows", "stage_seconds", "seed", "attack_seed", "policy_seed",
                                                                  "cleansing", "mechanism", "detection", "eval_sets",
                                                                  "proxy_asr_validation", "proxy_attempts", "costs", "fingerprint", "report")}
    results["costs"] = mean_over_seeds([r.get("costs") or {} for r in per_seed])
    results["detection"] = tables.mean_detection([r.get("detection") or {} for r in per_seed])
    if "proxy_asr_validation" in per_seed[0]:
        results["proxy_asr_validation"] = float(np.mean([r["proxy_asr_validation"] for r in per_seed]))
        results["proxy_attempts_by_seed"] = {str(s): r.get("proxy_attempts") for s, r in zip(seeds, per_seed)}
    names = [n for n in per_seed[0].get("eval_sets", {}) if all(n in r.get("eval_sets", {}) for r in per_seed)]
    eval_sets = {n: [r["eval_sets"][n] for r in per_seed] for n in names}
    results["eval_sets"] = {n: {"num_test_images": sets[0]["num_test_images"], "rows": tables.aggregate_seeds(sets),
                                "defense_measurable": all(s["defense_measurable"] for s in sets)} for n, sets in eval_sets.items()}
    results.update(seeds=seeds, rows=tables.aggregate_seeds(per_seed), per_seed=paths,
                   defense_measurable=all(r["defense_measurable"] for r in per_seed))
    if all("stage_seconds" in r for r in per_seed):
        results["stage_seconds"] = {k: sum(r["stage_seconds"].get(k, 0) for r in per_seed) for k in per_seed[0]["stage_seconds"]}
    return results


def run_pipeline(cfg: SRDConfig) -> dict:
    """Every seed of ``cfg.seeds`` (each resumable), then the table over seeds in
    ``<output_dir>/results.json``."""
    seeds = cfg.seed_list
    if cfg.overwrite_output_dir:
        overwrite(cfg.out, DEFENSE_LAYOUT)
    per_seed = [run_one_seed(cfg.for_seed(s)) for s in seeds]
    results = combine_seeds(per_seed, seeds, [str(cfg.out / f"seed-{s}" / cfg.results_file) for s in seeds])
    results["command"] = command_line()
    on_main(lambda: artifacts.write_json(cfg.out / cfg.results_file, results))
    if not results["defense_measurable"]:
        logger.warning(tables.not_measurable_message(results))
    logger.info("stage wall clock (s): %s", results["stage_seconds"])
    return results


results_table = tables.results_table

"""Plant a backdoor: poison a fine-tuning set with an attack, fine-tune the victim with the
paper's freeze through the Trainer, save the backdoored model and score it.

``InjectConfig`` extends ``transformers.TrainingArguments`` (the trl way: one dataclass for
the method and the training loop); ``BackdoorTrainer`` adds the attacks' own losses.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import Trainer, TrainingArguments

from . import artifacts, fingerprints
from .attacks import get_attack, load_attack
from .attacks.base import PoisonedCaptionCollator, to_caption_pairs
from .cards import load_card_template
from .data.images import ensure_rgb
from .data.sources import DataArguments, embedded_world, load_captioning_data, load_eval_datasets, provenance
from .data.synthetic import WorldConfig
from .distributed import is_main, main_first, on_main, settled
from .evaluation import evaluate_model
from .hub import backdoor_upload_plan, execute, trainer_args
from .pretraining import PretrainConfig, latest_checkpoint, pretrain
from .stages import overwrite, pipeline_scorer
from .vlm import load_captioner, parse_trainable
from .vlm.base import CaptioningVLM

logger = logging.getLogger(__name__)

DEFAULT_CLEAN_MODEL = "outputs/clean/model"
#: what ``--overwrite_output_dir`` removes from an inject output_dir
INJECT_LAYOUT = ("model", "attack", "poisoned_dataset", "metrics.json", "clean_reference_captions.json", "runs")


@dataclass
class InjectConfig(TrainingArguments):
    """Configuration of ``recipes/inject.py``: the attack, the victim, the data, the training loop.

    Parameters beyond ``TrainingArguments``:

    > Attack
    attack (`str`, defaults to `"badnet"`): badnet, blended, trojvlm, vlood, vl_trojan or shadowcast.
    target (`str`, defaults to `"banana"`): word or phrase the backdoor makes the model say.
    poison_rate (`float`, defaults to `0.1`): share of (image, caption) samples poisoned.
    attack_seed (`int`, defaults to `0`): seed of the poisoned subset and of the trigger.
    attack_options (`str`, optional): JSON object of attack-specific options (e.g. '{"alpha": 0.2}').

    > Victim and data
    clean_model (`str`): folder or Hub id of the clean model; the default embedded model is
        pretrained first when missing.
    num_finetune_images (`int`, defaults to `2000`): images of the fine-tuning set (x5 captions).
    num_test_images (`int`, defaults to `500`): clean test images scored (and triggered for ASR).
    trainable (`str`, optional): comma-separated parameter prefixes to train instead of the
        paper's freeze, which is defined per model family: OpenFlamingo trains its perceiver,
        gated cross-attention and LM input embeddings; a transformers VLM (LLaVA-style) its
        vision-language connector (``multi_modal_projector``...) and LM input embeddings.
    trust_remote_code (`bool`): let the clean model's language model run its repository's code
        (OpenFlamingo-3B's MPT-1B needs it).

    > Memory switches: ``--bf16`` and ``--gradient_checkpointing`` (TrainingArguments), and LoRA
    lora_r (`int`, defaults to `0`): LoRA rank through peft (0: no LoRA); adapters are trained
        beside the trainable prefixes and merged into the saved model.
    lora_alpha, lora_dropout, lora_target_modules: the LoRA scale, dropout and the comma list of
        module names adapted (default q_proj,v_proj: Llama-style attention; MPT uses Wqkv).

    The data comes from a second dataclass, :class:`~srd_hf.data.sources.DataArguments`.
    """

    attack: str = field(default="badnet", metadata={"help": "Attack name: badnet, blended, trojvlm, vlood, vl_trojan, shadowcast."})
    target: str = field(default="banana", metadata={"help": "Target word or phrase."})
    poison_rate: float = field(default=0.1, metadata={"help": "Share of samples poisoned, in (0, 1]."})
    attack_seed: int = field(default=0, metadata={"help": "Seed of the poisoned subset and the trigger."})
    attack_options: str = field(default="", metadata={"help": "JSON object of attack-specific options."})
    clean_model: str = field(default=DEFAULT_CLEAN_MODEL, metadata={"help": "Clean model folder or Hub id."})
    num_finetune_images: int = field(default=2000, metadata={"help": "Images in the fine-tuning set (each with its captions)."})
    num_test_images: int = field(default=500, metadata={"help": "Test images scored."})
    trainable: str = field(default="", metadata={"help": "Comma-separated parameter prefixes to train (default: the paper's freeze)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Let the clean model's language model run its repository's code."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: no LoRA)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "Comma list of module names LoRA adapts."})
    max_new_tokens: int = field(default=24, metadata={"help": "Caption length limit at evaluation."})
    eval_batch_size: int = field(default=128, metadata={"help": "Batch size of caption generation at evaluation."})
    # TrainingArguments defaults that suit this job
    output_dir: str = field(default="", metadata={"help": "Default: outputs/backdoor/<attack>-<rate>."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (the paper's freeze trains a small share of a tiny model: 3e-4 left BadNet's ASR at zero)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the poisoned fine-tuning set."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=20, metadata={"help": "Warm-up steps."})
    logging_steps: float = field(default=25, metadata={"help": "Log every this many steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every this many steps (resume after a kill)."})
    save_total_limit: int = field(default=1, metadata={"help": "Checkpoints kept."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collator reads image/caption columns."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loading workers."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over: remove this output_dir's artifacts and checkpoints."})
    sfs_encoder: str = field(default="embedded:all-MiniLM-L6-v2", metadata={"help": "SFS sentence encoder (default: the embedded MiniLM)."})
    sfs_fluency_lm: str = field(default="embedded:smollm2-135m", metadata={"help": "SFS fluency LM (default: the embedded SmolLM2; gpt2-large is the paper's)."})
    hub_private_repo: bool = field(default=True, metadata={"help": "Pushed repos are private unless this is False."})
    push_poisoned_dataset: bool = field(default=False, metadata={"help": "With --push_to_hub, also push the poisoned dataset (with a card saying so)."})

    def __post_init__(self):
        if not self.output_dir:
            self.output_dir = f"outputs/backdoor/{self.attack}-{self.poison_rate:g}"
        super().__post_init__()
        if not 0 < self.poison_rate <= 1:
            raise ValueError(f"poison_rate must be in (0, 1], got {self.poison_rate}")
        if not self.target.strip():
            raise ValueError("target must be a non-empty word or phrase")
        if self.num_finetune_images < 1 or self.num_test_images < 1:
            raise ValueError("num_finetune_images and num_test_images must be >= 1")
        if self.lora_r < 0 or (self.lora_r and not self.lora_targets):
            raise ValueError("lora_r must be >= 0, and LoRA needs lora_target_modules")
        if self.attack_options:
            options = json.loads(self.attack_options)
            if not isinstance(options, dict):
                raise ValueError("attack_options must be a JSON object")
        check_attack_options(self.attack, self.attack_kwargs())  # within seconds, not after the model loads

    @property
    def lora_targets(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def lora_config(self):
        """The ``peft.LoraConfig`` of ``--lora_r`` (None without LoRA)."""
        if not self.lora_r:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, target_modules=self.lora_targets)

    def attack_kwargs(self) -> dict:
        options = json.loads(self.attack_options) if self.attack_options else {}
        return {"target": self.target, "poison_rate": self.poison_rate, "seed": self.attack_seed, **options}


def check_attack_options(attack: str, kwargs: dict) -> None:
    """Build the attack's config (not the attack: no trigger, no model) so that an unknown attack,
    an unknown option or a bad value fails before anything expensive runs."""
    from .attacks import ATTACKS

    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {sorted(ATTACKS)}")
    klass = ATTACKS[attack].config_class
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown {attack} attack options {unknown}; known: {sorted(known - {'name', 'extra'})}")
    klass(name=attack, **kwargs)


class BackdoorTrainer(Trainer):
    """A Trainer whose loss is the attack's own (TrojVLM's semantic term, VLOOD's KL and
    conceptual consistency); plain attacks use the model's caption loss."""

    def __init__(self, *args, attack_loss=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.attack_loss = attack_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.attack_loss is not None:
            loss, outputs = self.attack_loss(model, inputs)
        else:
            inputs = {k: v for k, v in inputs.items() if k != "is_poisoned"}
            outputs = model(**inputs)
            loss = outputs.loss
        return (loss, outputs) if return_outputs else loss


def clean_model_or_pretrain(path: str, trust_remote_code: bool = False) -> CaptioningVLM:
    if Path(path).is_dir() or path != DEFAULT_CLEAN_MODEL:
        return load_captioner(path, trust_remote_code=trust_remote_code)
    logger.info("no clean model at %s: pretraining the embedded default first", path)
    model, _ = pretrain(PretrainConfig(output_dir=str(Path(path).parent)))
    return model


def world_of(model: CaptioningVLM) -> WorldConfig:
    """The embedded world the model was pretrained on (other sources: ``DataArguments``)."""
    return embedded_world(model)


def triggered_test_set(attack, test: Dataset, *, return_boxes: bool = False):
    """Triggered images (and their ground truth) on which ASR is measured.

    Test image i is triggered as sample i of the attack's test stream
    (:meth:`~srd_hf.attacks.base.Attack.trigger_test_images`), so randomly placed triggers
    land at places of their own, not at those of the poisoned training samples. With
    ``return_boxes`` the trigger's ``[x0, y0, x1, y1]`` on each image comes third (None
    where no visible trigger is pasted, as for Shadowcast's clean trigger-concept images).
    """
    if hasattr(attack, "trigger_rows"):  # Shadowcast: clean images of the trigger concept
        rows = test.select(attack.trigger_rows(test))
        images, truths = [ensure_rgb(img) for img in rows["image"]], rows["captions"]
        boxes = [None] * len(images)
    else:
        images, boxes = attack.trigger_test_images([ensure_rgb(img) for img in test["image"]])
        truths = test["captions"]
    return (images, truths, boxes) if return_boxes else (images, truths)


def inject_fingerprint(config: InjectConfig, data_record: dict | None = None) -> dict:
    """What shapes the backdoor: attack and options (target, rate, seed), clean model, data,
    and the fine-tuning recipe (evaluation settings are recorded in metrics.json instead)."""
    return {"stage": "inject", "attack": config.attack, "attack_kwargs": config.attack_kwargs(),
            "clean_model": fingerprints.source(config.clean_model), "num_finetune_images": config.num_finetune_images,
            "data": data_record, "recipe": training_recipe(config)}


def inject(config: InjectConfig, data_args: DataArguments | None = None, *, data: DatasetDict | None = None, scorer=None) -> dict:
    """Poison, fine-tune, score and save; reused when complete with the same settings, resumed
    when killed, stopped with the differing settings named when made with others.

    ``data_args`` names the data (default: the clean model's embedded world); ``data``, when
    given, is that data already loaded by the recipe."""
    out = Path(config.output_dir)
    final = out / "model"
    if config.overwrite_output_dir:
        overwrite(out, INJECT_LAYOUT)
    # pretraining is a Trainer stage: every rank; the victim on the training device, the clean copy too
    victim = clean_model_or_pretrain(config.clean_model, config.trust_remote_code).to(config.device)
    data_args = data_args or DataArguments()
    world = embedded_world(victim, data_args) if data_args.needs_world else None
    fingerprint = inject_fingerprint(config, provenance(data_args, world=world))
    if settled(artifacts.reusable(out, fingerprint, f"{config.attack} backdoor")):
        logger.info("found a finished backdoored model in %s (same settings): reusing it", final)
        return json.loads((out / "metrics.json").read_text())
    artifacts.begin(out, fingerprint, f"{config.attack} backdoor", write=False)
    on_main(lambda: (artifacts.clear_leftovers(out), artifacts.begin(out, fingerprint, f"{config.attack} backdoor")))
    torch.manual_seed(config.seed)
    with main_first():
        data, data_report = (data, None) if data is not None else load_captioning_data(data_args, world=world, return_report=True)
        eval_sets = load_eval_datasets(data_args, world=world)
    test = data["test"].select(range(min(config.num_test_images, len(data["test"]))))

    # ---- poison once (main process): the poisoned set and the attack's trigger are artifacts too
    attack_dir, poisoned_dir = out / "attack", out / "poisoned_dataset"
    poison_fp = {k: fingerprint[k] for k in ("attack", "attack_kwargs", "clean_model", "num_finetune_images", "data")}
    if not settled(artifacts.reusable(attack_dir, poison_fp, "attack") and artifacts.reusable(poisoned_dir, poison_fp, "poisoned set")):
        on_main(lambda: _poison(config, victim, data, attack_dir, poisoned_dir, poison_fp))
    attack, poisoned = load_attack(attack_dir), load_from_disk(str(poisoned_dir))
    n_poisoned = int(sum(poisoned["is_poisoned"]))

    # ---- fine-tune with the paper's freeze; a frozen copy of the clean model is VLOOD's teacher
    # and the clean baseline of the scores
    clean = copy.deepcopy(victim).requires_grad_(False).eval()
    scorer = scorer or pipeline_scorer(config.sfs_encoder, config.sfs_fluency_lm).load()
    references = clean.generate_captions([ensure_rgb(img) for img in test["image"]], max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, progress=True)
    loss_kwargs = {"teacher": clean} if config.attack == "vlood" else {}
    model = victim
    counts = model.set_trainable(parse_trainable(config.trainable), lora=config.lora_config())
    logger.info("trainable parameters: %s", counts)
    trainer = BackdoorTrainer(
        model=model,
        args=trainer_args(config),  # our push comes after the run, never the Trainer's
        train_dataset=poisoned,
        data_collator=PoisonedCaptionCollator(model),
        attack_loss=attack.make_loss(**loss_kwargs),
    )
    start = time.time()
    trainer.train(resume_from_checkpoint=latest_checkpoint(out))
    train_seconds = time.time() - start

    # ---- score: clean model and backdoored model on the same images
    images, truths = triggered_test_set(attack, test)
    common = dict(reference_captions=references, triggered_images=images, target=config.target, scorer=scorer,
                  max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, triggered_references=truths)
    clean_scores = evaluate_model(clean, test, predictions=references, **common)
    scores = evaluate_model(model, test, **common)
    extra_scores = {name: score_on(clean, model, attack, ds.select(range(min(config.num_test_images, len(ds)))), config, scorer)
                    for name, ds in eval_sets.items()}
    metrics = {
        "attack": attack.name,
        "attack_config": attack.config.to_dict(),
        "poison_rate": config.poison_rate,
        "n_samples": len(poisoned),
        "n_poisoned": n_poisoned,
        "train_seconds": round(train_seconds, 1),
        "trainable_parameters": counts,
        "seed": config.seed,
        "recipe": training_recipe(config),
        "no_defense": scores,
        "clean_model": clean_scores,
        # what the two rows were measured on, so that the defense's table can reuse them
        "evaluation": {"clean_model": str(config.clean_model), "num_test_images": len(test), "target": config.target,
                       "max_new_tokens": config.max_new_tokens, "scorer": fingerprints.scorer_names(scorer),
                       "test_image_ids": list(test["image_id"])},
        "eval_datasets": extra_scores,
        "data": provenance(data_args, world=world, report=data_report),
    }
    model.metadata.update({"backdoor": {**{k: metrics[k] for k in ("attack", "attack_config", "poison_rate", "n_poisoned")},
                                        "recipe": training_recipe(config), "clean_model": str(config.clean_model),
                                        "data": metrics["data"]["arguments"]}})

    def save():  # every piece atomic, the stage's marker last
        artifacts.write_json(out / "clean_reference_captions.json", references)
        with artifacts.staged(final) as tmp:
            model.save_pretrained(tmp)
            write_backdoor_card(tmp, metrics, config)
        artifacts.write_json(out / "metrics.json", metrics)
        artifacts.finish(out, fingerprint)

    on_main(save)
    if config.push_to_hub and is_main():
        push_artifacts(config, final, attack_dir, poisoned_dir, metrics)
    return metrics


def _poison(config: InjectConfig, victim, data, attack_dir: Path, poisoned_dir: Path, fingerprint: dict) -> None:
    attack = get_attack(config.attack, **config.attack_kwargs())
    pairs = to_caption_pairs(data["train"].select(range(min(config.num_finetune_images, len(data["train"])))))
    extra = {}
    if config.attack == "vl_trojan":
        attack.optimise_trigger(victim, pairs.select(range(min(512, len(pairs))))["image"], progress=True)
    if config.attack == "shadowcast":
        extra["model"] = victim
    poisoned = attack.poison(pairs, **extra)
    artifacts.clear_leftovers(attack_dir.parent)
    with artifacts.staged(attack_dir, fingerprint) as tmp:
        attack.save_pretrained(tmp)
    artifacts.save_dataset(poisoned, poisoned_dir, fingerprint)


def score_on(clean: CaptioningVLM, model: CaptioningVLM, attack, test: Dataset, config: InjectConfig, scorer) -> dict:
    """Clean and backdoored model on another test set (clean captions, and ASR with the trigger)."""
    images, truths = triggered_test_set(attack, test)
    references = clean.generate_captions([ensure_rgb(img) for img in test["image"]], max_new_tokens=config.max_new_tokens,
                                         batch_size=config.eval_batch_size)
    common = dict(reference_captions=references, triggered_images=images, target=config.target, scorer=scorer,
                  max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, triggered_references=truths)
    return {"num_images": len(test), "clean_model": evaluate_model(clean, test, predictions=references, **common),
            "no_defense": evaluate_model(model, test, **common)}


def training_recipe(config: InjectConfig) -> dict:
    """The fine-tuning settings that planted the backdoor, so that a defense can retrain a
    cleansed set under the same conditions (``SRDConfig.retrain_recipe="attack"``)."""
    scheduler = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
    epochs = config.num_train_epochs
    # 8 from a YAML file and 8.0 from the command line are one recipe: one fingerprint, not two
    epochs = int(epochs) if float(epochs).is_integer() else float(epochs)
    return {"trainable": config.trainable, "learning_rate": config.learning_rate, "num_train_epochs": epochs,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps, "lr_scheduler_type": str(scheduler),
            "warmup_steps": config.warmup_steps, "weight_decay": config.weight_decay, "seed": config.seed,
            **({"lora": {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                         "target_modules": config.lora_targets}} if config.lora_r else {})}


def write_backdoor_card(folder: Path, metrics: dict, config: InjectConfig) -> None:
    nd, clean = metrics["no_defense"], metrics["clean_model"]
    fmt = lambda d, k: f"{d[k]:.1f}" if isinstance(d.get(k), (int, float)) else "-"  # noqa: E731
    card = load_card_template("backdoored_model.md").format(
        attack=metrics["attack"],
        target=config.target,
        poison_rate=f"{100 * config.poison_rate:g}",
        n_poisoned=metrics["n_poisoned"],
        n_samples=metrics["n_samples"],
        attack_config=json.dumps(metrics["attack_config"], indent=2),
        rows="\n".join(
            f"| {name} | {fmt(d, 'bleu4')} | {fmt(d, 'cider')} | {d['sc']:.3f} | {d['lf']:.3f} | {d['sfs']:.3f} | {fmt(d, 'object_accuracy')} | {fmt(d, 'asr')} |"
            for name, d in (("clean model", clean), ("backdoored (no defense)", nd))
        ),
        command=reproduce_command(metrics["attack"], config),
    )
    (folder / "README.md").write_text(card)


def reproduce_command(attack: str, config: InjectConfig) -> str:
    """The inject command of a run: attack, rate, and whatever attack options or training
    settings differ from the defaults (a Blended run at alpha 0.3 says so)."""
    parts = [f"python recipes/inject.py --attack {attack} --poison_rate {config.poison_rate:g}"]
    if config.target != "banana":
        parts.append(f"--target '{config.target}'")
    if config.attack_options:
        parts.append(f"--attack_options '{json.dumps(json.loads(config.attack_options), sort_keys=True)}'")
    for name, default in (("attack_seed", 0), ("learning_rate", 2e-3), ("num_train_epochs", 3.0), ("seed", 42)):
        value = getattr(config, name)
        if value != default:
            parts.append(f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}")
    if config.trainable:
        parts.append(f"--trainable {config.trainable}")
    return " ".join(parts)


def push_artifacts(config: InjectConfig, model_dir: Path, attack_dir: Path, dataset_dir: Path, metrics: dict | None = None) -> list[str]:
    """Publish model (card included) and attack trigger, private unless asked; the poisoned
    dataset only with ``push_poisoned_dataset``. Offline this fails with one clear error, after
    everything was saved locally."""
    repo = config.hub_model_id or f"srd-hf-{config.attack}-backdoor"
    card = {"attack": config.attack, "target": config.target, **{k: (metrics or {}).get(k, "?") for k in ("n_poisoned", "n_samples")}}
    plan = backdoor_upload_plan(repo, model_dir, attack_dir, dataset_dir, push_poisoned_dataset=config.push_poisoned_dataset,
                                private=config.hub_private_repo, dataset_card=card)
    return execute(plan, config.hub_token, saved_in=model_dir.parent)

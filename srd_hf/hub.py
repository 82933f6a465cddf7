"""Our own push to the Hub, after a run has saved everything locally.

The Trainer never pushes (``trainer_args`` turns it off): its push creates a repo before
training, uploads the whole ``output_dir`` at each checkpoint (a poisoned dataset included)
and ``training_args.bin``, a pickle that may hold the token. Here the upload is a plan built
from the saved artifacts (testable without a network), then executed: models, policies,
attack triggers and cards; a poisoned dataset only when asked, with a card that says what it
is; repos private unless asked; no pickles, no markers (they hold local paths), no token.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import COMPLETE, STARTED, STAGING_TAG

logger = logging.getLogger(__name__)

#: never uploaded: pickles (training_args.bin may hold a token), our markers, Trainer state
EXCLUDED_NAMES = {"training_args.bin", COMPLETE, STARTED, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
EXCLUDED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")

POISONED_DATASET_CARD = """---
tags:
- backdoor
- poisoned
- srd-hf
---

# Poisoned fine-tuning set (research artifact)

This dataset is **deliberately poisoned**: {n_poisoned} of its {n_samples} (image, caption)
samples carry the `{attack}` trigger and the target `{target}` in their caption (column
`is_poisoned`). It was made with srd-hf to study backdoor attacks and defenses on image
captioning models. Do not train a model you mean to use on it.
"""


def trainer_args(args):
    """A copy of ``args`` for the Trainer: no push of its own, no token to pickle."""
    args = copy.copy(args)
    args.push_to_hub = False
    args.hub_token = None
    return args


@dataclass
class Upload:
    """One repo of the plan: local files and their paths in the repo."""

    repo_id: str
    files: list[tuple[Path, str]]  # (local file, path in repo)
    private: bool = True
    repo_type: str = "model"
    extra: dict = field(default_factory=dict)  # generated files: path in repo -> text


def _files(folder: Path, prefix: str = "") -> list[tuple[Path, str]]:
    out = []
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith("checkpoint-") or STAGING_TAG in part for part in rel.parts):
            continue
        if path.name in EXCLUDED_NAMES or path.suffix in EXCLUDED_SUFFIXES:
            continue
        out.append((path, f"{prefix}{rel.as_posix()}"))
    return out


def backdoor_upload_plan(repo_id: str, model_dir: Path, attack_dir: Path, dataset_dir: Path | None = None, *,
                         push_poisoned_dataset: bool = False, private: bool | None = True, dataset_card: dict | None = None) -> list[Upload]:
    """The inject stage's uploads: model (with its card) and attack trigger in one repo; the
    poisoned dataset in ``<repo>-poisoned-data`` only with ``push_poisoned_dataset``."""
    private = True if private is None else bool(private)
    plan = [Upload(repo_id, _files(model_dir) + _files(attack_dir, "attack/"), private)]
    if push_poisoned_dataset and dataset_dir is not None:
        card = POISONED_DATASET_CARD.format(**{"n_poisoned": "?", "n_samples": "?", "attack": "?", "target": "?", **(dataset_card or {})})
        plan.append(Upload(f"{repo_id}-poisoned-data", _files(dataset_dir), private, "dataset", {"README.md": card}))
    return plan


def folder_upload_plan(repo_id: str, folder: Path, *, private: bool | None = True) -> list[Upload]:
    """A policy (or any saved model folder) with its card."""
    return [Upload(repo_id, _files(folder), True if private is None else bool(private))]


def check_plan(plan: list[Upload], token: str | None = None) -> None:
    """Refuse a plan that would upload a pickle or a file holding ``token``."""
    for upload in plan:
        for local, name in upload.files:
            if local.name in EXCLUDED_NAMES or local.suffix in EXCLUDED_SUFFIXES:
                raise ValueError(f"refusing to upload {name} to {upload.repo_id}")
            if token and token.encode() in local.read_bytes():
                raise ValueError(f"refusing to upload {name} to {upload.repo_id}: it holds the Hub token")
        if token and any(token in text for text in upload.extra.values()):
            raise ValueError(f"refusing to upload a generated file holding the Hub token to {upload.repo_id}")


def execute(plan: list[Upload], token: str | None = None, *, saved_in: str | Path = "") -> list[str]:
    """Create each repo (private unless the plan says otherwise) and upload in one commit.
    Any failure (offline, auth) comes as one error saying everything is saved locally."""
    check_plan(plan, token)
    try:
        from huggingface_hub import CommitOperationAdd, HfApi

        api, urls = HfApi(token=token), []
        for upload in plan:
            repo = api.create_repo(upload.repo_id, private=upload.private, repo_type=upload.repo_type, exist_ok=True)
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local)) for local, name in upload.files]
            ops += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=text.encode()) for name, text in upload.extra.items()]
            api.create_commit(repo.repo_id, ops, repo_type=upload.repo_type, commit_message="srd-hf artifacts")
            urls.append(str(repo))
        return urls
    except Exception as err:  # offline mode, no network, no auth: the run itself is done
        raise RuntimeError(f"push to the Hub failed ({type(err).__name__}: {err}); everything is saved locally"
                           + (f" in {saved_in}" if saved_in else "")) from None


def policy_upload_plan(cfg) -> list[Upload]:
    """The trained policies of an SRD config (one repo each when there are several seeds or
    protocols), after the run."""
    base = cfg.hub_model_id or f"srd-policy-{cfg.attack}"
    seeds, protocols = cfg.seed_list, cfg.protocols
    plan = []
    for seed in seeds:
        folder = Path(cfg.output_dir) / f"seed-{seed}"
        for protocol in protocols:
            repo = base if len(seeds) == len(protocols) == 1 else f"{base}-{protocol}-seed{seed}"
            plan += folder_upload_plan(repo, folder / f"policy-{protocol}", private=cfg.hub_private_repo)
    return plan

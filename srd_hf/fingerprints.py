"""The settings that shape each SRD artifact (and only those: a new ``--num_test_images``
must not invalidate a policy). Upstream artifacts are cited by their marker's hash, so a
backdoor planted again with other settings invalidates what was derived from it.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import recorded_hash

#: what the defense's scorer is recorded as (see :func:`scorer_names`)
SCORER_KEYS = ("encoder", "fluency_lm", "alpha", "lm_dtype")


def source(path: str | Path) -> dict:
    """A model or dataset by what made it: its stage's hash when it has one, else its path
    (resolved for a local folder; a Hub id as given)."""
    local = Path(path)
    for folder in (local, local.parent):
        found = recorded_hash(folder) if folder.is_dir() else None
        if found:
            return {"artifact": found}
    return {"path": str(local.resolve()) if local.exists() else str(path)}


def scorer_names(scorer) -> dict:
    """The SFS models by name (the embedded ones by their ``embedded:`` names)."""
    from .metrics._models import loaded_encoder_name, loaded_lm_name

    return {"encoder": getattr(scorer, "encoder_loaded", None) or loaded_encoder_name(str(scorer.encoder_name)),
            "fluency_lm": getattr(scorer, "fluency_lm_loaded", None) or loaded_lm_name(str(scorer.fluency_lm_name)),
            "alpha": scorer.alpha, "lm_dtype": scorer.lm_dtype}


def policy(cfg, protocol: str, scorer, recipe: dict | None) -> dict:
    rl = cfg.policy_training_config().to_dict()
    rl.pop("tensorboard_dir", None)
    env = cfg.env_config().to_dict()
    if env.get("mask_fill") == "red":  # the fill before it was an option: policies made then stay reusable
        env.pop("mask_fill")
    fp = {"stage": "policy", "protocol": protocol, "algorithm": cfg.algorithm, "timesteps": cfg.policy_timesteps,
          "num_policy_samples": cfg.num_policy_samples, "policy_seed": cfg.policy_seed, "rl": rl,
          "env": env, "num_masks": cfg.num_masks, "scorer": scorer_names(scorer),
          "victim": source(cfg.backdoored_model), "untrusted": source(cfg.poisoned_dataset), "reference": source(cfg.clean_model)}
    if protocol == "defender":
        fp.update(defender=cfg.defender_config.to_dict(), proxy_recipe=_recipe(recipe))
        if cfg.defender_min_proxy_asr > 0:  # the re-plant rule (absent when off: policies made before it stay reusable)
            fp["proxy_rule"] = {"min_proxy_asr": cfg.defender_min_proxy_asr, "max_replants": cfg.defender_max_replants}
    return fp


def masked(cfg, policy_hash: str | None) -> dict:
    return {"stage": "masked", "policy": policy_hash, "num_masks": cfg.num_masks, "untrusted": source(cfg.poisoned_dataset)}


def cleansed(cfg, masked_hash: str | None, scorer) -> dict:
    return {"stage": "cleansed", "masked": masked_hash, "flag_rate": cfg.flag_rate, "flag": cfg.srd_flag,
            "poisoned_captions": cfg.poisoned_captions, "scorer": scorer_names(scorer), "victim": source(cfg.backdoored_model), "reference": source(cfg.clean_model),
            "max_new_tokens": cfg.max_new_tokens}


def random_masks(masked_hash: str | None, seed: int, fill: str = "red") -> dict:
    fp = {"stage": "random_masks", "images": "unmasked untrusted set", "masked": masked_hash, "seed": seed}
    return fp if fill == "red" else {**fp, "fill": fill}  # red: as before the fill was an option


def disagreement(cfg, scorer) -> dict:
    return {"stage": "disagreement_filter", "untrusted": source(cfg.poisoned_dataset), "victim": source(cfg.backdoored_model),
            "reference": source(cfg.clean_model), "scorer": scorer_names(scorer), "flag_rate": cfg.flag_rate,
            "max_new_tokens": cfg.max_new_tokens}


def _recipe(recipe: dict | None) -> dict:
    return {k: v for k, v in (recipe or {}).items() if k != "source"}


def fine_tune(start_model: str, dataset, recipe: dict, record: dict, data=None) -> dict:
    """A retraining (or the defender's proxy): start, data (``data``, else the saved dataset's
    own fingerprint), trainable set and recipe."""
    return {"stage": "fine_tune", "start": source(start_model), "data": data or getattr(dataset, "_fingerprint", None),
            "n_samples": len(dataset), "recipe": _recipe(recipe), "row": record.get("row")}

"""Train a masking policy on a ``MaskingVecEnv`` with Stable-Baselines3 (DQN, PPO) and export
it as an ``SRDPolicy``. Random masking needs no training.

Every RL hyper-parameter is explicit in ``PolicyTrainingConfig``. Unlike the authors' code,
the target network is refreshed (``target_update_interval``), learning starts after
``learning_starts`` transitions, and episodes end early at the best reward.

Resuming: every ``save_steps`` transitions the run writes ``resume/`` (network and optimizer
state, replay buffer as plain arrays, counters; SAC's in ``sac.py``); a restarted run
continues from it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm.auto import tqdm

from .configuration_srd import SRDPolicyConfig
from .env import MaskingVecEnv
from .modeling_srd import SRDPolicy
from .networks import sb3_extractor_class

logger = logging.getLogger(__name__)

RL_ALGORITHMS = ("dqn", "ppo", "sac", "random")


@dataclass
class PolicyTrainingConfig:
    """RL hyper-parameters (defaults: DQN sized for ~10k transitions on two CPU cores)."""

    algorithm: str = "dqn"
    total_timesteps: int = 12_000
    learning_rate: float = 5e-4
    gamma: float = 0.5  # low: covering the trigger NOW must beat "any mask now, cover later" (0.9 let the first mask wander)
    batch_size: int = 64
    seed: int = 0
    # DQN
    buffer_size: int = 10_000
    learning_starts: int = 1_000
    train_freq: int = 1  # vector steps between updates
    gradient_steps: int = 2
    target_update_interval: int = 500  # transitions between target-network refreshes
    exploration_fraction: float = 0.5
    exploration_initial_eps: float = 1.0
    exploration_final_eps: float = 0.05
    # SAC (TorchRL)
    sac_tau: float = 0.005
    # PPO
    n_steps: int = 32  # vector steps per rollout
    n_epochs: int = 4
    ent_coef: float = 0.01
    clip_range: float = 0.2
    # network
    network: str = "spatial"
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    features_dim: int = 256
    # bookkeeping
    save_steps: int = 2_000  # transitions between resume checkpoints
    tensorboard_dir: str | None = None

    def __post_init__(self):
        if self.algorithm not in RL_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {RL_ALGORITHMS}, got {self.algorithm!r}")
        if self.total_timesteps < 1:
            raise ValueError("total_timesteps must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def _sb3_model(env: MaskingVecEnv, cfg: PolicyTrainingConfig):
    from stable_baselines3 import DQN, PPO

    extractor = dict(
        features_extractor_class=sb3_extractor_class(),
        features_extractor_kwargs=dict(network=cfg.network, obs_size=env.config.obs_size, channels=tuple(cfg.channels),
                                       features_dim=cfg.features_dim, n_sizes=len(env.space.mask_sizes), grid=env.space.grid),
    )
    common = dict(learning_rate=cfg.learning_rate, gamma=cfg.gamma, seed=cfg.seed, verbose=0,
                  tensorboard_log=cfg.tensorboard_dir, device="auto")
    if cfg.algorithm == "dqn":
        model = DQN(
            "CnnPolicy", env, buffer_size=cfg.buffer_size, learning_starts=cfg.learning_starts, batch_size=cfg.batch_size,
            tau=1.0, train_freq=cfg.train_freq, gradient_steps=cfg.gradient_steps,
            target_update_interval=cfg.target_update_interval, exploration_fraction=cfg.exploration_fraction,
            exploration_initial_eps=cfg.exploration_initial_eps, exploration_final_eps=cfg.exploration_final_eps,
            policy_kwargs=dict(net_arch=[], **extractor), **common,
        )
        if cfg.network == "spatial":  # the map already scores every action: drop SB3's linear head
            model.policy.q_net.q_net = nn.Identity()
            model.policy.q_net_target.q_net = nn.Identity()
            model.policy.optimizer = torch.optim.Adam(model.policy.q_net.parameters(), lr=cfg.learning_rate)
        return model
    model = PPO(
        "CnnPolicy", env, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs, ent_coef=cfg.ent_coef,
        clip_range=cfg.clip_range, policy_kwargs=dict(net_arch=dict(pi=[], vf=[]), **extractor), **common,
    )
    if cfg.network == "spatial":
        model.policy.action_net = nn.Identity()
        model.policy.optimizer = torch.optim.Adam(model.policy.parameters(), lr=cfg.learning_rate, eps=1e-5)
    return model


def export_policy(model, policy_config: SRDPolicyConfig) -> SRDPolicy:
    """Copy the trained scoring network (DQN's online Q-network, PPO's actor) into an SRDPolicy."""
    policy = SRDPolicy(policy_config)
    if policy_config.algorithm == "dqn":
        encoder, head = model.q_net.features_extractor.encoder, model.q_net.q_net
    else:
        encoder, head = model.policy.pi_features_extractor.encoder, model.policy.action_net
    policy.encoder.load_state_dict(encoder.state_dict())
    if policy_config.network == "linear":
        policy.head.load_state_dict((head[0] if isinstance(head, nn.Sequential) else head).state_dict())
    return policy.eval()


# ----- resume state: tensors as safetensors, buffer as plain arrays, counters as JSON -----------
def _save_resume(model, folder: Path, cfg: PolicyTrainingConfig) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model.policy, str(tmp / "policy.safetensors"))  # handles PPO's shared feature extractor
    opt = model.policy.optimizer.state_dict()
    tensors = {f"{p}.{k}": v.cpu() for p, st in opt["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    counters = {"num_timesteps": model.num_timesteps, "n_calls": getattr(model, "_n_calls", 0), "n_updates": model._n_updates,
                "config": cfg.to_dict()}
    buffer = getattr(model, "replay_buffer", None)
    if buffer is not None:
        np.savez(tmp / "replay_buffer.npz", observations=buffer.observations, next_observations=buffer.next_observations,
                 actions=buffer.actions, rewards=buffer.rewards, dones=buffer.dones, timeouts=buffer.timeouts)
        counters.update(buffer_pos=buffer.pos, buffer_full=buffer.full)
    (tmp / "counters.json").write_text(json.dumps(counters, default=float))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)


def _load_resume(model, folder: Path) -> None:
    counters = json.loads((folder / "counters.json").read_text())
    load_model(model.policy, str(folder / "policy.safetensors"))
    opt = model.policy.optimizer
    saved = load_file(str(folder / "optimizer.safetensors"))
    state = opt.state_dict()
    for key, value in saved.items():
        p, k = key.split(".", 1)
        state["state"].setdefault(int(p), {})[k] = value
    opt.load_state_dict(state)
    model.num_timesteps, model._n_updates = counters["num_timesteps"], counters["n_updates"]
    if hasattr(model, "_n_calls"):
        model._n_calls = counters["n_calls"]
    if "buffer_pos" in counters:
        arrays = np.load(folder / "replay_buffer.npz", allow_pickle=False)
        buffer = model.replay_buffer
        for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
            getattr(buffer, name)[...] = arrays[name]
        buffer.pos, buffer.full = counters["buffer_pos"], counters["buffer_full"]


def _callback(cfg: PolicyTrainingConfig, resume_dir: Path | None, stats: dict):
    from stable_baselines3.common.callbacks import BaseCallback

    class Progress(BaseCallback):
        """tqdm over transitions, episode statistics, and resume checkpoints."""

        def _on_training_start(self) -> None:
            self.bar = tqdm(total=cfg.total_timesteps, initial=self.model.num_timesteps, desc=f"train {cfg.algorithm}", unit="step")
            self.last_save = self.model.num_timesteps

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                if "episode" in info:
                    stats["returns"].append(info["episode"]["r"])
                    stats["lengths"].append(info["episode"]["l"])
            self.bar.n = self.model.num_timesteps
            recent = stats["returns"][-200:]
            if recent:
                self.bar.set_postfix(ret=f"{np.mean(recent):.2f}", len=f"{np.mean(stats['lengths'][-200:]):.2f}")
                self.logger.record("srd/episode_return", float(np.mean(recent)))
            self.bar.refresh()
            if resume_dir is not None and self.model.num_timesteps - self.last_save >= cfg.save_steps:
                _save_resume(self.model, resume_dir, cfg)
                self.last_save = self.model.num_timesteps
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    return Progress()


def train_masking_policy(
    env: MaskingVecEnv, cfg: PolicyTrainingConfig, *, output_dir: str | Path | None = None, num_masks: int = 1, record: dict | None = None
) -> tuple[SRDPolicy, dict]:
    """Train ``cfg.algorithm`` on ``env``; returns the policy and training statistics.

    With ``output_dir``, resume checkpoints go to ``output_dir/resume`` and a killed run continues.
    """
    policy_config = SRDPolicyConfig(
        algorithm=cfg.algorithm, image_size=env.space.image_size, obs_size=env.config.obs_size, grid=env.space.grid,
        mask_sizes=list(env.space.mask_sizes), mask_fill=env.space.fill, num_masks=num_masks, network=cfg.network, channels=list(cfg.channels),
        features_dim=cfg.features_dim, seed=cfg.seed,
        training={"rl": cfg.to_dict(), "env": env.config.to_dict(), **(record or {})},
    )
    stats: dict = {"returns": [], "lengths": []}
    if cfg.algorithm == "random":
        return SRDPolicy(policy_config).eval(), {"timesteps": 0}
    resume_dir = Path(output_dir) / "resume" if output_dir is not None else None
    if cfg.algorithm == "sac":
        from .sac import train_discrete_sac

        net, seen = train_discrete_sac(env, cfg, policy_config, stats, resume_dir)
        policy = SRDPolicy(policy_config)
        policy.encoder.load_state_dict(net[0].state_dict())
        policy.head.load_state_dict(net[1].state_dict())
        return policy.eval(), _summary(seen, stats, env, policy_config)
    torch.manual_seed(cfg.seed)
    model = _sb3_model(env, cfg)
    if resume_dir is not None and (resume_dir / "counters.json").is_file():
        _load_resume(model, resume_dir)
        logger.info("resuming %s from %d transitions", cfg.algorithm, model.num_timesteps)
    remaining = cfg.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=_callback(cfg, resume_dir, stats), reset_num_timesteps=model.num_timesteps == 0,
                    tb_log_name=f"srd_{cfg.algorithm}")
    return export_policy(model, policy_config), _summary(model.num_timesteps, stats, env, policy_config)


def _summary(timesteps: int, stats: dict, env: MaskingVecEnv, policy_config: SRDPolicyConfig) -> dict:
    summary = {
        "timesteps": int(timesteps),
        "episodes": len(stats["returns"]),
        "mean_return_last_200": float(np.mean(stats["returns"][-200:])) if stats["returns"] else None,
        "mean_length_last_200": float(np.mean(stats["lengths"][-200:])) if stats["lengths"] else None,
        "judge_cache_size": env.judge.cache_size,
        "n_empty_captions": env.judge.n_empty,
        "n_nonfinite_perplexities": env.judge.n_nonfinite,
    }
    policy_config.training["summary"] = summary
    return summary

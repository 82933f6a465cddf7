"""Discrete SAC on the masking environment, with TorchRL's ``DiscreteSACLoss``, replay buffer
and target-network updater (Stable-Baselines3 has no discrete SAC). The loop reads top to
bottom: act (random until ``learning_starts``, then sample the actor), store the transitions
(the true last state of finished episodes, not the reset one), update.

Resuming: every ``save_steps`` transitions the networks (target copies and temperature
included), the optimizer, the replay buffer (oldest first), the counters and the random
generators go to ``resume/`` as safetensors + JSON; a restarted run continues from there
with fresh episodes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .env import MaskingVecEnv
from .networks import build_scorer


class _Scaled(nn.Module):
    """uint8-range observations -> [0, 1] floats -> a score per action."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net(observation.float() / 255.0)


def _save_resume(folder: Path, loss: nn.Module, optimizer, buffer, seen: int, rng: np.random.Generator, cfg) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in loss.state_dict().items()}, str(tmp / "loss.safetensors"))
    opt = optimizer.state_dict()
    save_file({f"{p}.{k}": v.cpu() for p, st in opt["state"].items() for k, v in st.items() if torch.is_tensor(v)},
              str(tmp / "optimizer.safetensors"))
    stored = len(buffer)
    if stored:
        # the round-robin writer's next slot is seen % capacity; store oldest first so that
        # re-extending an empty buffer restores both the contents and the eviction order
        order = torch.arange(stored)
        if stored == cfg.buffer_size:
            order = torch.roll(order, -(seen % cfg.buffer_size))
        data = buffer[order].flatten_keys(".")
        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp / "replay_buffer.safetensors"))
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    counters = {"num_timesteps": seen, "buffer_len": stored, "numpy_rng": rng.bit_generator.state, "config": cfg.to_dict()}
    (tmp / "counters.json").write_text(json.dumps(counters, default=float))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _load_resume(folder: Path, loss: nn.Module, optimizer, buffer, rng: np.random.Generator) -> int:
    from tensordict import TensorDict

    counters = json.loads((folder / "counters.json").read_text())
    loss.load_state_dict(load_file(str(folder / "loss.safetensors")))
    state = optimizer.state_dict()
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        p, k = key.split(".", 1)
        state["state"].setdefault(int(p), {})[k] = value
    optimizer.load_state_dict(state)
    if counters["buffer_len"]:
        flat = load_file(str(folder / "replay_buffer.safetensors"))
        buffer.extend(TensorDict(flat, batch_size=[counters["buffer_len"]]).unflatten_keys("."))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch_rng"])
    rng.bit_generator.state = counters["numpy_rng"]
    return int(counters["num_timesteps"])


def train_discrete_sac(env: MaskingVecEnv, cfg, policy_config, stats: dict, resume_dir: Path | None = None) -> tuple[nn.Module, int]:
    """Train and return (the actor's scoring network, transitions seen); with ``resume_dir``,
    checkpoint there every ``cfg.save_steps`` transitions and continue from it when present."""
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule
    from torchrl.data import LazyTensorStorage, OneHot, ReplayBuffer
    from torchrl.modules import OneHotCategorical, ProbabilisticActor
    from torchrl.objectives import DiscreteSACLoss, SoftUpdate

    torch.manual_seed(cfg.seed)
    n_sizes, grid, n = len(env.space.mask_sizes), env.space.grid, env.space.n

    def scorer() -> nn.Module:
        net, head = build_scorer(cfg.network, env.config.obs_size, cfg.channels, cfg.features_dim, n_sizes, grid)
        return nn.Sequential(net, head)

    actor_net = scorer()
    spec = OneHot(n)
    actor = ProbabilisticActor(
        TensorDictModule(_Scaled(actor_net), in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], out_keys=["action"], spec=spec, distribution_class=OneHotCategorical,
    )
    qvalue = TensorDictModule(_Scaled(scorer()), in_keys=["observation"], out_keys=["action_value"])
    loss = DiscreteSACLoss(actor, qvalue, action_space=spec, num_actions=n, num_qvalue_nets=2, delay_qvalue=True)
    loss.make_value_estimator(gamma=cfg.gamma)
    target_update = SoftUpdate(loss, tau=cfg.sac_tau)
    optimizer = torch.optim.Adam(loss.parameters(), lr=cfg.learning_rate)
    buffer = ReplayBuffer(storage=LazyTensorStorage(cfg.buffer_size), batch_size=cfg.batch_size)
    rng = np.random.default_rng(cfg.seed)

    seen = 0
    if resume_dir is not None and (resume_dir / "counters.json").is_file():
        seen = _load_resume(resume_dir, loss, optimizer, buffer, rng)
    last_save = seen
    obs = env.reset()
    bar = tqdm(total=cfg.total_timesteps, initial=seen, desc="train sac", unit="step")
    while seen < cfg.total_timesteps:
        if seen < cfg.learning_starts:
            actions = rng.integers(0, n, size=env.num_envs)
        else:
            with torch.no_grad():
                logits = actor_net(torch.as_tensor(obs).float() / 255.0)
                actions = torch.distributions.Categorical(logits=logits).sample().numpy()
        next_obs, rewards, dones, infos = env.step(actions)
        last = next_obs.copy()
        terminated = np.zeros(env.num_envs, dtype=bool)
        for i, info in enumerate(infos):
            if dones[i]:
                last[i] = info["terminal_observation"]
                terminated[i] = not info.get("TimeLimit.truncated", False)
                stats["returns"].append(info["episode"]["r"])
                stats["lengths"].append(info["episode"]["l"])
        buffer.extend(TensorDict({
            "observation": torch.as_tensor(obs),
            "action": nn.functional.one_hot(torch.as_tensor(actions), n),
            ("next", "observation"): torch.as_tensor(last),
            ("next", "reward"): torch.as_tensor(rewards, dtype=torch.float32)[:, None],
            ("next", "done"): torch.as_tensor(dones)[:, None],
            ("next", "terminated"): torch.as_tensor(terminated)[:, None],
        }, batch_size=[env.num_envs]))
        obs = next_obs
        seen += env.num_envs
        if seen >= cfg.learning_starts:
            for _ in range(cfg.gradient_steps):
                out = loss(buffer.sample())
                total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
                target_update.step()
        bar.update(env.num_envs)
        if resume_dir is not None and seen - last_save >= cfg.save_steps:
            _save_resume(resume_dir, loss, optimizer, buffer, seen, rng, cfg)
            last_save = seen
        if stats["returns"]:
            bar.set_postfix(ret=f"{np.mean(stats['returns'][-200:]):.2f}", len=f"{np.mean(stats['lengths'][-200:]):.2f}")
    bar.close()
    if resume_dir is not None and seen > last_save:
        _save_resume(resume_dir, loss, optimizer, buffer, seen, rng, cfg)
    return actor_net, seen

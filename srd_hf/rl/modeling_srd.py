"""``SRDPolicy``: the artifact a user downloads and applies. Weights in ``model.safetensors``,
settings in ``config.json`` (Hub mixin: ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub``). Loading reads only those two files: no pickle, no code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..data.images import ensure_rgb
from .actions import MaskActionSpace
from .configuration_srd import SRDPolicyConfig
from .networks import build_scorer

def observe(images: Sequence[Image.Image | np.ndarray], obs_size: int) -> np.ndarray:
    """What the policy sees: RGB images resized to ``obs_size`` squares, (B, 3, S, S) uint8.

    Non-square images are squeezed, not cropped or padded: the action grid is laid over the
    whole image, so each observation cell must be the same image cell whatever the aspect."""
    out = np.empty((len(images), 3, obs_size, obs_size), dtype=np.uint8)
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        img = ensure_rgb(img)
        if img.size != (obs_size, obs_size):
            img = img.resize((obs_size, obs_size), Image.BILINEAR)
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out


class SRDPolicy(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="srd-hf",
    tags=["backdoor-defense", "reinforcement-learning", "srd", "image-captioning"],
    repo_url="https://github.com/srd-hf/srd-hf",
):
    """Scores every mask action of an image; the best one is where the next mask goes."""

    def __init__(self, config: SRDPolicyConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = SRDPolicyConfig()
        elif isinstance(config, dict):
            config = SRDPolicyConfig(**config)
        self.config = config
        self.space = config.action_space
        self.encoder, self.head = build_scorer(config.network, config.obs_size, config.channels, config.features_dim,
                                               len(self.space.mask_sizes), self.space.grid)
        self._rng = np.random.default_rng(config.seed)

    # ----- acting ------------------------------------------------------------------------
    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) observations, uint8 range -> (B, n_actions) scores."""
        return self.head(self.encoder(observations.float() / 255.0))

    @torch.inference_mode()
    def act(self, observations: np.ndarray) -> np.ndarray:
        """Greedy action per observation (random masking draws uniformly, seeded)."""
        if self.config.algorithm == "random":
            return self._rng.integers(0, self.space.n, size=len(observations))
        device = next(self.parameters()).device
        scores = self(torch.as_tensor(observations, device=device))
        return scores.argmax(dim=1).cpu().numpy()

    def mask_images(self, images: Sequence[Image.Image], num_masks: int | None = None) -> tuple[list[Image.Image], list[list[int]]]:
        """Place ``num_masks`` masks on each image, one after another (each choice sees the masks
        placed before it). Returns the masked images and the actions taken per image."""
        num_masks = self.config.num_masks if num_masks is None else num_masks
        if num_masks < 0:
            raise ValueError(f"num_masks must be >= 0, got {num_masks}")
        pixels = [np.asarray(ensure_rgb(img), dtype=np.uint8) for img in images]
        for i, p in enumerate(pixels):
            if not self.space.fits(p.shape[1], p.shape[0]):
                raise ValueError(
                    f"image {i} is {p.shape[1]}x{p.shape[0]} px, smaller than the policy's largest mask "
                    f"({self.space.largest_side} px: {max(self.config.mask_sizes):g} px at 224 px on {self.config.image_size} px images)"
                )
        actions: list[list[int]] = [[] for _ in images]
        for _ in range(num_masks):
            chosen = self.act(observe(pixels, self.config.obs_size))
            for i, a in enumerate(chosen):
                pixels[i] = self.space.apply(pixels[i], [int(a)])
                actions[i].append(int(a))
        return [Image.fromarray(p) for p in pixels], actions

    def check_compatible(self, space: MaskActionSpace, obs_size: int | None = None) -> None:
        """Refuse to act in an environment whose action space or observation size differs."""
        mine = self.space
        if (mine.grid, tuple(mine.mask_sizes), mine.image_size, mine.fill) != (space.grid, tuple(space.mask_sizes), space.image_size, space.fill):
            raise ValueError(
                f"policy action space (grid {mine.grid}, sizes {list(mine.mask_sizes)}, image {mine.image_size} px, fill {mine.fill}) "
                f"does not match the environment's (grid {space.grid}, sizes {list(space.mask_sizes)}, image {space.image_size} px, "
                f"fill {space.fill})"
            )
        if obs_size is not None and obs_size != self.config.obs_size:
            raise ValueError(f"policy sees {self.config.obs_size} px observations, the environment gives {obs_size} px")

    # ----- artifacts ---------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, push_to_hub: bool = False, repo_id: str | None = None, **kwargs) -> None:
        """Write ``model.safetensors``, ``config.json`` and a card; ``push_to_hub=True`` uploads them."""
        from safetensors.torch import save_model

        from .cards import render_policy_card

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, default=float))
        (folder / "README.md").write_text(render_policy_card(self.config))
        if push_to_hub:
            self.push_to_hub(repo_id or folder.name, **{k: v for k, v in kwargs.items() if k in ("private", "token", "commit_message")})

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token, map_location="cpu", **kwargs):
        """config.json + model.safetensors only (strict: every tensor must match the config)."""

        def fetch(name: str) -> str:
            if os.path.isdir(model_id):
                path = os.path.join(model_id, name)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"policy folder {model_id} has no {name}")
                return path
            return hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                   local_files_only=local_files_only, token=token)

        raw = json.loads(Path(fetch("config.json")).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"config.json of {model_id} is not a JSON object")
        try:
            config = SRDPolicyConfig(**raw)
        except TypeError as err:
            raise ValueError(f"config.json of {model_id} is not an SRD policy config: {err}") from err
        policy = cls(config)
        state = load_file(fetch("model.safetensors"), device=str(map_location))
        try:
            policy.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"weights in {model_id} do not match its config.json (action space or network): {err}") from err
        return policy.eval()

"""The policy's networks: they score every mask action (Q-values for DQN, logits for PPO).

* ``MaskScoreMap`` (default, "spatial"): a small fully-convolutional net whose output is a
  score map per mask size, resized to the action grid. A patch that looks like a trigger
  raises the score of the cells around it wherever it is, so one success at one place
  teaches every place: with a 6 px trigger only ~2% of random masks cover it, and a
  position-by-position linear head did not learn from so few successes (docs/results/srd.md).
* ``ImageEncoder`` + a linear head ("linear"): the flattened-CNN baseline.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_trunk(channels) -> list[nn.Module]:
    """Stride-2 convolutions (5x5 first, then 3x3) with ReLUs: each halves the image side."""
    layers, in_ch = [], 3
    for i, out_ch in enumerate(channels):
        kernel = 5 if i == 0 else 3
        layers += [nn.Conv2d(in_ch, out_ch, kernel, stride=2, padding=kernel // 2), nn.ReLU()]
        in_ch = out_ch
    return layers


class ImageEncoder(nn.Module):
    """uint8-range images (B, 3, S, S) scaled to [0, 1] -> features (B, features_dim)."""

    def __init__(self, obs_size: int = 64, channels: tuple[int, ...] = (32, 64, 64), features_dim: int = 256):
        super().__init__()
        self.conv = nn.Sequential(*conv_trunk(channels), nn.Flatten())
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, 3, obs_size, obs_size)).shape[1]
        self.project = nn.Sequential(nn.Linear(flat, features_dim), nn.ReLU())
        self.features_dim = features_dim

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.project(self.conv(images01))


class MaskScoreMap(nn.Module):
    """uint8-range images (B, 3, S, S) scaled to [0, 1] -> (B, sizes * grid * grid) scores, in
    the action order (size, row, col): a per-size map from local features, plus a per-size
    term from the pooled image (is anything suspicious at all?)."""

    def __init__(self, obs_size: int = 64, channels: tuple[int, ...] = (32, 64, 64), n_sizes: int = 4, grid: int = 10, hidden: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(*conv_trunk(channels))
        in_ch = channels[-1]
        self.local = nn.Sequential(nn.Conv2d(in_ch, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, n_sizes, 1))
        self.pooled = nn.Linear(in_ch, n_sizes)
        self.grid = grid
        self.features_dim = n_sizes * grid * grid

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(images01)
        maps = nn.functional.interpolate(self.local(feats), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        maps = maps + self.pooled(feats.mean(dim=(2, 3)))[:, :, None, None]
        return maps.flatten(1)


def build_scorer(network: str, obs_size: int, channels, features_dim: int, n_sizes: int, grid: int) -> tuple[nn.Module, nn.Module]:
    """(encoder, head) of a policy: the spatial map needs no head; the linear baseline does."""
    if network == "spatial":
        return MaskScoreMap(obs_size, tuple(channels), n_sizes, grid), nn.Identity()
    if network == "linear":
        return ImageEncoder(obs_size, tuple(channels), features_dim), nn.Linear(features_dim, n_sizes * grid * grid)
    raise ValueError(f"network must be 'spatial' or 'linear', got {network!r}")


def sb3_extractor_class():
    """``ImageEncoder`` as a Stable-Baselines3 features extractor (SB3 divides uint8 images by
    255 before calling it). Imported lazily: inference needs no RL library."""
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class SB3ImageEncoder(BaseFeaturesExtractor):
        def __init__(self, observation_space, network: str = "spatial", obs_size: int = 64, channels=(32, 64, 64),
                     features_dim: int = 256, n_sizes: int = 4, grid: int = 10):
            encoder, _ = build_scorer(network, obs_size, channels, features_dim, n_sizes, grid)
            super().__init__(observation_space, encoder.features_dim)
            self.encoder = encoder

        def forward(self, observations: torch.Tensor) -> torch.Tensor:
            return self.encoder(observations)

    return SB3ImageEncoder

"""The policy's network: a small CNN over the masked image, then one linear layer that scores
every mask action (Q-values for DQN, logits for PPO and SAC).

Spatial features are flattened, not pooled, so the head can tell where in the image a
suspicious patch is: the defense is about *where* to put a mask.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageEncoder(nn.Module):
    """uint8-range images (B, 3, S, S) scaled to [0, 1] -> features (B, features_dim)."""

    def __init__(self, obs_size: int = 64, channels: tuple[int, ...] = (32, 64, 64), features_dim: int = 256):
        super().__init__()
        layers, in_ch = [], 3
        for i, out_ch in enumerate(channels):
            kernel = 5 if i == 0 else 3
            layers += [nn.Conv2d(in_ch, out_ch, kernel, stride=2, padding=kernel // 2), nn.ReLU()]
            in_ch = out_ch
        self.conv = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, 3, obs_size, obs_size)).shape[1]
        self.project = nn.Sequential(nn.Linear(flat, features_dim), nn.ReLU())
        self.features_dim = features_dim

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.project(self.conv(images01))


def sb3_extractor_class():
    """``ImageEncoder`` as a Stable-Baselines3 features extractor (SB3 divides uint8 images by
    255 before calling it). Imported lazily: inference needs no RL library."""
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class SB3ImageEncoder(BaseFeaturesExtractor):
        def __init__(self, observation_space, obs_size: int = 64, channels=(32, 64, 64), features_dim: int = 256):
            super().__init__(observation_space, features_dim)
            self.encoder = ImageEncoder(obs_size, tuple(channels), features_dim)

        def forward(self, observations: torch.Tensor) -> torch.Tensor:
            return self.encoder(observations)

    return SB3ImageEncoder

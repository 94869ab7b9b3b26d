"""Building blocks of the PMD network: residual adaptation and co-channel attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(channels_in: int, channels_out: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
    )


class AdaptationBlock(nn.Module):
    """Two residual conv-BN-ReLU blocks that adapt frozen backbone features to matching.

    ``(B, C, h, w) -> (B, C, h, w)``; parameter names (``conv1.0``, ``conv1.1``, ``conv2.*``)
    follow the official PMD checkpoints so they convert one to one.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels, kernel_size)
        self.conv2 = _conv_bn_relu(channels, channels, kernel_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features + self.conv1(features)
        return features + self.conv2(features)


class CoChannelAttention(nn.Module):
    """A channel gate for one image computed from the pooled features of both images.

    ``gate = sigmoid(z)`` with ``z = mu`` (student) or ``z = mu + sigma * eps`` (teacher), where
    ``mu = ReLU(BN(conv1x1([pool(f_self), pool(f_other)])))`` as in the official code and
    ``sigma = softplus(conv1x1(...))`` is positive, so the reparameterised distribution trains.
    """

    def __init__(self, channels: int, stochastic: bool = False):
        super().__init__()
        self.mu_conv = _conv_bn_relu(2 * channels, channels, 1)
        self.stochastic = stochastic
        if stochastic:
            self.sigma_conv = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, features: torch.Tensor, other: torch.Tensor, sample: bool = True, generator=None):
        """Gate ``features (B, C, h, w)`` given ``other``; returns ``(gated, mu, sigma | None)``.

        ``sample=False`` uses the mean gate ``sigmoid(mu)`` even for a stochastic module.
        """
        pooled = torch.cat([F.adaptive_avg_pool2d(features, 1), F.adaptive_avg_pool2d(other, 1)], dim=1)
        mu = self.mu_conv(pooled)
        sigma = None
        z = mu
        if self.stochastic:
            sigma = F.softplus(self.sigma_conv(pooled)) + 1e-4
            if sample:
                noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
                z = mu + sigma * noise
        return features * torch.sigmoid(z), mu, sigma


def gaussian_kl_to_unit(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``KL(N(mu, sigma^2) || N(0, 1))`` summed over channels."""
    kl = 0.5 * (sigma**2 + mu**2 - 1.0 - 2.0 * torch.log(sigma))
    return kl.flatten(1).sum(dim=1).mean()

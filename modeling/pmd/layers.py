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


def conv2d_as_matmul(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     padding: int = 0) -> torch.Tensor:
    """Stride-1 2-D convolution as im2col (``F.unfold``) and one matrix product per image.

    The same result as ``F.conv2d(features, weight, bias, padding=padding)`` up to float32
    summation order. On the CPU it is much faster for the adaptation convolutions (few cells,
    many channels: ResNet-101 layer3 20 x 20 x 1024 with k5, layer4 10 x 10 x 2048 with k3 at a
    320² input), where oneDNN's direct convolution reaches a fraction of the BLAS GEMM's rate.

    Args:
        features: ``(B, C_in, h, w)``.
        weight: ``(C_out, C_in, k, k)``, odd ``k``.
        bias: ``(C_out,)`` or None.
        padding: zero padding on each side (``k // 2`` keeps ``h x w``).

    Returns:
        ``(B, C_out, h + 2 padding - k + 1, w + 2 padding - k + 1)``.
    """
    batch_size, _, height, width = features.shape
    kernel = weight.shape[-1]
    columns = F.unfold(features, kernel, padding=padding) if kernel > 1 or padding else features.flatten(2)
    out_height, out_width = height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1
    matrix = weight.reshape(weight.shape[0], -1)  # (C_out, C_in k k)
    if bias is None:
        output = torch.matmul(matrix, columns)  # (B, C_out, h' w')
    else:
        bias = bias[:, None].expand(batch_size, -1, columns.shape[-1])
        output = torch.baddbmm(bias, matrix.expand(batch_size, -1, -1), columns)
    return output.view(batch_size, -1, out_height, out_width)


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
        features = features + self._branch(self.conv1, features)
        return features + self._branch(self.conv2, features)

    def _branch(self, block: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
        """``ReLU(BN(conv(features)))``; in eval mode on the CPU the conv is :func:`conv2d_as_matmul`.

        Training keeps ``nn.Conv2d`` (its backward does not store the unfolded columns).
        """
        if self.training or features.device.type != "cpu":
            return block(features)
        conv, batch_norm, relu = block
        return relu(batch_norm(conv2d_as_matmul(features, conv.weight, conv.bias, conv.padding[0])))


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

"""Hyperpixels: several backbone levels on one grid (Min et al., Hyperpixel Flow, ICCV 2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stack_levels(levels: list[torch.Tensor], grid_size: tuple[int, int]) -> torch.Tensor:
    """``L`` maps ``(B, C_l, h_l, w_l)`` -> one ``(B, sum C_l, h, w)`` map on ``grid_size = (h, w)``.

    Each level is resampled to the grid (area pooling when finer, bilinear when coarser) and
    L2-normalised over its channels; the concatenation is scaled by ``1 / sqrt(L)`` so it has unit
    norm and its cosine with another hyperpixel is the mean of the per-level cosines.
    """
    resampled = []
    for feature in levels:
        if feature.shape[-2] > grid_size[0] or feature.shape[-1] > grid_size[1]:
            feature = F.adaptive_avg_pool2d(feature, grid_size)
        if tuple(feature.shape[-2:]) != tuple(grid_size):
            feature = F.interpolate(feature, size=grid_size, mode="bilinear", align_corners=False)
        resampled.append(F.normalize(feature, dim=1))
    return torch.cat(resampled, dim=1) / math.sqrt(len(resampled))

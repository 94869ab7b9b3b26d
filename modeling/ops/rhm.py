"""Regularised Hough matching (Min et al., Hyperpixel Flow, ICCV 2019).

Every candidate match (i, j) votes, with its appearance similarity, for the translation that
carries source position i to target position j. The vote histogram is smoothed with a small
Gaussian, and a match's confidence is its similarity times the support of its translation bin:
matches that agree with the dominant geometric consensus are promoted.

The reference implementation (juhongm999/hpf) fills an ``N_s x bins`` buffer before summing it;
here the separable structure of the translation bins keeps every temporary at the size of the
similarity volume or smaller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel2d(side: int = 7, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised ``side x side`` Gaussian whose full width at half maximum is ``side / 2``."""
    sigma = side / 2 / 2.354
    coords = torch.arange(side, dtype=dtype, device=device) - (side - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel_1d[:, None] * kernel_1d[None, :]
    return kernel / kernel.sum()


def hough_space_shape(source_size: tuple[float, float], target_size: tuple[float, float], num_bins: int):
    """Bins of the translation space: ``(bins_y, bins_x, cell_size)``.

    Translations range over ``[0, w_s + w_t] x [0, h_s + h_t]`` (after shifting by the source
    size so they are non-negative); square cells are sized so there are about ``num_bins``.
    """
    (h_s, w_s), (h_t, w_t) = source_size, target_size
    width, height = w_s + w_t, h_s + h_t
    cell_size = math.sqrt(width * height / num_bins)
    return int(height / cell_size) + 1, int(width / cell_size) + 1, cell_size


def _axis_bins(source_coords, target_coords, source_extent, cell_size):
    """Bin of the translation along one axis for every (source, target) coordinate pair: ``(n_s, n_t)``."""
    votes = (source_extent - source_coords)[:, None] + target_coords[None, :]
    return torch.div(votes, cell_size, rounding_mode="floor").long()


def regularized_hough_matching(
    similarity: torch.Tensor,
    source_grid: tuple[torch.Tensor, torch.Tensor],
    target_grid: tuple[torch.Tensor, torch.Tensor],
    source_size: tuple[float, float],
    target_size: tuple[float, float],
    num_bins: int = 8192,
    kernel_size: int = 7,
    return_hough_space: bool = False,
):
    """Re-score candidate matches by their geometric consensus.

    Cells lie on rectilinear grids (every feature map does), so the translation bin of a match
    splits into an x part that depends only on the two columns and a y part that depends only on
    the two rows. Votes are summed over column pairs first (one ``scatter_add`` with a small,
    broadcast index), then over row pairs into the 2D histogram; no ``N_s x N_t`` index tensor
    and no ``N_s x bins`` buffer is ever built.

    Args:
        similarity: ``(B, N_s, N_t)`` non-negative appearance similarities (e.g. clamped cosine
            raised to a power); cells row-major, ``N_s = h_s * w_s``.
        source_grid: ``(xs (w_s,), ys (h_s,))`` pixel coordinates of the source cell centres.
        target_grid: ``(xs (w_t,), ys (h_t,))`` likewise for the target.
        source_size, target_size: ``(height, width)`` of the images in the same pixel units.
        num_bins: approximate number of translation bins.
        kernel_size: side of the Gaussian that smooths the vote histogram.
        return_hough_space: also return the smoothed histogram ``(B, bins_y, bins_x)``.

    Returns:
        ``(B, N_s, N_t)`` confidences ``similarity * votes[bin(i, j)]`` (and the histogram).
    """
    (source_xs, source_ys), (target_xs, target_ys) = source_grid, target_grid
    batch_size = similarity.shape[0]
    h_s, w_s, h_t, w_t = len(source_ys), len(source_xs), len(target_ys), len(target_xs)
    if similarity.shape[1:] != (h_s * w_s, h_t * w_t):
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match grids {h_s}x{w_s} and {h_t}x{w_t}")
    bins_y, bins_x, cell_size = hough_space_shape(source_size, target_size, num_bins)
    dtype, device = similarity.dtype, similarity.device
    bin_x = _axis_bins(source_xs.to(device, dtype), target_xs.to(device, dtype), source_size[1], cell_size)
    bin_y = _axis_bins(source_ys.to(device, dtype), target_ys.to(device, dtype), source_size[0], cell_size)

    # (B, h_s, w_s, h_t, w_t) -> (B, h_s, h_t, w_s * w_t): column pairs last, then sum them per x bin.
    volume = similarity.view(batch_size, h_s, w_s, h_t, w_t).permute(0, 1, 3, 2, 4).reshape(batch_size, h_s, h_t, -1)
    votes_x = volume.new_zeros(batch_size, h_s, h_t, bins_x)
    votes_x.scatter_add_(3, bin_x.reshape(1, 1, 1, -1).expand_as(volume), volume)
    hough = volume.new_zeros(batch_size, bins_y, bins_x)
    hough.index_add_(1, bin_y.reshape(-1), votes_x.reshape(batch_size, h_s * h_t, bins_x))

    kernel = gaussian_kernel2d(kernel_size, dtype=dtype, device=device)
    hough = F.conv2d(hough[:, None], kernel[None, None], padding=kernel_size // 2)[:, 0]

    # support[b, ys, xs, yt, xt] = hough[b, bin_y[ys, yt], bin_x[xs, xt]]
    support = hough[:, bin_y[:, None, :, None], bin_x[None, :, None, :]]
    confidence = similarity * support.reshape(batch_size, h_s * w_s, h_t * w_t)
    if return_hough_space:
        return confidence, hough
    return confidence

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


def hough_bins(source_grid, target_grid, source_size, target_size, num_bins: int, dtype=torch.float32, device=None):
    """Translation bin of every (source, target) cell pair, one axis at a time.

    Returns:
        ``(bin_y (h_s, h_t), bin_x (w_s, w_t), (bins_y, bins_x))``: the bin of a match (i, j) is
        ``(bin_y[row(i), row(j)], bin_x[col(i), col(j)])`` in a ``bins_y x bins_x`` histogram.
    """
    (source_xs, source_ys), (target_xs, target_ys) = source_grid, target_grid
    bins_y, bins_x, cell_size = hough_space_shape(source_size, target_size, num_bins)
    bin_x = _axis_bins(source_xs.to(device, dtype), target_xs.to(device, dtype), source_size[1], cell_size)
    bin_y = _axis_bins(source_ys.to(device, dtype), target_ys.to(device, dtype), source_size[0], cell_size)
    return bin_y, bin_x, (bins_y, bins_x)


def vote_rows(similarity_columns: torch.Tensor, bin_y_up: torch.Tensor, votes_y: torch.Tensor) -> None:
    """Add the votes of whole source columns, summed over row pairs per y bin, to ``votes_y``.

    Args:
        similarity_columns: ``(B, c, h_s * h_t, w_t)`` similarities of ``c`` whole source columns,
            source rows bottom-up: ``[b, xs, (h_s - 1 - ys) * h_t + yt, xt]``.
        bin_y_up: ``(h_s, h_t)`` y bin of every row pair, source rows bottom-up (``bin_y.flip(0)``).
        votes_y: ``(B, c, bins_y, w_t)`` accumulator.
    """
    # index_add_ adds whole target rows (w_t floats) per (source row, target row) pair, in pair order.
    votes_y.index_add_(2, bin_y_up.reshape(-1), similarity_columns)


def smooth_hough_space(votes_y: torch.Tensor, bin_x: torch.Tensor, bins_x: int, kernel_size: int) -> torch.Tensor:
    """Sum ``votes_y (B, w_s, bins_y, w_t)`` over column pairs per x bin and smooth: ``(B, bins_y, bins_x)``."""
    batch_size, w_s, bins_y, w_t = votes_y.shape
    column_pairs = votes_y.permute(0, 2, 1, 3).reshape(batch_size, bins_y, w_s * w_t)
    hough = votes_y.new_zeros(batch_size, bins_y, bins_x)
    hough.scatter_add_(2, bin_x.reshape(1, 1, -1).expand_as(column_pairs), column_pairs)
    kernel = gaussian_kernel2d(kernel_size, dtype=votes_y.dtype, device=votes_y.device)
    return F.conv2d(hough[:, None], kernel[None, None], padding=kernel_size // 2)[:, 0]


def regularized_hough_matching(
    similarity: torch.Tensor,
    source_grid: tuple[torch.Tensor, torch.Tensor],
    target_grid: tuple[torch.Tensor, torch.Tensor],
    source_size: tuple[float, float],
    target_size: tuple[float, float],
    num_bins: int = 8192,
    kernel_size: int = 7,
    return_hough_space: bool = False,
    block_elements: int = 1 << 22,
):
    """Re-score candidate matches by their geometric consensus.

    Cells lie on rectilinear grids (every feature map does), so the translation bin of a match
    splits into an x part that depends only on the two columns and a y part that depends only on
    the two rows. Votes are summed over row pairs first, per source column (one ``index_add`` of
    whole target rows), then over column pairs into the 2D histogram (a ``scatter_add`` on that
    small ``w_s x bins_y x w_t`` sum); no ``N_s x N_t`` index tensor and no ``N_s x bins`` buffer
    is ever built, and every temporary is a block of about ``block_elements`` floats, so the
    peak is the input and the output volumes. The fused matcher (:mod:`.fused_matching`) sums in
    the same order, so the two give the same histogram to the bit.

    Args:
        similarity: ``(B, N_s, N_t)`` non-negative appearance similarities (e.g. clamped cosine
            raised to a power); cells row-major, ``N_s = h_s * w_s``.
        source_grid: ``(xs (w_s,), ys (h_s,))`` pixel coordinates of the source cell centres.
        target_grid: ``(xs (w_t,), ys (h_t,))`` likewise for the target.
        source_size, target_size: ``(height, width)`` of the images in the same pixel units.
        num_bins: approximate number of translation bins.
        kernel_size: side of the Gaussian that smooths the vote histogram.
        return_hough_space: also return the smoothed histogram ``(B, bins_y, bins_x)``.
        block_elements: floats per temporary block (whole source rows or columns, at least one).

    Returns:
        ``(B, N_s, N_t)`` confidences ``similarity * votes[bin(i, j)]`` (and the histogram).
    """
    (source_xs, source_ys), (target_xs, target_ys) = source_grid, target_grid
    batch_size = similarity.shape[0]
    h_s, w_s, h_t, w_t = len(source_ys), len(source_xs), len(target_ys), len(target_xs)
    if similarity.shape[1:] != (h_s * w_s, h_t * w_t):
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match grids {h_s}x{w_s} and {h_t}x{w_t}")
    bin_y, bin_x, (bins_y, bins_x) = hough_bins(
        source_grid, target_grid, source_size, target_size, num_bins, similarity.dtype, similarity.device
    )
    block_rows = max(1, block_elements // (batch_size * h_s * h_t * w_t))  # source rows or columns per block
    votes_y = _votes_by_source_column(similarity, bin_y, bins_y, (h_s, w_s), (h_t, w_t), block_rows)
    hough = smooth_hough_space(votes_y, bin_x, bins_x, kernel_size)

    confidence = torch.empty_like(similarity)
    for start in range(0, h_s, block_rows):
        cells = slice(start * w_s, min(h_s, start + block_rows) * w_s)
        # support[b, ys, xs, yt, xt] = hough[b, bin_y[ys, yt], bin_x[xs, xt]] for the block's rows
        support = hough[:, bin_y[start : start + block_rows, None, :, None], bin_x[None, :, None, :]]
        torch.mul(similarity[:, cells], support.view(batch_size, -1, h_t * w_t), out=confidence[:, cells])
    if return_hough_space:
        return confidence, hough
    return confidence


def _votes_by_source_column(similarity, bin_y, bins_y, source_shape, target_shape, columns_per_block):
    """``(B, w_s, bins_y, w_t)`` votes summed over row pairs, in the fused matcher's order: source
    columns, each bottom-up (every (source row, target row) pair of a column is one row of w_t)."""
    batch_size, (h_s, w_s), (h_t, w_t) = similarity.shape[0], source_shape, target_shape
    by_column = similarity.view(batch_size, h_s, w_s, h_t, w_t).transpose(1, 2)
    bottom_up = torch.arange(h_s - 1, -1, -1, device=similarity.device)
    votes_y = similarity.new_zeros(batch_size, w_s, bins_y, w_t)
    for start in range(0, w_s, columns_per_block):
        block = torch.index_select(by_column[:, start : start + columns_per_block], 2, bottom_up)  # a copy
        vote_rows(block.view(batch_size, -1, h_s * h_t, w_t), bin_y.flip(0), votes_y[:, start : start + columns_per_block])
    return votes_y

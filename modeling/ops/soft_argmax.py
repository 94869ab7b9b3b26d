"""Kernel soft-argmax (Lee et al., SFNet, CVPR 2019): a differentiable, outlier-robust arg-max."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .geometry import grid_axes


def kernel_soft_argmax(
    correlation: torch.Tensor,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    sigma: float = 5.0,
    beta: float = 50.0,
    align_corners: bool = False,
) -> torch.Tensor:
    """Dense correspondence from a correlation volume.

    A Gaussian window (standard deviation ``sigma`` target cells) centred on each source cell's
    arg-max suppresses distant multi-modal peaks; a softmax with temperature ``beta`` over the
    windowed scores gives a probability map whose expectation is the match.

    Args:
        correlation: ``(B, h_s * w_s, h_t * w_t)`` scores (source cells row-major).
        source_size: ``(h_s, w_s)``.
        target_size: ``(h_t, w_t)``.
        sigma: window standard deviation in target cells; ``<= 0`` disables the window.
        beta: softmax temperature (inverse).
        align_corners: cell coordinates on ``linspace(-1, 1, n)`` (official PMD) instead of
            pixel-centre coordinates.

    Returns:
        ``grid_src_to_trg`` ``(B, 2, h_s, w_s)`` in grid units.
    """
    batch_size, num_source, num_target = correlation.shape
    (h_s, w_s), (h_t, w_t) = source_size, target_size
    if num_source != h_s * w_s or num_target != h_t * w_t:
        raise ValueError(
            f"correlation {tuple(correlation.shape)} does not match source {source_size} and target {target_size}"
        )
    xs, ys = grid_axes(h_t, w_t, align_corners, device=correlation.device, dtype=correlation.dtype)
    scores = beta * correlation
    if sigma > 0:
        best = correlation.argmax(dim=2)  # (B, Ns)
        best_x = torch.arange(w_t, device=correlation.device, dtype=correlation.dtype)[best % w_t]
        best_y = torch.arange(h_t, device=correlation.device, dtype=correlation.dtype)[best // w_t]
        cols = torch.arange(w_t, device=correlation.device, dtype=correlation.dtype)
        rows = torch.arange(h_t, device=correlation.device, dtype=correlation.dtype)
        dist_x = (cols.view(1, 1, 1, w_t) - best_x.view(batch_size, num_source, 1, 1)) ** 2
        dist_y = (rows.view(1, 1, h_t, 1) - best_y.view(batch_size, num_source, 1, 1)) ** 2
        window = torch.exp(-(dist_x + dist_y) / (2 * sigma**2)).view(batch_size, num_source, num_target)
        scores = scores * window
    probability = torch.softmax(scores, dim=2).view(batch_size, num_source, h_t, w_t)
    match_x = (probability.sum(dim=2) * xs).sum(dim=-1)
    match_y = (probability.sum(dim=3) * ys).sum(dim=-1)
    return torch.stack([match_x, match_y], dim=1).view(batch_size, 2, h_s, w_s)


def local_soft_argmax(
    scores: torch.Tensor,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    radius: int = 1,
    beta: float = 20.0,
) -> torch.Tensor:
    """Sub-cell refinement of each arg-max from its ``(2r+1)^2`` neighbourhood only.

    The same estimate as :func:`kernel_soft_argmax` with a narrow window, at ``O(N_s r^2)`` cost
    instead of ``O(N_s N_t)``: scores are divided by the row maximum (so ``beta`` does not depend
    on their scale) and softmax-averaged over the cells around the arg-max.

    Args:
        scores: ``(B, h_s * w_s, h_t * w_t)`` non-negative scores.

    Returns:
        ``grid_src_to_trg`` ``(B, 2, h_s, w_s)`` in grid units.
    """
    batch_size = scores.shape[0]
    best_value, best = scores.max(dim=2)  # (B, Ns)
    around = arg_max_neighbourhood(best, target_size, radius)
    grid = soft_argmax_around(torch.gather(scores, 2, around.index), best_value, around, target_size, beta)
    return grid.view(batch_size, 2, *source_size)


class Neighbourhood(NamedTuple):
    """The ``K = (2r+1)^2`` cells around each arg-max of an ``h x w`` map, clamped into the map.

    Cell ``k = i * (2r+1) + j`` is row offset ``i - r`` and column offset ``j - r``.
    """

    rows: torch.Tensor  # (B, N, 2r+1) clamped rows
    cols: torch.Tensor  # (B, N, 2r+1) clamped columns
    index: torch.Tensor  # (B, N, K) flat (row-major) cells
    outside: torch.Tensor  # (B, N, K) whether the unclamped cell lies outside the map


def arg_max_neighbourhood(best: torch.Tensor, size: tuple[int, int], radius: int) -> Neighbourhood:
    """The cells around each arg-max ``best (B, N)`` (flat, row-major) of an ``h x w`` map."""
    height, width = size
    offsets = torch.arange(-radius, radius + 1, device=best.device)
    rows, cols = (best // width)[..., None] + offsets, (best % width)[..., None] + offsets  # (B, N, 2r+1)
    # Rows and columns separately (small), then one outer combination per (B, N, K) tensor.
    outside = ((rows < 0) | (rows >= height))[..., :, None] | ((cols < 0) | (cols >= width))[..., None, :]
    rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    index = (rows * width)[..., :, None] + cols[..., None, :]
    return Neighbourhood(rows, cols, index.flatten(-2), outside.flatten(-2))


def soft_argmax_around(
    neighbour_scores: torch.Tensor,
    best_value: torch.Tensor,
    around: Neighbourhood,
    size: tuple[int, int],
    beta: float = 20.0,
) -> torch.Tensor:
    """Softmax-weighted mean position of the cells around each arg-max.

    Args:
        neighbour_scores: ``(B, N, K)`` scores of the cells of ``around``.
        best_value: ``(B, N)`` the arg-max scores (row maxima).
        around: from :func:`arg_max_neighbourhood` on the ``size = (h, w)`` map.

    Returns:
        ``(B, 2, N)`` (x, y) in grid units of that map.
    """
    height, width = size
    side = around.rows.shape[-1]
    values = neighbour_scores / best_value.clamp_min(1e-12)[..., None]
    weights = torch.softmax((beta * values).masked_fill(around.outside, float("-inf")), dim=2)
    axis_x, axis_y = grid_axes(height, width, device=neighbour_scores.device, dtype=neighbour_scores.dtype)
    # (B, 2, N, K) cell positions, built from the small per-row and per-column lookups.
    xs = axis_x[around.cols][..., None, :].expand(*around.cols.shape[:-1], side, side)
    ys = axis_y[around.rows][..., :, None].expand(*around.rows.shape[:-1], side, side)
    positions = torch.stack([xs.flatten(-2), ys.flatten(-2)], dim=1)  # outside cells have weight 0
    return (weights[:, None] * positions).sum(-1)

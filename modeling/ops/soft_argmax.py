"""Kernel soft-argmax (Lee et al., SFNet, CVPR 2019): a differentiable, outlier-robust arg-max."""

from __future__ import annotations

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
    batch_size, num_source, _ = scores.shape
    (h_s, w_s), (h_t, w_t) = source_size, target_size
    best_value, best = scores.max(dim=2)  # (B, Ns)
    offsets = torch.arange(-radius, radius + 1, device=scores.device)
    offset_y, offset_x = torch.meshgrid(offsets, offsets, indexing="ij")
    cols = (best % w_t)[..., None] + offset_x.reshape(-1)  # (B, Ns, K)
    rows = (best // w_t)[..., None] + offset_y.reshape(-1)
    inside = (cols >= 0) & (cols < w_t) & (rows >= 0) & (rows < h_t)
    index = (rows.clamp(0, h_t - 1) * w_t + cols.clamp(0, w_t - 1))
    values = torch.gather(scores, 2, index) / best_value.clamp_min(1e-12)[..., None]
    weights = torch.softmax((beta * values).masked_fill(~inside, float("-inf")), dim=2)
    axis_x, axis_y = grid_axes(h_t, w_t, device=scores.device, dtype=scores.dtype)
    xs, ys = axis_x[cols.clamp(0, w_t - 1)], axis_y[rows.clamp(0, h_t - 1)]  # outside cells have weight 0
    grid = torch.stack([(weights * xs).sum(-1), (weights * ys).sum(-1)], dim=1)
    return grid.view(batch_size, 2, h_s, w_s)

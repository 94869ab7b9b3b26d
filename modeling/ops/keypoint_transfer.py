"""Keypoint transfer through a dense correspondence field."""

from __future__ import annotations

import torch

from .geometry import cell_centers


def transfer_keypoints(
    source_points: torch.Tensor,
    grid_src_to_trg: torch.Tensor,
    confidence: torch.Tensor | None = None,
    radius: float = 1.5,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry source points into the target through the matches of the cells around them.

    Each source cell within ``radius`` cells of a point proposes ``match(cell) + (point - cell)``
    (the point keeps its offset from the cell, as in Hyperpixel Flow's transfer); the proposals are
    averaged with Gaussian weights on the distance (sigma = ``radius / 2`` cells) times the cell
    confidence, so one wrong cell next to several right ones is outvoted.

    Args:
        source_points: ``(B, K, 2)`` points in grid units.
        grid_src_to_trg: ``(B, 2, h, w)`` target location of every source cell, grid units.
        confidence: ``(B, h, w)`` non-negative per-cell weights; ``None`` weighs cells equally.
        radius: neighbourhood radius in cells; the nearest cell is always used.
        scores: ``(B, h, w)`` per-cell scores to report, averaged with the same weights
            (default: ``confidence``).

    Returns:
        ``(target_points (B, K, 2) grid units, scores (B, K))`` where a score is the weighted mean
        of ``scores`` (or of the confidence) of the cells used.
    """
    batch_size, _, height, width = grid_src_to_trg.shape
    centers = cell_centers(height, width, device=source_points.device, dtype=source_points.dtype)  # (N, 2)
    cell_size = centers.new_tensor([2.0 / width, 2.0 / height])
    offsets = (source_points[:, :, None, :] - centers[None, None]) / cell_size  # (B, K, N, 2) in cells
    distance_sq = (offsets**2).sum(-1)  # (B, K, N)
    sigma = max(radius / 2, 1e-3)
    weights = torch.exp(-distance_sq / (2 * sigma**2))
    nearest = distance_sq.argmin(dim=-1, keepdim=True)
    in_reach = (distance_sq <= radius**2).scatter(-1, nearest, True)
    weights = weights * in_reach
    if confidence is None:
        cell_confidence = weights.new_ones(batch_size, 1, height * width)
    else:
        cell_confidence = confidence.reshape(batch_size, 1, height * width).clamp_min(0)
    weighted = weights * (cell_confidence + 1e-8)
    weighted = weighted / weighted.sum(-1, keepdim=True)

    matches = grid_src_to_trg.flatten(2).transpose(1, 2)  # (B, N, 2)
    displacement = source_points[:, :, None, :] - centers[None, None]  # (B, K, N, 2)
    proposals = matches[:, None] + displacement
    target_points = (weighted[..., None] * proposals).sum(dim=2)
    cell_scores = cell_confidence if scores is None else scores.reshape(batch_size, 1, height * width)
    return target_points, (weighted * cell_scores).sum(dim=-1)

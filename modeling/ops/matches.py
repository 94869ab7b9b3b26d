"""Selecting sparse, mutually consistent matches from dense fields."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import cell_centers, sample_grid_at


def select_mutual_matches(
    grid_src_to_trg: torch.Tensor,
    grid_trg_to_src: torch.Tensor,
    confidence: torch.Tensor,
    top_k: int,
    cycle_tolerance: float = 1.0,
    nms_radius: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``top_k`` most confident source cells whose match maps back to them.

    A source cell is mutual when following ``grid_src_to_trg`` and then ``grid_trg_to_src`` returns
    within ``cycle_tolerance`` source cells of its centre (the dense form of mutual nearest
    neighbours). Only cells whose confidence is the largest within ``nms_radius`` cells are kept,
    so the matches spread over the image instead of piling up on the best region.

    Args:
        grid_src_to_trg: ``(B, 2, h_s, w_s)``; grid_trg_to_src: ``(B, 2, h_t, w_t)`` (grid units).
        confidence: ``(B, h_s, w_s)``.

    Returns:
        ``(source_points, target_points, scores, valid)`` with shapes ``(B, k, 2)``, ``(B, k, 2)``,
        ``(B, k)``, ``(B, k)``: grid units, sorted by score; ``valid`` is False for padding slots
        when a pair has fewer than ``k`` mutual matches.
    """
    batch_size, _, height, width = grid_src_to_trg.shape
    centers = cell_centers(height, width, device=grid_src_to_trg.device, dtype=grid_src_to_trg.dtype)
    forward = grid_src_to_trg.flatten(2).transpose(1, 2)  # (B, N, 2)
    back = sample_grid_at(grid_trg_to_src, forward)  # (B, N, 2)
    cell_size = centers.new_tensor([2.0 / width, 2.0 / height])
    cycle_error = ((back - centers) / cell_size).norm(dim=-1)  # (B, N) in source cells
    mutual = cycle_error <= cycle_tolerance
    if nms_radius > 0:
        side = 2 * nms_radius + 1
        local_max = F.max_pool2d(confidence[:, None], side, stride=1, padding=nms_radius)[:, 0]
        mutual &= (confidence >= local_max).flatten(1)
    scores = torch.where(mutual, confidence.flatten(1), torch.full_like(cycle_error, -1.0))
    k = min(top_k, scores.shape[1])
    top_scores, index = scores.topk(k, dim=1)
    source_points = centers[index]
    target_points = torch.gather(forward, 1, index[..., None].expand(-1, -1, 2))
    valid = top_scores >= 0
    return source_points, target_points, top_scores.clamp_min(0), valid

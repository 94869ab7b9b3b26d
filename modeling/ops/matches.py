"""How much to trust a match (:func:`match_confidence`), and selecting sparse, mutually consistent
matches from dense fields (:func:`select_mutual_matches`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import cell_centers, sample_grid_at

# Cells around a match whose scores count as "the match" when measuring how distinctive it is: the
# refinement's 3 x 3 window plus one ring, so that a match between two cells is not counted as ambiguous.
SCORE_RADIUS = 2


def match_confidence(
    best_similarity: torch.Tensor,
    neighbour_scores: torch.Tensor,
    around,
    total_scores: torch.Tensor,
    power: float,
) -> torch.Tensor:
    """An absolute confidence in ``[0, 1]`` of each cell's best match, comparable across pairs.

    A score normalised by the pair's best match says nothing about the pair: noise against a
    photo, or a flat image against itself, would have matches at 1.0. This one is the geometric
    mean of two ratios that each lie in ``[0, 1]`` whatever the pair:

    * **similarity** -- the clamped cosine of the two matched feature vectors: how alike they are;
    * **distinctiveness** -- the share of the cell's matching scores (over every target cell) that
      lies within :data:`SCORE_RADIUS` cells of its match: how clearly this match beats every
      other place. A flat or repetitive image spreads the scores over many places (near 0); a
      unique structure concentrates them (towards 1).

    Args:
        best_similarity: ``(B, N)`` the similarity of each best match as the volume stores it, the
            clamped cosine raised to ``power``.
        neighbour_scores: ``(B, N, K)`` matching scores of the ``K`` cells ``around`` each best match
            (a :class:`~.soft_argmax.Neighbourhood` of radius :data:`SCORE_RADIUS`).
        total_scores: ``(B, N)`` each cell's matching scores summed over the whole target.
        power: the exponent ``best_similarity`` carries.

    Returns:
        ``(B, N)`` confidences.
    """
    similarity = best_similarity.clamp(0, 1).pow(1.0 / power)
    window = neighbour_scores.masked_fill(around.outside, 0).sum(-1)  # clamped copies of edge cells count once
    distinctiveness = (window / total_scores.clamp_min(1e-30)).clamp(0, 1)
    return (similarity * distinctiveness).sqrt()


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

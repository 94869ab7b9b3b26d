"""Close-loop consistency of generated correspondence labels (Huang et al., ICCV 2023).

A source point ``P_s`` is carried around a loop through a third image ``m`` of the same category:
source -> ``m`` -> target -> source, landing at ``P'_s``. A reliable correspondence field brings
it back; the offset ``||P_s - P'_s||`` scores the point (lower: more consistent), averaged over
the third images, and over the points of a pair for a per-pair score that filters labels.

Reconstructed details (the paper publishes no code): the offset is normalised by the source
image *diagonal*, so a score lies in ``[0, 1]`` for every point on the image (the largest
possible offset is the diagonal); the target -> source leg does not depend on the third image and
is computed once per pair; points are read from the fields bilinearly
(:func:`~semcorr.modeling.ops.sample_grid_at`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops.geometry import cell_centers, grid_to_pixels, pixels_to_grid, sample_grid_at

MatchFn = Callable[[torch.Tensor, torch.Tensor], object]


@torch.no_grad()
def consistency_scores(
    match_fn: MatchFn,
    source: torch.Tensor,
    target: torch.Tensor,
    thirds: torch.Tensor,
    points: torch.Tensor | None = None,
    *,
    point_mask: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Close-loop offsets source -> third -> target -> source, batched over the thirds.

    Args:
        match_fn: ``match_fn(source_pixel_values, target_pixel_values) -> CorrespondenceOutput``
            (any object with ``grid_src_to_trg (B, 2, h, w)``); a model's ``match`` works as is.
        source, target: ``(B, 3, H, W)`` model inputs.
        thirds: ``(B, K, 3, H_m, W_m)`` third images per pair, or ``(K, 3, H_m, W_m)`` shared by
            the batch.
        points: ``(B, N, 2)`` source points in model-input pixels ``(x, y)``; ``None``: every
            source cell centre of the first leg's field (``N = h * w``, row-major).
        point_mask: optional ``(B, N)`` bool, False for padding points (left out of ``per_pair``).
        chunk_size: image pairs per ``match_fn`` call; each leg runs over all ``B * K`` pairs in
            chunks of this size.

    Returns:
        ``per_point (B, N)`` (offset / source diagonal, averaged over the K thirds), ``per_third
        (B, K, N)``, ``per_pair (B,)`` (mean over the valid points; 0 for a pair without any) and
        ``points (B, N, 2)``, the source points used. Runs without gradients.
    """
    batch_size = source.shape[0]
    thirds = _per_pair_thirds(thirds, batch_size)
    num_thirds = thirds.shape[1]
    pair = torch.arange(batch_size * num_thirds, device=source.device)
    owner = pair // num_thirds  # pair b * K + m belongs to source / target b
    flat_thirds = thirds.flatten(0, 1)

    to_third = _fields(match_fn, source, owner, flat_thirds, pair, chunk_size)  # (B*K, 2, h_s, w_s)
    third_to_target = _fields(match_fn, flat_thirds, pair, target, owner, chunk_size)
    target_to_source = _fields(match_fn, target, None, source, None, chunk_size)  # once per pair

    source_size = tuple(source.shape[-2:])
    if points is None:
        points = _cell_points(to_third, source_size, batch_size)
    start = pixels_to_grid(points.to(to_third.dtype), source_size)  # (B, N, 2)
    in_third = sample_grid_at(to_third, start.repeat_interleave(num_thirds, dim=0))
    in_target = sample_grid_at(third_to_target, in_third)
    back = sample_grid_at(target_to_source.repeat_interleave(num_thirds, dim=0), in_target)

    offset = grid_to_pixels(back, source_size) - points.repeat_interleave(num_thirds, dim=0)
    diagonal = (source_size[0] ** 2 + source_size[1] ** 2) ** 0.5
    per_third = (offset.norm(dim=-1) / diagonal).unflatten(0, (batch_size, num_thirds))  # (B, K, N)
    per_point = per_third.mean(dim=1)
    return {"per_point": per_point, "per_third": per_third, "per_pair": _masked_mean(per_point, point_mask),
            "points": points}


def _per_pair_thirds(thirds: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(K, 3, H, W)`` or ``(B, K, 3, H, W)`` -> ``(B, K, 3, H, W)`` (a view, no copy)."""
    if thirds.dim() == 4:
        return thirds.unsqueeze(0).expand(batch_size, -1, -1, -1, -1)
    if thirds.dim() != 5 or thirds.shape[0] != batch_size:
        raise ValueError(f"thirds must be (K, 3, H, W) or (B={batch_size}, K, 3, H, W), got {tuple(thirds.shape)}")
    return thirds


def _fields(match_fn, left, left_index, right, right_index, chunk_size: int) -> torch.Tensor:
    """``grid_src_to_trg`` of the pairs ``(left[left_index[i]], right[right_index[i]])``, chunked.

    ``None`` indices pair ``left[i]`` with ``right[i]``. Images are gathered chunk by chunk, so
    the ``B * K`` repeated inputs never exist all at once.
    """
    count = len(left_index) if left_index is not None else left.shape[0]
    fields = []
    for begin in range(0, count, max(1, chunk_size)):
        chunk = slice(begin, begin + max(1, chunk_size))
        source = left[chunk] if left_index is None else left[left_index[chunk]]
        target = right[chunk] if right_index is None else right[right_index[chunk]]
        fields.append(match_fn(source, target).grid_src_to_trg)
    return torch.cat(fields)


def _cell_points(field: torch.Tensor, image_size: tuple[int, int], batch_size: int) -> torch.Tensor:
    """Every source cell centre of a ``(.., 2, h, w)`` field, in pixels: ``(B, h * w, 2)``."""
    height, width = field.shape[-2:]
    centres = cell_centers(height, width, device=field.device, dtype=field.dtype)
    return grid_to_pixels(centres, image_size).repeat(batch_size, 1, 1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values (B, N)`` over the True entries of ``mask`` per row (all entries when None)."""
    if mask is None:
        return values.mean(dim=1)
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)

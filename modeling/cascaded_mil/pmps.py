"""Pseudo matching pair selection (PMPS) of cascaded online correspondence refinement.

Huang et al., *Weakly Supervised Learning of Semantic Correspondence through Cascaded Online
Correspondence Refinement*, ICCV 2023, pick the pseudo labels of each stage from its matching
volume: the volume is re-scored by regularised Hough matching (Min et al., ICCV 2019), restricted
to pairs whose two cells are salient foreground, and the best pairs are taken one-to-one.

The paper publishes no code. Reconstructed here: the greedy one-to-one assignment (the best
remaining pair, then its row and column are removed), its tie rule, the optional spatial
suppression of source cells near a better pick, and the order "RHM on the whole volume, then the
foreground restriction".
"""

from __future__ import annotations

import torch

from ..ops.geometry import cell_axes, cell_centers, grid_to_pixels
from ..ops.rhm import regularized_hough_matching
from .saliency import saliency_on_grid


def greedy_one_to_one(
    scores: torch.Tensor,
    k: int,
    valid: torch.Tensor | None = None,
    *,
    source_shape: tuple[int, int] | None = None,
    nms_radius: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick ``k`` pairs greedily: the best remaining score, then remove its row and its column.

    Vectorised over the batch; each of the ``k`` picks is one arg-max over the ``N_s x N_t``
    scores and two masked writes, so the cost is ``O(k * N_s * N_t)``.

    Ties are broken by the lowest flat index ``s * N_t + t`` (the first maximum of ``argmax``):
    the lowest source cell first, then the lowest target cell.

    Args:
        scores: ``(B, N_s, N_t)``; entries that are ``-inf`` or NaN are never picked.
        k: number of pairs to pick.
        valid: optional ``(B, N_s, N_t)`` (or broadcastable) bool; ``False`` entries are never picked.
        source_shape: ``(h_s, w_s)`` of the row-major source cells; needed when ``nms_radius > 0``.
        nms_radius: also remove every source row within this many cells (Chebyshev distance, the
            square window of :func:`~semcorr.modeling.ops.select_mutual_matches`) of each pick, so
            later (worse) picks cannot sit next to a better one. 0: one-to-one only.

    Returns:
        ``(source_index (B, k) long, target_index (B, k) long, score (B, k), found (B, k) bool)``
        in pick order (non-increasing score). ``found`` is False for the slots left when fewer
        than ``k`` pairs remain; those slots hold index 0 and score 0.
    """
    batch_size, num_source, num_target = scores.shape
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if nms_radius > 0 and (source_shape is None or source_shape[0] * source_shape[1] != num_source):
        raise ValueError(f"nms_radius needs source_shape (h_s, w_s) with h_s * w_s = {num_source}, got {source_shape}")
    # One detached working copy: picked rows, picked columns and invalid entries become -inf.
    # (masked_fill always returns a new tensor, never a view of ``scores``)
    work = scores.detach().masked_fill(scores.detach().isnan(), float("-inf"))
    if valid is not None:
        work = work.masked_fill(~valid.bool(), float("-inf"))
    work = work.contiguous()  # the arg-max reads it flat
    batch = torch.arange(batch_size, device=scores.device)
    source_yx = _row_major_coords(source_shape, scores.device) if nms_radius > 0 else None

    source_index, target_index, found = [], [], []
    for _ in range(min(k, num_source, num_target)):  # then every row or every column is used up
        flat = work.view(batch_size, -1).argmax(dim=1)  # first maximum: the documented tie rule
        has_pair = work.view(batch_size, -1).gather(1, flat[:, None])[:, 0] > float("-inf")
        row, column = flat // num_target, flat % num_target
        if source_yx is None:
            work[batch, row] = float("-inf")
        else:
            near = (source_yx[None] - source_yx[row][:, None]).abs().amax(dim=-1) <= nms_radius  # (B, N_s)
            work.masked_fill_(near[:, :, None], float("-inf"))
        work[batch, :, column] = float("-inf")
        source_index.append(row)
        target_index.append(column)
        found.append(has_pair)
    return _stack_picks(source_index, target_index, found, k, scores)


def _row_major_coords(shape: tuple[int, int], device) -> torch.Tensor:
    """``(h * w, 2)`` integer (row, column) of every row-major cell."""
    height, width = shape
    index = torch.arange(height * width, device=device)
    return torch.stack([index // width, index % width], dim=-1)


def _stack_picks(source_index, target_index, found, k, scores):
    """Stack the per-pick lists into ``(B, k)`` tensors (padding when ``k > min(N_s, N_t)``) and read
    the picked scores from the original tensor, so they keep its autograd graph."""
    batch_size, _, num_target = scores.shape
    pad = k - len(found)
    long_pad = [torch.zeros(batch_size, dtype=torch.long, device=scores.device)] * pad
    found = torch.stack(found + [torch.zeros(batch_size, dtype=torch.bool, device=scores.device)] * pad, dim=1)
    # Padding slots point at cell 0 with score 0, so downstream gathers and sums stay finite.
    source = torch.stack(source_index + long_pad, dim=1).masked_fill(~found, 0)
    target = torch.stack(target_index + long_pad, dim=1).masked_fill(~found, 0)
    score = scores.flatten(1).gather(1, source * num_target + target)
    return source, target, torch.where(found, score, torch.zeros_like(score)), found


def foreground_on_grid(saliency: torch.Tensor | None, shape: tuple[int, int], threshold: float) -> torch.Tensor | None:
    """``(B, h * w)`` bool foreground of a saliency map ``(B, H', W')`` in ``[0, 1]`` (None: no mask).

    A map at another resolution is resampled to the ``h x w`` cells first (bilinear, anti-aliased
    when shrinking, so a cell gets the mean saliency of the pixels it covers).
    """
    if saliency is None:
        return None
    if saliency.dim() != 3:
        raise ValueError(f"saliency must be (B, H, W), got {tuple(saliency.shape)}")
    return (saliency_on_grid(saliency, shape) >= threshold).flatten(1)


def select_pseudo_pairs(
    volume: torch.Tensor,
    source_shape: tuple[int, int],
    target_shape: tuple[int, int],
    source_image_size: tuple[int, int],
    target_image_size: tuple[int, int],
    k: int,
    *,
    use_rhm: bool = True,
    hough_kernel_size: int = 5,
    hough_bins: int = 8192,
    source_saliency: torch.Tensor | None = None,
    target_saliency: torch.Tensor | None = None,
    saliency_threshold: float = 0.5,
    nms_radius: int = 0,
) -> dict[str, torch.Tensor]:
    """PMPS: the ``k`` best one-to-one foreground pairs of a matching volume after RHM.

    Steps: clamp the volume at 0; re-score it with
    :func:`~semcorr.modeling.ops.regularized_hough_matching` (``use_rhm``), whose Gaussian
    smoothing side is the paper's "hyperpixel length" ``L`` (3, 5 or 7); keep the pairs whose
    source and target cells are both foreground (saliency ``>= saliency_threshold``; without a
    saliency map every cell is foreground); then :func:`greedy_one_to_one`, optionally suppressing
    source cells within ``nms_radius`` cells of a better pick.

    RHM votes with the whole clamped volume, background included, before the foreground mask
    (a reconstruction choice): the saliency map decides which pairs may be *picked*, not which
    ones shape the geometric consensus.

    Args:
        volume: ``(B, N_s, N_t)`` matching scores between row-major cells, ``N = h * w``.
        source_shape, target_shape: ``(h, w)`` of the source and target cell grids.
        source_image_size, target_image_size: ``(H, W)`` of the model inputs in pixels.
        k: pairs per image pair.
        source_saliency, target_saliency: optional ``(B, H', W')`` maps in ``[0, 1]``; resampled
            to the cell grid when ``(H', W') != (h, w)``.

    Returns:
        A dict of ``(B, k)`` / ``(B, k, 2)`` tensors in pick order: ``source_index``,
        ``target_index`` (cell indices, long), ``source_grid_points``, ``target_grid_points``
        (cell centres, grid units), ``source_pixels``, ``target_pixels`` (cell centres, model-input
        pixels ``(x, y)``), ``scores`` (the re-scored values that ranked the pairs), ``similarity``
        (the volume's own values at the pairs) and ``found`` (False for padding slots, which
        point at cell 0 with score 0).
    """
    (h_s, w_s), (h_t, w_t) = source_shape, target_shape
    if volume.dim() != 3 or volume.shape[1:] != (h_s * w_s, h_t * w_t):
        raise ValueError(f"volume {tuple(volume.shape)} does not match grids {h_s}x{w_s} and {h_t}x{w_t}")
    similarity = volume.clamp_min(0)
    scores = similarity
    if use_rhm:
        scores = regularized_hough_matching(
            similarity,
            cell_axes(h_s, w_s, source_image_size, device=volume.device, dtype=volume.dtype),
            cell_axes(h_t, w_t, target_image_size, device=volume.device, dtype=volume.dtype),
            source_image_size, target_image_size, num_bins=hough_bins, kernel_size=hough_kernel_size,
        )
    valid = _foreground_pairs(source_saliency, target_saliency, source_shape, target_shape, saliency_threshold)
    source_index, target_index, picked, found = greedy_one_to_one(
        scores, k, valid, source_shape=source_shape, nms_radius=nms_radius
    )
    return _pairs_output(volume, source_index, target_index, picked, found, source_shape, target_shape,
                         source_image_size, target_image_size)


def _foreground_pairs(source_saliency, target_saliency, source_shape, target_shape, threshold):
    """``(B, N_s, N_t)`` bool, both cells foreground (None when neither image has a saliency map)."""
    source = foreground_on_grid(source_saliency, source_shape, threshold)
    target = foreground_on_grid(target_saliency, target_shape, threshold)
    if source is None and target is None:
        return None
    if source is None:
        return target[:, None, :]
    if target is None:
        return source[:, :, None]
    return source[:, :, None] & target[:, None, :]


def _pairs_output(volume, source_index, target_index, picked, found, source_shape, target_shape,
                  source_image_size, target_image_size) -> dict[str, torch.Tensor]:
    """Cell indices -> the coordinates and values :func:`select_pseudo_pairs` returns."""
    source_centers = cell_centers(*source_shape, device=volume.device, dtype=volume.dtype)
    target_centers = cell_centers(*target_shape, device=volume.device, dtype=volume.dtype)
    source_grid, target_grid = source_centers[source_index], target_centers[target_index]  # (B, k, 2)
    flat = source_index * volume.shape[2] + target_index
    similarity = volume.flatten(1).gather(1, flat).masked_fill(~found, 0.0)
    return {
        "source_index": source_index,
        "target_index": target_index,
        "source_grid_points": source_grid,
        "target_grid_points": target_grid,
        "source_pixels": grid_to_pixels(source_grid, source_image_size),
        "target_pixels": grid_to_pixels(target_grid, target_image_size),
        "scores": picked,
        "similarity": similarity,
        "found": found,
    }

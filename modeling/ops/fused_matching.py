"""Correlation, regularised Hough matching and arg-max refinement in both directions, fused.

Hyperpixel Flow (Min et al., ICCV 2019) scores a match (i, j) by ``s(i, j) * H[bin(i, j)]``: the
clamped cosine similarity raised to a power, times the smoothed Hough vote of its translation
bin. The matcher only needs, per source cell, the best target and, per target cell, the best
source, each with the scores around it for the sub-cell refinement (the local kernel
soft-argmax of Lee et al., SFNet, CVPR 2019). Materialising the confidence volume and reducing
it twice (once transposed) costs several ``N_s x N_t`` temporaries; here one similarity volume is
stored and everything else runs over blocks of whole source columns:

1. per block, a matrix product fills the volume's rows, which are clamped and raised to the
   power in place (with a lower-precision ``compute_dtype``, the product goes to the block buffer
   and is widened into the volume while in cache). Source cells are ordered column by column,
   each column bottom-up, so the cells of one source column with one target row are consecutive
   and one ``index_add`` per block sums the votes over row pairs without a reordering copy;
2. the histogram is summed over column pairs and smoothed once (it needs every similarity);
3. per block: confidences ``s * H[bin]`` in a block buffer, their row maxima, arg-maxima and sums
   (source -> target) and, per source row, their column maxima (target -> source). When the y
   bin depends only on the row offset (equal grids), a block's support is a strided view of a
   small table (bottom-up rows make both strides positive); otherwise it is gathered row by row;
4. the first source of each column maximum and the scores around every arg-max are read back
   from the volume and the histogram; with the row sums they give each source cell's absolute
   confidence (:func:`~.matches.match_confidence`).

Every float is computed by the same operation, on the same operands, as in the unfused
``dense_cosine_correlation`` -> ``regularized_hough_matching`` -> ``local_soft_argmax`` path
(a matrix product's entries do not depend on the order of its rows, and the histogram is summed
in the same order), so the two give the same fields; arg-max ties go to the first cell in both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .matches import SCORE_RADIUS, match_confidence
from .rhm import hough_bins, smooth_hough_space, vote_rows
from .soft_argmax import Neighbourhood, arg_max_neighbourhood, soft_argmax_around

# Floats per block (16 MiB): large enough that the per-block dispatch overhead (a dozen operator
# calls) is small against the work, small enough to stay in cache between the passes over it.
BLOCK_ELEMENTS = 1 << 22


class DenseFields(NamedTuple):
    """Refined best matches both ways."""

    grid_src_to_trg: torch.Tensor  # (B, 2, h_s, w_s) target position of every source cell, grid units
    best_src_to_trg: torch.Tensor  # (B, N_s) best score of every source cell over the target
    grid_trg_to_src: torch.Tensor  # (B, 2, h_t, w_t)
    best_trg_to_src: torch.Tensor  # (B, N_t)
    confidence_src_to_trg: torch.Tensor  # (B, N_s) absolute confidence of every source cell's match (match_confidence)


def fused_hough_matching(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    source_grid: tuple[torch.Tensor, torch.Tensor],
    target_grid: tuple[torch.Tensor, torch.Tensor],
    source_size: tuple[float, float],
    target_size: tuple[float, float],
    power: float = 3.0,
    num_bins: int | None = 8192,
    kernel_size: int = 7,
    radius: int = 1,
    beta: float = 20.0,
    block_elements: int = BLOCK_ELEMENTS,
    workspace: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> DenseFields:
    """Dense fields both ways from two feature maps, holding one ``N_s x N_t`` volume.

    Equal to ``local_soft_argmax`` of ``regularized_hough_matching(dense_cosine_correlation(...,
    normalize=False).clamp_min(0).pow(power))`` and of its transpose.

    Args:
        source_features: ``(B, C, h_s, w_s)``, unit norm over channels (the dot product is the cosine).
        target_features: ``(B, C, h_t, w_t)``.
        source_grid, target_grid: ``(xs, ys)`` pixel coordinates of the cell centres.
        source_size, target_size: ``(height, width)`` of the images in those pixel units.
        power: exponent of the clamped cosine similarity.
        num_bins: approximate number of Hough bins; ``None``: no RHM (scores = similarities).
        kernel_size: side of the Gaussian that smooths the histogram.
        radius, beta: neighbourhood and temperature of the sub-cell refinement.
        block_elements: floats per block buffer (whole source columns; at least one column).
        workspace: optional contiguous buffer of the features' dtype and device for the
            similarity volume (at least ``B * N_s * N_t`` elements) and, with
            :func:`workspace_size` elements, the block buffer too. A caller that matches
            repeatedly can pass the same one: on the CPU, the page faults of fresh allocations
            of that size cost about as much as the RHM work.
        compute_dtype: dtype of the correlation's matrix product (``None``: the features'). The
            volume and everything after it stay in the features' dtype; see
            :func:`~.correlation.correlation_compute_dtype`.

    Returns:
        :class:`DenseFields`.
    """
    batch_size, _, h_s, w_s = source_features.shape
    h_t, w_t = target_features.shape[-2:]
    num_source, num_target = h_s * w_s, h_t * w_t
    columns_per_block = _columns_per_block(batch_size, (h_s, w_s), (h_t, w_t), block_elements)
    blocks = [(start, min(w_s, start + columns_per_block)) for start in range(0, w_s, columns_per_block)]
    volume_numel, block_numel = batch_size * num_source * num_target, batch_size * columns_per_block * h_s * num_target
    if workspace is not None and workspace.numel() >= volume_numel:
        similarity = workspace[:volume_numel].view(batch_size, num_source, num_target)
    else:
        similarity = source_features.new_empty(batch_size, num_source, num_target)
    if workspace is not None and workspace.numel() >= volume_numel + block_numel:
        block_buffer = workspace[volume_numel : volume_numel + block_numel]
    else:
        block_buffer = similarity.new_empty(block_numel)

    bins = None if num_bins is None else hough_bins(
        source_grid, target_grid, source_size, target_size, num_bins, similarity.dtype, similarity.device
    )
    operands = _correlation_operands(source_features, target_features, compute_dtype or source_features.dtype)
    hough = _power_and_vote(similarity, operands, block_buffer, blocks, power, bins, (h_s, w_s), (h_t, w_t), kernel_size)
    score = _Scores(similarity, hough, bins, (h_s, w_s), (h_t, w_t))
    forward_value, forward_index, forward_total, column_value_per_row = _block_maxima(score, blocks, block_buffer)
    # First source row (top-down) holding each column maximum, then the first cell in that row.
    backward_value, backward_row = column_value_per_row.flip(1).max(dim=1)
    backward_index = _first_in_row(score, backward_row, backward_value)

    # Source -> target in the volume's order, reordered to row-major at the end.
    around = arg_max_neighbourhood(forward_index, (h_t, w_t), radius)
    grid_src_to_trg = soft_argmax_around(score.around_targets(around), forward_value, around, (h_t, w_t), beta)
    around = arg_max_neighbourhood(forward_index, (h_t, w_t), SCORE_RADIUS)
    forward_confidence = match_confidence(
        similarity.gather(2, forward_index[..., None])[..., 0], score.around_targets(around), around, forward_total, power
    )
    around = arg_max_neighbourhood(backward_index, (h_s, w_s), radius)
    grid_trg_to_src = soft_argmax_around(score.around_sources(around), backward_value, around, (h_s, w_s), beta)

    def row_major(per_source_cell):  # (B, N_s) in volume order -> row-major
        return per_source_cell.view(batch_size, w_s, h_s).flip(-1).transpose(1, 2).reshape(batch_size, h_s * w_s)

    return DenseFields(
        grid_src_to_trg.view(batch_size, 2, w_s, h_s).flip(-1).transpose(2, 3).contiguous(),
        row_major(forward_value), grid_trg_to_src.view(batch_size, 2, h_t, w_t), backward_value,
        row_major(forward_confidence),
    )


def workspace_size(batch_size: int, source_shape, target_shape, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Elements of a ``workspace`` that holds the volume and the block buffer of
    :func:`fused_hough_matching` for ``(h, w)`` source and target maps."""
    (h_s, w_s), (h_t, w_t) = source_shape, target_shape
    columns_per_block = _columns_per_block(batch_size, source_shape, target_shape, block_elements)
    return batch_size * h_s * (w_s + columns_per_block) * h_t * w_t


def _columns_per_block(batch_size, source_shape, target_shape, block_elements) -> int:
    """Whole source columns per block: at least one, at most all."""
    (h_s, w_s), (h_t, w_t) = source_shape, target_shape
    return min(w_s, max(1, block_elements // (batch_size * h_s * h_t * w_t)))


def _correlation_operands(source_features, target_features, compute_dtype):
    """The matrix product's operands in ``compute_dtype``: source cells column by column, bottom-up
    (volume row ``xs * h_s + (h_s - 1 - ys)``) ``(B, N_s, C)``, and target cells ``(B, C, N_t)``."""
    source = source_features.to(compute_dtype)  # narrower first: the reordering copy moves fewer bytes
    source = source.flip(-2).transpose(-1, -2).contiguous().flatten(2).transpose(1, 2)
    return source, target_features.flatten(2).to(compute_dtype)


def _power_and_vote(similarity, operands, block_buffer, blocks, power, bins, source_shape, target_shape, kernel_size):
    """Fill the volume with the dot products of ``operands``, clamped and raised to ``power``, block
    by block, and vote: the smoothed histogram ``(B, bins_y, bins_x)``, or ``None`` without ``bins``."""
    batch_size, (h_s, w_s), (h_t, w_t) = similarity.shape[0], source_shape, target_shape
    source, target = operands
    if bins is not None:
        bin_y, bin_x, (bins_y, bins_x) = bins
        votes_y = similarity.new_zeros(batch_size, w_s, bins_y, w_t)
    for start, end in blocks:
        # Per block, so that the votes read it while it is still in cache.
        rows = slice(start * h_s, end * h_s)
        block = similarity[:, rows]
        if source.dtype == similarity.dtype:
            torch.bmm(source[:, rows], target, out=block).clamp_min_(0)
        else:  # the narrower product in the (not yet used) block buffer, clamped there (exact), widened
            product = block_buffer.view(source.dtype)[: block.numel()].view(block.shape)
            block.copy_(torch.bmm(source[:, rows], target, out=product).clamp_min_(0))
        block.pow_(power)
        if bins is not None:
            vote_rows(block.view(batch_size, end - start, h_s * h_t, w_t), bin_y.flip(0), votes_y[:, start:end])
    return None if bins is None else smooth_hough_space(votes_y, bin_x, bins_x, kernel_size)


class _Scores:
    """Confidences of the stored volume (source columns bottom-up): whole blocks or chosen pairs."""

    offset_table = None

    def __init__(self, similarity, hough, bins, source_shape, target_shape):
        self.similarity, self.hough = similarity, hough
        self.source_shape, self.target_shape = source_shape, target_shape
        if hough is not None:
            bin_y, self.bin_x, _ = bins
            self.bin_y_up = bin_y.flip(0)
            # hough_columns[b, xs, by, xt] = hough[b, by, bin_x[xs, xt]] (w_s x bins_y x w_t, small)
            self.hough_columns = hough[:, :, self.bin_x].permute(0, 2, 1, 3).contiguous()
            self.offset_table = _offset_table(self.hough_columns, self.bin_y_up)

    def block(self, start: int, end: int, buffer: torch.Tensor) -> torch.Tensor:
        """``(B, (end - start) * h_s, N_t)`` confidences of source columns ``start:end``."""
        similarity = self.similarity[:, start * self.source_shape[0] : end * self.source_shape[0]]
        if self.hough is None:
            return similarity
        batch_size, h_s, (h_t, w_t) = similarity.shape[0], self.source_shape[0], self.target_shape
        scores = buffer[: similarity.numel()].view(batch_size, end - start, h_s, h_t * w_t)
        if self.offset_table is not None:
            table = self.offset_table[:, start:end]
            support = table.as_strided(scores.shape, (*table.stride()[:2], w_t, 1), table.storage_offset())
            torch.mul(similarity.view_as(scores), support, out=scores)
        else:  # row bin_y_up[i, yt] of hough_columns[xs], one whole target row per (i, yt)
            torch.index_select(self.hough_columns[:, start:end], 2, self.bin_y_up.reshape(-1),
                               out=scores.view(batch_size, end - start, h_s * h_t, w_t))
            scores.mul_(similarity.view_as(scores))
        return scores.view_as(similarity)

    def _support(self, source_rows, source_cols, target_rows, target_cols):
        """Smoothed votes of the bins of (rows x cols) pairs, source rows bottom-up: the index
        tensors broadcast to ``(B, N, R)`` rows and ``(B, N, C)`` columns; returns ``(B, N, R * C)``."""
        bins_x = self.hough.shape[-1]
        row_bins = self.bin_y_up[source_rows, target_rows] * bins_x
        col_bins = self.bin_x[source_cols, target_cols]
        flat_bin = (row_bins[..., :, None] + col_bins[..., None, :]).flatten(-2)
        flat_bin = flat_bin.expand(self.hough.shape[0], *flat_bin.shape[1:])
        return torch.gather(self.hough.flatten(1), 1, flat_bin.flatten(1)).view(flat_bin.shape)

    def around_targets(self, around: Neighbourhood) -> torch.Tensor:
        """``(B, N_s, K)`` scores of every source cell (volume order) with the target cells ``around`` it."""
        scores = torch.gather(self.similarity, 2, around.index)
        if self.hough is None:
            return scores
        cell = torch.arange(scores.shape[1], device=scores.device)[None, :, None]
        h_s = self.source_shape[0]
        return scores * self._support(cell % h_s, cell // h_s, around.rows, around.cols)

    def around_sources(self, around: Neighbourhood) -> torch.Tensor:
        """``(B, N_t, K)`` scores of every target cell with the source cells ``around`` it (row-major)."""
        h_s = self.source_shape[0]
        up_rows = h_s - 1 - around.rows
        volume_rows = around.cols[..., None, :] * h_s + up_rows[..., :, None]  # (B, N_t, 2r+1, 2r+1)
        # Contiguous, as local_soft_argmax's gather on the transposed volume gives them.
        scores = torch.gather(self.similarity, 1, volume_rows.flatten(-2).transpose(1, 2)).transpose(1, 2).contiguous()
        if self.hough is None:
            return scores
        cell = torch.arange(scores.shape[1], device=scores.device)[None, :, None]
        w_t = self.target_shape[1]
        return scores * self._support(up_rows, around.cols, cell // w_t, cell % w_t)

    def source_row(self, row: torch.Tensor) -> torch.Tensor:
        """``(B, w_s, N_t)``: every target cell with each cell of its source row ``row (B, N_t)`` (top-down)."""
        (h_s, w_s), (h_t, w_t) = self.source_shape, self.target_shape
        up_row = h_s - 1 - row
        columns = torch.arange(w_s, device=row.device)
        scores = torch.gather(self.similarity, 1, up_row[:, None, :] + (columns * h_s)[:, None])
        if self.hough is None:
            return scores
        row_bins = self.bin_y_up[up_row.view(-1, h_t, w_t), torch.arange(h_t, device=row.device)[:, None]]
        flat_bin = (row_bins * self.hough.shape[-1]).view(-1, 1, h_t * w_t) + self.bin_x.repeat(1, h_t)
        return scores * torch.gather(self.hough.flatten(1), 1, flat_bin.flatten(1)).view_as(scores)


def _offset_table(hough_columns: torch.Tensor, bin_y_up: torch.Tensor) -> torch.Tensor | None:
    """``(B, w_s, h_s + h_t - 1, w_t)`` table with ``support[xs, i, yt, xt] = table[xs, i + yt, xt]``
    when the y bin depends on the row offset only (equal grids), else ``None``.

    With source rows bottom-up (``i = h_s - 1 - ys``), the offset ``yt - ys`` is ``i + yt - (h_s - 1)``:
    both strides of a block's support view are positive.
    """
    h_s, h_t = bin_y_up.shape
    diagonal = torch.cat([bin_y_up[:, 0], bin_y_up[-1, 1:]])  # the bin of i + yt = d
    offsets = torch.arange(h_s, device=diagonal.device)[:, None] + torch.arange(h_t, device=diagonal.device)
    if not torch.equal(diagonal[offsets], bin_y_up):
        return None
    return torch.index_select(hough_columns, 2, diagonal)


def _block_maxima(score: _Scores, blocks, block_buffer):
    """Row maxima, arg-maxima and sums ``(B, N_s)`` (volume order) and, per source row (bottom-up),
    the column maxima ``(B, h_s, N_t)``."""
    similarity = score.similarity
    batch_size, num_source, num_target = similarity.shape
    h_s = score.source_shape[0]
    row_value = similarity.new_empty(batch_size, num_source)
    row_index = torch.empty(batch_size, num_source, dtype=torch.long, device=similarity.device)
    row_total = similarity.new_empty(batch_size, num_source)
    # Column maxima per source row by amax (a max with indices over an outer dimension is several
    # times slower); the first source holding each column's maximum is found once, at the end.
    column_value_per_row = similarity.new_full((batch_size, h_s, num_target), float("-inf"))
    for start, end in blocks:
        scores = score.block(start, end, block_buffer)
        rows = slice(start * h_s, end * h_s)
        torch.max(scores, dim=2, out=(row_value[:, rows], row_index[:, rows]))
        torch.sum(scores, dim=2, out=row_total[:, rows])
        block_max = scores.view(batch_size, end - start, h_s, num_target).amax(dim=1)
        torch.maximum(column_value_per_row, block_max, out=column_value_per_row)
    return row_value, row_index, row_total, column_value_per_row


def _first_in_row(score: _Scores, source_row, best_value):
    """First cell (row-major) of each column's source row ``source_row (B, N_t)`` whose score
    equals the column maximum: ``(B, N_t)``."""
    hits = score.source_row(source_row) == best_value[:, None, :]  # (B, w_s, N_t)
    w_s = score.source_shape[1]
    columns = torch.arange(w_s, device=hits.device)[:, None]
    # The smallest hit column (an arg-max over this strided dim is several times slower).
    return source_row * w_s + torch.where(hits, columns, w_s).amin(dim=1)

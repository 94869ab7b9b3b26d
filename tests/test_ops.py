"""Shared correspondence ops, each checked against a naive reference or a hand-built case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semcorr.modeling import (
    cell_centers,
    dense_cosine_correlation,
    gaussian_kernel2d,
    grid_to_pixels,
    identity_grid,
    kernel_soft_argmax,
    pixels_to_grid,
    regularized_hough_matching,
    sample_grid_at,
    select_mutual_matches,
    transfer_keypoints,
)
from semcorr.modeling.ops.geometry import cell_axes
from semcorr.modeling.ops.soft_argmax import local_soft_argmax


def _cell_x(index, n):
    """Centre of cell ``index`` of ``n`` in grid units (align_corners=False)."""
    return (index + 0.5) * 2.0 / n - 1.0


# -- correlation --------------------------------------------------------------------------------
def test_dense_cosine_correlation_equals_naive_loop():
    torch.manual_seed(0)
    source, target = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 2, 3)
    correlation = dense_cosine_correlation(source, target)
    assert correlation.shape == (2, 12, 6)
    for b in range(2):
        for i in range(12):
            for j in range(6):
                s = source[b, :, i // 4, i % 4]
                t = target[b, :, j // 3, j % 3]
                expected = torch.dot(s, t) / (s.norm() * t.norm())
                assert correlation[b, i, j].item() == pytest.approx(expected.item(), abs=1e-5)


def test_dense_cosine_correlation_chunked_equals_unchunked():
    torch.manual_seed(1)
    source, target = torch.randn(2, 8, 5, 7), torch.randn(2, 8, 4, 6)
    whole = dense_cosine_correlation(source, target, chunk_size=None)
    for chunk in (1, 3, 34):
        assert torch.allclose(dense_cosine_correlation(source, target, chunk_size=chunk), whole, atol=1e-6)


def test_dense_cosine_correlation_normalize_false_is_plain_dot_product():
    torch.manual_seed(2)
    source, target = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    raw = dense_cosine_correlation(source, target, normalize=False)
    expected = torch.einsum("ci,cj->ij", source[0].flatten(1), target[0].flatten(1))
    assert torch.allclose(raw[0], expected, atol=1e-5)
    normalised = dense_cosine_correlation(F.normalize(source, dim=1), F.normalize(target, dim=1), normalize=False)
    assert torch.allclose(normalised, dense_cosine_correlation(source, target), atol=1e-6)


def test_dense_cosine_correlation_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="share batch and channels"):
        dense_cosine_correlation(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2))


# -- kernel soft-argmax -------------------------------------------------------------------------
def _peaked(source_size, target_size, targets):
    """Correlation (1, Ns, Nt) with value 1 at ``targets[i]`` (a list of target indices) per source."""
    ns, nt = source_size[0] * source_size[1], target_size[0] * target_size[1]
    correlation = torch.zeros(1, ns, nt)
    for i, cells in enumerate(targets):
        for j in cells:
            correlation[0, i, j] = 1.0
    return correlation


def test_kernel_soft_argmax_recovers_known_grid():
    source_size, target_size = (2, 3), (4, 5)  # non-square, different sizes
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randperm(20, generator=generator)[:6].tolist()
    grid = kernel_soft_argmax(_peaked(source_size, target_size, [[j] for j in chosen]), source_size, target_size)
    assert grid.shape == (1, 2, 2, 3)
    expected_x = torch.tensor([_cell_x(j % 5, 5) for j in chosen]).view(2, 3)
    expected_y = torch.tensor([_cell_x(j // 5, 4) for j in chosen]).view(2, 3)
    assert torch.allclose(grid[0, 0], expected_x, atol=1e-5)
    assert torch.allclose(grid[0, 1], expected_y, atol=1e-5)


def test_kernel_soft_argmax_two_equal_neighbours_give_midpoint():
    source_size, target_size = (1, 2), (4, 6)
    # source 0: cells (x=1, y=2) and (x=2, y=2); source 1: cells (x=4, y=0) and (x=4, y=1).
    correlation = _peaked(source_size, target_size, [[2 * 6 + 1, 2 * 6 + 2], [0 * 6 + 4, 1 * 6 + 4]])
    grid = kernel_soft_argmax(correlation, source_size, target_size, sigma=0)
    assert grid[0, 0, 0, 0].item() == pytest.approx((_cell_x(1, 6) + _cell_x(2, 6)) / 2, abs=1e-5)
    assert grid[0, 1, 0, 0].item() == pytest.approx(_cell_x(2, 4), abs=1e-5)
    assert grid[0, 0, 0, 1].item() == pytest.approx(_cell_x(4, 6), abs=1e-5)
    assert grid[0, 1, 0, 1].item() == pytest.approx((_cell_x(0, 4) + _cell_x(1, 4)) / 2, abs=1e-5)


def test_kernel_soft_argmax_window_suppresses_distant_peak():
    source_size, target_size = (1, 1), (1, 9)
    correlation = _peaked(source_size, target_size, [[1, 7]])  # two equal peaks 6 cells apart
    correlation[0, 0, 1] = 1.0 + 1e-3  # the arg-max
    windowed = kernel_soft_argmax(correlation, source_size, target_size, sigma=1.0)
    unwindowed = kernel_soft_argmax(correlation, source_size, target_size, sigma=0)
    assert windowed[0, 0, 0, 0].item() == pytest.approx(_cell_x(1, 9), abs=1e-4)
    assert unwindowed[0, 0, 0, 0].item() == pytest.approx((_cell_x(1, 9) + _cell_x(7, 9)) / 2, abs=0.05)


def test_kernel_soft_argmax_align_corners_uses_linspace():
    source_size, target_size = (1, 3), (3, 5)
    chosen = [0, 7, 14]  # (x, y) = (0, 0), (2, 1), (4, 2)
    grid = kernel_soft_argmax(_peaked(source_size, target_size, [[j] for j in chosen]), source_size, target_size,
                              align_corners=True)
    xs, ys = torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 3)
    assert torch.allclose(grid[0, 0, 0], torch.stack([xs[0], xs[2], xs[4]]), atol=1e-5)
    assert torch.allclose(grid[0, 1, 0], torch.stack([ys[0], ys[1], ys[2]]), atol=1e-5)
    assert grid[0, 0, 0, 0].item() == pytest.approx(-1.0, abs=1e-5)  # corner-aligned, not -0.8


def test_kernel_soft_argmax_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="does not match"):
        kernel_soft_argmax(torch.zeros(1, 6, 20), (2, 2), (4, 5))


def _peaked_with_neighbour(source_size, target_size, seed):
    """Each source row: 1 at a random target cell, 0.6..1 at one random 8-neighbour, 0 elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    (h_t, w_t) = target_size
    ns = source_size[0] * source_size[1]
    correlation = torch.zeros(1, ns, h_t * w_t)
    for i in range(ns):
        x = int(torch.randint(1, w_t - 1, (1,), generator=generator))
        y = int(torch.randint(1, h_t - 1, (1,), generator=generator))
        dx, dy = [(-1, 0), (1, 0), (0, -1), (0, 1), (1, 1), (-1, -1)][i % 6]
        correlation[0, i, y * w_t + x] = 1.0
        correlation[0, i, (y + dy) * w_t + x + dx] = 0.6 + 0.4 * float(torch.rand(1, generator=generator))
    return correlation


def test_local_soft_argmax_agrees_with_kernel_soft_argmax_on_peaked_volume():
    source_size, target_size = (3, 4), (6, 7)
    correlation = _peaked_with_neighbour(source_size, target_size, seed=3)
    local = local_soft_argmax(correlation, source_size, target_size, radius=1, beta=20.0)
    kernel = kernel_soft_argmax(correlation, source_size, target_size, sigma=0, beta=20.0)
    assert torch.allclose(local, kernel, atol=1e-4)
    # Sub-cell: not simply the arg-max cell centre.
    argmax_only = kernel_soft_argmax(correlation, source_size, target_size, sigma=0, beta=1e4)
    assert (local - argmax_only).abs().max() > 0.01
    # Scale invariance of the local version (scores are divided by their row maximum).
    assert torch.allclose(local_soft_argmax(correlation * 7.0, source_size, target_size), local, atol=1e-6)


def test_local_soft_argmax_ignores_distant_peak_like_a_narrow_kernel():
    source_size, target_size = (1, 1), (5, 9)
    correlation = torch.zeros(1, 1, 45)
    correlation[0, 0, 2 * 9 + 2] = 1.0  # arg-max at (2, 2)
    correlation[0, 0, 2 * 9 + 7] = 0.95  # distant peak at (7, 2)
    local = local_soft_argmax(correlation, source_size, target_size)
    narrow = kernel_soft_argmax(correlation, source_size, target_size, sigma=0.5, beta=20.0)
    wide = kernel_soft_argmax(correlation, source_size, target_size, sigma=0, beta=20.0)
    assert torch.allclose(local, narrow, atol=1e-4)
    assert local[0, 0, 0, 0].item() == pytest.approx(_cell_x(2, 9), abs=1e-4)
    assert wide[0, 0, 0, 0].item() > _cell_x(2, 9) + 0.1  # pulled towards the distant peak


def test_local_soft_argmax_border_cells_stay_inside():
    source_size, target_size = (1, 1), (3, 3)
    correlation = torch.zeros(1, 1, 9)
    correlation[0, 0, 0] = 1.0  # corner: half the neighbourhood is outside the map
    grid = local_soft_argmax(correlation, source_size, target_size)
    assert torch.isfinite(grid).all()
    assert grid[0, :, 0, 0].tolist() == pytest.approx([_cell_x(0, 3), _cell_x(0, 3)], abs=1e-4)


# -- regularised Hough matching -----------------------------------------------------------------
def _naive_rhm(similarity, source_size, target_size, source_shape, target_shape, num_bins=8192, side=7):
    """Straightforward RHM: per-pair bins, histogram by index_add_, 7x7 Gaussian, conf = sim * hist."""
    (H_s, W_s), (H_t, W_t) = source_size, target_size
    (h_s, w_s), (h_t, w_t) = source_shape, target_shape
    sx = ((torch.arange(w_s) + 0.5) * W_s / w_s).double()
    sy = ((torch.arange(h_s) + 0.5) * H_s / h_s).double()
    tx = ((torch.arange(w_t) + 0.5) * W_t / w_t).double()
    ty = ((torch.arange(h_t) + 0.5) * H_t / h_t).double()
    # Every source cell i (row-major) with every target cell j.
    src_x, src_y = sx.repeat(h_s), sy.repeat_interleave(w_s)  # (Ns,)
    trg_x, trg_y = tx.repeat(h_t), ty.repeat_interleave(w_t)  # (Nt,)
    cell = math.sqrt((W_s + W_t) * (H_s + H_t) / num_bins)
    bins_x, bins_y = int((W_s + W_t) / cell) + 1, int((H_s + H_t) / cell) + 1
    bin_x = torch.floor((W_s - src_x[:, None] + trg_x[None, :]) / cell).long()
    bin_y = torch.floor((H_s - src_y[:, None] + trg_y[None, :]) / cell).long()
    flat = (bin_y * bins_x + bin_x).reshape(-1)
    sigma = side / 2 / 2.354
    coords = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = g[:, None] * g[None, :]
    kernel = kernel / kernel.sum()
    out = []
    for b in range(similarity.shape[0]):
        sim = similarity[b].double()
        hist = torch.zeros(bins_y * bins_x, dtype=torch.float64).index_add_(0, flat, sim.reshape(-1))
        hist = F.conv2d(hist.view(1, 1, bins_y, bins_x), kernel[None, None], padding=side // 2).view(-1)
        out.append(sim * hist[flat].view_as(sim))
    return torch.stack(out).float()


@pytest.mark.parametrize("num_bins", [8192, 64])
def test_regularized_hough_matching_equals_naive(num_bins):
    torch.manual_seed(4)
    source_shape, target_shape = (4, 6), (5, 3)
    source_size, target_size = (32, 48), (50, 30)
    similarity = torch.rand(2, 24, 15).pow(3)
    got = regularized_hough_matching(
        similarity, cell_axes(*source_shape, source_size), cell_axes(*target_shape, target_size),
        source_size, target_size, num_bins=num_bins,
    )
    expected = _naive_rhm(similarity, source_size, target_size, source_shape, target_shape, num_bins=num_bins)
    assert got.shape == (2, 24, 15)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert got.abs().max() > 0


def test_gaussian_kernel2d_is_normalised_and_symmetric():
    kernel = gaussian_kernel2d(7)
    assert kernel.shape == (7, 7)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(kernel, kernel.T) and torch.allclose(kernel, kernel.flip(0))
    assert kernel[3, 3] == kernel.max()
    # Full width at half maximum = side / 2 = 3.5 cells.
    profile = kernel[3] / kernel[3, 3]
    sigma = 3.5 / 2.354
    assert profile[5].item() == pytest.approx(math.exp(-4 / (2 * sigma**2)), rel=1e-4)


def test_regularized_hough_matching_promotes_consistent_translation_over_outlier():
    shape, size = (6, 6), (48, 48)
    n = 36
    similarity = torch.full((1, n, n), 0.05)
    # Every source cell (x, y) truly matches (x + 1, y) with similarity 0.8...
    for y in range(6):
        for x in range(5):
            similarity[0, y * 6 + x, y * 6 + x + 1] = 0.8
    # ...but source (2, 3) also looks slightly more like a far-away, inconsistent cell (5, 0).
    outlier_source, true_target, outlier_target = 3 * 6 + 2, 3 * 6 + 3, 0 * 6 + 5
    similarity[0, outlier_source, outlier_target] = 0.9
    assert similarity[0, outlier_source].argmax().item() == outlier_target
    confidence = regularized_hough_matching(similarity, cell_axes(*shape, size), cell_axes(*shape, size), size, size,
                                            num_bins=256)
    assert confidence[0, outlier_source].argmax().item() == true_target
    consistent = [y * 6 + x for y in range(6) for x in range(5)]
    assert (confidence[0, consistent].argmax(dim=1) == torch.tensor(consistent) + 1).all()


def test_regularized_hough_matching_rejects_wrong_shape():
    shape, size = (2, 2), (16, 16)
    with pytest.raises(ValueError, match="does not match grids"):
        regularized_hough_matching(torch.rand(1, 4, 5), cell_axes(*shape, size), cell_axes(*shape, size), size, size)


# -- keypoint transfer --------------------------------------------------------------------------
def _random_points(batch, count, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, count, 2, generator=generator) * 1.9 - 0.95


def test_transfer_keypoints_identity_field_keeps_points():
    grid = identity_grid(2, 5, 7)
    points = _random_points(2, 10, 0)
    target, scores = transfer_keypoints(points, grid)
    assert torch.allclose(target, points, atol=1e-5)
    assert torch.allclose(scores, torch.ones(2, 10), atol=1e-5)


def test_transfer_keypoints_constant_shift_shifts_points():
    shift = torch.tensor([0.13, -0.07])
    grid = identity_grid(1, 6, 4) + shift.view(1, 2, 1, 1)
    points = _random_points(1, 12, 1)
    confidence = torch.rand(1, 6, 4) + 0.1
    target, _ = transfer_keypoints(points, grid, confidence)
    assert torch.allclose(target, points + shift, atol=1e-5)


def test_transfer_keypoints_confidence_lets_eight_right_cells_outvote_one_wrong():
    height = width = 5
    shift = torch.tensor([0.2, 0.1])
    grid = identity_grid(1, height, width) + shift.view(1, 2, 1, 1)
    grid[0, :, 2, 2] = torch.tensor([-0.9, 0.9])  # the centre cell is wrong
    point = cell_centers(height, width)[2 * width + 2].view(1, 1, 2)  # exactly on the wrong cell
    confidence = torch.ones(1, height, width)
    confidence[0, 2, 2] = 0.01
    weighted, score = transfer_keypoints(point, grid, confidence, radius=1.5)
    assert (weighted - (point + shift)).norm().item() < 0.02
    unweighted, _ = transfer_keypoints(point, grid, None, radius=1.5)
    assert (unweighted - (point + shift)).norm().item() > 0.2  # the nearest cell dominates without confidence
    assert 0.9 < score.item() <= 1.0


def test_transfer_keypoints_ignores_cells_beyond_radius():
    grid = identity_grid(1, 7, 7)
    grid[0, :, 6, 6] = torch.tensor([-0.9, -0.9])  # wrong, but far from the point
    point = cell_centers(7, 7)[3 * 7 + 3].view(1, 1, 2)
    target, _ = transfer_keypoints(point, grid, radius=1.5)
    assert torch.allclose(target, point, atol=1e-6)


# -- geometry -----------------------------------------------------------------------------------
def test_pixels_to_grid_convention_and_round_trip():
    size = (20, 10)  # (height, width)
    assert pixels_to_grid(torch.tensor([0.5, 0.5]), size).tolist() == pytest.approx([-0.9, -0.95])
    corners = pixels_to_grid(torch.tensor([[0.0, 0.0], [10.0, 20.0]]), size)
    assert torch.allclose(corners, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    points = torch.rand(3, 5, 2) * torch.tensor([10.0, 20.0])
    assert torch.allclose(grid_to_pixels(pixels_to_grid(points, size), size), points, atol=1e-5)
    grid = torch.rand(4, 2) * 2 - 1
    assert torch.allclose(pixels_to_grid(grid_to_pixels(grid, size), size), grid, atol=1e-6)


def test_cell_centers_and_cell_axes_are_consistent():
    height, width, image_size = 3, 5, (30, 40)
    centers = cell_centers(height, width)
    assert centers.shape == (15, 2)
    xs, ys = cell_axes(height, width, image_size)
    assert xs.tolist() == pytest.approx([4.0, 12.0, 20.0, 28.0, 36.0])
    assert ys.tolist() == pytest.approx([5.0, 15.0, 25.0])
    pixel_centers = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).reshape(-1, 2)
    assert torch.allclose(pixels_to_grid(pixel_centers, image_size), centers, atol=1e-6)
    # row-major: index y * width + x
    assert centers[1 * width + 4].tolist() == pytest.approx([_cell_x(4, 5), _cell_x(1, 3)])


def test_identity_grid_and_sample_grid_at():
    grid = identity_grid(2, 4, 6)
    assert grid.shape == (2, 2, 4, 6)
    centers = cell_centers(4, 6)
    assert torch.allclose(grid[1].flatten(1).T, centers)
    inner = torch.rand(2, 9, 2) * torch.tensor([2 * (1 - 1 / 6), 2 * (1 - 1 / 4)]) - torch.tensor([1 - 1 / 6, 1 - 1 / 4])
    assert torch.allclose(sample_grid_at(grid, inner), inner, atol=1e-5)  # bilinear on a linear field
    corner = torch.tensor([[[-1.0, -1.0]]]).expand(2, 1, 2)
    assert torch.allclose(sample_grid_at(grid, corner), centers[0].expand(2, 1, 2), atol=1e-6)  # border padding


# -- sparse mutual matches ----------------------------------------------------------------------
def test_select_mutual_matches_identity_field_sorted_and_spread():
    height, width, k = 8, 10, 12
    generator = torch.Generator().manual_seed(5)
    confidence = torch.rand(1, height, width, generator=generator)
    grid = identity_grid(1, height, width)
    source, target, scores, valid = select_mutual_matches(grid, grid.clone(), confidence, top_k=k, nms_radius=1)
    assert source.shape == (1, k, 2) and target.shape == (1, k, 2) and scores.shape == (1, k) and valid.shape == (1, k)
    assert valid.all()
    assert torch.allclose(source, target, atol=1e-6)
    assert (scores[0, :-1] >= scores[0, 1:]).all()
    # Scores are the confidences of the chosen cells, and those cells are local maxima.
    cells = ((source[0] + 1) / 2 * torch.tensor([width, height]) - 0.5).round().long()
    assert torch.allclose(scores[0], confidence[0, cells[:, 1], cells[:, 0]])
    distance = (cells[:, None, :] - cells[None, :, :]).abs().amax(-1)  # Chebyshev, in cells
    distance.fill_diagonal_(99)
    assert distance.min() > 1
    # The best cell overall is always selected first.
    assert scores[0, 0].item() == pytest.approx(confidence.max().item())


def test_select_mutual_matches_drops_non_mutual_and_pads():
    height, width = 4, 4
    grid_src_to_trg = identity_grid(1, height, width)
    grid_trg_to_src = identity_grid(1, height, width)
    grid_src_to_trg[0, :, 0, 0] = torch.tensor([0.75, 0.75])  # (0,0) -> (3,3), which maps back to (3,3)
    confidence = torch.zeros(1, height, width)
    confidence[0, 0, 0] = 1.0
    confidence[0, 3, 3] = 0.5
    source, target, scores, valid = select_mutual_matches(
        grid_src_to_trg, grid_trg_to_src, confidence, top_k=20, nms_radius=0
    )
    assert source.shape[1] == 16  # k is capped at the number of cells
    chosen = source[0, valid[0]]
    assert not any(torch.allclose(p, torch.tensor([-0.75, -0.75])) for p in chosen)  # the non-mutual cell
    assert int(valid.sum()) == 15
    assert scores[0, 0].item() == pytest.approx(0.5)
    assert (scores[0, ~valid[0]] == 0).all()

"""Synthetic image pairs with known dense correspondence (random warps of unlabelled images).

All warps are expressed as ``grid_trg_to_src``: for every target pixel, where it samples the
source (grid units, ``align_corners=False``), which is what ``torch.nn.functional.grid_sample``
consumes. Vectorised over the batch and seeded through a ``torch.Generator``.

The other direction, ``grid_src_to_trg`` (where every source pixel lands in the target), is exact
for affine maps and homographies (matrix inverses) and numeric (:func:`invert_grid`) for thin-plate
splines. :class:`SyntheticPairGenerator` draws affine / homography / TPS warps, horizontal flips of
the target and colour jitter of the target, and returns both grids with their validity masks;
:func:`semcorr.training.data.images.iter_image_batches` feeds it from a folder of images or a
``datasets`` Image column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from semcorr.modeling.ops.geometry import cell_centers


def random_affine(
    batch_size: int,
    linear_std: float = 0.15,
    translation_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random affine maps ``(B, 2, 3)`` from target to source grid units: ``[I + N(0, s^2) | N(0, t^2)]``."""
    noise = torch.randn(batch_size, 2, 3, generator=generator)
    theta = torch.zeros(batch_size, 2, 3)
    theta[:, :, :2] = torch.eye(2) + linear_std * noise[:, :, :2]
    theta[:, :, 2] = translation_std * noise[:, :, 2]
    return theta


def affine_grid_trg_to_src(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Dense ``grid_trg_to_src`` ``(B, 2, H, W)`` of affine maps ``theta (B, 2, 3)``."""
    height, width = size
    grid = F.affine_grid(theta, [theta.shape[0], 1, height, width], align_corners=False)  # (B, H, W, 2)
    return grid.permute(0, 3, 1, 2)


def warp_images(images: torch.Tensor, grid_trg_to_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``images (B, C, H, W)`` with a dense field ``(B, 2, H', W')``.

    Returns:
        ``(warped (B, C, H', W'), valid (B, H', W'))``: ``valid`` marks target pixels whose source
        location lies inside the source image.
    """
    grid = grid_trg_to_src.permute(0, 2, 3, 1)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = (grid.abs() <= 1).all(dim=-1)
    return warped, valid


def apply_affine(theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``theta (B, 2, 3)`` to points ``(B, N, 2)`` in grid units."""
    return points @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse affine maps ``(B, 2, 3)``."""
    linear_inv = torch.linalg.inv(theta[:, :, :2])
    return torch.cat([linear_inv, -(linear_inv @ theta[:, :, 2:])], dim=2)


# ==================================================================================================
# Synthetic pairs for training a matcher (PMD teacher): affine / homography / TPS warps, flips,
# colour jitter, dense ground truth in both directions.
# ==================================================================================================
#
# Default warp strengths (all in grid units, where the image spans [-1, 1], so 0.1 = 5 % of a side):
#
# * affine:     linear part ``I + N(0, 0.15^2)``, translation ``N(0, 0.1^2)``; a corner moves by
#               ~0.25 grid units (~12 % of the side) on average. Same defaults as ``random_affine``.
# * homography: each image corner moved by ``N(0, 0.15^2)`` per coordinate (~7.5 % of the side).
# * TPS:        a 3 x 3 lattice of control points over [-1, 1]^2, each moved by ``N(0, 0.15^2)``
#               per coordinate (~7.5 % of the side); nothing else is applied on top.
#
# These are moderate, photo-realistic deformations: most of the target stays inside the source
# (typically 80-95 % of the pixels are valid), which is what a dense matcher is trained on. Raise
# them for harder pairs; the numeric inverse (``invert_grid``) stays accurate as long as the warp is
# smooth and one-to-one.

WARP_KINDS = ("affine", "homography", "tps")

# Homogeneous coordinates with |w| below this are behind / at the horizon of the camera: such
# points get the coordinate OUTSIDE_VALUE (far outside [-1, 1]) so every validity mask drops them.
_MIN_HOMOGENEOUS_W = 1e-6
OUTSIDE_VALUE = 4.0


def _pixel_centre_grid(size: tuple[int, int], batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel centres ``(B, H*W, 2)`` (x, y) in grid units, row-major."""
    return cell_centers(*size, device=device, dtype=dtype)[None].expand(batch_size, -1, -1)


def _points_to_field(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, 2)`` row-major points -> ``(B, 2, H, W)`` field."""
    height, width = size
    return points.transpose(1, 2).reshape(points.shape[0], 2, height, width)


def grid_validity(grid: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` bool: the field ``(B, 2, H, W)`` points inside the other image (``|x|, |y| <= 1``)."""
    return (grid.abs() <= 1).all(dim=1)


# -- homography ------------------------------------------------------------------------------------
_UNIT_CORNERS = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])


def homography_from_points(points_from: torch.Tensor, points_to: torch.Tensor) -> torch.Tensor:
    """Homographies ``(B, 3, 3)`` (``H[2, 2] = 1``) mapping 4 points ``(B, 4, 2)`` onto 4 points.

    Solves the 8 x 8 direct linear system of each pair with one batched ``torch.linalg.solve``
    (in float64 for accuracy; the result has the dtype of ``points_to``).
    """
    dtype = points_to.dtype
    source = points_from.to(torch.float64)
    target = points_to.to(torch.float64)
    x, y = source[..., 0], source[..., 1]
    u, v = target[..., 0], target[..., 1]
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)  # (B, 8, 8)
    rhs = torch.cat([u, v], dim=1)  # (B, 8)
    solution = torch.linalg.solve(system, rhs)
    matrix = torch.cat([solution, torch.ones_like(solution[:, :1])], dim=1).reshape(-1, 3, 3)
    return matrix.to(dtype)


def random_homography(
    batch_size: int, strength: float = 0.15, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random target -> source homographies ``(B, 3, 3)`` in grid units.

    The four image corners ``(+-1, +-1)`` of the target map to the corners moved by
    ``N(0, strength^2)`` per coordinate in the source; ``strength = 0`` is the identity.
    """
    corners_trg = _UNIT_CORNERS.expand(batch_size, 4, 2)
    corners_src = corners_trg + strength * torch.randn(batch_size, 4, 2, generator=generator)
    return homography_from_points(corners_trg, corners_src)


def apply_homography(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``matrix (B, 3, 3)`` to points ``(B, N, 2)`` (grid units).

    Points whose homogeneous coordinate is ``<= 1e-6`` (at or behind the horizon) come back as
    ``OUTSIDE_VALUE`` so that validity masks exclude them.
    """
    homogeneous = points @ matrix[:, :, :2].transpose(1, 2) + matrix[:, None, :, 2]
    w = homogeneous[..., 2:]
    ok = w > _MIN_HOMOGENEOUS_W
    mapped = homogeneous[..., :2] / torch.where(ok, w, torch.ones_like(w))
    return torch.where(ok, mapped, torch.full_like(mapped, OUTSIDE_VALUE))


def invert_homography(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse homographies ``(B, 3, 3)`` (``torch.linalg.inv``, renormalised to ``H[2, 2] = 1``)."""
    inverse = torch.linalg.inv(matrix.to(torch.float64))
    return (inverse / inverse[:, 2:, 2:]).to(matrix.dtype)


def homography_grid_trg_to_src(matrix: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Dense ``grid_trg_to_src`` ``(B, 2, H, W)`` of target -> source homographies ``(B, 3, 3)``.

    For the other direction pass ``invert_homography(matrix)``.
    """
    points = _pixel_centre_grid(size, matrix.shape[0], device=matrix.device, dtype=matrix.dtype)
    return _points_to_field(apply_homography(matrix, points), size)


# -- thin-plate spline -----------------------------------------------------------------------------
class TPSParams(NamedTuple):
    """A thin-plate spline from target to source (grid units).

    ``control_trg (B, K, 2)``: control points in the target; ``control_src (B, K, 2)``: where
    they map to in the source. The spline interpolates them exactly and is otherwise as smooth as
    possible (minimum bending energy).
    """

    control_trg: torch.Tensor
    control_src: torch.Tensor


def _tps_kernel(squared_distance: torch.Tensor) -> torch.Tensor:
    """``U(r) = r^2 log r^2`` from ``r^2`` (``U(0) = 0``)."""
    return squared_distance * torch.log(squared_distance.clamp_min(1e-20))


def random_tps(
    batch_size: int,
    num_control: tuple[int, int] = (3, 3),
    strength: float = 0.15,
    generator: torch.Generator | None = None,
) -> TPSParams:
    """Random target -> source thin-plate splines on a ``num_control = (rows, cols)`` lattice.

    The control points form a regular lattice over ``[-1, 1]^2`` in the target (corners
    included); each moves by ``N(0, strength^2)`` per coordinate in the source.
    """
    rows, cols = num_control
    if rows < 2 or cols < 2:
        raise ValueError(f"num_control needs at least 2 x 2 points, got {num_control}")
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, rows), torch.linspace(-1, 1, cols), indexing="ij")
    lattice = torch.stack([xs, ys], dim=-1).reshape(1, -1, 2).expand(batch_size, -1, -1)
    moved = lattice + strength * torch.randn(batch_size, rows * cols, 2, generator=generator)
    return TPSParams(lattice.clone(), moved)


def tps_coefficients(params: TPSParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the ``(K+3) x (K+3)`` TPS systems (batched, float64).

    Returns:
        ``(weights (B, K, 2), affine (B, 3, 2))`` with
        ``f(p) = [1, p] @ affine + sum_k weights_k U(|p - c_k|)``.
    """
    control = params.control_trg.to(torch.float64)
    values = params.control_src.to(torch.float64)
    batch_size, num_points, _ = control.shape
    kernel = _tps_kernel(torch.cdist(control, control).square())  # (B, K, K)
    basis = torch.cat([torch.ones_like(control[..., :1]), control], dim=-1)  # (B, K, 3)
    system = torch.zeros(batch_size, num_points + 3, num_points + 3, dtype=torch.float64, device=control.device)
    system[:, :num_points, :num_points] = kernel
    system[:, :num_points, num_points:] = basis
    system[:, num_points:, :num_points] = basis.transpose(1, 2)
    rhs = torch.cat([values, torch.zeros(batch_size, 3, 2, dtype=torch.float64, device=control.device)], dim=1)
    solution = torch.linalg.solve(system, rhs)
    return solution[:, :num_points], solution[:, num_points:]


def apply_tps(params: TPSParams, points: torch.Tensor) -> torch.Tensor:
    """Apply the target -> source spline to points ``(B, N, 2)`` (grid units)."""
    weights, affine = tps_coefficients(params)
    dtype = points.dtype
    points64 = points.to(torch.float64)
    kernel = _tps_kernel(torch.cdist(points64, params.control_trg.to(points.device, torch.float64)).square())
    basis = torch.cat([torch.ones_like(points64[..., :1]), points64], dim=-1)
    return (basis @ affine.to(points.device) + kernel @ weights.to(points.device)).to(dtype)


def tps_grid_trg_to_src(params: TPSParams, size: tuple[int, int]) -> torch.Tensor:
    """Dense ``grid_trg_to_src`` ``(B, 2, H, W)`` of a target -> source spline.

    A spline has no closed-form inverse: get ``grid_src_to_trg`` with :func:`invert_grid`.
    """
    points = _pixel_centre_grid(size, params.control_trg.shape[0], device=params.control_trg.device)
    return _points_to_field(apply_tps(params, points), size)


# -- numeric inverse of any dense warp -------------------------------------------------------------
def _fit_affine(grid: torch.Tensor) -> torch.Tensor:
    """Least-squares affine map ``(B, 2, 3)`` from pixel centres to the values of ``grid (B, 2, H, W)``."""
    batch_size, _, height, width = grid.shape
    points = _pixel_centre_grid((height, width), batch_size, device=grid.device, dtype=torch.float64)
    basis = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # (B, N, 3)
    values = grid.flatten(2).transpose(1, 2).to(torch.float64)  # (B, N, 2)
    finite = torch.isfinite(values).all(-1, keepdim=True) & (values.abs() < OUTSIDE_VALUE).all(-1, keepdim=True)
    basis, values = basis * finite, torch.where(finite, values, torch.zeros_like(values))
    normal = basis.transpose(1, 2) @ basis + 1e-9 * torch.eye(3, dtype=torch.float64, device=grid.device)
    solution = torch.linalg.solve(normal, basis.transpose(1, 2) @ values)  # (B, 3, 2)
    return solution.transpose(1, 2)


def invert_grid(
    grid_trg_to_src: torch.Tensor,
    source_size: tuple[int, int] | None = None,
    iterations: int = 10,
    return_residual: bool = False,
):
    """Numerically invert a dense warp: ``grid_trg_to_src (B, 2, H, W)`` -> ``grid_src_to_trg``.

    For every source pixel centre ``p`` it solves ``g(x) = p`` for the target point ``x``, where
    ``g`` is ``grid_trg_to_src`` read bilinearly (``grid_sample``) at ``x``. Method (vectorised over
    all pixels and the batch): Newton steps ``x <- x - J(x)^{-1} (g(x) - p)`` with ``J`` the
    central-difference Jacobian field of ``g`` (read bilinearly too), started from the exact inverse
    of the least-squares affine fit of ``g``. Where ``J`` is near-singular or folds (its determinant
    changes sign w.r.t. the fit's), the step uses the fit's linear part instead. Outside the
    outermost target pixel centres ``g`` is extended to first order with the Jacobian at the border,
    so source points whose match lies outside the target image come out outside ``[-1, 1]``.

    Accuracy (measured at 64 x 64 on 16 random homographies, against their exact inverse, over the
    source pixels that land inside the target): corner noise std 0.15 (the generator's default):
    mean error 6e-4 px, max 7e-3 px; std 0.3: mean 8e-4 px, max 1.1e-2 px. Affine warps are
    recovered to float precision. Newton converges in about 3 steps (the residual ``|g(x) - p|`` is
    then ~1e-5 px); what is left is how well bilinear interpolation between pixel centres represents
    the warp (its curvature), not the iteration.

    Args:
        grid_trg_to_src: ``(B, 2, H, W)`` the forward field (grid units, ``align_corners=False``).
        source_size: ``(h, w)`` of the output (the source image); defaults to ``(H, W)``.
        iterations: number of Newton steps.
        return_residual: also return ``|g(x) - p|`` ``(B, h, w)`` in grid units (how well the
            equation is solved; large where the warp is not invertible or did not converge).

    Returns:
        ``grid_src_to_trg (B, 2, h, w)`` (and the residual if asked).
    """
    batch_size, _, height, width = grid_trg_to_src.shape
    source_size = (height, width) if source_size is None else tuple(source_size)
    dtype = grid_trg_to_src.dtype
    affine = _fit_affine(grid_trg_to_src)  # (B, 2, 3) float64
    fit_inverse = torch.linalg.inv(affine[:, :, :2])
    fit_det = torch.linalg.det(affine[:, :, :2]).to(dtype).view(batch_size, 1)
    fit_inverse_flat = fit_inverse.to(dtype).reshape(batch_size, 1, 4)  # (a, b, c, d) row-major
    targets = _pixel_centre_grid(source_size, batch_size, device=grid_trg_to_src.device, dtype=dtype)  # p (B, N, 2)
    estimate = ((targets.to(torch.float64) - affine[:, None, :, 2]) @ fit_inverse.transpose(1, 2)).to(dtype)
    field = _value_and_jacobian_field(grid_trg_to_src, affine)
    for _ in range(iterations):
        value, jacobian = _read_field(field, estimate)
        estimate = estimate - _newton_step(value - targets, jacobian, fit_det, fit_inverse_flat)
    grid_src_to_trg = _points_to_field(estimate, source_size)
    if not return_residual:
        return grid_src_to_trg
    residual = (_read_field(field, estimate)[0] - targets).norm(dim=-1).reshape(batch_size, *source_size)
    return grid_src_to_trg, residual


def _value_and_jacobian_field(grid: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """``g`` and its central-difference Jacobian per grid unit as one field ``(B, 6, H, W)``:
    ``g_x, g_y, dg_x/dx, dg_x/dy, dg_y/dx, dg_y/dy`` (a single row or column uses the affine fit)."""
    batch_size, _, height, width = grid.shape
    d_dx = torch.gradient(grid, spacing=2.0 / width, dim=3)[0] if width > 1 else None
    d_dy = torch.gradient(grid, spacing=2.0 / height, dim=2)[0] if height > 1 else None
    if d_dx is None or d_dy is None:
        d_dx = affine[:, :, 0].to(grid.dtype).view(batch_size, 2, 1, 1).expand_as(grid)
        d_dy = affine[:, :, 1].to(grid.dtype).view(batch_size, 2, 1, 1).expand_as(grid)
    return torch.cat([grid, d_dx[:, :1], d_dy[:, :1], d_dx[:, 1:], d_dy[:, 1:]], dim=1)


def _read_field(field: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g(points)`` ``(B, N, 2)`` and ``J(points)`` ``(B, N, 4)`` read bilinearly from ``field``.

    Past the outermost pixel centres ``g`` is extended to first order with the Jacobian at the
    border, so points whose match lies outside the image come out outside ``[-1, 1]``.
    """
    height, width = field.shape[-2:]
    lower = torch.tensor([-1 + 1.0 / width, -1 + 1.0 / height], device=field.device, dtype=field.dtype)
    clamped = torch.maximum(torch.minimum(points, -lower), lower)
    sampled = F.grid_sample(field, clamped.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled[:, :, 0].transpose(1, 2)  # (B, N, 6)
    jacobian, offset = sampled[..., 2:], points - clamped
    value = sampled[..., :2] + _apply_2x2(jacobian, offset)
    return value, jacobian


def _apply_2x2(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Row-major ``(..., 4)`` 2 x 2 matrices times ``(..., 2)`` vectors."""
    return torch.stack([matrices[..., 0] * vectors[..., 0] + matrices[..., 1] * vectors[..., 1],
                        matrices[..., 2] * vectors[..., 0] + matrices[..., 3] * vectors[..., 1]], dim=-1)


def _newton_step(error: torch.Tensor, jacobian: torch.Tensor, fit_det: torch.Tensor,
                 fit_inverse_flat: torch.Tensor) -> torch.Tensor:
    """``J^{-1} (g(x) - p)``; where ``J`` is near-singular or folds (its determinant's sign differs from
    the affine fit's), the fit's inverse linear part replaces ``J^{-1}``."""
    a, b, c, d = jacobian.unbind(-1)
    det = a * d - b * c
    usable = (det * fit_det.sign() > 1e-3 * fit_det.abs()).unsqueeze(-1)
    safe_det = torch.where(usable[..., 0], det, torch.ones_like(det))
    local_inverse = torch.stack([d, -b, -c, a], dim=-1) / safe_det.unsqueeze(-1)
    return _apply_2x2(torch.where(usable, local_inverse, fit_inverse_flat), error)


# -- flips and colour ------------------------------------------------------------------------------
def flip_target_horizontally(
    grid_trg_to_src: torch.Tensor, grid_src_to_trg: torch.Tensor, flip: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose a horizontal flip of the target (``x -> -x`` on the target side) into both grids.

    ``flip (B,)`` bool selects the samples. The target pixel at ``x`` becomes the one at ``-x``
    (with ``align_corners=False`` pixel centres are symmetric, so that is a flip of the W axis), and
    every target location ``(x, y)`` in ``grid_src_to_trg`` becomes ``(-x, y)``.
    """
    select = flip.view(-1, 1, 1, 1).to(grid_trg_to_src.device)
    flipped_trg_to_src = torch.where(select, grid_trg_to_src.flip(-1), grid_trg_to_src)
    mirror = grid_src_to_trg.new_tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    flipped_src_to_trg = torch.where(select, grid_src_to_trg * mirror, grid_src_to_trg)
    return flipped_trg_to_src, flipped_src_to_trg


@dataclass(frozen=True)
class ColorJitter:
    """Photometric jitter of the target: per-sample factors drawn uniformly from ``[1-a, 1+a]``.

    brightness multiplies the image, contrast blends it with its mean grey level, saturation
    blends it with its grey image (ITU-R 601 luma), applied in that order. ``clamp`` keeps values
    in ``[0, 1]`` (images are expected in ``[0, 1]``). Geometry is never touched.
    """

    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    clamp: bool = True

    def sample_factors(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3)`` factors (brightness, contrast, saturation)."""
        spread = torch.tensor([self.brightness, self.contrast, self.saturation])
        return 1.0 + spread * (2 * torch.rand(batch_size, 3, generator=generator) - 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        factors = self.sample_factors(images.shape[0], generator).to(images.device, images.dtype)
        return adjust_colour(images, factors[:, 0], factors[:, 1], factors[:, 2], clamp=self.clamp)


def _grey(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def adjust_colour(
    images: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    clamp: bool = True,
) -> torch.Tensor:
    """Per-sample brightness / contrast / saturation factors ``(B,)`` applied to ``images (B, 3, H, W)``.

    A factor of 1 leaves the image unchanged; saturation 0 gives the grey image.
    """
    view = (-1, 1, 1, 1)
    out = images * brightness.view(view)
    if clamp:
        out = out.clamp(0, 1)
    mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
    out = mean + contrast.view(view) * (out - mean)
    if clamp:
        out = out.clamp(0, 1)
    grey = _grey(out)
    out = grey + saturation.view(view) * (out - grey)
    return out.clamp(0, 1) if clamp else out


# -- the pair generator ----------------------------------------------------------------------------
class SyntheticPairGenerator:
    """Synthetic training pairs from unlabelled images: source = the image, target = a random warp.

    Every sample draws its warp kind from ``kinds`` (parameters are then drawn per kind, vectorised),
    the target may be flipped horizontally (the flip is composed into the ground truth) and its
    colours jittered (never the grids). Seeded: the same ``seed`` gives the same sequence of batches.
    Geometry and colour use two separate generators, so switching the jitter on or off never changes
    the grids.

    Args:
        kinds: warp kinds among ``"affine"``, ``"homography"``, ``"tps"`` (drawn uniformly).
        flip_prob: probability of a horizontal flip of the target.
        jitter: a :class:`ColorJitter`, or ``None`` for no photometric change.
        seed: seeds both generators.
        affine_linear_std, affine_translation_std: see :func:`random_affine`.
        homography_strength: corner noise std of :func:`random_homography`.
        tps_strength, tps_num_control: see :func:`random_tps`.
        invert_iterations: iterations of :func:`invert_grid` (TPS).
        max_inverse_residual_px: source pixels where the numeric inverse solves ``g(x) = p`` worse
            than this (in pixels) are marked invalid in ``valid_src``.
    """

    def __init__(
        self,
        kinds: Sequence[str] = WARP_KINDS,
        flip_prob: float = 0.5,
        jitter: ColorJitter | None = ColorJitter(),
        seed: int = 0,
        affine_linear_std: float = 0.15,
        affine_translation_std: float = 0.1,
        homography_strength: float = 0.15,
        tps_strength: float = 0.15,
        tps_num_control: tuple[int, int] = (3, 3),
        invert_iterations: int = 10,
        max_inverse_residual_px: float = 0.1,
    ):
        kinds = tuple(kinds)
        unknown = [kind for kind in kinds if kind not in WARP_KINDS]
        if not kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {WARP_KINDS}, got {kinds}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.kinds = kinds
        self.flip_prob = float(flip_prob)
        self.jitter = jitter
        self.seed = int(seed)
        self.affine_linear_std = affine_linear_std
        self.affine_translation_std = affine_translation_std
        self.homography_strength = homography_strength
        self.tps_strength = tps_strength
        self.tps_num_control = tuple(tps_num_control)
        self.invert_iterations = invert_iterations
        self.max_inverse_residual_px = max_inverse_residual_px
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Restart the sequence (from ``seed`` if given)."""
        if seed is not None:
            self.seed = int(seed)
        self.geometry_generator = torch.Generator().manual_seed(self.seed)
        self.colour_generator = torch.Generator().manual_seed(self.seed + 0x5EED)

    def _warp(self, kind: str, count: int, size: tuple[int, int], device) -> tuple[torch.Tensor, ...]:
        """``(grid_trg_to_src, grid_src_to_trg, inverse_ok)`` for ``count`` samples of one kind."""
        generator = self.geometry_generator
        height, width = size
        inverse_ok = torch.ones(count, height, width, dtype=torch.bool, device=device)
        if kind == "affine":
            theta = random_affine(count, self.affine_linear_std, self.affine_translation_std, generator).to(device)
            return (affine_grid_trg_to_src(theta, size), affine_grid_trg_to_src(invert_affine(theta), size), inverse_ok)
        if kind == "homography":
            matrix = random_homography(count, self.homography_strength, generator).to(device)
            grid_src_to_trg = homography_grid_trg_to_src(invert_homography(matrix), size)
            return homography_grid_trg_to_src(matrix, size), grid_src_to_trg, inverse_ok
        params = random_tps(count, self.tps_num_control, self.tps_strength, generator)
        params = TPSParams(params.control_trg.to(device), params.control_src.to(device))
        grid_trg_to_src = tps_grid_trg_to_src(params, size)
        grid_src_to_trg, residual = invert_grid(
            grid_trg_to_src, iterations=self.invert_iterations, return_residual=True
        )
        residual_px = residual * (max(height, width) / 2.0)
        return grid_trg_to_src, grid_src_to_trg, residual_px <= self.max_inverse_residual_px

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, return_metadata: bool = False) -> dict[str, torch.Tensor]:
        """Make one batch of pairs from ``images (B, 3, H, W)`` (float, values in [0, 1]).

        Returns:
            ``dict`` with ``source_pixel_values`` (the images), ``target_pixel_values``,
            ``grid_trg_to_src`` / ``grid_src_to_trg`` ``(B, 2, H, W)`` and ``valid_trg`` /
            ``valid_src`` ``(B, H, W)`` bool; with ``return_metadata`` also ``warp_kind (B,)``
            (index into ``self.kinds``) and ``flipped (B,)``.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float (B, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
        batch_size, _, height, width = images.shape
        device, dtype = images.device, images.dtype
        kind_index = torch.randint(len(self.kinds), (batch_size,), generator=self.geometry_generator)
        flipped = torch.rand(batch_size, generator=self.geometry_generator) < self.flip_prob
        grid_trg_to_src = torch.empty(batch_size, 2, height, width, device=device, dtype=dtype)
        grid_src_to_trg = torch.empty_like(grid_trg_to_src)
        inverse_ok = torch.ones(batch_size, height, width, dtype=torch.bool, device=device)
        for index, kind in enumerate(self.kinds):
            members = (kind_index == index).nonzero().squeeze(1)
            if len(members) == 0:
                continue
            forward, backward, ok = self._warp(kind, len(members), (height, width), device)
            members = members.to(device)
            grid_trg_to_src[members] = forward.to(dtype)
            grid_src_to_trg[members] = backward.to(dtype)
            inverse_ok[members] = ok
        grid_trg_to_src, grid_src_to_trg = flip_target_horizontally(grid_trg_to_src, grid_src_to_trg, flipped)
        target, valid_trg = warp_images(images, grid_trg_to_src)
        if self.jitter is not None:
            target = self.jitter(target, self.colour_generator)
        batch = {
            "source_pixel_values": images,
            "target_pixel_values": target,
            "grid_src_to_trg": grid_src_to_trg,
            "grid_trg_to_src": grid_trg_to_src,
            "valid_src": grid_validity(grid_src_to_trg) & inverse_ok,
            "valid_trg": valid_trg,
        }
        if return_metadata:
            batch["warp_kind"] = kind_index.to(device)
            batch["flipped"] = flipped.to(device)
        return batch

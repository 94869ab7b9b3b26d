"""Synthetic image pairs with known dense correspondence (random warps of unlabelled images).

All warps are expressed as ``grid_trg_to_src``: for every target pixel, where it samples the
source (grid units, ``align_corners=False``), which is what ``torch.nn.functional.grid_sample``
consumes. Vectorised over the batch and seeded through a ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

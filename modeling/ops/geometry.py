"""Coordinate conventions shared by every model: pixels <-> normalised grid units.

Pixels: float (x, y), origin at the top-left corner of the image, pixel ``i`` covers ``[i, i+1)``.
Grid units: ``[-1, 1]`` with ``align_corners=False``, so ``-1`` is the left edge of the first pixel
and ``+1`` the right edge of the last one. Feature cell ``i`` of a map with ``n`` cells has its
centre at pixel ``(i + 0.5) * size / n``.
"""

from __future__ import annotations

import torch


def pixels_to_grid(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Map pixel (x, y) points (..., 2) of an image of ``size = (height, width)`` to grid units."""
    height, width = size
    scale = points.new_tensor([2.0 / width, 2.0 / height])
    return points * scale - 1.0


def grid_to_pixels(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pixels_to_grid`: grid units (..., 2) -> pixel (x, y)."""
    height, width = size
    scale = points.new_tensor([width / 2.0, height / 2.0])
    return (points + 1.0) * scale


def grid_axes(height: int, width: int, align_corners: bool = False, device=None, dtype=torch.float32):
    """Cell-centre coordinates of an ``height x width`` map in grid units: ``(xs (width,), ys (height,))``.

    The one definition of where a cell sits. ``align_corners=False`` (the package convention):
    cell ``i`` of ``n`` is centred at ``(i + 0.5) * 2 / n - 1``. ``align_corners=True``: cells on
    ``linspace(-1, 1, n)``, as the official SFNet / PMD code places them.
    """
    if align_corners:
        return (torch.linspace(-1, 1, width, device=device, dtype=dtype),
                torch.linspace(-1, 1, height, device=device, dtype=dtype))
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * (2.0 / width) - 1.0
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * (2.0 / height) - 1.0
    return xs, ys


def cell_centers(height: int, width: int, device=None, dtype=torch.float32, align_corners: bool = False) -> torch.Tensor:
    """Centres of the cells of an ``height x width`` feature map in grid units.

    Returns:
        ``(height * width, 2)`` (x, y), row-major (index ``y * width + x``).
    """
    xs, ys = grid_axes(height, width, align_corners, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def identity_grid(batch_size: int, height: int, width: int, device=None, dtype=torch.float32,
                  align_corners: bool = False) -> torch.Tensor:
    """Identity correspondence field ``(B, 2, h, w)``: every cell maps to its own centre."""
    centers = cell_centers(height, width, device=device, dtype=dtype, align_corners=align_corners)
    return centers.T.reshape(1, 2, height, width).expand(batch_size, -1, -1, -1).clone()


def sample_grid_at(grid_src_to_trg: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly read a dense field at arbitrary points.

    Args:
        grid_src_to_trg: ``(B, 2, h, w)`` target location (grid units) of every source cell.
        points: ``(B, N, 2)`` source points in grid units.

    Returns:
        ``(B, N, 2)`` target points in grid units. Points between the outermost cell centres and
        the image border take the value of the nearest cell (border padding).
    """
    sampled = torch.nn.functional.grid_sample(
        grid_src_to_trg, points.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.squeeze(2).transpose(1, 2)


def cell_axes(height: int, width: int, image_size: tuple[int, int], device=None, dtype=torch.float32):
    """Pixel coordinates of the cell centres of an ``height x width`` map over an image of
    ``image_size = (H, W)``: ``(xs (width,), ys (height,))``."""
    image_height, image_width = image_size
    xs, ys = grid_axes(height, width, device=device, dtype=dtype)
    return (xs + 1.0) * (image_width / 2.0), (ys + 1.0) * (image_height / 2.0)

"""Real image pairs with known correspondence from scikit-image's data folder (no download).

* ``stereo_pair``: the Middlebury *motorcycle* pair; ground-truth disparity ``d`` maps left
  pixel centre ``(x, y)`` to right ``(x - d, y)``.
* ``affine_pair``: scikit-image's *chelsea* photo and a seeded random affine warp of it.

Keypoints follow the package convention: (x, y) pixels, origin at the top-left corner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .synthetic import affine_grid_trg_to_src, apply_affine, random_affine, warp_images


@dataclass
class KeypointPair:
    """Two images and ``(N, 2)`` matching keypoints (x, y) in pixels of each."""

    name: str
    source_image: Image.Image
    target_image: Image.Image
    source_keypoints: np.ndarray
    target_keypoints: np.ndarray


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def stereo_pair(num_points: int = 500, seed: int = 0) -> KeypointPair:
    """The Middlebury motorcycle pair with ``num_points`` random ground-truth correspondences.

    Points are drawn among left pixels with a finite disparity whose match falls inside the
    right image.
    """
    data = skimage_data_dir()
    left = Image.open(data / "motorcycle_left.png").convert("RGB")
    right = Image.open(data / "motorcycle_right.png").convert("RGB")
    disparity = np.load(data / "motorcycle_disp.npz")["arr_0"]
    rows, cols = np.nonzero(np.isfinite(disparity))
    source = np.stack([cols + 0.5, rows + 0.5], axis=1)
    target = source - np.stack([disparity[rows, cols], np.zeros(len(rows))], axis=1)
    inside = (target[:, 0] >= 0) & (target[:, 0] <= right.width)
    source, target = source[inside], target[inside]
    chosen = np.random.default_rng(seed).choice(len(source), size=min(num_points, len(source)), replace=False)
    return KeypointPair("stereo (motorcycle)", left, right, source[chosen].astype(np.float32), target[chosen].astype(np.float32))


def affine_pair(
    image: Image.Image | None = None,
    num_points: int = 500,
    seed: int = 0,
    linear_std: float = 0.15,
    translation_std: float = 0.1,
) -> KeypointPair:
    """An image (default: chelsea) and its random affine warp, with matching points.

    The target is the source resampled through ``[I + N(0, linear_std^2) | N(0, translation_std^2)]``
    (grid units); points are drawn uniformly in the target where the warp stays inside the source.
    """
    if image is None:
        image = Image.open(skimage_data_dir() / "chelsea.png").convert("RGB")
    generator = torch.Generator().manual_seed(seed)
    theta = random_affine(1, linear_std, translation_std, generator=generator)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    size = (image.height, image.width)
    warped, _ = warp_images(pixels, affine_grid_trg_to_src(theta, size))
    target_image = Image.fromarray(warped[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy())

    # Sample generously in the target, keep points whose source lies inside the image.
    candidates = torch.rand(1, 8 * num_points, 2, generator=generator) * 2 - 1  # target, grid units
    source_grid = apply_affine(theta, candidates)
    inside = (source_grid.abs() <= 0.98).all(dim=-1)[0]
    target_grid, source_grid = candidates[0, inside][:num_points], source_grid[0, inside][:num_points]
    scale = torch.tensor([image.width / 2.0, image.height / 2.0])
    return KeypointPair(
        "affine warp (chelsea)",
        image,
        target_image,
        ((source_grid + 1) * scale).numpy().astype(np.float32),
        ((target_grid + 1) * scale).numpy().astype(np.float32),
    )

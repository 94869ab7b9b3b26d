"""Real image pairs with known correspondence from scikit-image's data folder (no download).

* ``stereo_pair``: the Middlebury *motorcycle* pair; ground-truth disparity ``d`` maps left
  pixel centre ``(x, y)`` to right ``(x - d, y)``.
* ``affine_pair``: scikit-image's *chelsea* photo and a seeded random affine warp of it.
* ``stereo_crops``: windows of the motorcycle pair (real parallax, occlusions) with their
  ground-truth points -- held-out evaluation pairs for the CPU training chain.
* ``crop_pairs_dataset``: unlabelled real pairs (two overlapping crops of one photo, at different
  positions and scales) -- the "real pairs" the PMD teacher labels with hypotheses on CPU.
* ``keypoint_pairs_dataset``: :class:`KeypointPair` s as a ``datasets.Dataset`` in the benchmark pair
  schema, so ``semcorr evaluate --dataset`` and :func:`semcorr.evaluation.evaluate_dataset`
  score them like PF-WILLOW (PCK relative to the keypoint extent).

``python -m semcorr.hub_datasets.skimage_pairs --output-dir DIR`` writes both as ``save_to_disk``
folders: ``DIR/train-pairs`` and ``DIR/stereo-test``.

Keypoints follow the package convention: (x, y) pixels, origin at the top-left corner.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semcorr.training.data.synthetic import affine_grid_trg_to_src, apply_affine, random_affine, warp_images
from semcorr.utils import atomic_directory


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


#: Photos of scikit-image's data folder the CPU chain trains on; chelsea and the motorcycle pair are
#: kept out of training so they can serve as held-out images.
TRAINING_PHOTOS = (
    "astronaut.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
    "horse.png", "camera.png", "brick.png", "grass.png", "gravel.png",
)


def stereo_crops(num_pairs: int = 8, window: tuple[int, int] = (300, 360), seed: int = 0,
                 max_points: int = 200) -> list[KeypointPair]:
    """Random windows of the motorcycle pair with the ground-truth points inside both windows.

    The right window is the left one shifted by the median disparity, so most points stay in view;
    points are re-expressed in window pixels. Windows are ``(height, width)`` of the 500 x 741 pair.
    """
    full = stereo_pair(num_points=10**9, seed=seed)
    disparity = float(np.median(full.source_keypoints[:, 0] - full.target_keypoints[:, 0]))
    rng = np.random.default_rng(seed)
    height, width = window
    pairs = []
    for index in range(num_pairs):
        y0 = int(rng.integers(0, full.source_image.height - height + 1))
        x0 = int(rng.integers(int(np.ceil(disparity)), full.source_image.width - width + 1))
        x0_right = int(round(x0 - disparity))
        source = full.source_keypoints - np.array([x0, y0], dtype=np.float32)
        target = full.target_keypoints - np.array([x0_right, y0], dtype=np.float32)
        inside = ((source >= 0) & (source <= [width, height])).all(1) & ((target >= 0) & (target <= [width, height])).all(1)
        chosen = np.flatnonzero(inside)
        chosen = rng.choice(chosen, size=min(max_points, len(chosen)), replace=False)
        pairs.append(KeypointPair(
            f"stereo window {index}",
            full.source_image.crop((x0, y0, x0 + width, y0 + height)),
            full.target_image.crop((x0_right, y0, x0_right + width, y0 + height)),
            source[chosen], target[chosen],
        ))
    return pairs


def keypoint_pairs_dataset(pairs: list[KeypointPair], category: str = "skimage", box: str = "keypoints"):
    """``datasets.Dataset`` in the benchmark pair schema.

    ``box``: ``"keypoints"`` -- each box is the keypoint extent (as PF-WILLOW); ``"image"`` -- the whole
    image (the metric's ``bbox`` threshold is then ``alpha x`` the image's longer side).
    """
    import datasets

    from ._common import keypoint_box, pair_features

    if box not in ("keypoints", "image"):
        raise ValueError(f"box must be 'keypoints' or 'image', got {box!r}")
    rows = {name: [] for name in pair_features([category])}
    for index, pair in enumerate(pairs):
        rows["pair_id"].append(index)
        rows["category"].append(0)
        for side, image, points in (("source", pair.source_image, pair.source_keypoints),
                                    ("target", pair.target_image, pair.target_keypoints)):
            rows[f"{side}_image"].append(image)
            rows[f"{side}_keypoints"].append(np.asarray(points, dtype=np.float32).tolist())
            rows[f"{side}_bbox"].append(keypoint_box(np.asarray(points)) if box == "keypoints"
                                        else [0.0, 0.0, float(image.width), float(image.height)])
            rows[f"{side}_image_size"].append([image.height, image.width])
    return datasets.Dataset.from_dict(rows, features=pair_features([category]))


def crop_pairs_dataset(photos=TRAINING_PHOTOS, pairs_per_photo: int = 4, seed: int = 0,
                       scale_range: tuple[float, float] = (0.55, 0.85)):
    """Unlabelled real pairs: two overlapping square crops of one photo.

    Crop A covers ``scale_range`` of the shorter side at a random place; crop B is A rescaled by a
    factor in [0.8, 1.25] and shifted by up to 15 % of its side, clamped inside the photo.

    Returns:
        ``datasets.Dataset`` with ``source_image``, ``target_image`` (Image) and ``photo`` (string).
    """
    import datasets

    rng = np.random.default_rng(seed)
    rows = {"source_image": [], "target_image": [], "photo": []}
    for name in photos:
        photo = Image.open(skimage_data_dir() / name).convert("RGB")
        shorter = min(photo.width, photo.height)
        for _ in range(pairs_per_photo):
            side_a = shorter * rng.uniform(*scale_range)
            side_b = min(side_a * np.exp(rng.uniform(np.log(0.8), np.log(1.25))), shorter)
            centre_a = rng.uniform([side_a / 2, side_a / 2], [photo.width - side_a / 2, photo.height - side_a / 2])
            centre_b = centre_a + rng.uniform(-0.15, 0.15, size=2) * side_a
            centre_b = np.clip(centre_b, side_b / 2, [photo.width - side_b / 2, photo.height - side_b / 2])
            rows["source_image"].append(photo.crop(_box(centre_a, side_a)))
            rows["target_image"].append(photo.crop(_box(centre_b, side_b)))
            rows["photo"].append(name)
    features = datasets.Features({"source_image": datasets.Image(), "target_image": datasets.Image(),
                                  "photo": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def _box(centre: np.ndarray, side: float) -> tuple[int, int, int, int]:
    x0, y0 = (centre - side / 2).round().astype(int)
    return int(x0), int(y0), int(x0 + round(side)), int(y0 + round(side))


#: Photos whose random warps form the classes of the weakly supervised (cascaded MIL) CPU run, and
#: the photos held out of it (their warps measure what the generator learnt).
MIL_TRAINING_PHOTOS = (
    "astronaut.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "moon.png",
    "coins.png", "cell.png", "brick.png", "gravel.png", "grass.png",
)
MIL_HELD_OUT_PHOTOS = ("chelsea.png", "coffee.png", "motorcycle_left.png")


def warp_generator(strength: float = 0.35, seed: int = 0):
    """The warps of :func:`warped_classes`: affine, homography and TPS of ``strength`` grid units (noise std of
    the linear part, the corners and the TPS control points; translations 2/3 of it), colour jitter, no flips."""
    from semcorr.training.data.synthetic import SyntheticPairGenerator

    return SyntheticPairGenerator(flip_prob=0.0, seed=seed, affine_linear_std=strength,
                                  affine_translation_std=strength * 2 / 3, homography_strength=strength,
                                  tps_strength=strength)


def warped_classes(photos=MIL_TRAINING_PHOTOS, members: int = 8, size: tuple[int, int] = (192, 192), seed: int = 0,
                   strength: float = 0.35):
    """Image classes without labels of points: class ``c`` is ``members`` random warps of photo ``c``.

    Each member is the photo (resized to ``size``) under a random affine / homography / TPS warp
    with colour jitter (:func:`warp_generator`: strong warps, no flips);
    two members of a class are a positive pair, two of different classes a negative one -- the
    only supervision a weakly supervised matcher gets. Yields ``(class name, member index, PIL image)``.
    """
    from semcorr.modeling.image_processing_semcorr import image_to_unit_tensor

    generator = warp_generator(strength, seed)
    for name in photos:
        photo = image_to_unit_tensor(Image.open(skimage_data_dir() / name).convert("RGB"), size)
        warped = generator(photo[None].repeat(members, 1, 1, 1))["target_pixel_values"]
        for index, member in enumerate(warped):
            yield Path(name).stem, index, Image.fromarray((member.permute(1, 2, 0) * 255).round().byte().numpy())


def write_warped_classes(output_dir, photos=MIL_TRAINING_PHOTOS, members: int = 8, size=(192, 192), seed: int = 0) -> Path:
    """:func:`warped_classes` as an ImageNet-layout folder ``output_dir/<class>/<member>.png``, written atomically."""
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        for name, index, image in warped_classes(photos, members, size, seed):
            (staging / name).mkdir(exist_ok=True)
            image.save(staging / name / f"{index:03d}.png")
    return output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semcorr.hub_datasets.skimage_pairs",
                                     description="Write the CPU runs' data: unlabelled crop pairs, held-out stereo windows, warped classes.")
    parser.add_argument("--output-dir", required=True,
                        help="writes OUTPUT_DIR/train-pairs, OUTPUT_DIR/stereo-test (PMD) and OUTPUT_DIR/classes (cascaded MIL)")
    parser.add_argument("--class-members", type=int, default=8, help="warps per photo in OUTPUT_DIR/classes")
    parser.add_argument("--pairs-per-photo", type=int, default=4)
    parser.add_argument("--test-pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pairs_per_photo < 1 or args.test_pairs < 1 or args.class_members < 2:
        print("skimage_pairs: error: --pairs-per-photo and --test-pairs must be >= 1, --class-members >= 2",
              file=sys.stderr)
        return 2
    output = Path(args.output_dir)
    for name, dataset in (("train-pairs", crop_pairs_dataset(pairs_per_photo=args.pairs_per_photo, seed=args.seed)),
                          ("stereo-test", keypoint_pairs_dataset(stereo_crops(args.test_pairs, seed=args.seed + 1),
                                                                 category="stereo"))):
        with atomic_directory(output / name) as staging:  # a rerun replaces the folder whole, never half-written
            dataset.save_to_disk(str(staging))
        print(f"wrote {output / name} ({len(dataset)} pairs)")
    write_warped_classes(output / "classes", members=args.class_members, seed=args.seed)
    print(f"wrote {output / 'classes'} ({len(MIL_TRAINING_PHOTOS)} classes of {args.class_members} warped photos)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

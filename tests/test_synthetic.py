"""Synthetic warps and the scikit-image pairs with known correspondence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semcorr.hub_datasets.skimage_pairs import affine_pair, skimage_data_dir, stereo_pair
from semcorr.training.data.synthetic import (
    affine_grid_trg_to_src,
    apply_affine,
    invert_affine,
    random_affine,
    warp_images,
)
from semcorr.modeling import cell_centers


def test_random_affine_is_seeded_and_reproducible():
    a = random_affine(4, generator=torch.Generator().manual_seed(1))
    b = random_affine(4, generator=torch.Generator().manual_seed(1))
    c = random_affine(4, generator=torch.Generator().manual_seed(2))
    assert a.shape == (4, 2, 3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_random_affine_statistics():
    theta = random_affine(20000, linear_std=0.2, translation_std=0.05, generator=torch.Generator().manual_seed(0))
    linear, translation = theta[:, :, :2], theta[:, :, 2]
    assert torch.allclose(linear.mean(0), torch.eye(2), atol=0.01)
    assert torch.allclose((linear - torch.eye(2)).std(0), torch.full((2, 2), 0.2), atol=0.01)
    assert torch.allclose(translation.mean(0), torch.zeros(2), atol=0.003)
    assert torch.allclose(translation.std(0), torch.full((2,), 0.05), atol=0.003)
    zero = random_affine(3, linear_std=0.0, translation_std=0.0)
    assert torch.equal(zero, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))


def test_warp_images_identity_returns_the_image():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 12, 17)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    grid = affine_grid_trg_to_src(identity, (12, 17))
    assert grid.shape == (2, 2, 12, 17)
    assert torch.allclose(grid[0].flatten(1).T, cell_centers(12, 17), atol=1e-6)  # pixel centres
    warped, valid = warp_images(images, grid)
    assert torch.allclose(warped, images, atol=1e-5)
    assert valid.shape == (2, 12, 17) and valid.all()


def test_warp_images_samples_the_source_at_the_mapped_point():
    height, width = 24, 32
    # A source whose channels are its own grid coordinates: warping it reveals the map exactly.
    centers = cell_centers(height, width)
    coordinates = centers.T.reshape(1, 2, height, width)
    theta = torch.tensor([[[0.8, 0.1, 0.05], [-0.05, 0.9, -0.1]]])
    warped, valid = warp_images(coordinates, affine_grid_trg_to_src(theta, (height, width)))
    mapped = apply_affine(theta, centers[None])[0].T.reshape(2, height, width)
    inner = (mapped.abs() < 1 - 1.0 / min(height, width) * 2).all(0)  # away from the zero padding
    assert inner.sum() > 200
    assert torch.allclose(warped[0][:, inner], mapped[:, inner], atol=1e-5)
    outside = (mapped.abs() > 1).any(0)
    assert (~valid[0][outside]).all() and valid[0][inner].all()


def test_apply_affine_and_invert_affine_are_inverse():
    theta = random_affine(5, generator=torch.Generator().manual_seed(3))
    points = torch.rand(5, 9, 2) * 2 - 1
    inverse = invert_affine(theta)
    assert torch.allclose(apply_affine(inverse, apply_affine(theta, points)), points, atol=1e-5)
    assert torch.allclose(apply_affine(theta, apply_affine(inverse, points)), points, atol=1e-5)
    assert torch.allclose(invert_affine(inverse), theta, atol=1e-5)
    # By hand: scale 2, shift (1, -1).
    by_hand = torch.tensor([[[2.0, 0, 1], [0, 2.0, -1]]])
    assert apply_affine(by_hand, torch.tensor([[[0.5, 0.25]]])).tolist() == [[[2.0, -0.5]]]
    assert torch.allclose(invert_affine(by_hand), torch.tensor([[[0.5, 0, -0.5], [0, 0.5, 0.5]]]))


def _colours_at(image, points):
    """Colours (N, 3) of the pixels containing ``points`` (x, y) (pixel i covers [i, i+1))."""
    array = np.asarray(image, dtype=np.float64)
    x = np.clip(np.floor(points[:, 0]).astype(int), 0, array.shape[1] - 1)
    y = np.clip(np.floor(points[:, 1]).astype(int), 0, array.shape[0] - 1)
    return array[y, x]


def test_affine_pair_ground_truth_is_consistent():
    pair = affine_pair(num_points=300, seed=1)
    assert pair.source_image.size == pair.target_image.size == (451, 300)
    assert pair.source_keypoints.shape == pair.target_keypoints.shape == (300, 2)
    assert pair.source_keypoints.dtype == np.float32
    for points, image in ((pair.source_keypoints, pair.source_image), (pair.target_keypoints, pair.target_image)):
        assert (points >= 0).all() and (points[:, 0] <= image.width).all() and (points[:, 1] <= image.height).all()
    source_colours = _colours_at(pair.source_image, pair.source_keypoints)
    matched = np.abs(source_colours - _colours_at(pair.target_image, pair.target_keypoints)).mean()
    shuffled_points = pair.target_keypoints[np.random.default_rng(0).permutation(300)]
    shuffled = np.abs(source_colours - _colours_at(pair.target_image, shuffled_points)).mean()
    assert matched < 12.0, matched
    assert matched < 0.3 * shuffled, (matched, shuffled)
    # The warp is a real one, not the identity.
    assert np.abs(pair.source_keypoints - pair.target_keypoints).mean() > 5.0


def test_affine_pair_is_seeded():
    a, b, c = affine_pair(num_points=50, seed=4), affine_pair(num_points=50, seed=4), affine_pair(num_points=50, seed=5)
    assert np.array_equal(a.source_keypoints, b.source_keypoints)
    assert np.array_equal(np.asarray(a.target_image), np.asarray(b.target_image))
    assert not np.array_equal(a.source_keypoints, c.source_keypoints)


def test_stereo_pair_ground_truth_is_consistent():
    pair = stereo_pair(num_points=400, seed=0)
    assert pair.source_keypoints.shape == pair.target_keypoints.shape == (400, 2)
    assert np.array_equal(pair.source_keypoints[:, 1], pair.target_keypoints[:, 1])  # rectified: same row
    disparity = pair.source_keypoints[:, 0] - pair.target_keypoints[:, 0]
    assert (disparity > 0).all()  # the right camera sees everything shifted left
    assert (pair.target_keypoints[:, 0] >= 0).all() and (pair.target_keypoints[:, 0] <= pair.target_image.width).all()
    # The points are pixel centres of the left image.
    assert np.allclose(pair.source_keypoints % 1, 0.5)
    left = _colours_at(pair.source_image, pair.source_keypoints)
    matched = np.abs(left - _colours_at(pair.target_image, pair.target_keypoints)).mean()
    shuffled_points = pair.target_keypoints[np.random.default_rng(1).permutation(400)]
    shuffled = np.abs(left - _colours_at(pair.target_image, shuffled_points)).mean()
    no_shift = np.abs(left - _colours_at(pair.target_image, pair.source_keypoints)).mean()
    assert matched < 0.5 * shuffled, (matched, shuffled)
    assert matched < no_shift, (matched, no_shift)
    assert stereo_pair(num_points=10, seed=3).source_keypoints.tolist() == stereo_pair(10, 3).source_keypoints.tolist()


def test_skimage_data_dir_has_the_pairs():
    data = skimage_data_dir()
    for name in ("chelsea.png", "motorcycle_left.png", "motorcycle_right.png", "motorcycle_disp.npz"):
        assert (data / name).is_file(), name


@pytest.mark.parametrize("num_points", [1, 7])
def test_pairs_honour_num_points(num_points):
    assert len(affine_pair(num_points=num_points).source_keypoints) == num_points
    assert len(stereo_pair(num_points=num_points).target_keypoints) == num_points


def test_stereo_crops_keep_the_ground_truth():
    from semcorr.hub_datasets.skimage_pairs import stereo_crops

    pairs = stereo_crops(3, window=(300, 360), seed=2, max_points=100)
    assert len(pairs) == 3
    for pair in pairs:
        assert pair.source_image.size == pair.target_image.size == (360, 300)
        assert pair.source_keypoints.shape == pair.target_keypoints.shape == (100, 2)
        for points in (pair.source_keypoints, pair.target_keypoints):
            assert (points >= 0).all() and (points <= [360, 300]).all()
        assert np.array_equal(pair.source_keypoints[:, 1], pair.target_keypoints[:, 1])
        left = _colours_at(pair.source_image, pair.source_keypoints)
        matched = np.abs(left - _colours_at(pair.target_image, pair.target_keypoints)).mean()
        shuffled = np.abs(left - _colours_at(pair.target_image, pair.target_keypoints[::-1])).mean()
        assert matched < 0.5 * shuffled, (matched, shuffled)
    assert [p.source_keypoints.tolist() for p in pairs] == [p.source_keypoints.tolist() for p in stereo_crops(3, seed=2, max_points=100)]


def test_keypoint_pairs_dataset_has_the_benchmark_schema():
    from semcorr.hub_datasets._common import pair_features
    from semcorr.hub_datasets.skimage_pairs import keypoint_pairs_dataset, stereo_crops

    pairs = stereo_crops(2, max_points=20)
    dataset = keypoint_pairs_dataset(pairs, category="stereo")
    assert dataset.features == pair_features(["stereo"]) and len(dataset) == 2
    row = dataset[1]
    assert np.allclose(row["source_keypoints"], pairs[1].source_keypoints)
    points = np.asarray(row["target_keypoints"])
    assert row["target_bbox"] == pytest.approx([*points.min(0), *points.max(0)])
    assert row["target_image_size"] == [300, 360]


def test_crop_pairs_overlap_and_the_writer_cli(tmp_path):
    import datasets

    from semcorr.hub_datasets.skimage_pairs import TRAINING_PHOTOS, crop_pairs_dataset, main

    pairs = crop_pairs_dataset(photos=("coffee.png",), pairs_per_photo=3, seed=1)
    assert pairs.column_names == ["source_image", "target_image", "photo"] and len(pairs) == 3
    for row in pairs:
        a, b = row["source_image"], row["target_image"]
        assert a.width == a.height and b.width == b.height and 0.8 <= b.width / a.width <= 1.25 + 1e-2
    assert main(["--output-dir", str(tmp_path), "--pairs-per-photo", "1", "--test-pairs", "2"]) == 0
    assert len(datasets.load_from_disk(str(tmp_path / "train-pairs"))) == len(TRAINING_PHOTOS)
    assert len(datasets.load_from_disk(str(tmp_path / "stereo-test"))) == 2
    assert not list(tmp_path.glob(".tmp-*"))
    assert main(["--output-dir", str(tmp_path), "--test-pairs", "0"]) == 2

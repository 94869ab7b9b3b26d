"""Synthetic training pairs: homography / TPS warps, the numeric inverse, flips, jitter, image batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from semcorr.training.data.images import iter_image_batches
from semcorr.training.data.synthetic import (
    ColorJitter,
    SyntheticPairGenerator,
    adjust_colour,
    affine_grid_trg_to_src,
    apply_homography,
    apply_tps,
    grid_validity,
    homography_grid_trg_to_src,
    invert_affine,
    invert_grid,
    invert_homography,
    random_affine,
    random_homography,
    random_tps,
    tps_grid_trg_to_src,
)
from semcorr.modeling import identity_grid

from .conftest import textured_image

SIZE = (64, 64)
PX = SIZE[0] / 2.0  # pixels per grid unit (square images)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: one thread avoids thread contention on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _textures(batch_size: int, seed: int = 0) -> torch.Tensor:
    arrays = [textured_image(*SIZE, seed=seed + i) for i in range(batch_size)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _sample(field: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Read ``field (B, C, H, W)`` bilinearly at ``grid (B, 2, h, w)`` -> ``(B, C, h, w)``."""
    return F.grid_sample(field, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border", align_corners=False)


KEYS = ("source_pixel_values", "target_pixel_values", "grid_src_to_trg", "grid_trg_to_src", "valid_src", "valid_trg")


# -- dense ground truth of every warp kind -------------------------------------------------------------
@pytest.mark.parametrize(
    "kinds, flip_prob",
    [(("affine",), 0.0), (("homography",), 0.0), (("tps",), 0.0), (("affine", "homography", "tps"), 0.5)],
)
def test_pairs_ground_truth_aligns_source_and_target(kinds, flip_prob):
    images = _textures(6)
    generator = SyntheticPairGenerator(kinds=kinds, flip_prob=flip_prob, jitter=None, seed=3)
    batch = generator(images, return_metadata=True)
    assert set(KEYS) <= set(batch)
    assert batch["source_pixel_values"] is images
    assert batch["target_pixel_values"].shape == images.shape
    for key in ("grid_src_to_trg", "grid_trg_to_src"):
        assert batch[key].shape == (6, 2, *SIZE) and batch[key].dtype == torch.float32
    for key in ("valid_src", "valid_trg"):
        assert batch[key].shape == (6, *SIZE) and batch[key].dtype == torch.bool
    if len(kinds) > 1:  # the mixed batch really mixes kinds and flips
        assert len(set(batch["warp_kind"].tolist())) >= 2 and 0 < batch["flipped"].sum() < 6

    source, target = batch["source_pixel_values"], batch["target_pixel_values"]
    grid_src_to_trg, grid_trg_to_src = batch["grid_src_to_trg"], batch["grid_trg_to_src"]
    valid_src, valid_trg = batch["valid_src"], batch["valid_trg"]
    assert valid_src.float().mean() > 0.6 and valid_trg.float().mean() > 0.6

    # A real warp, not the identity.
    identity = identity_grid(6, *SIZE)
    assert ((grid_trg_to_src - identity) * PX).norm(dim=1)[valid_trg].mean() > 2.0

    # Colours: the target read where each source pixel lands gives back the source colour.
    colours = _sample(target, grid_src_to_trg)
    matched = (colours - source).abs().mean(1)[valid_src].mean()
    shuffled_colours = colours.permute(0, 2, 3, 1)[valid_src]
    permutation = torch.randperm(len(shuffled_colours), generator=torch.Generator().manual_seed(0))
    shuffled_colours = shuffled_colours[permutation]
    shuffled = (shuffled_colours - source.permute(0, 2, 3, 1)[valid_src]).abs().mean()
    assert matched < 0.25 * shuffled, (matched, shuffled)
    assert matched < 0.03, matched

    # The two grids are inverse: trg->src read at src->trg is the identity on valid source pixels.
    cycle = _sample(grid_trg_to_src, grid_src_to_trg)
    cycle_error = ((cycle - identity) * PX).norm(dim=1)[valid_src]
    assert cycle_error.mean() < 0.5, cycle_error.mean()
    assert cycle_error.mean() < 0.1, cycle_error.mean()  # in practice ~0.005 px
    # ... and the other way round on valid target pixels.
    back = _sample(grid_src_to_trg, grid_trg_to_src)
    back_error = ((back - identity) * PX).norm(dim=1)[valid_trg]
    assert back_error.mean() < 0.1, back_error.mean()

    # Validity masks: exactly "the other grid point lies inside the image" (plus a converged inverse).
    assert torch.equal(valid_trg, grid_validity(grid_trg_to_src))
    assert not (valid_src & ~grid_validity(grid_src_to_trg)).any()
    far_outside = (grid_trg_to_src.abs() > 1 + 2.0 / SIZE[0]).any(dim=1)  # beyond bilinear reach of the source
    assert far_outside.any() and target.permute(0, 2, 3, 1)[far_outside].abs().max() == 0


# -- homography and TPS primitives ---------------------------------------------------------------------
def test_random_homography_moves_the_corners_and_is_seeded():
    matrix = random_homography(5, strength=0.2, generator=torch.Generator().manual_seed(1))
    assert matrix.shape == (5, 3, 3)
    assert torch.allclose(matrix[:, 2, 2], torch.ones(5))
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]).expand(5, 4, 2)
    noise = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(1))  # the same draw
    assert torch.allclose(apply_homography(matrix, corners), corners + 0.2 * noise, atol=1e-5)
    assert torch.equal(matrix, random_homography(5, strength=0.2, generator=torch.Generator().manual_seed(1)))
    identity = random_homography(2, strength=0.0)
    assert torch.allclose(identity, torch.eye(3).expand(2, 3, 3), atol=1e-6)
    # Inverse via linalg.inv: points go there and back.
    points = torch.rand(5, 7, 2) * 2 - 1
    round_trip = apply_homography(invert_homography(matrix), apply_homography(matrix, points))
    assert torch.allclose(round_trip, points, atol=1e-5)
    # The dense field is the map at pixel centres.
    field = homography_grid_trg_to_src(matrix, SIZE)
    centres = identity_grid(5, *SIZE).flatten(2).transpose(1, 2)
    assert torch.allclose(field.flatten(2).transpose(1, 2), apply_homography(matrix, centres), atol=1e-6)


def test_random_tps_interpolates_its_control_points():
    params = random_tps(3, num_control=(3, 4), strength=0.1, generator=torch.Generator().manual_seed(2))
    assert params.control_trg.shape == params.control_src.shape == (3, 12, 2)
    assert params.control_trg[0, :, 0].unique().numel() == 4 and params.control_trg[0, :, 1].unique().numel() == 3
    assert torch.allclose(apply_tps(params, params.control_trg), params.control_src, atol=1e-5)
    assert (params.control_src - params.control_trg).abs().mean() > 0.03
    # A pure affine displacement of the control points gives that affine map everywhere (no bending).
    theta = random_affine(3, generator=torch.Generator().manual_seed(3))
    moved = params.control_trg @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
    affine_params = type(params)(params.control_trg, moved)
    assert torch.allclose(tps_grid_trg_to_src(affine_params, SIZE), affine_grid_trg_to_src(theta, SIZE), atol=1e-5)
    # Against an independent thin-plate spline (scipy: r^2 log r, the same function space as r^2 log r^2).
    interpolate = pytest.importorskip("scipy.interpolate")
    queries = torch.rand(3, 50, 2, generator=torch.Generator().manual_seed(4)) * 2.4 - 1.2
    ours = apply_tps(params, queries)
    for b in range(3):
        reference = interpolate.RBFInterpolator(
            params.control_trg[b].double().numpy(), params.control_src[b].double().numpy(), kernel="thin_plate_spline"
        )(queries[b].double().numpy())
        assert np.allclose(ours[b].numpy(), reference, atol=1e-5)
    still = random_tps(2, strength=0.0)
    assert torch.allclose(tps_grid_trg_to_src(still, SIZE), identity_grid(2, *SIZE), atol=1e-6)


# -- the numeric inverse -------------------------------------------------------------------------------
def test_invert_grid_matches_the_exact_homography_inverse():
    matrix = random_homography(8, strength=0.15, generator=torch.Generator().manual_seed(4))
    exact = homography_grid_trg_to_src(invert_homography(matrix), SIZE)
    numeric, residual = invert_grid(homography_grid_trg_to_src(matrix, SIZE), return_residual=True)
    inside = grid_validity(exact)
    error = ((numeric - exact) * PX).norm(dim=1)[inside]
    assert error.mean() < 0.5, error.mean()
    assert error.mean() < 0.01 and error.max() < 0.1, (error.mean(), error.max())  # what the docstring claims
    assert (residual * PX)[inside].max() < 0.01
    # The validity it implies agrees with the exact one almost everywhere.
    assert (grid_validity(numeric) != inside).float().mean() < 0.01
    # Many fewer iterations than the default: much worse would mean the iteration is not converging.
    one_step = invert_grid(homography_grid_trg_to_src(matrix, SIZE), iterations=0)
    assert ((one_step - exact) * PX).norm(dim=1)[inside].mean() > 10 * error.mean()


def test_invert_grid_is_exact_for_affine_and_flipped_warps_and_other_sizes():
    theta = random_affine(3, generator=torch.Generator().manual_seed(5))
    forward = affine_grid_trg_to_src(theta, SIZE)
    exact = affine_grid_trg_to_src(invert_affine(theta), SIZE)
    assert torch.allclose(invert_grid(forward), exact, atol=1e-4)
    mirror = torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    assert torch.allclose(invert_grid(forward.flip(-1)), exact * mirror, atol=1e-4)
    # A source of another size: the inverse is evaluated at that image's pixel centres.
    other = invert_grid(forward, source_size=(20, 36))
    assert other.shape == (3, 2, 20, 36)
    assert torch.allclose(other, affine_grid_trg_to_src(invert_affine(theta), (20, 36)), atol=1e-4)


# -- flips ---------------------------------------------------------------------------------------------
def test_flip_composes_into_the_ground_truth():
    images = _textures(4, seed=10)
    plain = SyntheticPairGenerator(flip_prob=0.0, jitter=None, seed=7)(images)
    flipped = SyntheticPairGenerator(flip_prob=1.0, jitter=None, seed=7)(images)
    assert torch.allclose(flipped["target_pixel_values"], plain["target_pixel_values"].flip(-1), atol=1e-5)
    assert torch.allclose(flipped["grid_trg_to_src"], plain["grid_trg_to_src"].flip(-1))
    assert torch.equal(flipped["grid_src_to_trg"][:, 0], -plain["grid_src_to_trg"][:, 0])
    assert torch.equal(flipped["grid_src_to_trg"][:, 1], plain["grid_src_to_trg"][:, 1])
    assert torch.equal(flipped["valid_src"], plain["valid_src"])
    assert torch.equal(flipped["valid_trg"], plain["valid_trg"].flip(-1))
    # Still aligned: the flipped target read at grid_src_to_trg gives the source colours; ignoring
    # the flip (reading at the un-flipped positions) does not.
    valid = flipped["valid_src"]
    colours = _sample(flipped["target_pixel_values"], flipped["grid_src_to_trg"])
    aligned = (colours - images).abs().mean(1)[valid].mean()
    ignored = (_sample(flipped["target_pixel_values"], plain["grid_src_to_trg"]) - images).abs().mean(1)[valid].mean()
    assert aligned < 0.03 and aligned < 0.25 * ignored, (aligned, ignored)


# -- determinism and jitter ----------------------------------------------------------------------------
def test_pairs_are_deterministic_given_the_seed():
    images = _textures(4, seed=20)
    first, second, other = (SyntheticPairGenerator(seed=s) for s in (11, 11, 12))
    a1, a2 = first(images), first(images)
    b1, b2 = second(images), second(images)
    c1 = other(images)
    for key in KEYS:
        assert torch.equal(a1[key], b1[key]) and torch.equal(a2[key], b2[key]), key
    for key in ("target_pixel_values", "grid_src_to_trg", "grid_trg_to_src"):
        assert not torch.allclose(a1[key], c1[key]), key
        assert not torch.allclose(a1[key], a2[key]), key  # the sequence moves on
    first.reset()
    assert torch.equal(first(images)["grid_trg_to_src"], a1["grid_trg_to_src"])


def test_colour_jitter_changes_the_target_only():
    images = _textures(4, seed=30)
    jitter = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)
    plain = SyntheticPairGenerator(jitter=None, seed=5)
    jittered = SyntheticPairGenerator(jitter=jitter, seed=5)
    for _ in range(2):  # also on the second batch of the sequence
        a, b = plain(images), jittered(images)
        for key in ("grid_src_to_trg", "grid_trg_to_src", "valid_src", "valid_trg", "source_pixel_values"):
            assert torch.equal(a[key], b[key]), key
        change = (a["target_pixel_values"] - b["target_pixel_values"]).abs().mean(dim=(1, 2, 3))
        assert (change > 0.005).all(), change
        assert b["target_pixel_values"].min() >= 0 and b["target_pixel_values"].max() <= 1
    assert torch.equal(jittered(images)["source_pixel_values"], images)


def test_adjust_colour():
    images = _textures(2, seed=40)
    ones = torch.ones(2)
    assert torch.allclose(adjust_colour(images, ones, ones, ones), images, atol=1e-6)
    grey = adjust_colour(images, ones, ones, torch.zeros(2))
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-6)
    darker = adjust_colour(images, torch.full((2,), 0.5), ones, ones)
    assert torch.allclose(darker, images * 0.5, atol=1e-6)
    flat = adjust_colour(images, ones, torch.zeros(2), ones)
    assert flat.flatten(1).std(1).max() < 1e-6
    factors = ColorJitter(0.2, 0.0, 0.1).sample_factors(1000, torch.Generator().manual_seed(0))
    assert factors[:, 0].min() >= 0.8 and factors[:, 0].max() <= 1.2 and factors[:, 0].std() > 0.1
    assert torch.equal(factors[:, 1], torch.ones(1000))


# -- image batches from a folder or a datasets column --------------------------------------------------
def test_folder_batches_skip_and_count_unreadable_files(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(textured_image(40, 50, 1)).save(tmp_path / "a.png")
    Image.fromarray(textured_image(30, 20, 2)).convert("L").save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(textured_image(33, 33, 3)).convert("RGBA").save(tmp_path / "sub" / "c.png")
    Image.fromarray(textured_image(64, 48, 4)).save(tmp_path / "sub" / "d.bmp")
    Image.fromarray(textured_image(25, 60, 5)).save(tmp_path / "e.PNG")
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    Image.fromarray(textured_image(80, 80, 6)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.png").unlink()
    (tmp_path / "notes.txt").write_text("not an image and not counted")

    batches = iter_image_batches(tmp_path, batch_size=2, image_size=(24, 40), seed=0)
    assert len(batches) == 7  # candidates: files with image extensions
    out = list(batches)
    assert [tuple(b.shape) for b in out] == [(2, 3, 24, 40), (2, 3, 24, 40), (1, 3, 24, 40)]
    assert all(b.dtype == torch.float32 and b.min() >= 0 and b.max() <= 1 for b in out)
    assert batches.skipped == 2
    assert sorted(p.split("/")[-1] for p in batches.skipped_items) == ["corrupt.jpg", "truncated.png"]
    # Seeded order; the next pass reshuffles and counts afresh.
    again = list(iter_image_batches(tmp_path, batch_size=2, image_size=(24, 40), seed=0))
    assert all(torch.equal(x, y) for x, y in zip(out, again))
    second_pass = torch.cat(list(batches))
    assert batches.skipped == 2 and second_pass.shape[0] == 5
    # Fixed order and drop_last.
    ordered = list(iter_image_batches(tmp_path, 2, 16, shuffle=False, drop_last=True))
    assert [tuple(b.shape) for b in ordered] == [(2, 3, 16, 16), (2, 3, 16, 16)]
    # The generator takes the batches as they come.
    pairs = SyntheticPairGenerator(seed=0)(out[0])
    assert pairs["target_pixel_values"].shape == (2, 3, 24, 40) and pairs["grid_src_to_trg"].shape == (2, 2, 24, 40)


def test_dataset_column_batches(tmp_path):
    import datasets

    images = [Image.fromarray(textured_image(20 + 4 * i, 30, i)) for i in range(4)]
    rows = {"picture": images + [{"bytes": b"garbage", "path": None}], "label": [0, 1, 2, 3, 4]}
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    batches = iter_image_batches(dataset, batch_size=3, image_size=(16, 24), seed=1)
    out = list(batches)
    assert [tuple(b.shape) for b in out] == [(3, 3, 16, 24), (1, 3, 16, 24)]
    assert batches.skipped == 1 and batches.skipped_items == [4]
    # Every image is there once, resized by the image processor's rule (compared in any order).
    from semcorr.modeling.image_processing_semcorr import image_to_unit_tensor

    expected = torch.stack([image_to_unit_tensor(im, (16, 24)) for im in images])
    got = torch.cat(out)
    distances = (got[:, None] - expected[None]).abs().flatten(2).mean(-1)
    assert torch.equal(distances.argmin(1).sort().values, torch.arange(4)) and distances.min(1).values.max() < 1e-6
    # Explicit column names and errors.
    assert sum(len(b) for b in iter_image_batches(dataset, 2, 8, image_column="picture")) == 4
    with pytest.raises(ValueError, match="no column"):
        iter_image_batches(dataset, 2, 8, image_column="missing")
    with pytest.raises(ValueError, match="no Image column"):
        iter_image_batches(dataset.remove_columns("picture"), 2, 8)
    with pytest.raises(ValueError, match="not a folder"):
        iter_image_batches(tmp_path / "nowhere", 2, 8)


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kinds"):
        SyntheticPairGenerator(kinds=("perspective",))
    with pytest.raises(ValueError, match="flip_prob"):
        SyntheticPairGenerator(flip_prob=1.5)
    with pytest.raises(ValueError, match="float"):
        SyntheticPairGenerator()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))

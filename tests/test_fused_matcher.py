"""The fused matcher (correlation -> RHM -> arg-max both ways over blocks of source columns) against
the unfused path it replaces: same fields, confidences and keypoints; one score volume held."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from semcorr.modeling import SemanticCorrespondenceImageProcessor, dense_cosine_correlation, regularized_hough_matching
from semcorr.modeling.ops.fused_matching import _Scores, fused_hough_matching
from semcorr.modeling.ops.geometry import cell_axes
from semcorr.modeling.ops.rhm import hough_bins
from semcorr.modeling.ops.matches import SCORE_RADIUS, match_confidence
from semcorr.modeling.ops.soft_argmax import arg_max_neighbourhood, local_soft_argmax

from .conftest import skimage_data, tiny_model


def _assert_same_match(fused, unfused, target_size):
    """Grids to 1e-5 grid units, keypoints to the same in target pixels, confidences and
    keypoint scores to 1e-5 relative."""
    for key in ("grid_src_to_trg", "grid_trg_to_src"):
        torch.testing.assert_close(fused[key], unfused[key], rtol=0, atol=1e-5, msg=key)
    pixels_per_grid_unit = max(target_size) / 2
    torch.testing.assert_close(fused.target_keypoints, unfused.target_keypoints, rtol=0,
                               atol=1e-5 * pixels_per_grid_unit)
    for key in ("confidence", "keypoint_scores"):
        torch.testing.assert_close(fused[key], unfused[key], rtol=1e-5, atol=1e-7, msg=key)


def _reference_fields(source_features, target_features, source_size, target_size, power=3.0, num_bins=8192,
                      radius=1, beta=20.0, compute_dtype=None):
    """The unfused composition: full volume, RHM, local soft-argmax of it and of its transpose."""
    (h_s, w_s), (h_t, w_t) = source_features.shape[-2:], target_features.shape[-2:]
    similarity = dense_cosine_correlation(source_features, target_features, normalize=False,
                                          compute_dtype=compute_dtype).clamp_min(0).pow(power)
    scores = similarity
    if num_bins is not None:
        scores = regularized_hough_matching(similarity, cell_axes(h_s, w_s, source_size), cell_axes(h_t, w_t, target_size),
                                            source_size, target_size, num_bins=num_bins)
    forward = local_soft_argmax(scores, (h_s, w_s), (h_t, w_t), radius=radius, beta=beta)
    backward = local_soft_argmax(scores.transpose(1, 2), (h_t, w_t), (h_s, w_s), radius=radius, beta=beta)
    best = scores.argmax(dim=2)
    around = arg_max_neighbourhood(best, (h_t, w_t), SCORE_RADIUS)
    confidence = match_confidence(similarity.gather(2, best[..., None])[..., 0], torch.gather(scores, 2, around.index),
                                  around, scores.sum(dim=2), power)
    return forward, scores.amax(dim=2), backward, scores.amax(dim=1), confidence


def _fused_fields(source_features, target_features, source_size, target_size, **kwargs):
    (h_s, w_s), (h_t, w_t) = source_features.shape[-2:], target_features.shape[-2:]
    return fused_hough_matching(source_features, target_features, cell_axes(h_s, w_s, source_size),
                                cell_axes(h_t, w_t, target_size), source_size, target_size, **kwargs)


def _assert_same_fields(fused, reference):
    forward, forward_best, backward, backward_best, confidence = reference
    torch.testing.assert_close(fused.grid_src_to_trg, forward, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.grid_trg_to_src, backward, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.best_src_to_trg, forward_best, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused.best_trg_to_src, backward_best, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused.confidence_src_to_trg, confidence, rtol=1e-5, atol=1e-7)


def _unit_features(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=1)


# -- the op ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])  # bfloat16: product widened per block
@pytest.mark.parametrize("num_bins", [8192, 64, None])
@pytest.mark.parametrize("block_elements", [1, 700, 1 << 20])  # one source column per block, a short last block, one block
@pytest.mark.parametrize(
    "source_shape, target_shape, source_size, target_size",
    [
        ((5, 7), (6, 4), (40, 56), (60, 32)),  # different images, grids and strides in x and y: support gathered
        ((6, 5), (6, 5), (48, 40), (48, 40)),  # equal grids: support as a strided view of the offset table
    ],
)
def test_fused_hough_matching_equals_unfused_composition(compute_dtype, num_bins, block_elements, source_shape,
                                                         target_shape, source_size, target_size):
    source = _unit_features(2, 16, *source_shape, seed=0)
    target = _unit_features(2, 16, *target_shape, seed=1)
    fused = _fused_fields(source, target, source_size, target_size, num_bins=num_bins, block_elements=block_elements,
                          compute_dtype=compute_dtype)
    assert fused.grid_src_to_trg.shape == (2, 2, *source_shape) and fused.grid_trg_to_src.shape == (2, 2, *target_shape)
    assert fused.best_src_to_trg.dtype == torch.float32
    _assert_same_fields(fused, _reference_fields(source, target, source_size, target_size, num_bins=num_bins,
                                                 compute_dtype=compute_dtype))


def test_equal_grids_take_the_offset_table_and_different_ones_do_not():
    def scores(source_shape, target_shape, source_size, target_size):
        bins = hough_bins(cell_axes(*source_shape, source_size), cell_axes(*target_shape, target_size),
                          source_size, target_size, 8192)
        return _Scores(torch.zeros(1, 1, 1), torch.rand(1, *bins[2]), bins, source_shape, target_shape)

    assert scores((6, 5), (6, 5), (48, 40), (48, 40)).offset_table is not None
    assert scores((5, 7), (6, 4), (40, 56), (60, 32)).offset_table is None


@pytest.mark.parametrize("radius, beta, power", [(2, 5.0, 2.0), (0, 20.0, 1.0)])
def test_fused_hough_matching_follows_refinement_and_power_settings(radius, beta, power):
    source, target = _unit_features(1, 8, 9, 9, seed=2), _unit_features(1, 8, 9, 9, seed=3)
    size = (72, 72)
    fused = _fused_fields(source, target, size, size, power=power, radius=radius, beta=beta, block_elements=300)
    _assert_same_fields(fused, _reference_fields(source, target, size, size, power=power, radius=radius, beta=beta))


def test_fused_hough_matching_resolves_ties_like_the_unfused_path():
    # A four-vector palette makes many exactly equal similarities (and equal votes where two cells
    # share a bin); zero features give all-zero rows and columns, whose arg-max is the first cell.
    palette = _unit_features(4, 8, 1, 1, seed=4)[:, :, 0, 0]
    generator = torch.Generator().manual_seed(5)
    source = palette[torch.randint(0, 4, (1, 8, 8), generator=generator)].permute(0, 3, 1, 2).contiguous()
    target = palette[torch.randint(0, 4, (1, 8, 8), generator=generator)].permute(0, 3, 1, 2).contiguous()
    source[:, :, 2, 3] = 0
    target[:, :, 5, 1] = 0
    target[:, :, 0, 0] = -palette.sum(0)  # negative cosine with most of the palette
    size = (64, 64)
    for num_bins in (8192, 64, None):
        scores = dense_cosine_correlation(source, target, normalize=False).clamp_min(0).pow(3)
        if num_bins is not None:
            scores = regularized_hough_matching(scores, cell_axes(8, 8, size), cell_axes(8, 8, size), size, size,
                                                num_bins=num_bins)
        for dim in (1, 2):  # the case is a real one: some rows and columns have several maxima
            assert ((scores == scores.amax(dim, keepdim=True)).sum(dim) > 1).any()
        fused = _fused_fields(source, target, size, size, num_bins=num_bins, block_elements=64)
        _assert_same_fields(fused, _reference_fields(source, target, size, size, num_bins=num_bins))
        assert fused.best_trg_to_src[0, 5 * 8 + 1] == 0


class _LargeStorages(TorchDispatchMode):
    """Records the storages of at least ``min_bytes`` that any operation returns."""

    def __init__(self, min_bytes: int):
        super().__init__()
        self.min_bytes, self.storages = min_bytes, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() >= self.min_bytes:
                self.storages.add(tensor.untyped_storage().data_ptr())
        return output


def test_fused_hough_matching_holds_one_score_volume():
    source, target = _unit_features(1, 16, 16, 16, seed=6), _unit_features(1, 16, 16, 16, seed=7)
    size = (128, 128)
    half_volume = 256 * 256 * 4 // 2
    with _LargeStorages(half_volume) as fused:
        _fused_fields(source, target, size, size, block_elements=2 * 16 * 256)
    with _LargeStorages(half_volume) as unfused:
        _reference_fields(source, target, size, size)
    assert len(fused.storages) == 1
    # Correlation, source-columns copy, support, confidence: several at once (a freed one's
    # address may be reused, so fewer distinct addresses may be seen).
    assert len(unfused.storages) >= 3


# -- the model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, dict(use_rhm=False), dict(hough_bins=256, refine_radius=2)])
def test_match_fused_equals_unfused_on_random_inputs(overrides):
    model = tiny_model(seed=0, **overrides)
    generator = torch.Generator().manual_seed(8)
    source = torch.randn(2, 3, 64, 64, generator=generator)
    target = torch.randn(2, 3, 48, 80, generator=generator)
    keypoints = torch.rand(2, 9, 2, generator=generator) * 48
    fused = model.match(source, target, keypoints)
    _assert_same_match(fused, model._match(source, target, keypoints, fused=False), (48, 80))
    assert torch.equal(model._match(source, target, keypoints, fused=True).grid_src_to_trg, fused.grid_src_to_trg)


def _skimage_pair(name_source, name_target, size):
    processor = SemanticCorrespondenceImageProcessor(
        size={"height": size[0], "width": size[1]}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    images = [Image.open(skimage_data() / name).convert("RGB") for name in (name_source, name_target)]
    return processor.preprocess(images)["pixel_values"]


@pytest.mark.parametrize(
    "names, source_size, target_size",
    [
        (("motorcycle_left.png", "motorcycle_right.png"), (448, 448), (448, 448)),
        (("chelsea.png", "chelsea.png"), (256, 384), (320, 224)),  # different sizes and aspect ratios
    ],
)
def test_match_fused_equals_unfused_on_the_embedded_model(default_model, names, source_size, target_size):
    source = _skimage_pair(*names, source_size)[:1]
    target = _skimage_pair(*names, target_size)[1:]
    generator = torch.Generator().manual_seed(9)
    keypoints = torch.rand(1, 25, 2, generator=generator) * torch.tensor([source_size[1], source_size[0]])
    fused = default_model.match(source, target, keypoints)
    unfused = default_model._match(source, target, keypoints, fused=False)
    _assert_same_match(fused, unfused, target_size)


def test_match_keeps_one_workspace_and_frees_it():
    model = tiny_model(seed=1)
    generator = torch.Generator().manual_seed(10)
    source, target = torch.randn(2, 1, 3, 64, 64, generator=generator)
    first = model.match(source, target)
    workspace = model._similarity_workspace
    again = model.match(source, target)
    assert model._similarity_workspace is workspace  # reused, not reallocated
    for key in ("grid_src_to_trg", "grid_trg_to_src", "confidence"):
        assert torch.equal(first[key], again[key]), key
    bigger = torch.randn(1, 3, 96, 96, generator=generator)
    model.match(bigger, bigger)
    assert model._similarity_workspace.numel() > workspace.numel()  # grown for the larger volume
    model.free_matching_workspace()
    assert model._similarity_workspace is None
    assert torch.equal(model.match(source, target).grid_src_to_trg, first.grid_src_to_trg)


def test_match_while_another_call_holds_the_workspace_allocates_its_own():
    model = tiny_model(seed=1)
    generator = torch.Generator().manual_seed(11)
    source, target = torch.randn(2, 1, 3, 64, 64, generator=generator)
    expected = model.match(source, target)
    with type(model)._workspace_lock:  # as if another thread were matching
        busy = model.match(source, target)
    for key in ("grid_src_to_trg", "grid_trg_to_src", "confidence"):
        assert torch.equal(busy[key], expected[key]), key


# -- the correlation's product dtype -------------------------------------------------------------
def test_auto_correlation_dtype_is_bfloat16_only_on_cpus_that_multiply_it_natively(monkeypatch):
    from semcorr.modeling.ops.correlation import correlation_compute_dtype

    features = torch.zeros(1, 4, 2, 2)
    for amx, avx512_bf16, expected in [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, torch.float32)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda flag=avx512_bf16: flag)
        assert correlation_compute_dtype("auto", features) == expected
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert correlation_compute_dtype("auto", features.double()) == torch.float64  # only float32 is narrowed
    assert correlation_compute_dtype("float32", features) == torch.float32
    assert correlation_compute_dtype("bfloat16", features) == torch.bfloat16
    with pytest.raises(ValueError, match="correlation_dtype must be one of"):
        correlation_compute_dtype("half", features)
    with pytest.raises(ValueError, match="correlation_dtype must be one of"):
        tiny_model(seed=0, correlation_dtype="int8")


def test_bfloat16_correlation_keeps_the_embedded_default_s_matches(default_model):
    """The bfloat16 product only rounds the operands: on the stereo pair at 448² the dense field
    moves by more than 0.01 grid units at under 1 % of the cells, keypoints by under half a pixel
    (measured: 0.06 % of the cells, 0.06 pixel)."""
    source, target = _skimage_pair("motorcycle_left.png", "motorcycle_right.png", (448, 448)).chunk(2)
    generator = torch.Generator().manual_seed(12)
    keypoints = torch.rand(1, 40, 2, generator=generator) * 448
    dtype = default_model.config.correlation_dtype
    try:
        outputs = {}
        for name in ("float32", "bfloat16"):
            default_model.config.correlation_dtype = name
            outputs[name] = default_model.match(source, target, keypoints)
    finally:
        default_model.config.correlation_dtype = dtype
    moved = (outputs["float32"].grid_src_to_trg - outputs["bfloat16"].grid_src_to_trg).abs().amax(dim=1)
    assert (moved > 0.01).float().mean() < 0.01
    assert (outputs["float32"].target_keypoints - outputs["bfloat16"].target_keypoints).abs().max() < 0.5
    assert not torch.equal(outputs["float32"].grid_src_to_trg, outputs["bfloat16"].grid_src_to_trg)  # both ran

"""Pseudo-label selection of cascaded MIL: PMPS, saliency, close-loop consistency, the iBOT converter."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from semcorr.modeling import FeatureBackbone, load_backbone_weights
from semcorr.modeling.cascaded_mil import convert_ibot_checkpoint as ibot
from semcorr.modeling.cascaded_mil.consistency import consistency_scores
from semcorr.modeling.cascaded_mil.pmps import greedy_one_to_one, select_pseudo_pairs
from semcorr.modeling.cascaded_mil.saliency import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassActivationSaliency,
    ClassTokenSaliency,
    no_saliency,
    resolve_saliency,
    saliency_on_grid,
)
from semcorr.modeling.modeling_matcher import CorrespondenceOutput
from semcorr.modeling.ops.geometry import cell_centers, grid_to_pixels, identity_grid


# -- greedy one-to-one ------------------------------------------------------------------------------
def _reference_greedy(scores, k, valid, shape=None, radius=0):
    """Brute force, one pair at a time: strict '>' over flat order keeps the lowest index on ties."""
    num_source, num_target = scores.shape
    rows_out, cols_out, picks = set(), set(), []
    for _ in range(k):
        best = None
        for s in range(num_source):
            for t in range(num_target):
                value = scores[s, t]
                if s in rows_out or t in cols_out or not valid[s, t] or math.isnan(value) or value == -math.inf:
                    continue
                if best is None or value > best[2]:
                    best = (s, t, value)
        if best is None:
            break
        picks.append(best)
        cols_out.add(best[1])
        if radius == 0:
            rows_out.add(best[0])
        else:
            y, x = divmod(best[0], shape[1])
            rows_out |= {s for s in range(num_source) if max(abs(s // shape[1] - y), abs(s % shape[1] - x)) <= radius}
    return picks


@pytest.mark.parametrize("radius", [0, 1])
def test_greedy_one_to_one_matches_brute_force(radius):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 4)
    for seed in range(40):
        batch, num_target, k = 3, int(torch.randint(2, 9, (1,), generator=generator)), 7
        # few distinct values: many ties; some -inf and NaN entries, and a random valid mask
        scores = torch.randint(0, 4, (batch, 12, num_target), generator=generator).float()
        scores[torch.rand(scores.shape, generator=generator) < 0.1] = -math.inf
        scores[torch.rand(scores.shape, generator=generator) < 0.05] = math.nan
        valid = torch.rand(scores.shape, generator=generator) < 0.7
        source, target, score, found = greedy_one_to_one(scores, k, valid, source_shape=shape, nms_radius=radius)
        assert source.shape == target.shape == score.shape == found.shape == (batch, k)
        for b in range(batch):
            expected = _reference_greedy(scores[b].numpy(), k, valid[b].numpy(), shape, radius)
            n = len(expected)
            assert found[b].tolist() == [True] * n + [False] * (k - n), seed
            got = list(zip(source[b, :n].tolist(), target[b, :n].tolist(), score[b, :n].tolist()))
            assert got == [(s, t, float(v)) for s, t, v in expected], seed
            assert len(set(source[b, :n].tolist())) == n and len(set(target[b, :n].tolist())) == n
            assert (score[b, n:] == 0).all() and (source[b, n:] == 0).all()


def test_greedy_one_to_one_without_mask_is_a_partial_permutation():
    scores = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(1))
    source, target, score, found = greedy_one_to_one(scores, 25)
    assert found[:, :20].all() and not found[:, 20:].any()  # only 20 columns
    for b in range(2):
        assert len(set(source[b, :20].tolist())) == 20 and len(set(target[b, :20].tolist())) == 20
    assert (score[:, :20].diff(dim=1) <= 0).all()  # pick order is non-increasing
    assert score[0, 0] == scores[0].max()


def test_greedy_one_to_one_keeps_the_score_gradient():
    scores = torch.randn(1, 5, 5, requires_grad=True)
    _, _, score, _ = greedy_one_to_one(scores, 3)
    score.sum().backward()
    assert scores.grad.sum() == 3


# -- PMPS -------------------------------------------------------------------------------------------
GRID, IMAGE = (8, 8), (128, 128)


def _square(top, left, side=4, batch=1):
    mask = torch.zeros(batch, *GRID)
    mask[:, top:top + side, left:left + side] = 1
    return mask


def _cell(row, col):
    return row * GRID[1] + col


def _planted_volume(pairs, distractor=None, seed=0):
    """Background uniform in [0, 0.3]; planted pairs at 0.9 - 0.001 i; an optional outside distractor at 1.0."""
    generator = torch.Generator().manual_seed(seed)
    volume = torch.rand(1, 64, 64, generator=generator) * 0.3
    for i, (s, t) in enumerate(pairs):
        volume[0, s, t] = 0.9 - 0.001 * i
    if distractor is not None:
        volume[0, distractor[0], distractor[1]] = 1.0
    return volume


def _select(volume, k, **kwargs):
    return select_pseudo_pairs(volume, GRID, GRID, IMAGE, IMAGE, k, **kwargs)


def test_pmps_returns_the_planted_foreground_pairs():
    # a random permutation of the 16 cells of a foreground square; the distractor lies outside it
    cells = [_cell(r, c) for r in range(2, 6) for c in range(2, 6)]
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(3)).tolist()
    planted = {cells[i]: cells[j] for i, j in enumerate(permutation)}
    saliency = _square(2, 2)
    volume = _planted_volume(planted.items(), distractor=(_cell(0, 0), _cell(7, 7)))
    out = _select(volume, 16, use_rhm=False, source_saliency=saliency, target_saliency=saliency)
    assert out["found"].all()
    assert dict(zip(out["source_index"][0].tolist(), out["target_index"][0].tolist())) == planted
    # coordinates: cell centres, 16 model pixels per cell
    s = out["source_index"][0, 0].item()
    assert out["source_pixels"][0, 0].tolist() == [(s % 8 + 0.5) * 16, (s // 8 + 0.5) * 16]
    assert torch.allclose(out["source_grid_points"], cell_centers(*GRID)[out["source_index"]])
    assert torch.allclose(out["similarity"], volume[0, out["source_index"][0], out["target_index"][0]][None])

    # saliency off: the outside distractor is the best pair
    off = _select(volume, 1, use_rhm=False)
    assert (off["source_index"].item(), off["target_index"].item()) == (_cell(0, 0), _cell(7, 7))


def test_pmps_with_rhm_returns_a_planted_translation():
    # source square rows/cols 1-4 -> target square rows 3-6, cols 2-5: one translation, so RHM agrees
    planted = {_cell(r, c): _cell(r + 2, c + 1) for r in range(1, 5) for c in range(1, 5)}
    volume = _planted_volume(planted.items(), distractor=(_cell(7, 0), _cell(0, 7)))
    out = _select(volume, 16, source_saliency=_square(1, 1), target_saliency=_square(3, 2), hough_kernel_size=5)
    assert out["found"].all()
    assert dict(zip(out["source_index"][0].tolist(), out["target_index"][0].tolist())) == planted
    # with more picks than foreground cells, the slots left are padding
    more = _select(volume, 20, source_saliency=_square(1, 1), target_saliency=_square(3, 2))
    assert more["found"][0].tolist() == [True] * 16 + [False] * 4


def test_rhm_promotes_consistent_pairs_over_an_isolated_outlier():
    # 20 pairs sharing one translation (+1 column) at 0.8; the first source cell also has an
    # inconsistent outlier at 1.0 (translation (+6 rows, +5 cols), far from the consensus bin)
    sources = [_cell(r, c) for r in range(1, 6) for c in range(0, 4)]
    consistent = {s: s + 1 for s in sources}
    outlier_source, outlier_target = sources[0], sources[0] + 6 * 8 + 5
    volume = torch.zeros(1, 64, 64)
    for s, t in consistent.items():
        volume[0, s, t] = 0.8
    volume[0, outlier_source, outlier_target] = 1.0

    plain = _select(volume, len(sources), use_rhm=False)
    assert (plain["source_index"][0, 0].item(), plain["target_index"][0, 0].item()) == (outlier_source, outlier_target)
    rhm = _select(volume, len(sources), use_rhm=True, hough_kernel_size=3)
    picked = dict(zip(rhm["source_index"][0].tolist(), rhm["target_index"][0].tolist()))
    assert picked == consistent  # the outlier's row went to its consistent pair instead


def test_pmps_nms_spreads_the_source_cells():
    volume = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(5))
    out = _select(volume, 6, use_rhm=False, nms_radius=2)
    assert out["found"][0, :4].all()  # an 8 x 8 grid holds at least 4 cells 3 apart
    index = out["source_index"][0][out["found"][0]]
    rows, cols = index // 8, index % 8
    chebyshev = torch.maximum((rows[:, None] - rows).abs(), (cols[:, None] - cols).abs())
    off_diagonal = ~torch.eye(len(index), dtype=torch.bool)
    assert (chebyshev[off_diagonal] > 2).all()


def test_pmps_rejects_a_volume_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not match grids"):
        select_pseudo_pairs(torch.zeros(1, 63, 64), GRID, GRID, IMAGE, IMAGE, 3)


# -- saliency ---------------------------------------------------------------------------------------
def _forced_attention_vit(chosen, reg_tokens=0):
    """A tiny random ViT (2 blocks, 4 x 4 patches at 64 px) whose last block's class query attends to
    the ``chosen`` patches: patch tokens are their position embeddings (+1 / -1 on channel 0 for
    chosen / other patches), block 0 is the identity, and the keys read channel 0 of ``norm1(x)``."""
    torch.manual_seed(0)
    backbone = FeatureBackbone("vit_tiny_patch16_224", [1], image_size=(64, 64),
                               model_kwargs=dict(depth=2, reg_tokens=reg_tokens))
    body = backbone.body
    prefix, width = body.num_prefix_tokens, body.embed_dim
    with torch.no_grad():
        body.patch_embed.proj.weight.zero_()
        body.patch_embed.proj.bias.zero_()
        sign = -torch.ones(16)
        sign[chosen] = 1
        body.pos_embed.zero_()
        body.pos_embed[0, -16:, 0], body.pos_embed[0, -16:, 1] = sign, -sign
        for layer in (body.blocks[0].attn.proj, body.blocks[0].mlp.fc2):  # residual branches off
            layer.weight.zero_()
            layer.bias.zero_()
        attn = body.blocks[-1].attn
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        for head in range(attn.num_heads):
            attn.qkv.bias[head * attn.head_dim] = 20.0  # every query: +20 on the head's first channel
            attn.qkv.weight[width + head * attn.head_dim, 0] = 1.0  # keys: channel 0 of norm1(x)
    assert prefix == 1 + reg_tokens
    return backbone


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_class_token_saliency_highlights_the_attended_patches(reg_tokens):
    chosen = [1, 6, 11, 12]
    backbone = _forced_attention_vit(chosen, reg_tokens)
    saliency = resolve_saliency("auto", backbone)
    assert isinstance(saliency, ClassTokenSaliency)
    mask = saliency(torch.randn(2, 3, 64, 64))
    assert mask.shape == (2, 4, 4) and mask.min() >= 0 and mask.max() <= 1
    expected = torch.zeros(16)
    expected[chosen] = 1
    assert torch.allclose(mask.flatten(1), expected.expand(2, -1), atol=1e-4)


def test_class_token_attention_equals_timms_own_weights():
    # timm's unfused path materialises the weights: read them where they enter attn_drop
    torch.manual_seed(0)
    backbone = FeatureBackbone("vit_tiny_patch16_224", [1], image_size=(48, 64),
                               model_kwargs=dict(depth=2, qk_norm=True, reg_tokens=1))
    attn = backbone.body.blocks[-1].attn
    attn.fused_attn = False
    seen = {}
    attn.attn_drop.register_forward_hook(lambda module, args, output: seen.setdefault("weights", output))
    pixel_values = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        backbone.body.forward_features(pixel_values)
    mask = ClassTokenSaliency(backbone)(pixel_values)
    patches = seen["weights"][:, :, 0, 2:].mean(dim=1).reshape(2, 3, 4)  # class + 1 register token first
    low, high = patches.amin(dim=(1, 2), keepdim=True), patches.amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(mask, (patches - low) / (high - low), atol=1e-5)


def test_saliency_resolution_and_errors():
    assert resolve_saliency("none") is no_saliency
    assert no_saliency(torch.zeros(2, 3, 8, 9)).shape == (2, 8, 9)

    def custom(pixel_values):  # e.g. SelfReformer behind a wrapper
        return pixel_values.new_ones(pixel_values.shape[0], 3, 3)

    assert resolve_saliency(custom) is custom
    cnn = FeatureBackbone("tf_efficientnet_lite0", [2, 3])
    assert isinstance(resolve_saliency("auto", cnn), ClassActivationSaliency)
    with pytest.raises(ValueError, match="vision transformer"):
        resolve_saliency("class-token", cnn)
    with pytest.raises(ValueError, match="saliency must be one of"):
        resolve_saliency("selfreformer")
    grid = saliency_on_grid(torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]), (4, 4))
    assert grid.shape == (1, 4, 4) and grid[0, 0, 0] == 0 and grid[0, 3, 3] == 1


def test_cam_is_higher_on_the_cat_head_than_on_the_background_corners():
    from skimage.data import chelsea

    image = torch.from_numpy(chelsea()).permute(2, 0, 1).float()[None] / 255  # 300 x 451, the face fills most of it
    image = F.interpolate(image, size=(288, 448), mode="bilinear", align_corners=False, antialias=True)
    pixel_values = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    cam = ClassActivationSaliency()(pixel_values)
    assert cam.shape == (1, 9, 14) and cam.min() >= 0 and cam.max() == 1
    on_image = saliency_on_grid(cam, (300, 451))[0]  # back to the original pixels
    head = on_image[60:280, 120:360].mean()  # eyes, nose and muzzle
    # right-hand corners: the blurred room behind the cat
    corners = torch.stack([on_image[:60, 420:].mean(), on_image[240:, 420:].mean()])
    assert head > 0.3 and (corners < head / 3).all(), (head, corners)


# -- close-loop consistency -------------------------------------------------------------------------
SIZE, CELLS = (64, 96), (8, 12)


class _Matcher:
    """Fields ``identity + offset(source, target)``, counting calls. ``offset`` -> ``(P, 2, h, w)``."""

    def __init__(self, offset=None):
        self.offset, self.calls = offset, 0

    def __call__(self, source, target):
        self.calls += 1
        grid = identity_grid(source.shape[0], *CELLS)
        if self.offset is not None:
            grid = grid + self.offset(source, target)
        return CorrespondenceOutput(grid_src_to_trg=grid)


def _images(batch, value=0.0):
    return torch.full((batch, 3, *SIZE), value)


def test_consistency_of_the_identity_is_zero():
    matcher = _Matcher()
    out = consistency_scores(matcher, _images(2), _images(2), _images(3), chunk_size=64)
    assert out["per_point"].shape == (2, 96) and out["per_pair"].shape == (2,)
    assert out["per_third"].shape == (2, 3, 96)
    assert torch.allclose(out["points"][0], grid_to_pixels(cell_centers(*CELLS), SIZE))
    assert out["per_point"].abs().max() < 1e-5 and out["per_pair"].abs().max() < 1e-5
    assert matcher.calls == 3  # one call per leg over all B * K pairs


def test_consistency_measures_a_known_shift_on_one_leg():
    shift = torch.tensor([0.125, -0.0625])  # grid units: (6, -2) pixels on a 96 x 64 image

    def third_to_target(source, target):  # thirds are marked with ones
        marked = (source[:, 0, 0, 0] == 1).float()
        return (marked[:, None] * shift)[:, :, None, None]

    points = torch.tensor([[[30.0, 20.0], [50.0, 40.0], [40.5, 33.25]]]).expand(2, -1, -1)
    out = consistency_scores(_Matcher(third_to_target), _images(2), _images(2, 2.0), _images(4, 1.0), points)
    expected = math.hypot(6, 2) / math.hypot(96, 64)
    assert torch.allclose(out["per_point"], torch.full((2, 3), expected), atol=1e-6)
    assert torch.allclose(out["per_pair"], torch.full((2,), expected), atol=1e-6)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    masked = consistency_scores(_Matcher(third_to_target), _images(2), _images(2, 2.0), _images(4, 1.0), points,
                                point_mask=mask)
    assert torch.allclose(masked["per_pair"], torch.full((2,), expected), atol=1e-6)


def _content_offset(source, target):
    """A smooth field that depends on both images: differs for every pair."""
    xs = torch.linspace(-1, 1, CELLS[1])
    a, b = source.mean(dim=(1, 2, 3)), target.mean(dim=(1, 2, 3))
    wave = torch.sin(3 * xs[None] + 5 * a[:, None]) * 0.05  # (P, w)
    return torch.stack([wave[:, None].expand(-1, CELLS[0], -1), (0.1 * torch.tanh(a - b))[:, None, None].expand(
        -1, *CELLS)], dim=1)


def test_consistency_batched_over_thirds_equals_a_loop():
    generator = torch.Generator().manual_seed(0)
    source, target = torch.rand(2, 3, *SIZE, generator=generator), torch.rand(2, 3, *SIZE, generator=generator)
    thirds = torch.rand(2, 4, 3, *SIZE, generator=generator)
    points = torch.rand(2, 5, 2, generator=generator) * torch.tensor([96.0, 64.0])
    matcher = _Matcher(_content_offset)
    batched = consistency_scores(matcher, source, target, thirds, points, chunk_size=3)
    assert batched["per_point"].abs().max() > 1e-3  # the fields do move points
    for m in range(4):
        single = consistency_scores(matcher, source, target, thirds[:, m:m + 1], points)
        assert torch.allclose(batched["per_third"][:, m], single["per_point"], atol=1e-6)
    assert torch.allclose(batched["per_point"], batched["per_third"].mean(dim=1))
    whole = consistency_scores(matcher, source, target, thirds, points, chunk_size=100)
    assert torch.allclose(whole["per_point"], batched["per_point"], atol=1e-6)
    shared = consistency_scores(matcher, source, target, thirds[0], points)  # (K, 3, H, W) for every pair
    assert torch.allclose(shared["per_point"][0], batched["per_point"][0], atol=1e-6)
    with pytest.raises(ValueError, match="thirds must be"):
        consistency_scores(matcher, source, target, thirds[:1], points)


# -- iBOT converter ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vit_state():
    """A timm ``vit_tiny_patch16_224`` state dict, classifier removed (what iBOT's ViT holds)."""
    import timm

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    return {key: value for key, value in reference.items() if not key.startswith("head")}


def _fake_ibot_checkpoint(path, backbone, layout="full"):
    teacher = {f"backbone.{key}": value for key, value in backbone.items()}
    teacher["head.mlp.0.weight"] = torch.randn(8, 192)  # the iBOT projection head
    teacher["head.last_layer.weight_g"] = torch.ones(8, 1)
    if layout == "full":
        obj = {"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 3,
               "args": argparse.Namespace(arch="vit_tiny", patch_size=16)}
    elif layout == "module":
        obj = {"teacher": {f"module.{k}": v for k, v in teacher.items()}}
    else:  # the backbone-only release: checkpoint_teacher.pth
        obj = {"state_dict": backbone}
    torch.save(obj, path)


def test_ibot_converter_round_trips_into_a_feature_backbone(tmp_path, tiny_vit_state):
    _fake_ibot_checkpoint(tmp_path / "checkpoint.pth", tiny_vit_state)
    output = ibot.convert_ibot_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "vit_tiny_ibot.safetensors",
                                          "vit_tiny_patch16_224")
    backbone = FeatureBackbone("vit_tiny_patch16_224", [11])
    load_backbone_weights(backbone, output)
    state = backbone.body.state_dict()
    assert state.keys() == tiny_vit_state.keys()
    for key, value in tiny_vit_state.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("layout", ["module", "released"])
def test_ibot_converter_reads_every_layout(tmp_path, tiny_vit_state, layout):
    from safetensors.torch import load_file

    _fake_ibot_checkpoint(tmp_path / "checkpoint.pth", tiny_vit_state, layout)
    assert ibot.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--output", str(tmp_path / "o.safetensors"),
                      "--model", "vit_tiny_patch16_224"]) == 0
    converted = load_file(tmp_path / "o.safetensors")
    assert converted.keys() == tiny_vit_state.keys()
    assert all(torch.equal(converted[key], value) for key, value in tiny_vit_state.items())


def test_ibot_converter_errors(tmp_path, capsys, tiny_vit_state):
    torch.save({"student": {"backbone.cls_token": torch.zeros(1, 1, 192)}}, tmp_path / "student.pth")
    with pytest.raises(ValueError, match="no 'teacher'"):
        ibot.convert_ibot_checkpoint(tmp_path / "student.pth", tmp_path / "out.safetensors", "vit_tiny_patch16_224")

    # the command line: one line on stderr, exit status 2
    assert ibot.main(["--checkpoint", str(tmp_path / "student.pth"), "--output", str(tmp_path / "o.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no 'teacher'") and error.count("\n") == 1

    _fake_ibot_checkpoint(tmp_path / "full.pth", tiny_vit_state)
    broken = {"teacher": {f"backbone.{k}": v for k, v in tiny_vit_state.items() if k != "blocks.3.attn.qkv.weight"}}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks.3.attn.qkv.weight"):
        ibot.convert_ibot_checkpoint(tmp_path / "broken.pth", tmp_path / "out.safetensors", "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="shape mismatches.*width 192"):
        ibot.convert_ibot_checkpoint(tmp_path / "full.pth", tmp_path / "out.safetensors", "vit_small_patch16_224")
    with pytest.raises(ValueError, match=".safetensors file"):
        ibot.convert_ibot_checkpoint(tmp_path / "full.pth", tmp_path / "out.pth", "vit_tiny_patch16_224")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="tensors-only torch checkpoint"):
        ibot.convert_ibot_checkpoint(tmp_path / "garbage.pth", tmp_path / "out.safetensors", "vit_tiny_patch16_224")

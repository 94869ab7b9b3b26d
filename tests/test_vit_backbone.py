"""Vision-transformer backbones (DINO, DINOv2, any timm ViT), the global token and the ViT presets.

Everything is offline: tiny randomly initialised ViTs, registered below as timm architectures
so that a config naming them round-trips through ``save_pretrained`` / ``AutoModel``.
"""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models import register_model
from timm.models.eva import _create_eva
from timm.models.vision_transformer import _create_vision_transformer
from transformers import AutoImageProcessor, AutoModel

from semcorr.modeling import FeatureBackbone, HyperpixelFlowConfig, HyperpixelFlowModel, load_backbone_weights
from semcorr.modeling import presets
from semcorr.modeling.ops.geometry import cell_axes

# -- tiny test architectures ---------------------------------------------------------------------
#: Read by timm's ``register_model``: the pretrained config of each test architecture (no Hub id).
#: ``vit_semcorr_test_p16`` checkpoints carry a 10-class head (dropped on loading), the others none.
default_cfgs = {
    name: dict(url="", num_classes=classes, classifier="head", input_size=(3, 64, 64), mean=presets.IMAGENET_MEAN,
               std=presets.IMAGENET_STD)
    for name, classes in (("vit_semcorr_test_p16", 10), ("vit_semcorr_test_p14_reg", 0), ("eva_semcorr_test_p14", 0))
}


@register_model
def vit_semcorr_test_p16(pretrained=False, **kwargs):
    """ViT: patch 16, width 48, 2 blocks, a class token."""
    args = dict(patch_size=16, embed_dim=48, depth=2, num_heads=2, img_size=64)
    return _create_vision_transformer("vit_semcorr_test_p16", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_semcorr_test_p14_reg(pretrained=False, **kwargs):
    """DINOv2 with registers in small: patch 14, layer scale, a class token and 2 register tokens."""
    args = dict(patch_size=14, embed_dim=48, depth=3, num_heads=2, img_size=56, init_values=1e-5, reg_tokens=2,
                no_embed_class=True)
    return _create_vision_transformer("vit_semcorr_test_p14_reg", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def eva_semcorr_test_p14(pretrained=False, **kwargs):
    """EVA-02 in small: rotary position embedding held in buffers timm does not save."""
    args = dict(patch_size=14, embed_dim=48, depth=2, num_heads=2, img_size=56, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    return _create_eva("eva_semcorr_test_p14", pretrained=pretrained, **dict(args, **kwargs))


def vit_config(backbone="vit_semcorr_test_p16", levels=(0, 1), size=(64, 64), **overrides):
    patch = 14 if "p14" in backbone else 16
    fields = dict(backbone=backbone, backbone_layers=list(levels), image_size=list(size), feature_stride=patch,
                  backbone_weights=None, image_mean=list(presets.IMAGENET_MEAN), image_std=list(presets.IMAGENET_STD))
    return HyperpixelFlowConfig(**{**fields, **overrides})


def vit_model(seed=0, **kwargs) -> HyperpixelFlowModel:
    torch.manual_seed(seed)
    return HyperpixelFlowModel(vit_config(**kwargs)).eval()


# -- maps: shapes, channels, reductions ----------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "patch", "width", "prefix_tokens"),
    [
        ("vit_tiny_patch16_224", dict(depth=2), 16, 192, 1),
        ("vit_small_patch14_dinov2", dict(depth=2, embed_dim=48, num_heads=2), 14, 48, 1),
        ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=48, num_heads=2), 14, 48, 5),
        ("deit_tiny_distilled_patch16_224", dict(depth=2), 16, 192, 2),
        ("eva02_tiny_patch14_224", dict(depth=2), 14, 192, 1),
    ],
)
def test_vit_maps_are_patch_grids_at_any_input_size(name, kwargs, patch, width, prefix_tokens):
    backbone = FeatureBackbone(name, [0, -1], image_size=(4 * patch, 4 * patch), model_kwargs=kwargs)
    assert backbone.is_vit and backbone.body.num_prefix_tokens == prefix_tokens
    assert backbone.channels == [width, width] and backbone.reductions == [patch, patch]
    assert backbone.patch_size == (patch, patch)
    for rows, cols in [(4, 4), (3, 6), (7, 2)]:
        maps = backbone(torch.randn(2, 3, rows * patch, cols * patch))
        assert [tuple(m.shape) for m in maps] == [(2, width, rows, cols)] * 2
    # A side that is not a multiple of the patch goes to the nearest multiple (ties upwards).
    height, width_px = int(3.4 * patch), int(5.6 * patch)
    maps = backbone(torch.randn(1, 3, height, width_px))
    assert backbone.patch_grid_size(height, width_px) == (3, 6) == tuple(maps[0].shape[-2:])
    assert backbone.patch_grid_size(patch // 4, patch // 4) == (1, 1)


def test_vit_levels_are_blocks_shallowest_first_and_frozen():
    backbone = FeatureBackbone("vit_semcorr_test_p14_reg", [2, 0]).train()
    assert not any(module.training for module in backbone.body.modules())
    assert not any(parameter.requires_grad for parameter in backbone.parameters())
    pixels = torch.randn(1, 3, 56, 70, requires_grad=True)
    maps = backbone(pixels)
    reference = backbone.body.forward_intermediates(pixels, indices=[0, 2], output_fmt="NCHW", intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, reference)) and not maps[0].requires_grad
    trainable = FeatureBackbone("vit_semcorr_test_p16", [1], frozen=False)
    assert trainable(torch.randn(1, 3, 32, 48))[0].requires_grad


# -- prefix tokens and the global token ----------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_semcorr_test_p16", "vit_semcorr_test_p14_reg", "eva_semcorr_test_p14"])
def test_class_and_register_tokens_are_not_in_the_maps_and_the_class_token_is_the_global_token(name):
    backbone = FeatureBackbone(name, [0, 1])
    body = backbone.body
    captured = {}
    for index in (0, len(body.blocks) - 1):
        body.blocks[index].register_forward_hook(lambda module, args, out, i=index: captured.__setitem__(i, out))
    pixels = torch.randn(2, 3, 42, 70) if "p14" in name else torch.randn(2, 3, 48, 80)
    maps, global_token = backbone.forward_with_global(pixels)
    rows, cols = maps[0].shape[-2:]
    prefix = body.num_prefix_tokens
    tokens = captured[0]  # (B, prefix + rows * cols, C) out of block 0
    assert tokens.shape[1] == prefix + rows * cols
    expected = tokens[:, prefix:].reshape(2, rows, cols, -1).permute(0, 3, 1, 2)
    assert torch.equal(maps[0], expected)  # patch tokens, row-major, without the class / register tokens
    # The global token: the class token of the *last* block (2 blocks past level 1 for the p14 model),
    # after the final norm -- not a token of the maps.
    last = captured[len(body.blocks) - 1]
    assert torch.allclose(global_token, body.norm(last)[:, 0], atol=1e-6)
    assert global_token.shape == (2, backbone.channels[-1])
    assert torch.allclose(global_token, body.forward_features(pixels)[:, 0], atol=1e-5)
    # forward() stops at the deepest level and gives the same maps.
    assert all(torch.equal(a, b) for a, b in zip(backbone(pixels), maps))


def test_cnn_global_token_is_the_pooled_deepest_map_and_maps_are_unchanged():
    torch.manual_seed(0)
    backbone = FeatureBackbone("resnet18", [1, 2])
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2)).eval()
    pixels = torch.randn(2, 3, 64, 96)
    maps, global_token = backbone.forward_with_global(pixels)
    with torch.no_grad():
        expected = reference(pixels)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))
    assert torch.allclose(global_token, expected[-1].mean(dim=(-2, -1)))
    assert global_token.shape == (2, 128) and not backbone.is_vit


# -- the patch grid <-> pixels -------------------------------------------------------------------
def _identity_vit(name: str) -> FeatureBackbone:
    """A ViT whose blocks pass tokens through and with no position embedding: token = linear(patch)."""
    backbone = FeatureBackbone(name, [0])
    with torch.no_grad():
        for block in backbone.body.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
        backbone.body.pos_embed.zero_()
        backbone.body.patch_embed.proj.bias.zero_()
    return backbone


@pytest.mark.parametrize(
    ("name", "size", "grid"),
    [("vit_semcorr_test_p16", (48, 80), (3, 5)), ("vit_semcorr_test_p14_reg", (42, 98), (3, 7)),
     ("vit_semcorr_test_p14_reg", (50, 75), (4, 5))],  # 50 x 75 is resized to 56 x 70 first
)
def test_content_at_a_pixel_lands_in_the_cell_whose_centre_the_geometry_helpers_give(name, size, grid):
    backbone = _identity_vit(name)
    height, width = size
    xs, ys = cell_axes(*grid, image_size=size)  # cell centres in pixels of the input
    generator = torch.Generator().manual_seed(0)
    for row, col in [(0, 0), (grid[0] - 1, grid[1] - 1), (1, 2)]:
        pixels = torch.zeros(1, 3, height, width)
        x, y = float(xs[col]), float(ys[row])
        half = min(height / grid[0], width / grid[1]) / 4  # a square well inside the cell around its centre
        top, left = round(y - half), round(x - half)
        size_px = round(2 * half)
        pixels[..., top:top + size_px, left:left + size_px] = torch.randn(3, size_px, size_px, generator=generator)
        norms = backbone(pixels)[0][0].norm(dim=0)  # (rows, cols)
        assert tuple(norms.shape) == grid
        assert torch.nonzero(norms > 1e-6).tolist() == [[row, col]]
    # At multiples of the patch the cell centres are the patch centres.
    patch = backbone.patch_size[0]
    if height % patch == 0 and width % patch == 0:
        assert torch.allclose(xs, (torch.arange(grid[1]) + 0.5) * patch)
        assert torch.allclose(ys, (torch.arange(grid[0]) + 0.5) * patch)


def _planted_maps(shape, source_cell, target_cell, num_source_cells, seed=0):
    """Maps whose cells are orthonormal, except target cell = source cell: one exact match."""
    batch, channels, rows, cols = shape
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
    cells = rows * cols
    if num_source_cells is None:  # the source
        vectors = basis[:, :cells]
    else:  # the target: fresh directions, one of them replaced by the planted source cell
        vectors = basis[:, num_source_cells:num_source_cells + cells].clone()
        vectors[:, target_cell] = basis[:, source_cell]
    return vectors.reshape(channels, rows, cols).expand(batch, -1, -1, -1).contiguous()


@pytest.mark.parametrize("use_rhm", [True, False])
@pytest.mark.parametrize(
    ("backbone", "levels", "source_size", "target_size"),
    [("vit_semcorr_test_p16", (0, 1), (64, 80), (48, 96)), ("vit_semcorr_test_p14_reg", (2,), (56, 70), (42, 84))],
)
def test_hyperpixel_flow_matches_a_planted_patch_to_its_patch_centre(
    monkeypatch, backbone, levels, source_size, target_size, use_rhm
):
    """Source cell (1, 3) equals target cell (2, 0); every other cell is orthogonal to every other.

    The source patch's centre must land on the target patch's centre, through the ViT's real map
    shapes, Hyperpixel Flow's cell grid (stride = patch size) and keypoint transfer.
    """
    model = vit_model(backbone=backbone, levels=levels, size=source_size, use_rhm=use_rhm)
    patch = model.config.feature_stride
    real_forward = model.backbone.forward
    source_cell, target_cell = (1, 3), (2, 0)
    source_grid = (source_size[0] // patch, source_size[1] // patch)
    num_source = source_grid[0] * source_grid[1]

    def planted_forward(pixel_values):
        shape = real_forward(pixel_values)[0].shape  # the maps this ViT really gives for this input
        is_source = tuple(pixel_values.shape[-2:]) == source_size
        flat_source = source_cell[0] * source_grid[1] + source_cell[1]
        flat_target = target_cell[0] * shape[-1] + target_cell[1]
        planted = _planted_maps(shape, flat_source, flat_target, None if is_source else num_source)
        return [planted] * len(levels)

    monkeypatch.setattr(model.backbone, "forward", planted_forward)
    source = torch.randn(1, 3, *source_size)
    target = torch.randn(1, 3, *target_size)
    centre = lambda cell: [(cell[1] + 0.5) * patch, (cell[0] + 0.5) * patch]  # noqa: E731  (x, y) pixels
    keypoints = torch.tensor([[centre(source_cell)]])
    output = model.match(source, target, keypoints)
    assert output.grid_src_to_trg.shape[-2:] == source_grid
    assert output.grid_trg_to_src.shape[-2:] == (target_size[0] // patch, target_size[1] // patch)
    expected = torch.tensor(centre(target_cell))
    assert torch.allclose(output.target_keypoints[0, 0], expected, atol=1e-3)
    # The dense field too: the planted cell's match, in target pixels.
    field = output.grid_src_to_trg[0, :, source_cell[0], source_cell[1]]
    in_pixels = (field + 1) / 2 * torch.tensor([target_size[1], target_size[0]])
    assert torch.allclose(in_pixels, expected, atol=1e-3)
    assert output.keypoint_scores[0, 0] > 0.99


# -- save / load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["vit_semcorr_test_p14_reg", "eva_semcorr_test_p14"])
def test_vit_hyperpixel_model_round_trips_and_runs_at_other_sizes(tmp_path, backbone):
    model = vit_model(seed=4, backbone=backbone, levels=(0, 1), size=(56, 56))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is HyperpixelFlowModel and loaded.backbone.is_vit
    original, restored = model.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    assert all(torch.equal(original[key], restored[key]) for key in original)
    generator = torch.Generator().manual_seed(1)
    keypoints = torch.tensor([[[10.0, 20.0], [40.0, 30.0]]])
    for size in [(56, 56), (70, 84), (42, 98)]:  # saved at 56 x 56; other sizes interpolate the position embedding
        pixels = torch.randn(2, 3, *size, generator=generator)
        a = model.match(pixels[:1], pixels[1:], keypoints)
        b = loaded.match(pixels[:1], pixels[1:], keypoints)
        assert a.grid_src_to_trg.shape[-2:] == (size[0] // 14, size[1] // 14)
        for key in ("grid_src_to_trg", "grid_trg_to_src", "confidence", "target_keypoints", "keypoint_scores"):
            assert (a[key] - b[key]).abs().max().item() < 1e-6, (size, key)


def test_post_init_leaves_vit_weights_alone():
    model = vit_model(seed=0, backbone="vit_semcorr_test_p14_reg", size=(56, 70))
    torch.manual_seed(0)
    reference = timm.create_model("vit_semcorr_test_p14_reg", num_classes=0, dynamic_img_size=True,
                                  img_size=(56, 70))
    ours, theirs = model.backbone.body.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


# -- weights -----------------------------------------------------------------------------------
def _full_timm_file(path, name, seed=0, **kwargs):
    torch.manual_seed(seed)
    full = timm.create_model(name, pretrained=False, **kwargs)
    save_file({key: value.contiguous() for key, value in full.state_dict().items()}, path)
    return full.state_dict()


def test_vit_weights_load_from_a_checkpoint_of_another_resolution(tmp_path):
    path = tmp_path / "vit.safetensors"
    full = _full_timm_file(path, "vit_semcorr_test_p16", img_size=128, num_classes=10)  # 8 x 8 grid, a classifier
    backbone = FeatureBackbone("vit_semcorr_test_p16", [1], image_size=(48, 64))  # 3 x 4 grid, no classifier
    load_backbone_weights(backbone, path)
    body = backbone.body.state_dict()
    assert torch.equal(body["blocks.1.mlp.fc1.weight"], full["blocks.1.mlp.fc1.weight"])
    assert torch.equal(body["cls_token"], full["cls_token"])
    resampled = resample_abs_pos_embed(full["pos_embed"], new_size=(3, 4), num_prefix_tokens=1)
    assert torch.allclose(body["pos_embed"], resampled)


def test_timm_weights_offline_raise_a_value_error_naming_the_file_to_pass(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    backbone = FeatureBackbone("vit_small_patch14_dinov2.lvd142m", [0], image_size=(56, 56), model_kwargs=dict(depth=1))
    with pytest.raises(ValueError, match=r"could not fetch .*vit_small_patch14_dinov2\.lvd142m.*safetensors"):
        load_backbone_weights(backbone, "timm")
    with pytest.raises(ValueError, match="pass a local safetensors file"):
        presets.load_preset("dinov2-small", weights="timm", image_size=[56, 56])


# -- presets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_are_consistent_with_their_backbones(name):
    preset = presets.PRESETS[name]
    config = HyperpixelFlowConfig.from_preset(name)
    assert config.preset == name and config.backbone == preset.backbone
    assert config.feature_stride == preset.patch_size
    assert all(side % preset.patch_size == 0 for side in config.image_size)
    assert config.image_mean == list(presets.IMAGENET_MEAN)
    with torch.device("meta"):  # the real architecture, without allocating its weights
        backbone = FeatureBackbone(config.backbone, config.backbone_layers, image_size=config.image_size)
    assert backbone.is_vit and backbone.reductions == [preset.patch_size] * len(preset.blocks)
    assert max(preset.blocks) < len(backbone.body.blocks)
    grid = tuple(side // preset.patch_size for side in config.image_size)
    assert backbone.patch_grid_size(*config.image_size) == grid
    card = presets.model_card(name)
    for text in ("55.6", "59.6", "63.7", "68.6", "≈ 28", "semcorr did not measure", f"`{preset.backbone}`",
                 "Oquab", "Tang", "Min", "Tale of Two Features", "Telling Left from Right"):
        assert text in card, text
    assert "{" not in card.split("```")[0]  # every placeholder of the front matter and title filled


def test_preset_config_overrides_and_errors():
    config = HyperpixelFlowConfig.from_preset("dinov2-base", image_size=[840, 840], use_rhm=False)
    assert config.image_size == [840, 840] and config.use_rhm is False and config.backbone_layers == [11]
    assert HyperpixelFlowConfig.from_preset("dinov2-base-nn").use_rhm is False
    assert HyperpixelFlowConfig.from_preset("dino-base").backbone_layers == [9, 11]
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        HyperpixelFlowConfig.from_preset("dinov2-small", image_size=[500, 518])
    with pytest.raises(ValueError, match="unknown preset 'dinov3'.*dinov2-base"):
        presets.load_preset("dinov3")


def test_dinov2_preset_loads_a_local_timm_checkpoint_saved_at_another_size(tmp_path):
    path = tmp_path / "vit_small_patch14_dinov2.safetensors"
    full = _full_timm_file(path, "vit_small_patch14_dinov2", img_size=112)  # 8 x 8 patches; the preset runs at 4 x 4
    model = presets.load_preset("dinov2-small", weights=path, image_size=[56, 56])
    assert model.config.backbone_weights == path.name and not model.training
    body = model.backbone.body.state_dict()
    assert torch.equal(body["blocks.11.attn.qkv.weight"], full["blocks.11.attn.qkv.weight"])
    resampled = resample_abs_pos_embed(full["pos_embed"], new_size=(4, 4), num_prefix_tokens=1)
    assert torch.allclose(body["pos_embed"], resampled)
    output = model.match(torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 84), torch.tensor([[[21.0, 35.0]]]))
    assert output.grid_src_to_trg.shape == (1, 2, 4, 4) and output.grid_trg_to_src.shape == (1, 2, 4, 6)


def test_saved_preset_is_a_hub_folder_that_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "test-tiny", presets.Preset(
        backbone="vit_semcorr_test_p14_reg", blocks=(2,), patch_size=14, image_size=(56, 70), similarity_power=2.0,
        use_rhm=True, title="test preset", rationale="Test rationale.",
    ))
    weights = tmp_path / "tiny.safetensors"
    full = _full_timm_file(weights, "vit_semcorr_test_p14_reg", seed=3, img_size=98)
    folder = presets.save_preset("test-tiny", tmp_path / "repo", weights=weights)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (folder / name).is_file(), name
    saved = json.loads((folder / "config.json").read_text())
    assert saved["preset"] == "test-tiny" and saved["backbone_weights"] == "tiny.safetensors"
    loaded = AutoModel.from_pretrained(folder).eval()
    assert torch.equal(loaded.backbone.body.state_dict()["blocks.2.mlp.fc2.weight"], full["blocks.2.mlp.fc2.weight"])
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor.size == {"height": 56, "width": 70} and list(processor.image_mean) == list(presets.IMAGENET_MEAN)
    card = (folder / "README.md").read_text()
    assert "base_model: timm/vit_semcorr_test_p14_reg" in card and "Test rationale." in card
    assert "56 × 70" in card and "4 × 5 cells" in card and "weights: tiny.safetensors" in card
    reference = presets.load_preset("test-tiny", weights=weights)
    pixels = torch.randn(2, 3, 56, 70)
    a, b = reference.match(pixels[:1], pixels[1:]), loaded.match(pixels[:1], pixels[1:])
    assert (a.grid_src_to_trg - b.grid_src_to_trg).abs().max().item() < 1e-6

"""HyperpixelFlowConfig / HyperpixelFlowModel: Auto round trips, weight handling, match() contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

from semcorr.modeling import (
    CorrespondenceOutput,
    HyperpixelFlowConfig,
    HyperpixelFlowModel,
    SemanticCorrespondenceImageProcessor,
    SemanticMatcherPreTrainedModel,
    default_config,
    default_model_dir,
    image_processor_for,
    load_backbone_weights,
)

from .conftest import cell_centres, grid_in_pixels, pixel_values, shifted_crops, textured_image, tiny_config, tiny_model


# -- config -------------------------------------------------------------------------------------
def test_config_save_load_round_trip(tmp_path):
    config = tiny_config(similarity_power=2.0, use_rhm=False, hough_bins=1024, transfer_radius=2.5, image_size=[64, 96])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "semcorr-hyperpixel"
    for loaded in (HyperpixelFlowConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is HyperpixelFlowConfig
        assert loaded.backbone == "resnet18" and loaded.backbone_layers == [1, 2]
        assert loaded.image_size == [64, 96] and loaded.backbone_weights is None
        assert loaded.similarity_power == 2.0 and loaded.use_rhm is False
        assert loaded.hough_bins == 1024 and loaded.transfer_radius == 2.5


def test_config_defaults_are_the_embedded_model():
    config = default_config()
    assert config.model_type == "semcorr-hyperpixel"
    assert config.backbone == "tf_efficientnet_lite0" and config.backbone_weights == "embedded"
    assert config.image_mean == [0.5, 0.5, 0.5] and config.image_std == [0.5, 0.5, 0.5]
    assert default_config(image_size=[320, 480]).image_size == [320, 480]
    processor = image_processor_for(default_config(image_size=[320, 480]))
    assert processor.size == {"height": 320, "width": 480} and processor.image_mean == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "fields",
    [dict(backbone_layers=[]), dict(image_size=[4, 64]), dict(hough_kernel_size=6), dict(backbone=""), dict(hough_bins=8)],
)
def test_config_rejects_bad_fields(fields):
    with pytest.raises(ValueError):
        tiny_config(**fields)


# -- model classes and Auto round trip ----------------------------------------------------------
def test_model_classes_and_auto_registration():
    assert HyperpixelFlowModel.config_class is HyperpixelFlowConfig
    assert issubclass(HyperpixelFlowModel, SemanticMatcherPreTrainedModel)
    model = AutoModel.from_config(tiny_config())
    assert type(model) is HyperpixelFlowModel


def test_matcher_subclass_must_implement_match():
    with pytest.raises(TypeError, match="must implement match"):
        type("BrokenMatcher", (SemanticMatcherPreTrainedModel,), {})


def test_save_pretrained_auto_model_round_trip_is_exact(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is HyperpixelFlowModel
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(original_state) == set(loaded_state)
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    pixels = pixel_values(textured_image(64, 64, 1), textured_image(64, 64, 2))
    keypoints = torch.tensor([[[10.0, 20.0], [40.0, 50.0]]])
    a = model.match(pixels[:1], pixels[1:], keypoints)
    b = loaded.match(pixels[:1], pixels[1:], keypoints)
    for key in ("grid_src_to_trg", "grid_trg_to_src", "confidence", "target_keypoints", "keypoint_scores"):
        assert (a[key] - b[key]).abs().max().item() == 0.0, key


def test_post_init_leaves_backbone_weights_alone():
    torch.manual_seed(0)
    model = HyperpixelFlowModel(tiny_config())
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2))
    ours, theirs = model.backbone.body.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # N(0, 0.02) re-init would change them


def test_loaded_backbone_weights_survive_save_and_from_pretrained(tmp_path):
    torch.manual_seed(5)
    full = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        for module in full.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, weights)
    model = HyperpixelFlowModel(tiny_config(backbone_weights=weights.name))
    load_backbone_weights(model.backbone, weights)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModel.from_pretrained(tmp_path / "saved")
    body = loaded.backbone.body.state_dict()
    expected = full.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.bn2.running_mean", "layer2.1.bn1.weight"):
        assert torch.equal(body[key], expected[key]), key
    assert not torch.equal(body["bn1.running_var"], torch.ones_like(body["bn1.running_var"]))
    assert loaded.config.backbone_weights == "resnet18.safetensors"


# -- match() ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def test_match_output_shapes_and_a_planted_shift(model):
    """Shapes, units and values of every output on a pair with a known answer.

    Pair 0: the 48 x 80 target is a crop of the 64 x 64 source's texture, moved so that source pixel
    (x, y) is target pixel (x + 16, y - 8); the source's top and bottom cell rows are not in the target.
    Pair 1: unrelated textures (shapes only).
    """
    source_image, target_image = shifted_crops((64, 64), (48, 80), offset=(16, -8), seed=0)
    source = pixel_values(source_image, textured_image(64, 64, 2))
    target = pixel_values(target_image, textured_image(48, 80, 4), size=(48, 80))
    keypoints = torch.tensor([[x, y] for y in (4.0, 13.0, 21.5, 30.0, 37.0, 45.0, 60.0)
                              for x in (3.0, 13.5, 26.0, 39.0, 52.0, 61.0)])[None].repeat(2, 1, 1)
    output = model.match(source, target, keypoints)
    assert isinstance(output, CorrespondenceOutput)
    assert output.grid_src_to_trg.shape == (2, 2, 8, 8)
    assert output.grid_trg_to_src.shape == (2, 2, 6, 10)
    assert output.confidence.shape == (2, 8, 8)
    assert output.target_keypoints.shape == (2, 42, 2)
    assert output.keypoint_scores.shape == (2, 42)
    # absolute, not normalised by the pair's peak: the cells of pair 0 whose content is in the target
    # score above the cells of the unrelated pair 1 (measured 0.69 against 0.62 with this tiny model)
    assert output.confidence[0, 1:-1].mean() > output.confidence[1].mean() + 0.04

    # Dense fields (normalised units, x first): every cell whose content is in the other image lands
    # on it (RHM + refinement find the whole-cell shift exactly; 0.5 px = 1/16 cell).
    xs, ys = cell_centres(8, 8, 8)
    in_target = (ys - 8 >= 0) & (ys - 8 < 48)  # source rows 1..6
    x, y = grid_in_pixels(output.grid_src_to_trg, (48, 80))
    assert float(torch.hypot(x[0] - (xs + 16), y[0] - (ys - 8))[in_target].max()) < 0.5
    target_xs, target_ys = cell_centres(6, 10, 8)
    in_source = target_xs - 16 >= 0  # target columns 2..9
    x, y = grid_in_pixels(output.grid_trg_to_src, (64, 64))
    assert float(torch.hypot(x[0] - (target_xs - 16), y[0] - (target_ys + 8))[in_source].max()) < 0.5
    # The transfer weights (best RHM score over the pair's peak) rank every source cell the target
    # shows above every cell it does not show; the absolute confidence ranks them on average (its
    # distinctiveness term is coarse on a 6 x 10 target grid).
    weights, confidence = output.transfer_weights[0], output.confidence[0]
    assert float(weights[in_target].min()) > float(weights[~in_target].max())
    assert float(confidence[in_target].mean()) > float(confidence[~in_target].mean()) + 0.04

    # Keypoints come back in target model-input pixels (80 x 48). Points whose neighbouring cells are all
    # in the target land within 1 px (the transfer keeps a point's offset from its cells in normalised
    # units, which the 64 -> 80 and 64 -> 48 frames stretch by a quarter of that offset).
    expected = keypoints[0] + torch.tensor([16.0, -8.0])
    inside = (expected[:, 1] >= 8) & (expected[:, 1] <= 40)
    outside = (expected[:, 1] < 0) | (expected[:, 1] >= 48)
    assert int(inside.sum()) == 24 and int(outside.sum()) == 12
    assert float((output.target_keypoints[0] - expected).norm(dim=-1)[inside].max()) < 1.0
    scores = output.keypoint_scores[0]  # the mean confidence of their cells: higher inside (0.71 vs 0.63)
    assert float(scores[inside].mean()) > float(scores[outside].mean()) + 0.04

    without = model.match(source, target)
    assert without.target_keypoints is None and without.keypoint_scores is None
    assert torch.equal(without.grid_src_to_trg, output.grid_src_to_trg)
    assert torch.equal(model(source, target, keypoints).target_keypoints, output.target_keypoints)


@pytest.mark.parametrize("use_rhm", [True, False])
def test_identical_images_map_keypoints_to_themselves(use_rhm):
    model = tiny_model(seed=0, use_rhm=use_rhm)
    pixels = pixel_values(textured_image(64, 64, 7))
    generator = torch.Generator().manual_seed(0)
    keypoints = torch.rand(1, 20, 2, generator=generator) * 56 + 4
    output = model.match(pixels, pixels, keypoints)
    error = (output.target_keypoints - keypoints).norm(dim=-1)
    assert error.max().item() < 8.0  # one cell (stride 8)
    assert error.mean().item() < 2.0


def test_batch_of_two_equals_two_singles(model):
    source = pixel_values(textured_image(64, 64, 1), textured_image(64, 64, 2))
    target = pixel_values(textured_image(64, 64, 3), textured_image(64, 64, 4))
    keypoints = torch.rand(2, 5, 2) * 64
    batched = model.match(source, target, keypoints)
    for row in range(2):
        single = model.match(source[row : row + 1], target[row : row + 1], keypoints[row : row + 1])
        for key in ("grid_src_to_trg", "grid_trg_to_src", "confidence", "target_keypoints", "keypoint_scores"):
            assert torch.allclose(batched[key][row], single[key][0], atol=1e-4), key


def test_embedded_default_follows_a_horizontal_shift(default_model, chelsea):
    shift = 32
    source = chelsea.crop((0, 20, 256, 276))
    target = chelsea.crop((shift, 20, 256 + shift, 276))  # content moves 32 px to the left
    processor = SemanticCorrespondenceImageProcessor(
        size={"height": 256, "width": 256}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    pixels = processor.preprocess([source, target])["pixel_values"]
    xs, ys = np.meshgrid(np.arange(64, 224, 32), np.arange(40, 232, 32))
    keypoints = torch.tensor(np.stack([xs.ravel(), ys.ravel()], axis=1), dtype=torch.float32)[None]
    output = default_model.match(pixels[:1], pixels[1:], keypoints)
    predicted = output.target_keypoints[0]
    expected = keypoints[0] - torch.tensor([float(shift), 0.0])
    error = (predicted - expected).norm(dim=-1)
    assert error.median().item() < 3.0
    assert (error < 6.0).float().mean().item() >= 0.9
    # And not the identity: the shift is really found.
    assert (predicted[:, 0] - keypoints[0, :, 0]).median().item() == pytest.approx(-shift, abs=3.0)


def test_default_model_dir_is_a_complete_hub_layout_written_once(semcorr_cache):
    directory = default_model_dir()
    assert directory.parent == semcorr_cache
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (directory / name).is_file(), name
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp
    config = AutoConfig.from_pretrained(directory)
    assert config.backbone == "tf_efficientnet_lite0"
    assert not list(semcorr_cache.glob(".tmp-default-*"))

"""The cascaded MIL generator as a model: config, Auto round trip, the cascade's pieces worked by hand,
the ablation switches, the matching contract and the pipeline (learning: test_train_cascaded_mil)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel

from semcorr.modeling import CascadedMILConfig, CascadedMILModel, CascadedMILStageConfig, image_processor_for
from semcorr.modeling.cascaded_mil.modeling_cascaded_mil import (
    _bilinear_cell_weights,
    _nearest_cell,
    volume_pooling,
)
from tests.conftest import pixel_values, shifted_crops

SMALL_STAGE = dict(volume_embed_dim=8, volume_depth=2, volume_heads=2, volume_window=2, volume_fold=1)
TINY_MIL = dict(backbone="resnet18", backbone_layers=[2], backbone_weights=None, image_size=[64, 64],
                image_stage=SMALL_STAGE, region_stage=SMALL_STAGE, pixel_stage=SMALL_STAGE, saliency="none",
                num_suspects=4, region_image_size=32, num_region_pairs=3, num_pseudo_pairs=6)


def tiny_mil(seed: int = 0, **overrides) -> CascadedMILModel:
    torch.manual_seed(seed)
    return CascadedMILModel(CascadedMILConfig(**{**TINY_MIL, **overrides})).eval()


@pytest.fixture(scope="module")
def pair():
    source, target = shifted_crops((64, 64), (64, 64), (16, 0))  # source pixel (x, y) shows target pixel (x + 16, y)
    return pixel_values(source, target)[:1], pixel_values(source, target)[1:]


def test_config_nests_a_stage_config_per_stage_and_round_trips(tmp_path):
    config = CascadedMILConfig(pixel_stage={"volume_depth": 4}, share_attention=True, hough_kernel_size=7)
    assert isinstance(config.pixel_stage, CascadedMILStageConfig) and config.pixel_stage.volume_depth == 4
    assert config.image_stage.volume_depth == 2 and config.enabled_stages == ("image", "region", "pixel")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is CascadedMILConfig and loaded.pixel_stage.volume_depth == 4 and loaded.hough_kernel_size == 7
    assert set(config.to_dict()["pixel_stage"]) == {"num_attention_heads", "volume_embed_dim", "volume_depth",
                                                    "volume_heads", "volume_window", "volume_fold", "mlp_ratio"}
    assert CascadedMILConfig(use_pixel_stage=False).enabled_stages == ("image", "region")
    for bad, message in [({"hough_kernel_size": 4}, "must be odd"), ({"saliency": "selfreformer"}, "saliency must be"),
                         ({"use_region_stage": False}, "use_pixel_stage needs use_region_stage"),
                         ({"region_window": 4}, "region_window must be odd")]:
        with pytest.raises(ValueError, match=message):
            CascadedMILConfig(**bad)


def test_an_untrained_stage_is_the_backbones_cosine_volume(pair):
    """Zero-initialised residuals survive transformers' post_init: every stage starts from the cosine volume."""
    model = tiny_mil()
    source, target = model.encode(pair[0]), model.encode(pair[1])
    cosine = torch.nn.functional.normalize(source[0], dim=-1) @ torch.nn.functional.normalize(target[0], dim=-1).mT
    for stage in ("image", "region", "pixel"):
        volumes = model.stage_volume(stage, source, target)
        torch.testing.assert_close(volumes["raw"], cosine, atol=1e-5, rtol=0)
        assert torch.equal(volumes["refined"], volumes["raw"])
    assert not torch.equal(model.image_mvam.aggregator.blocks[0].mlp[0].weight, torch.zeros(1))  # the rest is random


def test_ablation_switches_shape_the_model():
    shared = tiny_mil(share_attention=True)
    assert shared.region_mvam is shared.image_mvam and shared.pixel_mvam is shared.image_mvam
    separate = tiny_mil()
    assert len({id(separate.image_mvam), id(separate.region_mvam), id(separate.pixel_mvam)}) == 3
    image_only = tiny_mil(use_region_stage=False, use_pixel_stage=False)
    assert image_only.region_mvam is None and image_only.pixel_mvam is None
    count = lambda model: sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count(separate) == 3 * count(image_only) and count(shared) == count(image_only)


def test_shared_attention_saves_once_and_loads_shared(tmp_path):
    """One MVAM under three names: safetensors refuses aliased tensors unless they are declared tied."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = tiny_mil(share_attention=True).eval()
    with torch.no_grad():
        for parameter in model.image_mvam.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)  # not the zero-initialised outputs
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert not any(key.startswith(("region_mvam.", "pixel_mvam.")) for key in stored)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.region_mvam is loaded.image_mvam and loaded.pixel_mvam is loaded.image_mvam
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not hasattr(tiny_mil(), "_tied_weights_keys") or not tiny_mil()._tied_weights_keys  # separate: nothing tied


@pytest.mark.parametrize("stages, losses", [({}, {"image", "region", "pixel"}),
                                            ({"use_pixel_stage": False}, {"image", "region"}),
                                            ({"use_region_stage": False, "use_pixel_stage": False}, {"image"})])
def test_forward_trains_the_enabled_stages_and_never_the_backbone(pair, stages, losses):
    model = tiny_mil(**stages).train()
    batch = torch.cat([pair[0], pair[1], pair[0]]), torch.cat([pair[1], pair[0], pair[1].flip(-1)])
    output = model(*batch, class_ids=torch.tensor([0, 1, 2]))
    assert set(output.losses) == losses and torch.isfinite(output.loss)
    weights = model.config
    expected = sum(getattr(weights, f"{name}_loss_weight") * output.losses[name] for name in losses)
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    for name in losses:
        mvam = getattr(model, f"{name}_mvam")
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mvam.parameters()), name
    if "region" in losses:
        assert output.region_pairs["source_points"].shape == (3, 3, 2)
        assert output.image_pairs["source_points"].shape == (3, 4, 2)


def test_volume_pooling_by_hand():
    """AP of a one-to-one volume is 1 (at a low temperature); of a flat volume 1 / N."""
    peaked = torch.eye(4)[None] * 10
    assert volume_pooling(peaked, 0.05).item() == pytest.approx(1.0)
    assert volume_pooling(torch.zeros(1, 4, 4), 0.05).item() == pytest.approx(0.25)
    row = torch.softmax(torch.tensor([1.0, 0.0, 0.0, 0.0]) / 0.5, 0).max().item()
    assert volume_pooling(torch.eye(4)[None], 0.5).item() == pytest.approx(row)


def test_bilinear_targets_and_nearest_cells_by_hand():
    """A 64 x 64 image on a 4 x 4 grid: cell centres at 8, 24, 40, 56 px."""
    points = torch.tensor([[[24.0, 8.0], [32.0, 16.0], [2.0, 60.0]]])  # a centre, between 4 centres, a corner
    weights = _bilinear_cell_weights(points, (64, 64), (4, 4))[0]
    assert weights[0, 1] == 1 and weights[0].sum() == 1
    assert torch.allclose(weights[1, [1, 2, 5, 6]], torch.full((4,), 0.25)) and weights[1].sum() == pytest.approx(1)
    assert weights[2, 12] == pytest.approx(1.0)  # clamped into the bottom-left cell
    assert _nearest_cell(points, (64, 64), (4, 4)).tolist() == [[1, 6, 12]]  # (32, 16) starts cell (row 1, col 2)


def test_region_windows_and_non_maximum_suppression_by_hand():
    model = tiny_mil()
    image = torch.arange(64.0).repeat(64, 1)[None, None].repeat(1, 3, 1, 1)  # value = x
    crops, boxes = model._crop_regions(image, torch.tensor([[[40.0, 24.0]]]), (4, 4))
    side = 16 * model.config.region_window  # 5 cells of 16 px on a 4 x 4 grid of a 64 px image
    assert boxes.tolist() == [[40 - side / 2, 24 - side / 2, 40 + side / 2, 24 + side / 2]]
    assert crops.shape == (1, 3, 32, 32)
    # crop column j samples pixel coordinate x1 + (j + 0.5) * side / 32, i.e. pixel index that - 0.5
    sampled = boxes[0, 0] + (torch.arange(32) + 0.5) * side / 32 - 0.5
    inside = (sampled >= 1) & (sampled <= 62)
    torch.testing.assert_close(crops[0, 0, 16, inside], sampled[inside], atol=1e-3, rtol=0)
    points = torch.tensor([[[10.0, 10.0], [12.0, 10.0], [50.0, 50.0]]])
    scores = torch.tensor([[0.5, 0.9, 0.7]])
    keep = model._non_maximum_suppression(points, scores, torch.tensor([[0.0, 0.0, 80.0, 80.0]]))
    assert keep.tolist() == [[False, True, True]]  # 10,10 lies within a cell of the better 12,10


def test_match_and_pseudo_labels_find_a_planted_shift(pair):
    """Untrained (= the backbone's cosine volume), the generator already finds the planted 16-px shift."""
    model = tiny_mil(seed=3)
    source, target = pair
    output = model.match(source, target, torch.tensor([[[24.0, 24.0], [40.0, 40.0]]]))
    assert output.grid_src_to_trg.shape == (1, 2, 8, 8) and output.confidence.shape == (1, 8, 8)
    assert output.confidence.min() >= 0 and output.confidence.max() <= 1
    torch.testing.assert_close(output.target_keypoints, torch.tensor([[[40.0, 24.0], [56.0, 40.0]]]), atol=4.0, rtol=0)
    labels = model.pseudo_label(source, target)
    found = labels["found"][0]
    assert found.sum() >= 3
    shift = labels["target_points"][0, found] - labels["source_points"][0, found]
    assert ((shift - torch.tensor([16.0, 0.0])).norm(dim=-1) < 4).float().mean() >= 0.75, shift
    cells = labels["source_points"][0, found].tolist()
    assert len({tuple(c) for c in cells}) == len(cells)  # one-to-one


def test_round_trip_auto_model_and_pipeline(tmp_path, pair):
    import semcorr.pipelines  # noqa: F401
    from transformers import pipeline

    model = tiny_mil()
    with torch.no_grad():  # train the stages a little so a round trip has something to lose
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    image_processor_for(model.config).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is CascadedMILModel
    a, b = model.match(*pair), loaded.match(*pair)
    for key in ("grid_src_to_trg", "grid_trg_to_src", "confidence"):
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    matcher = pipeline("semantic-correspondence", model=str(tmp_path))
    result = matcher({"source_image": (pair[0][0].permute(1, 2, 0) * 50 + 128).clamp(0, 255).byte().numpy(),
                      "target_image": (pair[1][0].permute(1, 2, 0) * 50 + 128).clamp(0, 255).byte().numpy(),
                      "source_keypoints": [[20.0, 30.0]]})
    assert len(result["target_keypoints"]) == 1 and math.isfinite(result["scores"][0])


def test_cascade_figure_shows_each_stage_and_scores_it_against_the_truth(tmp_path):
    """``cascade()`` hands on what ``forward`` would (suspects, region pairs, pseudo labels); the figure
    has one panel per stage and counts a match correct exactly when it lands near the given truth."""
    from PIL import Image

    from semcorr.pipelines.cascade_figure import draw_cascade, main
    from semcorr.pipelines.drawing import CAPTION_HEIGHT

    model = tiny_mil(seed=3)
    source_array, target_array = shifted_crops((64, 64), (64, 64), (16, 0))
    source, target = Image.fromarray(source_array), Image.fromarray(target_array)
    stages = model.cascade(*pixel_values(source_array, target_array).chunk(2))
    assert list(stages) == ["image", "region", "pixel"]
    assert [stages[name]["found"].shape[1] for name in stages] == [4, 3, 6]
    picture, summary = draw_cascade(model, source, target, lambda points: points + [16.0, 0.0], panel_height=128)
    assert picture.height == 3 * (CAPTION_HEIGHT + 128)
    assert summary["pixel"]["pairs"] == int(stages["pixel"]["found"].sum()) and summary["pixel"]["pck"] >= 0.75
    _, wrong = draw_cascade(model, source, target, lambda points: points + [-30.0, 0.0], panel_height=128)
    assert all(row["pck"] == 0.0 for row in wrong.values())  # every match is 46 px from this false truth
    model.save_pretrained(tmp_path / "generator")
    assert main(["--model", str(tmp_path / "generator"), "--out", str(tmp_path / "cascade.png")]) == 0
    assert Image.open(tmp_path / "cascade.png").height == 3 * (CAPTION_HEIGHT + 360)
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2

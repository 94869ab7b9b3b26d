"""The ``semantic-correspondence`` pipeline and match drawing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import semcorr.pipelines  # noqa: F401  (registers the task)
from semcorr.modeling import HyperpixelFlowModel, SemanticCorrespondenceImageProcessor
from semcorr.pipelines import SemanticCorrespondencePipeline, default_pipeline, draw_matches
from semcorr.pipelines.drawing import score_color

from .conftest import textured_image, tiny_model


def _pair(seed=0, source_shape=(48, 60), target_shape=(40, 72)):
    return {
        "source_image": textured_image(*source_shape, seed=seed),
        "target_image": textured_image(*target_shape, seed=seed + 100),
    }


def _assert_same_result(a, b, atol=1e-4):
    assert set(a) == set(b) == {"source_keypoints", "target_keypoints", "scores"}
    for key in a:
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=atol, err_msg=key)


# -- the embedded default ------------------------------------------------------------------------
def test_no_model_gives_embedded_default_offline_and_transfers_to_target_pixels(default_pipe, chelsea, semcorr_cache):
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE  # set before huggingface_hub loaded
    assert isinstance(default_pipe, SemanticCorrespondencePipeline)
    assert isinstance(default_pipe.model, HyperpixelFlowModel)
    assert default_pipe.model.config.backbone == "tf_efficientnet_lite0"
    assert str(default_pipe.model.name_or_path).startswith(str(semcorr_cache))
    wide = chelsea.resize((chelsea.width * 2, chelsea.height), Image.BILINEAR)  # 902 x 300
    keypoints = [[100.0, 100.0], [200.0, 150.0], [300.0, 200.0], [60.5, 250.5], [400.0, 40.0]]
    result = default_pipe({"source_image": chelsea, "target_image": wide, "source_keypoints": keypoints})
    assert np.allclose(result["source_keypoints"], keypoints, atol=1e-3)  # echoed in source pixels
    target = np.asarray(result["target_keypoints"])
    expected = np.asarray(keypoints) * [2.0, 1.0]
    assert target.shape == (5, 2)
    assert np.abs(target - expected).max() < 8.0, target  # 8 px on a 902-px-wide target
    assert np.median(np.abs(target - expected)) < 3.0
    assert len(result["scores"]) == 5 and all(0.0 <= s <= 1.0 for s in result["scores"])


def test_default_model_top_k_matches_are_correct(default_model, chelsea):
    processor = SemanticCorrespondenceImageProcessor(size={"height": 192, "width": 288}, image_mean=[0.5] * 3,
                                                    image_std=[0.5] * 3)
    pipe = pipeline("semantic-correspondence", model=default_model, image_processor=processor)
    wide = chelsea.resize((chelsea.width * 2, chelsea.height), Image.BILINEAR)
    result = pipe({"source_image": chelsea, "target_image": wide}, top_k=30)
    source, target = np.asarray(result["source_keypoints"]), np.asarray(result["target_keypoints"])
    assert 10 <= len(source) <= 30 and len(target) == len(source) == len(result["scores"])
    error = np.linalg.norm(target - source * [2.0, 1.0], axis=1)
    assert np.median(error) < 6.0 and (error < 15.0).mean() >= 0.8


def test_default_pipeline_helper(default_pipe):
    pipe = default_pipeline()
    assert isinstance(pipe, SemanticCorrespondencePipeline)
    assert pipe.model.config.to_diff_dict() == default_pipe.model.config.to_diff_dict()
    assert pipe.image_processor.size == {"height": 448, "width": 448}
    assert pipe.image_processor.image_mean == [0.5, 0.5, 0.5]


# -- top-k mode ------------------------------------------------------------------------------------
def test_without_keypoints_returns_sorted_top_k_mutual_matches(tiny_pipeline):
    for top_k in (1, 5, 40):
        result = tiny_pipeline(_pair(1), top_k=top_k)
        source, target, scores = result["source_keypoints"], result["target_keypoints"], result["scores"]
        assert 1 <= len(source) <= top_k
        assert len(source) == len(target) == len(scores)
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        source, target = np.asarray(source), np.asarray(target)
        assert (source >= 0).all() and (source[:, 0] <= 60).all() and (source[:, 1] <= 48).all()
        assert (target >= 0).all() and (target[:, 0] <= 72).all() and (target[:, 1] <= 40).all()
    default_k = tiny_pipeline(_pair(1))
    assert len(default_k["scores"]) <= 50
    # A looser round-trip tolerance admits at least as many mutual matches (64 cells: top_k never caps).
    counts = [len(tiny_pipeline(_pair(1), top_k=64, cycle_tolerance=t)["scores"]) for t in (0.0, 1.0, 100.0)]
    assert counts[0] <= counts[1] <= counts[2] and counts[2] > counts[0], counts


def test_identical_images_top_k_matches_are_fixed_points(tiny_pipeline):
    image = textured_image(64, 64, seed=8)
    result = tiny_pipeline({"source_image": image, "target_image": image}, top_k=10)
    # The absolute confidence of an image against itself is one smooth hill on this 8 x 8 grid (highest
    # where a cell has the most neighbours to match), so non-maximum suppression keeps few of its cells.
    assert len(result["scores"]) >= 3
    np.testing.assert_allclose(result["source_keypoints"], result["target_keypoints"], atol=2.0)


def test_call_argument_errors(tiny_pipeline):
    with pytest.raises(ValueError, match="top_k"):
        tiny_pipeline(_pair(), top_k=0)
    with pytest.raises(TypeError, match="unexpected arguments"):
        tiny_pipeline(_pair(), threshold=0.5)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_pipeline([_pair()], batch_size=-1)
    with pytest.raises(TypeError, match="a dict with 'source_image'"):
        tiny_pipeline(42)


def test_mixed_requests_in_one_list_match_separate_calls(tiny_pipeline):
    mixed = [dict(_pair(0), source_keypoints=[[5, 5]]), _pair(1), dict(_pair(2), source_keypoints=[[7, 9], [3, 4]])]
    together = tiny_pipeline(mixed, batch_size=3, top_k=5)
    separate = [tiny_pipeline(item, top_k=5) for item in mixed]
    assert len(together[0]["target_keypoints"]) == 1 and len(together[2]["target_keypoints"]) == 2
    for joint, alone in zip(together, separate):
        for key in ("source_keypoints", "target_keypoints", "scores"):
            np.testing.assert_allclose(np.asarray(joint[key]), np.asarray(alone[key]), atol=1e-4)


# -- input forms and batching -----------------------------------------------------------------------
def test_images_as_path_pil_and_numpy_agree(tiny_pipeline, tmp_path):
    source, target = textured_image(48, 60, 3), textured_image(40, 72, 4)
    Image.fromarray(source).save(tmp_path / "source.png")
    Image.fromarray(target).save(tmp_path / "target.png")
    keypoints = [[10.0, 12.0], [50.5, 30.25]]
    forms = [
        (source, target),
        (Image.fromarray(source), Image.fromarray(target)),
        (str(tmp_path / "source.png"), tmp_path / "target.png"),  # str and pathlib.Path
    ]
    results = [tiny_pipeline({"source_image": s, "target_image": t, "source_keypoints": keypoints}) for s, t in forms]
    for other in results[1:]:
        _assert_same_result(results[0], other, atol=1e-6)
    assert len(results[0]["target_keypoints"]) == 2
    as_numpy = tiny_pipeline({"source_image": source, "target_image": target, "source_keypoints": np.array(keypoints)})
    _assert_same_result(results[0], as_numpy, atol=1e-6)


def test_list_input_with_batching_equals_one_by_one(tiny_pipeline):
    pairs = [
        dict(_pair(0), source_keypoints=[[5.0, 5.0], [30.0, 20.0], [59.0, 47.0]]),
        dict(_pair(1, (64, 64), (30, 50)), source_keypoints=[[32.0, 32.0]]),  # fewer points: padded in the batch
        dict(_pair(2, (20, 90), (90, 20)), source_keypoints=[[1.0, 1.0], [80.0, 10.0]]),
    ]
    batched = tiny_pipeline(pairs, batch_size=2)
    assert isinstance(batched, list) and len(batched) == 3
    assert [len(r["target_keypoints"]) for r in batched] == [3, 1, 2]
    for pair, result in zip(pairs, batched):
        _assert_same_result(result, tiny_pipeline(pair))
    unkeyed = [_pair(5), _pair(6, (64, 64), (64, 64)), _pair(7)]
    for pair, result in zip(unkeyed, tiny_pipeline(unkeyed, batch_size=2, top_k=8)):
        _assert_same_result(result, tiny_pipeline(pair, top_k=8))


def test_empty_keypoint_list_gives_empty_result(tiny_pipeline):
    result = tiny_pipeline(dict(_pair(), source_keypoints=[]))
    assert result == {"source_keypoints": [], "target_keypoints": [], "scores": []}


# -- loading saved models -------------------------------------------------------------------------
def test_pipeline_loads_saved_model_dir_without_processor(tmp_path):
    model = tiny_model(seed=1, image_size=[64, 96])
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    pipe = pipeline("semantic-correspondence", model=str(tmp_path))
    assert isinstance(pipe, SemanticCorrespondencePipeline) and isinstance(pipe.model, HyperpixelFlowModel)
    assert pipe.image_processor.size == {"height": 64, "width": 96}  # derived from the config
    state = pipe.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    result = pipe(dict(_pair(), source_keypoints=[[10, 10]]))
    assert len(result["target_keypoints"]) == 1


def test_pipeline_loads_saved_model_dir_with_processor(tmp_path, tiny_model_dir):
    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path)
    SemanticCorrespondenceImageProcessor(size={"height": 48, "width": 80}, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3).save_pretrained(tmp_path)
    pipe = pipeline("semantic-correspondence", model=str(tmp_path))
    assert pipe.image_processor.size == {"height": 48, "width": 80}  # the saved processor wins
    assert pipe.image_processor.image_mean == [0.5] * 3
    result = pipe(_pair(), top_k=3)
    assert 1 <= len(result["scores"]) <= 3
    from_fixture = pipeline("semantic-correspondence", model=str(tiny_model_dir))
    assert from_fixture.image_processor.size == {"height": 64, "width": 64}


# -- drawing ---------------------------------------------------------------------------------------
def test_draw_matches_layout_and_colours():
    source = Image.new("RGB", (40, 30), "black")
    target = Image.new("RGB", (80, 60), "black")
    result = {"source_keypoints": [[10.0, 10.0], [30.0, 5.0]], "target_keypoints": [[60.0, 40.0], [20.0, 50.0]],
              "scores": [1.0, 0.0]}
    canvas = draw_matches(source, target, result, max_height=60)
    # Both scaled to height 60: source x2 (80 wide), target x1 (80 wide).
    assert canvas.size == (80 + 80, 60) and canvas.mode == "RGB"
    pixels = np.asarray(canvas)
    good, bad = score_color(1.0), score_color(0.0)
    assert tuple(pixels[20, 20]) == good  # source (10, 10) scaled x2
    assert tuple(pixels[40, 80 + 60]) == good  # target (60, 40), offset by the left width
    assert tuple(pixels[10, 60]) == bad  # source (30, 5) scaled x2
    assert tuple(pixels[50, 80 + 20]) == bad
    assert tuple(pixels[2, 2]) == (0, 0, 0)  # untouched background
    small = draw_matches(source, target, result, max_height=15)
    assert small.size == (20 + 20, 15)


def test_draw_matches_custom_colours_and_mismatch_error():
    image = np.zeros((20, 20, 3), np.uint8)
    result = {"source_keypoints": [[10, 10]], "target_keypoints": [[10, 10]], "scores": [0.5]}
    canvas = np.asarray(draw_matches(image, image, result, colors=[(0, 0, 255)]))
    assert tuple(canvas[10, 10]) == (0, 0, 255) and tuple(canvas[10, 30]) == (0, 0, 255)
    with pytest.raises(ValueError, match="1 source keypoints but 2 target"):
        draw_matches(image, image, {"source_keypoints": [[1, 1]], "target_keypoints": [[1, 1], [2, 2]]})


def test_score_color_ramp():
    assert score_color(0.0) == (215, 48, 39)
    assert score_color(1.0) == (26, 152, 80)
    assert score_color(2.0) == score_color(1.0) and score_color(-1.0) == score_color(0.0)
    assert score_color(0.5) != score_color(0.0)

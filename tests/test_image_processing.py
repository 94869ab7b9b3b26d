"""SemanticCorrespondenceImageProcessor: tensors, sizes, keypoint mapping, Auto round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

import semcorr.modeling  # noqa: F401  (registers the Auto classes)
from semcorr.modeling import SemanticCorrespondenceImageProcessor, validate_keypoints


def _processor(**kwargs):
    return SemanticCorrespondenceImageProcessor(size={"height": 64, "width": 96}, **kwargs)


def test_preprocess_shapes_sizes_and_normalisation():
    processor = _processor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    white = np.full((30, 40, 3), 255, dtype=np.uint8)
    black = Image.new("RGB", (50, 20), "black")
    out = processor.preprocess([white, black])
    assert out["pixel_values"].shape == (2, 3, 64, 96)
    assert out["pixel_values"].dtype == torch.float32
    assert out["original_sizes"].tolist() == [[30, 40], [20, 50]]  # (height, width)
    assert torch.allclose(out["pixel_values"][0], torch.ones(3, 64, 96))  # (1 - 0.5) / 0.5
    assert torch.allclose(out["pixel_values"][1], -torch.ones(3, 64, 96))
    single = processor.preprocess(white)  # one image, not a list
    assert single["pixel_values"].shape == (1, 3, 64, 96)
    assert "keypoints" not in out


def test_preprocess_default_normalisation_is_imagenet():
    processor = SemanticCorrespondenceImageProcessor()
    assert processor.size == {"height": 448, "width": 448}
    grey = np.full((8, 8, 3), 128, dtype=np.uint8)
    values = processor.preprocess(grey)["pixel_values"][0, :, 0, 0]
    expected = (torch.tensor(128 / 255.0) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(values, expected, atol=1e-5)


def test_preprocess_resizes_content_not_crops():
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    image[:, 20:] = 255  # right half white
    out = SemanticCorrespondenceImageProcessor(size={"height": 64, "width": 96}, image_mean=[0, 0, 0],
                                               image_std=[1, 1, 1]).preprocess(image)
    row = out["pixel_values"][0, 0, 32]
    assert row[:40].max() < 0.05 and row[56:].min() > 0.95  # the edge stays at the middle (x = 48)


def test_keypoints_to_model_hand_example_and_inverse():
    processor = _processor()
    original_size = (30, 40)  # 40 wide, 30 high -> 96 x 64
    points = np.array([[0.0, 0.0], [10.0, 15.0], [40.0, 30.0], [0.5, 0.5]], dtype=np.float32)
    model = processor.keypoints_to_model(points, original_size)
    expected = torch.tensor(points) * torch.tensor([96 / 40, 64 / 30])
    assert torch.allclose(model, expected, atol=1e-5)
    assert model[1].tolist() == pytest.approx([24.0, 32.0])
    back = processor.keypoints_to_original(model, original_size)
    assert torch.allclose(back, torch.tensor(points), atol=1e-5)
    # And model -> original -> model.
    model_points = torch.rand(5, 2) * torch.tensor([96.0, 64.0])
    assert torch.allclose(
        processor.keypoints_to_model(processor.keypoints_to_original(model_points, original_size), original_size),
        model_points, atol=1e-4,
    )


def test_preprocess_maps_keypoints_per_image():
    processor = _processor()
    images = [np.zeros((30, 40, 3), np.uint8), np.zeros((64, 48, 3), np.uint8)]
    keypoints = [[[10, 15], [40, 30]], [[24, 32]]]
    out = processor.preprocess(images, keypoints=keypoints)
    assert len(out["keypoints"]) == 2
    np.testing.assert_allclose(out["keypoints"][0].numpy(), [[24.0, 32.0], [96.0, 64.0]], atol=1e-5)
    np.testing.assert_allclose(out["keypoints"][1].numpy(), [[48.0, 32.0]], atol=1e-5)
    with pytest.raises(ValueError, match="2 images"):
        processor.preprocess(images, keypoints=keypoints[:1])
    with pytest.raises(ValueError, match="outside"):
        processor.preprocess(images[0], keypoints=[[41, 1]])


def test_preprocess_pairs():
    processor = _processor()
    source = [np.zeros((30, 40, 3), np.uint8), np.zeros((20, 20, 3), np.uint8)]
    target = [np.zeros((50, 60, 3), np.uint8), np.zeros((10, 80, 3), np.uint8)]
    out = processor.preprocess_pairs(source, target, source_keypoints=[[[20, 15]], [[5, 5], [10, 10]]])
    assert out["source_pixel_values"].shape == out["target_pixel_values"].shape == (2, 3, 64, 96)
    assert out["source_original_sizes"].tolist() == [[30, 40], [20, 20]]
    assert out["target_original_sizes"].tolist() == [[50, 60], [10, 80]]
    np.testing.assert_allclose(out["source_keypoints"][0].numpy(), [[48.0, 32.0]], atol=1e-5)
    np.testing.assert_allclose(out["source_keypoints"][1].numpy(), [[24.0, 16.0], [48.0, 32.0]], atol=1e-5)
    with pytest.raises(ValueError, match="1 target images"):
        processor.preprocess_pairs(source, target[:1])


def test_preprocess_argument_errors():
    processor = _processor()
    with pytest.raises(ValueError, match="no images"):
        processor.preprocess([])
    with pytest.raises(TypeError, match="unexpected arguments"):
        processor.preprocess(np.zeros((4, 4, 3), np.uint8), colour="red")
    with pytest.raises(ValueError, match="return_tensors"):
        processor.preprocess(np.zeros((4, 4, 3), np.uint8), return_tensors="np")
    with pytest.raises(ValueError, match="size must be"):
        SemanticCorrespondenceImageProcessor(size={"height": 0, "width": 4})
    with pytest.raises(ValueError, match="size must be"):
        SemanticCorrespondenceImageProcessor(size={"shortest_edge": 224})


def test_keypoint_tolerance():
    strict = _processor()
    lenient = _processor(keypoint_tolerance=2.0)
    image = np.zeros((30, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="outside"):
        strict.preprocess(image, keypoints=[[41.0, 1.0]])
    assert lenient.preprocess(image, keypoints=[[41.0, 1.0]])["keypoints"][0].shape == (1, 2)


def test_save_pretrained_auto_image_processor_round_trip(tmp_path):
    processor = _processor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], keypoint_tolerance=1.5)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SemanticCorrespondenceImageProcessor
    assert loaded.size == {"height": 64, "width": 96}
    assert loaded.image_mean == pytest.approx([0.1, 0.2, 0.3])
    assert loaded.image_std == pytest.approx([0.4, 0.5, 0.6])
    assert loaded.keypoint_tolerance == 1.5
    image = (np.arange(30 * 40 * 3) % 251).astype(np.uint8).reshape(30, 40, 3)
    assert torch.equal(loaded.preprocess(image)["pixel_values"], processor.preprocess(image)["pixel_values"])


# -- validate_keypoints --------------------------------------------------------------------------
def test_validate_keypoints_accepts_lists_arrays_tensors():
    for points in ([[1, 2], [3, 4]], np.array([[1, 2], [3, 4]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])):
        out = validate_keypoints(points, (10, 10))
        assert out.dtype == np.float32 and out.tolist() == [[1, 2], [3, 4]]
    assert validate_keypoints([], (10, 10)).shape == (0, 2)
    assert validate_keypoints([[0, 0], [10, 5]], (5, 10)).shape == (2, 2)  # edges are inside


@pytest.mark.parametrize(
    "points, message",
    [
        ([[1, 2, 3]], r"shape \(N, 2\).*\(1, 3\)"),
        ([1, 2], r"shape \(N, 2\)"),
        ([[1, 2], [float("nan"), 3]], r"source_keypoints\[1\].*not finite"),
        ([[1, 2], [3, float("inf")]], r"not finite"),
        ([[11, 2]], r"source_keypoints\[0\] = \[11.0, 2.0\] lies outside the 10x5 image"),
        ([[1, -0.5]], r"outside"),
        ([[1, 2], [1, 6]], r"source_keypoints\[1\]"),
        ([["a", "b"]], r"list of \(x, y\) pairs"),
    ],
)
def test_validate_keypoints_errors(points, message):
    with pytest.raises(ValueError, match=message):
        validate_keypoints(points, (5, 10))


def test_validate_keypoints_tolerance_and_name():
    assert validate_keypoints([[10.5, 0]], (5, 10), tolerance=1.0).shape == (1, 2)
    with pytest.raises(ValueError, match=r"^my_points\[0\]"):
        validate_keypoints([[12, 0]], (5, 10), name="my_points", tolerance=1.0)


def test_pad_keypoints_hand_example():
    """Rows are zero-padded to the longest set; a NaN point becomes 0 and is masked out."""
    from semcorr.modeling import pad_keypoints

    padded, mask = pad_keypoints([
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
        np.array([[7.0, float("nan")]]),
        torch.zeros(0, 2),
    ])
    assert padded.dtype == torch.float32 and mask.dtype == torch.bool
    assert padded.tolist() == [
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
    ]
    assert mask.tolist() == [[True, True, True], [False, False, False], [False, False, False]]


def test_pad_keypoints_keeps_one_column_and_rejects_bad_shapes():
    from semcorr.modeling import pad_keypoints

    padded, mask = pad_keypoints([None, []])
    assert padded.shape == (2, 1, 2) and not mask.any()  # models cannot index a width-0 batch
    with pytest.raises(ValueError, match="keypoint set 1 must have shape"):
        pad_keypoints([[[1.0, 2.0]], [1.0, 2.0, 3.0]])

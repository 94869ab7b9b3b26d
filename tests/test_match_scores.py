"""Scores are absolute confidences: comparable across pairs, so that one threshold separates true
matches from matches between images that have nothing in common."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from semcorr.hub_datasets.skimage_pairs import stereo_pair
from semcorr.modeling.ops.matches import SCORE_RADIUS, match_confidence
from semcorr.modeling.ops.soft_argmax import arg_max_neighbourhood
from semcorr.pipelines.cli import main

from .conftest import skimage_data


def _confidence(scores: torch.Tensor, similarity: torch.Tensor, power: float, size) -> torch.Tensor:
    best = scores.argmax(dim=2)
    around = arg_max_neighbourhood(best, size, SCORE_RADIUS)
    return match_confidence(similarity.gather(2, best[..., None])[..., 0], torch.gather(scores, 2, around.index),
                            around, scores.sum(2), power)


def test_match_confidence_is_similarity_times_distinctiveness():
    size, power = (10, 10), 3.0
    one_hot = torch.zeros(1, 1, 100)
    one_hot[0, 0, 55] = 0.8**power  # all of the cell's score at one place, cosine 0.8
    assert _confidence(one_hot, one_hot, power, size).item() == pytest.approx(0.8**0.5, rel=1e-6)
    flat = torch.ones(1, 1, 100)  # a flat image: (nearly) the same score everywhere
    flat[0, 0, 55] = 1.0001
    assert _confidence(flat, flat, power, size).item() == pytest.approx((25 / 100) ** 0.5, rel=1e-4)
    corner = torch.ones(1, 1, 100)
    corner[0, 0, 0] = 2.0  # the match in a corner: its window has 3 x 3 cells inside the map, counted once
    assert _confidence(corner, corner.clamp(max=1), power, size).item() == pytest.approx((10 / 101) ** 0.5, rel=1e-6)


@pytest.fixture(scope="module")
def stereo_threshold(default_pipe):
    """The score that keeps 90 % of the true matches of the stereo pair (500 ground-truth points)."""
    pair = stereo_pair(500, seed=0)
    out = default_pipe({"source_image": pair.source_image, "target_image": pair.target_image,
                        "source_keypoints": pair.source_keypoints.tolist()})
    error = np.linalg.norm(np.array(out["target_keypoints"]) - pair.target_keypoints, axis=1)
    correct = error <= 0.05 * max(pair.target_image.size)
    assert correct.mean() > 0.95
    return float(np.percentile(np.array(out["scores"])[correct], 10)), pair


def _unrelated_pairs():
    rng = np.random.default_rng(0)
    chelsea = Image.open(skimage_data() / "chelsea.png").convert("RGB")
    noise = Image.fromarray(rng.integers(0, 256, (300, 450, 3), dtype=np.uint8))
    grey = Image.fromarray(np.full((300, 300, 3), 128, np.uint8))
    return {"noise -> photo": (noise, chelsea), "photo -> noise": (chelsea, noise), "flat -> itself": (grey, grey)}


def test_unrelated_images_score_below_the_threshold_that_keeps_true_stereo_matches(default_pipe, stereo_threshold):
    threshold, pair = stereo_threshold
    assert threshold > 0.4  # measured 0.56
    for name, (source, target) in _unrelated_pairs().items():
        top = default_pipe({"source_image": source, "target_image": target}, top_k=30)
        assert len(top["scores"]) > 0, name  # there are mutual matches; they score low
        assert max(top["scores"]) < threshold - 0.1, (name, max(top["scores"]), threshold)  # measured <= 0.34
        kept = default_pipe({"source_image": source, "target_image": target}, top_k=30, score_threshold=threshold)
        assert kept["scores"] == [] and kept["target_keypoints"] == [], name
    stereo = default_pipe({"source_image": pair.source_image, "target_image": pair.target_image}, top_k=30,
                          score_threshold=threshold)
    assert len(stereo["scores"]) == 30 and min(stereo["scores"]) >= threshold


def test_score_threshold_is_checked(default_pipe, capsys):
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="score_threshold must be a number in \\[0, 1\\]"):
        default_pipe({"source_image": image, "target_image": image}, score_threshold=1.5)
    left = str(skimage_data() / "motorcycle_left.png")
    assert main(["match", left, left, "--score-threshold", "-0.1", "--json"]) == 2
    assert "--score-threshold must be in [0, 1]" in capsys.readouterr().err

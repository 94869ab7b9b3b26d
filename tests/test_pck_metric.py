"""Tests for spaces/pck: the PCK evaluate metric, checked against hand-computed values."""

import math
from pathlib import Path

import numpy as np
import pytest

from semcorr.spaces.pck import PCK, PROTOCOLS
from semcorr.spaces.pck.pck import AVERAGES, BENCHMARKS, COMPARISONS, THRESHOLDS

PCK_DIR = Path(__file__).resolve().parents[1] / "spaces" / "pck"
NAN = float("nan")

# Five pairs, alpha = 0.1. Distances per valid keypoint and the per-pair lengths L:
#   A (cat, 3 valid of 4): d = 5 (exactly), 2, NaN prediction; its 4th reference is NaN (dropped).
#      image L=50 (t=5.0), bbox L=40, bbox-kp L=30 (x 10..40), padded L=41 (x -1..40).
#   B (cat, 2 valid of 3): d = 5 (exactly), 9; 3rd keypoint masked out (and kept out of the extent).
#      image L=100, bbox L=50 (t=5.0), bbox-kp L=20 (x 0..20), padded L=21.
#   C (dog, 2 valid): d = 2.5, 0.   image L=30, bbox L=20, bbox-kp L=20, padded L=26.
#   D (dog): every keypoint masked out -> empty.   E (bird): no keypoints -> empty.
PREDICTIONS = [
    [[13, 14], [40, 32], [NAN, NAN], [0, 0]],
    [[0, 5], [20, 9], [10, 60]],
    [[5, 7.5], [25, 15]],
    [[1, 1], [2, 2]],
    [],
]
REFERENCES = [
    [[10, 10], [40, 30], [20, 20], [NAN, NAN]],
    [[0, 0], [20, 0], [10, 60]],
    [[5, 5], [25, 15]],
    [[1, 1], [2, 2]],
    [],
]
MASKS = [[True] * 4, [True, True, False], [True, True], [False, False], []]
IMAGE_SIZES = [(40, 50), (100, 60), (30, 30), (10, 10), (10, 10)]
BBOXES = [(0, 0, 40, 20), (0, 0, 20, 50), (5, 5, 25, 15), (0, 0, 1, 1), (0, 0, 1, 1)]
CATEGORIES = ["cat", "cat", "dog", "dog", "bird"]
SIDE_INFO = dict(image_sizes=IMAGE_SIZES, bboxes=BBOXES, categories=CATEGORIES, masks=MASKS)

# Correct keypoints per pair (A, B, C) out of (3, 2, 2), by hand from the table above.
CORRECT = {
    ("image", "<="): (2, 2, 2), ("image", "<"): (1, 2, 2),
    ("bbox", "<="): (1, 1, 1), ("bbox", "<"): (1, 0, 1),
    ("bbox-kp", "<="): (1, 0, 1), ("bbox-kp", "<"): (1, 0, 1),
    ("bbox-kp-padded", "<="): (1, 0, 2), ("bbox-kp-padded", "<"): (1, 0, 2),
}
# pair: mean of c/n over A, B, C; point: sum c / 7; category: mean of cat (A, B pair-mean) and
# dog (C); category-point: mean of cat (c_A + c_B) / 5 and dog c_C / 2.
EXPECTED = {
    ("image", "<="): {"pair": 8 / 9, "point": 6 / 7, "category": 11 / 12, "category-point": 9 / 10},
    ("image", "<"): {"pair": 7 / 9, "point": 5 / 7, "category": 5 / 6, "category-point": 4 / 5},
    ("bbox", "<="): {"pair": 4 / 9, "point": 3 / 7, "category": 11 / 24, "category-point": 9 / 20},
    ("bbox", "<"): {"pair": 5 / 18, "point": 2 / 7, "category": 1 / 3, "category-point": 7 / 20},
    ("bbox-kp", "<="): {"pair": 5 / 18, "point": 2 / 7, "category": 1 / 3, "category-point": 7 / 20},
    ("bbox-kp", "<"): {"pair": 5 / 18, "point": 2 / 7, "category": 1 / 3, "category-point": 7 / 20},
    ("bbox-kp-padded", "<="): {"pair": 4 / 9, "point": 3 / 7, "category": 7 / 12, "category-point": 3 / 5},
    ("bbox-kp-padded", "<"): {"pair": 4 / 9, "point": 3 / 7, "category": 7 / 12, "category-point": 3 / 5},
}
VALID_POINTS = (3, 2, 2)


@pytest.fixture(scope="module")
def metric():
    return PCK()


def run(metric, **kwargs):
    """compute() on the five-pair fixture with all side information."""
    args = dict(SIDE_INFO, alphas=[0.1])
    args.update(kwargs)
    return metric.compute(predictions=PREDICTIONS, references=REFERENCES, **args)


@pytest.mark.parametrize("comparison", COMPARISONS)
@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_every_combination_matches_hand_values(metric, threshold, average, comparison):
    result = run(metric, threshold=threshold, average=average, comparison=comparison)
    assert result["pck@0.1"] == pytest.approx(EXPECTED[threshold, comparison][average])
    assert (result["num_pairs"], result["num_points"], result["num_empty_pairs"]) == (5, 7, 2)
    correct = CORRECT[threshold, comparison]
    per_pair = [p["pck@0.1"] for p in result["per_pair"]]
    assert per_pair[:3] == pytest.approx([c / n for c, n in zip(correct, VALID_POINTS)])
    assert math.isnan(per_pair[3]) and math.isnan(per_pair[4])
    assert set(result["per_category"]) == {"cat", "dog", "bird"}
    assert math.isnan(result["per_category"]["bird"]["pck@0.1"])
    assert result["per_category"]["dog"]["pck@0.1"] == pytest.approx(correct[2] / 2)


def test_per_category_follows_the_averaging(metric):
    by_pair = run(metric, threshold="image", average="pair")["per_category"]["cat"]["pck@0.1"]
    by_point = run(metric, threshold="image", average="point")["per_category"]["cat"]["pck@0.1"]
    assert by_pair == pytest.approx((2 / 3 + 1) / 2)
    assert by_point == pytest.approx(4 / 5)


@pytest.mark.parametrize("threshold, side_info", [
    ("image", dict(image_sizes=[(40, 50)])),
    ("bbox", dict(bboxes=[(10, 0, 60, 30)])),
])
def test_keypoint_exactly_at_threshold(threshold, side_info):
    # Distance 5.0 (a 3-4-5 offset) and L = 50, alpha = 0.1: all exactly representable.
    pred, ref = [[[3.0, 4.0]]], [[[0.0, 0.0]]]
    for comparison, expected in (("<=", 1.0), ("<", 0.0)):
        result = PCK().compute(predictions=pred, references=ref, alphas=[0.1],
                               threshold=threshold, comparison=comparison, **side_info)
        assert result["pck@0.1"] == expected


def test_empty_pair_is_excluded_from_pair_average():
    result = PCK().compute(predictions=[[[0, 0]], [], [[1, 1]]], references=[[[0, 0]], [], [[1, 1]]],
                           masks=[[True], [], [False]], threshold="bbox-kp", alphas=[0.1])
    assert result["pck@0.1"] == 1.0
    assert (result["num_pairs"], result["num_points"], result["num_empty_pairs"]) == (3, 1, 2)
    assert math.isnan(result["per_pair"][1]["pck@0.1"]) and math.isnan(result["per_pair"][2]["pck@0.1"])


def test_no_evaluated_keypoint_gives_nan():
    result = PCK().compute(predictions=[[]], references=[[]], threshold="bbox-kp")
    assert all(math.isnan(result[key]) for key in ("pck@0.05", "pck@0.1", "pck@0.15"))
    assert result["num_empty_pairs"] == 1


def test_nan_prediction_is_wrong_and_nan_reference_is_dropped():
    result = PCK().compute(predictions=[[[0, 0], [NAN, 5], [7, 7]]], references=[[[0, 0], [5, 5], [NAN, 7]]],
                           image_sizes=[(100, 100)], threshold="image", average="point", alphas=[0.1])
    assert result["pck@0.1"] == 0.5
    assert result["num_points"] == 2


def test_ragged_pairs_and_default_alphas():
    preds = [np.zeros((1, 2)), np.zeros((3, 2)), np.array([[0.0, 6.0], [0.0, 12.0]])]
    refs = [np.zeros((1, 2)), np.zeros((3, 2)), np.zeros((2, 2))]
    result = PCK().compute(predictions=preds, references=refs, image_sizes=[(100, 80)] * 3,
                           threshold="image", average="point")
    # Pair 3 distances 6 and 12 with L = 100: correct at 0.1 (<= 10) only for 6, at 0.15 for both.
    assert (result["pck@0.05"], result["pck@0.1"], result["pck@0.15"]) == (4 / 6, 5 / 6, 1.0)


def test_bbox_kp_padded_uses_padding_value():
    # References span x 0..20, y 0..0: padded with -1 L = 21, with -2 L = 22; distance 21.5, alpha 1.
    pred, ref = [[[0, 21.5], [20, 0]]], [[[0, 0], [20, 0]]]
    kwargs = dict(predictions=pred, references=ref, threshold="bbox-kp-padded", alphas=[1.0])
    assert PCK().compute(**kwargs)["pck@1"] == 0.5
    assert PCK().compute(padding_value=-2, **kwargs)["pck@1"] == 1.0
    assert PCK().compute(predictions=pred, references=ref, threshold="bbox-kp", alphas=[1.0])["pck@1"] == 0.5


# Preset, benchmark -> (threshold, average, comparison, padding_value, expected on the fixture).
PRESET_CASES = {
    ("hpf", "pf-pascal"): ("image", "pair", "<=", None, 8 / 9),
    ("hpf", "pf-willow"): ("bbox-kp", "pair", "<=", None, 5 / 18),
    ("hpf", "spair-71k"): ("bbox", "pair", "<=", None, 4 / 9),
    ("dhpf", "pf-pascal"): ("image", "pair", "<=", None, 8 / 9),
    ("dhpf", "pf-willow"): ("bbox-kp-padded", "pair", "<=", -1.0, 4 / 9),
    ("dhpf", "spair-71k"): ("bbox", "pair", "<=", None, 4 / 9),
    ("chm", "pf-willow"): ("bbox-kp-padded", "pair", "<=", -2.0, 4 / 9),
    ("cats", "pf-pascal"): ("image", "pair", "<=", None, 8 / 9),
    ("cats", "pf-willow"): ("bbox-kp-padded", "pair", "<=", -1.0, 4 / 9),
    ("cats", "spair-71k"): ("bbox", "pair", "<=", None, 4 / 9),
    ("vat", "spair-71k"): ("bbox", "pair", "<=", None, 4 / 9),
    ("dift", "spair-71k"): ("bbox", "pair", "<=", None, 4 / 9),
    ("sd-dino", "pf-pascal"): ("image", "category-point", "<", None, 4 / 5),
    ("sd-dino", "spair-71k"): ("bbox", "category-point", "<", None, 7 / 20),
    ("geoaware", "pf-pascal"): ("image", "pair", "<", None, 7 / 9),
    ("geoaware", "spair-71k"): ("bbox", "pair", "<", None, 5 / 18),
}


# The argument is not called `benchmark`: pytest-benchmark owns that fixture name.
@pytest.mark.parametrize("protocol, bench", sorted(PRESET_CASES))
def test_presets(metric, protocol, bench):
    threshold, average, comparison, padding, expected = PRESET_CASES[protocol, bench]
    preset = PROTOCOLS[protocol]
    assert preset["threshold"][bench] == threshold
    assert (preset["average"], preset["comparison"]) == (average, comparison)
    if padding is not None:
        assert preset["padding_value"] == padding
    assert run(metric, protocol=protocol, benchmark=bench)["pck@0.1"] == pytest.approx(expected)
    # Restating the preset's own values is allowed.
    same = run(metric, protocol=protocol, benchmark=bench, threshold=threshold, comparison=comparison)
    assert same["pck@0.1"] == pytest.approx(expected)


def test_protocol_table_is_complete():
    assert {"hpf", "dhpf", "chm", "cats", "vat", "dift", "sd-dino", "geoaware"} <= set(PROTOCOLS)
    for name, preset in PROTOCOLS.items():
        assert {"threshold", "average", "comparison", "side", "paper", "codebase"} <= set(preset), name
        assert set(preset["threshold"]) <= set(BENCHMARKS)
        assert set(preset["threshold"].values()) <= set(THRESHOLDS)
        assert preset["average"] in AVERAGES and preset["comparison"] in COMPARISONS
        expected_side = "source" if name in ("cats", "vat") else "target"
        assert preset["side"] == expected_side, name


def test_benchmark_aliases(metric):
    assert run(metric, protocol="hpf", benchmark="pfpascal")["pck@0.1"] == pytest.approx(8 / 9)


PAIR_ERRORS = [
    (dict(predictions=[[[0, 0]], [[0, 0, 0]]], references=[[[0, 0]], [[0, 0]]]), "pair 1"),
    (dict(predictions=[[[0, 0]], [0, 0]], references=[[[0, 0]], [[0, 0]]]), "pair 1"),
    (dict(predictions=[[[0, 0]], [[0, 0]]], references=[[[0, 0]], [[0, 0], [1, 1]]]), "pair 1"),
    (dict(predictions=[[[0, 0]], [["a", 0]]], references=[[[0, 0]], [[0, 0]]]), "pair 1"),
]


@pytest.mark.parametrize("inputs, message", PAIR_ERRORS)
def test_bad_shapes_name_the_pair(inputs, message):
    with pytest.raises(ValueError, match=message):
        PCK().compute(threshold="bbox-kp", **inputs)


SIDE_ERRORS = [
    (dict(threshold="bbox", bboxes=[(0, 0, 1, 1), (0, 0, 1)]), "pair 1"),
    (dict(threshold="bbox", bboxes=[(0, 0, 1, 1), (5, 0, 1, 1)]), "pair 1"),
    (dict(threshold="bbox", bboxes=[(0, 0, 1, 1), (0, 0, NAN, 1)]), "pair 1"),
    (dict(threshold="image", image_sizes=[(10, 10), (0, 10)]), "pair 1"),
    (dict(threshold="bbox-kp", masks=[[True], [True, False]]), "pair 1"),
    (dict(threshold="bbox-kp", average="category", categories=["a", ["b"]]), "pair 1"),
]


@pytest.mark.parametrize("kwargs, message", SIDE_ERRORS)
def test_bad_side_information_names_the_pair(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PCK().compute(predictions=[[[0, 0]], [[1, 1]]], references=[[[0, 0]], [[1, 1]]], **kwargs)


BAD_ARGUMENTS = [
    (dict(threshold="bbox"), "bboxes"),
    (dict(), "bboxes"),  # the default threshold is "bbox"
    (dict(threshold="image"), "image_sizes"),
    (dict(threshold="image", image_sizes=[(10, 10)]), "1 entries but there are 2 pairs"),
    (dict(threshold="bbox-kp", categories=["a"]), "1 entries but there are 2 pairs"),
    (dict(threshold="bbox-kp", masks=[[True]]), "1 entries but there are 2 pairs"),
    (dict(threshold="box"), "valid values"),
    (dict(threshold="bbox-kp", average="mean"), "valid values"),
    (dict(threshold="bbox-kp", comparison="=<"), "valid values"),
    (dict(protocol="nope", benchmark="spair-71k"), "valid values"),
    (dict(protocol="hpf", benchmark="caltech"), "valid values"),
    (dict(protocol="hpf"), "needs benchmark"),
    (dict(protocol="dift", benchmark="pf-pascal"), "no convention"),
    (dict(protocol="hpf", benchmark="spair-71k", threshold="image"), "contradicts"),
    (dict(protocol="sd-dino", benchmark="spair-71k", comparison="<="), "contradicts"),
    (dict(protocol="dhpf", benchmark="pf-willow", padding_value=-2), "contradicts"),
    (dict(threshold="bbox-kp", average="category"), "needs categories"),
    (dict(threshold="bbox-kp", average="category-point"), "needs categories"),
    (dict(threshold="bbox-kp", padding_value=-1), "padding_value"),
    (dict(threshold="bbox-kp", alphas=[0.1, -0.1]), "alphas"),
    (dict(threshold="bbox-kp", alphas=[0.1, 0.1]), "alphas"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PCK().compute(predictions=[[[0, 0]], [[1, 1]]], references=[[[0, 0]], [[1, 1]]], **kwargs)


def test_mismatched_number_of_pairs():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        PCK().compute(predictions=[[[0, 0]], [[1, 1]]], references=[[[0, 0]]], threshold="bbox-kp")


def test_add_batch_then_compute_matches_direct_compute(metric):
    direct = run(metric, threshold="bbox", average="category", comparison="<")
    batched = PCK()
    batched.add_batch(predictions=[np.array(p, dtype=float) for p in PREDICTIONS[:2]],
                      references=[np.array(r, dtype=float) for r in REFERENCES[:2]])
    batched.add_batch(predictions=PREDICTIONS[2:], references=REFERENCES[2:])
    result = batched.compute(alphas=[0.1], threshold="bbox", average="category", comparison="<", **SIDE_INFO)
    assert result["pck@0.1"] == pytest.approx(direct["pck@0.1"]) == pytest.approx(1 / 3)
    assert result["num_points"] == 7


def test_add_then_compute():
    metric = PCK()
    metric.add(prediction=[[3, 4]], reference=[[0, 0]])
    metric.add(prediction=[[0, 0]], reference=[[0, 0]])
    result = metric.compute(image_sizes=[(50, 40), (10, 10)], threshold="image", alphas=[0.1])
    assert result["pck@0.1"] == 1.0


def test_add_batch_error_names_the_global_pair_index():
    metric = PCK()
    metric.add_batch(predictions=[[[0, 0]], [[1, 1]]], references=[[[0, 0]], [[1, 1]]])
    with pytest.raises(ValueError, match="pair 2"):
        metric.add_batch(predictions=[[[0, 0, 0]]], references=[[[0, 0]]])


def test_evaluate_load_from_directory(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = evaluate.load(str(PCK_DIR))
    assert module.name == "pck"
    result = run(module, threshold="image", average="category-point", comparison="<=")
    assert result["pck@0.1"] == pytest.approx(9 / 10)


def test_space_files_exist():
    card = (PCK_DIR / "README.md").read_text()
    assert card.startswith("---\n") and "app_file: app.py" in card and "sdk: gradio" in card
    assert "launch_gradio_widget" in (PCK_DIR / "app.py").read_text()
    assert "evaluate" in (PCK_DIR / "requirements.txt").read_text()

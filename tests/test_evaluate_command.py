"""``semcorr evaluate`` / ``evaluate_model`` end to end on tiny benchmark copies (no network).

The fixture images are random noise, so the embedded model's PCK on them says nothing about its
accuracy; these tests check the plumbing: loading, batching, keypoint mapping both ways, the
judged side, the per-category table and the JSON file. A pair whose target is its own source is
the oracle case: any sensible matcher must transfer every keypoint onto itself. The PCK values
themselves are checked against answers computed by hand: a stub matcher plants errors of known
size (fractions of each protocol's threshold length) on the benchmarks' ground truth.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from semcorr.modeling import CorrespondenceOutput, HyperpixelFlowConfig, image_processor_for
from semcorr.pipelines.cli import main
from semcorr.evaluation import evaluate_dataset, evaluate_model, resolve_settings
from semcorr.tests.fixtures_benchmarks import write_pf_pascal, write_pf_willow, write_spair

# The embedded weights at a small input size keep every run well under a second per pair.
SMALL_SIZE = [128, 128]


pytestmark = pytest.mark.usefixtures("datasets_offline")


@pytest.fixture(scope="module")
def small_model_dir(semcorr_cache):
    """The embedded default model (same weights and settings) saved with a 128 x 128 input.

    ``semcorr_cache`` (tests/conftest.py) points ``$SEMCORR_CACHE`` at a session temporary folder.
    """
    from semcorr.modeling import default_model_dir

    return default_model_dir(image_size=SMALL_SIZE)


WRITERS = {"pf-pascal": write_pf_pascal, "pf-willow": write_pf_willow, "spair-71k": write_spair}
CATEGORIES = {"pf-pascal": ["aeroplane", "cat", "dog"], "pf-willow": ["car(G)", "duck(S)"], "spair-71k": ["cat", "dog"]}
PAIRS = {"pf-pascal": 4, "pf-willow": 5, "spair-71k": 5}


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_output(out: str, result: dict, bench_name: str) -> None:
    table = [line for line in out.splitlines() if line.startswith("| ")]
    for category in CATEGORIES[bench_name]:
        assert any(line.startswith(f"| {category} |") for line in table), f"{category} missing from\n{out}"
    assert any(line.startswith("| **total") for line in table)
    assert result["benchmark"] == bench_name
    assert result["num_pairs"] == PAIRS[bench_name]
    assert set(result["per_category"]) == set(CATEGORIES[bench_name])
    assert sum(row["num_pairs"] for row in result["per_category"].values()) == PAIRS[bench_name]
    assert sum(row["num_points"] for row in result["per_category"].values()) == result["num_points"] > 0
    assert len(result["per_pair"]) == PAIRS[bench_name]
    # The PCK values (known answers: test_planted_errors_give_the_pck_computed_by_hand) are reported
    # consistently: the protocol averages per pair, and the table prints the JSON values in percent.
    keys = list(result["total"])
    assert keys == ["pck@0.05", "pck@0.1", "pck@0.15"] and result["config"]["average"] == "pair"
    for key in keys:
        pairs = [row for row in result["per_pair"] if row["num_points"]]
        assert result["total"][key] == pytest.approx(np.mean([row[key] for row in pairs]), abs=1e-12)
        for category, summary in result["per_category"].items():
            members = [row[key] for row in pairs if row["category"] == category]
            assert summary[key] == pytest.approx(np.mean(members), abs=1e-12), (category, key)
    rows = {line.split(" | ")[0][2:]: [cell.strip() for cell in line.strip("| ").split(" | ")[1:]] for line in table}
    for category, summary in result["per_category"].items():
        assert rows[category] == [str(summary["num_pairs"]), str(summary["num_points"]),
                                  *(f"{100 * summary[key]:.1f}" for key in keys)], out
    total = next(cells for name, cells in rows.items() if name.startswith("**total"))
    assert total == [str(result["num_pairs"]), str(result["num_points"]),
                     *(f"{100 * result['total'][key]:.1f}" for key in keys)], out


def test_evaluate_default_embedded_model(tmp_path, capsys, semcorr_cache):
    """No --model: the embedded default at its own input size, on PF-PASCAL (NCNet-style list)."""
    root = write_pf_pascal(tmp_path)
    out_file = tmp_path / "results" / "pascal.json"
    code, out, err = run_cli(
        ["evaluate", "--benchmark", "pf-pascal", "--data-dir", str(root), "--out", str(out_file),
         "--cache-dir", str(tmp_path / "cache"), "--batch-size", "3"], capsys,
    )
    assert code == 0, err
    result = json.loads(out_file.read_text())
    check_output(out, result, "pf-pascal")
    assert result["model"] == "embedded-default"
    assert result["config"]["protocol"] == "hpf" and result["config"]["threshold"] == "image"
    assert result["config"]["model_input_size"] == [448, 448]
    assert f"wrote {out_file}" in out
    assert not [p for p in out_file.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing


@pytest.mark.parametrize("bench_name", ["pf-willow", "spair-71k"])
def test_evaluate_each_benchmark(bench_name, tmp_path, capsys, small_model_dir):
    root = WRITERS[bench_name](tmp_path)
    out_file = tmp_path / "pck.json"
    code, out, err = run_cli(
        ["evaluate", "--model", str(small_model_dir), "--benchmark", bench_name, "--data-dir", str(root),
         "--out", str(out_file), "--cache-dir", str(tmp_path / "cache"), "--no-progress"], capsys,
    )
    assert code == 0, err
    result = json.loads(out_file.read_text())
    check_output(out, result, bench_name)
    assert result["model"] == str(small_model_dir)
    assert result["config"]["model_input_size"] == SMALL_SIZE


def test_cats_protocol_judges_on_source_in_its_frame(tmp_path, capsys, small_model_dir):
    root = write_pf_willow(tmp_path)
    out_file = tmp_path / "cats.json"
    code, out, err = run_cli(
        ["evaluate", "--model", str(small_model_dir), "--benchmark", "pf-willow", "--data-dir", str(root),
         "--protocol", "cats", "--frame", "protocol", "--alphas", "0.1", "--out", str(out_file),
         "--cache-dir", str(tmp_path / "cache"), "--no-progress"], capsys,
    )
    assert code == 0, err
    config = json.loads(out_file.read_text())["config"]
    assert config["side"] == "source" and config["threshold"] == "bbox-kp-padded" and config["padding_value"] == -1.0
    assert config["frame_size"] == [256, 256] and config["alphas"] == [0.1]


def write_identical_willow(tmp_path) -> Path:
    """PF-WILLOW copy whose every pair is an image with itself, same keypoints on both sides."""
    root = write_pf_willow(tmp_path)
    path = root / "test_pairs.csv"
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    for row in rows[1:]:
        row[1] = row[0]
        row[22:42] = row[2:22]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return root


@pytest.mark.parametrize("protocol", ["hpf", "cats"])
def test_identical_pairs_score_one(protocol, tmp_path, small_model_dir):
    """An image matched with itself: every keypoint lands on itself, PCK@0.1 = 1 on either side."""
    root = write_identical_willow(tmp_path)
    result = evaluate_model(str(small_model_dir), "pf-willow", root, protocol=protocol, alphas=(0.1,),
                            cache_dir=tmp_path / "cache", progress=False)
    assert result["config"]["side"] == ("source" if protocol == "cats" else "target")
    assert result["num_points"] == 50
    assert result["total"]["pck@0.1"] == pytest.approx(1.0, abs=0.02)


class ShiftMatcher(torch.nn.Module):
    """Fake matcher: moves every query point by ``shift`` model-input pixels (x, y)."""

    def __init__(self, shift=(0.0, 0.0)):
        super().__init__()
        self.config = HyperpixelFlowConfig(image_size=[64, 96])
        self.shift = torch.tensor(shift)
        self.calls = []

    def match(self, source_pixel_values, target_pixel_values, source_keypoints=None):
        self.calls.append((source_pixel_values.clone(), target_pixel_values.clone(), source_keypoints.clone()))
        return CorrespondenceOutput(target_keypoints=source_keypoints + self.shift)


def proportional_pairs() -> datasets.Dataset:
    """Two pairs whose target keypoints sit at the same relative position as the source ones.

    Source images are 40 x 60 (h x w) with a box covering them; target images are 80 x 30 with a
    tiny 2 x 2 box. Pixel values encode which image is which (source dark, target bright).
    """
    source_points = np.array([[6.0, 4.0], [30.0, 20.0], [54.0, 36.0]])
    target_points = source_points * np.array([30 / 60, 80 / 40])
    rows = {key: [] for key in ("pair_id", "category", "source_image", "target_image", "source_keypoints",
                                "target_keypoints", "source_bbox", "target_bbox", "source_image_size",
                                "target_image_size")}
    for pair in range(2):
        rows["pair_id"].append(pair)
        rows["category"].append(pair)
        rows["source_image"].append(Image.new("RGB", (60, 40), (10, 10, 10)))
        rows["target_image"].append(Image.new("RGB", (30, 80), (250, 250, 250)))
        rows["source_keypoints"].append(source_points.tolist())
        rows["target_keypoints"].append(target_points.tolist())
        rows["source_bbox"].append([0.0, 0.0, 60.0, 40.0])
        rows["target_bbox"].append([10.0, 10.0, 12.0, 12.0])
        rows["source_image_size"].append([40, 60])
        rows["target_image_size"].append([80, 30])
    features = datasets.Features({
        "pair_id": datasets.Value("int32"),
        "category": datasets.ClassLabel(names=["bird", "boat"]),
        "source_image": datasets.Image(), "target_image": datasets.Image(),
        "source_keypoints": datasets.List(datasets.List(datasets.Value("float32"), length=2)),
        "target_keypoints": datasets.List(datasets.List(datasets.Value("float32"), length=2)),
        "source_bbox": datasets.List(datasets.Value("float32"), length=4),
        "target_bbox": datasets.List(datasets.Value("float32"), length=4),
        "source_image_size": datasets.List(datasets.Value("int32"), length=2),
        "target_image_size": datasets.List(datasets.Value("int32"), length=2),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def run_fake(matcher, protocol, alphas=(0.05, 0.1)):
    dataset = proportional_pairs()
    settings = resolve_settings(protocol, "spair-71k")
    processor = image_processor_for(matcher.config)
    return evaluate_dataset(matcher, processor, dataset, "spair-71k", settings, alphas, batch_size=2, progress=False)


def test_fake_exact_matcher_scores_one_on_both_sides():
    """Zero shift in model pixels = exact transfer in original pixels (the keypoint maps are exact inverses)."""
    for protocol in ("hpf", "cats"):
        result = run_fake(ShiftMatcher(), protocol)
        assert result["total"] == {"pck@0.05": 1.0, "pck@0.1": 1.0}
        assert list(result["per_category"]) == ["bird", "boat"]
        assert [row["category"] for row in result["per_pair"]] == ["bird", "boat"]


def test_side_swaps_query_and_judged_images():
    """hpf judges on the (tiny-box) target, cats on the (image-sized-box) source; the images and the
    query keypoints given to match() follow the side."""
    # 2 model pixels in x is 2 * 60/96 = 1.25 source pixels (box 60: correct at 0.05 -> 3 px) and
    # 2 * 30/96 = 0.625 target pixels (box 2: wrong even at 0.1 -> 0.2 px).
    hpf = ShiftMatcher((2.0, 0.0))
    assert run_fake(hpf, "hpf")["total"] == {"pck@0.05": 0.0, "pck@0.1": 0.0}
    source_pixels, target_pixels, queries = hpf.calls[0]
    assert source_pixels.mean() < target_pixels.mean()  # the dark source image is the query image
    assert torch.allclose(queries[0], torch.tensor([[6.0, 4.0], [30.0, 20.0], [54.0, 36.0]]) * torch.tensor([96 / 60, 64 / 40]))

    cats = ShiftMatcher((2.0, 0.0))
    assert run_fake(cats, "cats")["total"] == {"pck@0.05": 1.0, "pck@0.1": 1.0}
    source_pixels, target_pixels, queries = cats.calls[0]
    assert source_pixels.mean() > target_pixels.mean()  # the bright target image is now the query
    assert torch.allclose(queries[0], torch.tensor([[3.0, 8.0], [15.0, 40.0], [27.0, 72.0]]) * torch.tensor([96 / 30, 64 / 80]))


# -- known answers: a matcher with planted errors ----------------------------------------------------
#: Errors as fractions of the pair's threshold length L, 4 % either side of each alpha: a length 4 % off
#: (a box instead of the image, the keypoint extent without its padding point, ...) moves points across.
#: None equals an alpha, so "<" and "<=" agree.
PLANTED_ERRORS = (0.0, 0.048, 0.052, 0.096, 0.104, 0.144, 0.156, 0.5)
ALPHAS = (0.05, 0.1, 0.15)


def planted_errors(pair: int, count: int) -> list[float]:
    """Errors of the ``count`` keypoints of pair number ``pair``: the cycle, started at the pair number."""
    return [PLANTED_ERRORS[(pair + k) % len(PLANTED_ERRORS)] for k in range(count)]


def threshold_length(threshold: str, size, box, points: np.ndarray, padding) -> float:
    """The PCK length L of one judged image, by the definitions of the protocols' papers/codebases."""
    if threshold == "image":
        return float(max(size))  # (h, w)
    if threshold == "bbox":
        return float(max(box[2] - box[0], box[3] - box[1]))
    if threshold == "bbox-kp-padded":
        points = np.concatenate([points, [[padding, padding]]])
    return float((points.max(axis=0) - points.min(axis=0)).max())  # "bbox-kp": extent of the keypoints


class PlantedErrorMatcher:
    """A stub matcher that knows the benchmark's answers: it moves each ground-truth keypoint by its
    :func:`planted_errors` x L pixels along x (judged image, original pixels), so PCK@alpha of a pair is
    the share of its keypoints whose planted error is within alpha."""

    def __init__(self, rows, side: str, threshold: str, padding, model_size=(64, 96)):
        height, width = model_size
        self.config = SimpleNamespace(image_size=[height, width], image_mean=[0.5] * 3, image_std=[0.5] * 3)
        query, judged = ("source", "target") if side == "target" else ("target", "source")
        self.queries, self.answers = [], []  # per pair, model-input pixels of the query / judged image
        for pair, row in enumerate(rows):
            reference = np.asarray(row[f"{judged}_keypoints"], dtype=np.float64)
            assert np.isfinite(reference).all()
            length = threshold_length(threshold, row[f"{judged}_image_size"], row[f"{judged}_bbox"], reference, padding)
            errors = np.array(planted_errors(pair, len(reference)))
            predicted = reference + np.stack([errors * length, np.zeros_like(errors)], axis=1)
            (query_h, query_w), (judged_h, judged_w) = row[f"{query}_image_size"], row[f"{judged}_image_size"]
            self.queries.append(np.asarray(row[f"{query}_keypoints"]) * [width / query_w, height / query_h])
            self.answers.append(predicted * [width / judged_w, height / judged_h])

    def match(self, source_pixel_values, target_pixel_values, source_keypoints=None):
        predicted = torch.zeros_like(source_keypoints)
        for row in range(source_pixel_values.shape[0]):  # the pairs come in dataset order
            query, answer = self.queries.pop(0), self.answers.pop(0)
            torch.testing.assert_close(source_keypoints[row, : len(query)], torch.tensor(query, dtype=torch.float32),
                                       atol=1e-3, rtol=0)  # asked about this pair's query keypoints
            predicted[row, : len(answer)] = torch.tensor(answer, dtype=torch.float32)
        return CorrespondenceOutput(target_keypoints=predicted)


def expected_pck(counts: list[int], alpha: float) -> list[float]:
    """Per pair of ``counts[i]`` keypoints: the share whose planted error is within alpha."""
    return [sum(error <= alpha for error in planted_errors(pair, n)) / n for pair, n in enumerate(counts)]


@pytest.mark.parametrize("bench_name, protocol, threshold, padding, side, average", [
    ("pf-pascal", "hpf", "image", None, "target", "pair"),
    ("pf-willow", "hpf", "bbox-kp", None, "target", "pair"),
    ("spair-71k", "hpf", "bbox", None, "target", "pair"),
    ("pf-willow", "cats", "bbox-kp-padded", -1.0, "source", "pair"),
    ("spair-71k", "sd-dino", "bbox", None, "target", "category-point"),
])
def test_planted_errors_give_the_pck_computed_by_hand(bench_name, protocol, threshold, padding, side, average,
                                                       tmp_path):
    from semcorr.hub_datasets import load_benchmark

    root = WRITERS[bench_name](tmp_path)
    benchmark = load_benchmark(bench_name, str(root), split="test", cache_dir=str(tmp_path / "cache"))
    rows, names = list(benchmark), benchmark.features["category"].names
    matcher = PlantedErrorMatcher(rows, side, threshold, padding)
    result = evaluate_model(matcher, bench_name, root, protocol=protocol, alphas=ALPHAS, batch_size=2,
                            cache_dir=tmp_path / "cache", progress=False)
    assert not matcher.answers  # every pair was asked once
    config = result["config"]
    assert (config["threshold"], config["padding_value"], config["side"], config["average"]) == (
        threshold, padding, side, average)
    categories = [names[row["category"]] for row in rows]
    counts = [len(row["target_keypoints"]) for row in rows]
    assert result["num_pairs"] == len(rows) == PAIRS[bench_name] and result["num_points"] == sum(counts)
    assert [row["category"] for row in result["per_pair"]] == categories
    assert set(result["per_category"]) == set(CATEGORIES[bench_name])
    for alpha in ALPHAS:
        key = f"pck@{alpha:g}"
        per_pair = expected_pck(counts, alpha)
        assert [row[key] for row in result["per_pair"]] == pytest.approx(per_pair, abs=1e-12), key
        by_category = {}
        for category, count, pck in zip(categories, counts, per_pair):
            by_category.setdefault(category, []).append((count, pck))
        if average == "pair":  # mean over pairs
            expected = {c: np.mean([pck for _, pck in members]) for c, members in by_category.items()}
            total = np.mean(per_pair)
        else:  # "category-point": points pooled inside a category, then the mean over categories
            expected = {c: sum(n * pck for n, pck in members) / sum(n for n, _ in members)
                        for c, members in by_category.items()}
            total = np.mean(list(expected.values()))
        assert result["total"][key] == pytest.approx(total, abs=1e-12), key
        for category, value in expected.items():
            assert result["per_category"][category][key] == pytest.approx(value, abs=1e-12), (category, key)


def test_missing_data_dir_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code, out, err = run_cli(["evaluate", "--benchmark", "spair-71k", "--data-dir", str(missing)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err
    with pytest.raises(ValueError, match="no-such-folder"):
        evaluate_model(None, "spair-71k", missing)


def test_bad_benchmark_exits_2_one_line(tmp_path, capsys):
    code, out, err = run_cli(["evaluate", "--benchmark", "pf-nope", "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "pf-nope" in err and "pf-pascal" in err
    with pytest.raises(ValueError, match="pf-nope"):
        evaluate_model(None, "pf-nope", tmp_path)


@pytest.mark.parametrize("extra, expected", [
    (["--protocol", "hpf", "--threshold", "bbox"], "contradicts"),
    (["--protocol", "hpf", "--side", "source"], "contradicts"),
    (["--protocol", "dift"], "no convention"),
    (["--alphas", "0"], "alphas"),
    (["--batch-size", "0"], "batch_size"),
])
def test_bad_settings_exit_2_before_loading(extra, expected, tmp_path, capsys):
    root = tmp_path / "PF-PASCAL"
    root.mkdir()
    code, out, err = run_cli(["evaluate", "--benchmark", "pf-pascal", "--data-dir", str(root), *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and expected in err


def test_bad_layout_exits_2(tmp_path, capsys):
    code, out, err = run_cli(["evaluate", "--benchmark", "pf-willow", "--data-dir", str(tmp_path),
                              "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "test_pairs.csv" in err


def test_settings_without_protocol_take_explicit_values():
    settings = resolve_settings(None, "pf-willow", threshold="bbox-kp-padded", side="source", frame="protocol")
    assert settings == {"protocol": None, "threshold": "bbox-kp-padded", "average": "pair", "comparison": "<=",
                        "padding_value": -1.0, "side": "source", "frame": "protocol", "frame_size": None}
    assert resolve_settings("dhpf", "pf-willow", frame="protocol")["frame_size"] == [240, 240]


# -- your own pairs (--dataset) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def stereo_dataset_dir(tmp_path_factory):
    from semcorr.hub_datasets.skimage_pairs import keypoint_pairs_dataset, stereo_crops

    folder = tmp_path_factory.mktemp("stereo") / "stereo-test"
    keypoint_pairs_dataset(stereo_crops(2, max_points=50), category="stereo").save_to_disk(str(folder))
    return folder


def test_evaluate_a_saved_pair_dataset(stereo_dataset_dir, tmp_path, capsys, small_model_dir):
    """Real stereo windows with ground truth: the embedded model transfers most points within 10 %."""
    out_file = tmp_path / "pck.json"
    code, out, err = run_cli(["evaluate", "--model", str(small_model_dir), "--dataset", str(stereo_dataset_dir),
                              "--out", str(out_file), "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads(out_file.read_text())
    assert result["benchmark"] is None and result["data_dir"] == str(stereo_dataset_dir.resolve())
    assert result["config"]["protocol"] is None and result["config"]["threshold"] == "bbox"
    assert result["num_pairs"] == 2 and result["num_points"] == 100
    assert set(result["per_category"]) == {"stereo"} and "| stereo |" in out
    assert result["total"]["pck@0.1"] > 0.8, result["total"]


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "DATASET", "--benchmark", "pf-willow", "--data-dir", "DATASET"], "either --benchmark"),
    ([], "either --benchmark"),
    (["--dataset", "EMPTY"], "not a datasets save_to_disk folder"),
])
def test_dataset_option_errors_exit_2(argv, expected, stereo_dataset_dir, tmp_path, capsys):
    argv = [str(stereo_dataset_dir) if a == "DATASET" else str(tmp_path) if a == "EMPTY" else a for a in argv]
    code, out, err = run_cli(["evaluate", *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err

"""Bad input and robustness, tried as a new user would: thin images, phone photos, wrong model folders,
unwritable outputs, malformed datasets, NaN predictions, and a command line that answers at once.

Every failure is one ``ValueError`` (Python) or one line on stderr with exit status 2 (CLI), and
happens before any work that its fix would waste.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from semcorr.pipelines.cli import main

from .conftest import skimage_data, textured_image

pytestmark = pytest.mark.usefixtures("datasets_offline")


def run_cli(argv, capsys):
    capsys.readouterr()  # drop what the test's own setup printed (datasets progress bars)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def fail_if_called(*args, **kwargs):
    pytest.fail("work was started although the command should have failed first")


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("robust-images")
    Image.fromarray(textured_image(48, 60, 1)).save(folder / "source.png")
    Image.fromarray(textured_image(40, 72, 2)).save(folder / "target.png")
    return folder / "source.png", folder / "target.png"


# -- 1. a thin image does not blow up the match picture ---------------------------------------------
def test_thin_image_gives_a_bounded_picture_with_points_in_place():
    from semcorr.pipelines.drawing import MAX_CANVAS_SIDE, MIN_PANEL_SIDE, draw_matches, panel_sizes

    source = np.zeros((300, 451, 3), np.uint8)
    wide = np.zeros((1, 10000, 3), np.uint8)
    result = {"source_keypoints": [[225.5, 150.0]], "target_keypoints": [[5000.0, 0.5]], "scores": [1.0]}
    started = time.perf_counter()
    canvas = draw_matches(source, wide, result, colors=[(0, 0, 255)])
    assert time.perf_counter() - started < 10
    assert max(canvas.size) <= MAX_CANVAS_SIDE
    (left_w, height), (right_w, _) = panel_sizes((451, 300), (10000, 1))
    assert canvas.size == (left_w + right_w, height) and min(left_w, right_w, height) >= MIN_PANEL_SIDE
    pixels = np.asarray(canvas)
    # each point where it lies on its (possibly squeezed) image
    sx, sy = 225.5 * left_w / 451, 150.0 * height / 300
    tx, ty = left_w + 5000.0 * right_w / 10000, 0.5 * height / 1
    assert tuple(pixels[int(sy), int(sx)]) == (0, 0, 255)
    assert tuple(pixels[int(ty), int(tx)]) == (0, 0, 255)


@pytest.mark.parametrize("source_size, target_size", [
    ((451, 300), (10000, 1)), ((1, 10000), (451, 300)), ((10000, 1), (10000, 1)), ((400, 300), (10000, 1000)),
    ((100000, 99999), (1, 1)), ((3, 2), (2, 3)),
])
def test_panel_sizes_are_bounded_for_any_aspect_ratio(source_size, target_size):
    from semcorr.pipelines.drawing import MAX_CANVAS_SIDE, MIN_PANEL_SIDE, panel_sizes

    (left_w, height), (right_w, right_h) = panel_sizes(source_size, target_size)
    assert height == right_h and MIN_PANEL_SIDE <= height <= MAX_CANVAS_SIDE
    assert left_w >= MIN_PANEL_SIDE and right_w >= MIN_PANEL_SIDE and left_w + right_w <= MAX_CANVAS_SIDE


def test_wide_pair_keeps_its_aspect_ratio_when_it_can():
    from semcorr.pipelines.drawing import panel_sizes

    (left_w, height), (right_w, _) = panel_sizes((400, 300), (10000, 1000))
    assert left_w + right_w <= 4096 and height > 300
    assert abs(left_w / height - 400 / 300) < 0.01 and abs(right_w / height - 10.0) < 0.01


def test_cli_match_with_a_10000_by_1_target_writes_a_small_picture(pair_images, tiny_model_dir, tmp_path, capsys):
    source, _ = pair_images
    wide = tmp_path / "wide.png"
    Image.fromarray(textured_image(4, 10000, 3)[:1]).save(wide)
    out = tmp_path / "m.png"
    code, stdout, err = run_cli(["match", source, wide, "--top-k", "3", "--model", tiny_model_dir, "--out", out], capsys)
    assert code == 0, err
    with Image.open(out) as picture:
        assert max(picture.size) <= 4096


# -- 2. EXIF orientation: a phone photo is matched upright ------------------------------------------
@pytest.fixture(scope="module")
def phone_photos(tmp_path_factory):
    """A JPEG stored sideways with EXIF Orientation=6, its upright copy without EXIF, and another image."""
    folder = tmp_path_factory.mktemp("exif")
    with Image.open(skimage_data() / "chelsea.png") as chelsea:
        upright = chelsea.convert("RGB").resize((150, 100), Image.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    phone = folder / "phone.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(phone, quality=95, exif=exif)  # stored 100 wide x 150 tall
    copy = folder / "upright-copy.png"  # the displayed pixels, losslessly, without EXIF
    with Image.open(phone) as stored:
        assert stored.size == (100, 150) and stored.getexif()[0x0112] == 6
        displayed = ImageOps.exif_transpose(stored)
    assert displayed.size == (150, 100)
    displayed.save(copy)
    other = folder / "other.png"
    Image.fromarray(textured_image(90, 120, 5)).save(other)
    return SimpleNamespace(phone=phone, copy=copy, other=other)


# (120, 20) lies outside the stored 100 x 150 frame: accepted only in the displayed 150 x 100 frame
PHONE_POINTS = [[120.0, 20.0], [30.5, 80.0]]


def test_load_image_shows_the_photo_upright(phone_photos):
    from semcorr.modeling import load_image

    loaded = load_image(phone_photos.phone)
    assert loaded.size == (150, 100)
    assert np.array_equal(np.asarray(loaded), np.asarray(load_image(phone_photos.copy)))


def test_pipeline_matches_a_phone_photo_upright(tiny_pipeline, phone_photos):
    for source, target in ((phone_photos.phone, phone_photos.other), (phone_photos.other, phone_photos.phone)):
        points = PHONE_POINTS if source == phone_photos.phone else [[10.0, 10.0], [100.0, 80.0]]
        reference = {phone_photos.phone: phone_photos.copy}
        got = tiny_pipeline({"source_image": str(source), "target_image": str(target), "source_keypoints": points})
        want = tiny_pipeline({"source_image": str(reference.get(source, source)),
                              "target_image": str(reference.get(target, target)), "source_keypoints": points})
        np.testing.assert_allclose(got["target_keypoints"], want["target_keypoints"], atol=1e-4)
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
    # transferred onto the phone photo: in its displayed 150 x 100 frame
    onto_phone = tiny_pipeline({"source_image": str(phone_photos.other), "target_image": str(phone_photos.phone)},
                               top_k=20)
    assert all(0 <= x <= 150 and 0 <= y <= 100 for x, y in onto_phone["target_keypoints"])


def test_cli_match_takes_keypoints_in_the_displayed_frame(phone_photos, tiny_model_dir, capsys):
    keypoints = ";".join(f"{x},{y}" for x, y in PHONE_POINTS)
    results = []
    for source in (phone_photos.phone, phone_photos.copy):
        code, out, err = run_cli(["match", source, phone_photos.other, "--keypoints", keypoints, "--json",
                                  "--model", tiny_model_dir], capsys)
        assert code == 0, err
        results.append(json.loads(out))
    np.testing.assert_allclose(results[0]["source_keypoints"], PHONE_POINTS)
    np.testing.assert_allclose(results[0]["target_keypoints"], results[1]["target_keypoints"], atol=1e-4)


def _pair_dataset_folder(folder: Path, pairs: list[tuple], categories=("cat",)) -> Path:
    """A save_to_disk folder in the pair schema: ``pairs`` of (source path, target path, src points, trg points)."""
    from semcorr.hub_datasets._common import keypoint_box, pair_features

    rows = {name: [] for name in pair_features(list(categories))}
    for index, (source, target, source_points, target_points) in enumerate(pairs):
        rows["pair_id"].append(index)
        rows["category"].append(0)
        for side, path, points in (("source", source, source_points), ("target", target, target_points)):
            with Image.open(path) as image:
                width, height = ImageOps.exif_transpose(image).size
            rows[f"{side}_image"].append(str(path))
            rows[f"{side}_keypoints"].append(points)
            rows[f"{side}_bbox"].append(keypoint_box(np.asarray(points)))
            rows[f"{side}_image_size"].append([height, width])
    datasets.Dataset.from_dict(rows, features=pair_features(list(categories))).save_to_disk(str(folder))
    return folder


def test_cli_evaluate_dataset_with_a_phone_photo(phone_photos, tmp_path, capsys, semcorr_cache):
    """Keypoints in the displayed frame, against the upright copy: every point transferred onto itself."""
    from semcorr.modeling import default_model_dir

    model = default_model_dir(image_size=[128, 128])
    points = [[20.0, 15.0], [75.0, 50.0], [120.0, 20.0], [140.0, 90.0], [60.0, 85.0], [100.0, 40.0]]
    results = {}
    for name, source in (("phone", phone_photos.phone), ("copy", phone_photos.copy)):
        folder = _pair_dataset_folder(tmp_path / name, [(source, phone_photos.copy, points, points)])
        out = tmp_path / f"{name}.json"
        code, stdout, err = run_cli(["evaluate", "--model", model, "--dataset", folder, "--alphas", "0.1",
                                     "--no-progress", "--out", out], capsys)
        assert code == 0, err
        results[name] = json.loads(out.read_text())
        assert f"dataset {folder.resolve()}" in stdout and "None None" not in stdout  # the header names the folder
    assert results["phone"]["num_points"] == len(points)
    assert results["phone"]["total"]["pck@0.1"] == results["copy"]["total"]["pck@0.1"] == 1.0


# -- 3. model loading says what is wrong, in one line -------------------------------------------------
@pytest.fixture
def model_folders(tmp_path):
    bert = tmp_path / "bert-base"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768, "architectures": ["BertModel"]}))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"weight": torch.zeros(2)}, pickled / "pytorch_model.bin")
    return SimpleNamespace(root=tmp_path, bert=bert, pickled=pickled)


def test_missing_model_folder_is_named(model_folders, monkeypatch, pair_images, capsys):
    from semcorr.modeling import load_matcher

    monkeypatch.chdir(model_folders.root)
    with pytest.raises(ValueError, match=r"model folder 'runs/student/final' does not exist.*'org/name'"):
        load_matcher("runs/student/final")
    code, out, err = run_cli(["match", *pair_images, "--model", "runs/student/final", "--json"], capsys)
    assert_one_line_error(code, err, "runs/student/final", "does not exist", "org/name")


def test_another_librarys_model_is_not_a_semcorr_model(model_folders, pair_images, capsys):
    from semcorr.modeling import load_matcher

    with pytest.raises(ValueError, match=r"not a semcorr model \(model_type 'bert'\).*semcorr-hyperpixel"):
        load_matcher(model_folders.bert)
    code, out, err = run_cli(["match", *pair_images, "--model", model_folders.bert, "--json"], capsys)
    assert_one_line_error(code, err, "not a semcorr model (model_type 'bert')", "semcorr-pmd-student")


class _Payload:
    """Unpickling this would create a file: proof that a pickle was (never) executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("with_config", [False, True])
def test_pickle_weights_are_never_opened_and_the_conversion_is_shown(with_config, model_folders, tiny_model_dir,
                                                                     pair_images, capsys):
    from semcorr.modeling import load_matcher

    folder, marker = model_folders.pickled, model_folders.root / "executed"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    if with_config:
        (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"only safetensors weights are loaded") as raised:
        load_matcher(folder)
    message = str(raised.value)
    assert "pytorch_model.bin" in message and "weights_only=True" in message
    assert "safetensors.torch.save_file" in message and "save_pretrained" in message
    code, out, err = run_cli(["match", *pair_images, "--model", folder, "--json"], capsys)
    assert_one_line_error(code, err, "only safetensors weights are loaded", "weights_only=True")
    assert not marker.exists(), "a pickle file was unpickled"


def test_folder_without_config_or_with_broken_config(model_folders):
    from semcorr.modeling import load_matcher

    empty = model_folders.root / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        load_matcher(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a readable JSON config"):
        load_matcher(empty)


def test_hub_id_not_cached_while_offline_is_one_line(pair_images, capsys):
    from semcorr.modeling import load_matcher

    with pytest.raises(ValueError, match=r"'someorg/not-cached-model'.*not in the Hugging Face cache.*offline"):
        load_matcher("someorg/not-cached-model")
    code, out, err = run_cli(["match", *pair_images, "--model", "someorg/not-cached-model", "--json"], capsys)
    assert_one_line_error(code, err, "someorg/not-cached-model", "offline")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import semcorr.hub_datasets.sources as sources
    from semcorr.modeling import load_matcher

    with pytest.raises(ValueError, match=r"no CUDA device is available.*'cpu'"):
        load_matcher(None, device="cuda")
    monkeypatch.setattr(sources, "load_pairs", fail_if_called)
    monkeypatch.setattr("semcorr.hub_datasets.load_pairs", fail_if_called)
    code, out, err = run_cli(["evaluate", "--dataset", tmp_path, "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "no CUDA device is available", "--device cpu")


def test_unknown_device_is_named(capsys, tmp_path):
    code, out, err = run_cli(["evaluate", "--dataset", tmp_path, "--device", "gpu0"], capsys)
    assert_one_line_error(code, err, "unknown device 'gpu0'")


def test_evaluate_checks_the_model_before_reading_data(model_folders, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("semcorr.hub_datasets.load_pairs", fail_if_called)
    code, out, err = run_cli(["evaluate", "--model", model_folders.bert, "--dataset", tmp_path], capsys)
    assert_one_line_error(code, err, "not a semcorr model (model_type 'bert')")


# -- 4. nothing half-done: --out is checked first, and --json writes no picture by default -------------
@pytest.fixture
def unwritable_out(tmp_path):
    """A path whose parent is a regular file: not writable, even for root."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker / "result.out"


def test_match_out_not_writable_fails_before_the_model(pair_images, unwritable_out, monkeypatch, capsys):
    monkeypatch.setattr("semcorr.modeling.load_matcher", fail_if_called)
    monkeypatch.setattr("semcorr.modeling.loading.load_matcher", fail_if_called)
    out = unwritable_out.with_suffix(".png")
    code, stdout, err = run_cli(["match", *pair_images, "--out", out], capsys)
    assert_one_line_error(code, err, f"cannot write {out}", "is not a folder")
    assert stdout == "" and ".tmp" not in err


def test_evaluate_out_not_writable_fails_before_the_evaluation(unwritable_out, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("semcorr.evaluation.evaluate_model", fail_if_called)
    monkeypatch.setattr("semcorr.modeling.load_matcher", fail_if_called)
    out = unwritable_out.with_suffix(".json")
    code, stdout, err = run_cli(["evaluate", "--dataset", tmp_path, "--out", out], capsys)
    assert_one_line_error(code, err, f"cannot write {out}")
    assert ".tmp" not in err


def test_read_only_folder_is_refused_before_the_model(pair_images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("semcorr.modeling.load_matcher", fail_if_called)
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if getattr(os, "geteuid", lambda: None)() == 0:
        # Root passes every permission check, so the kernel never refuses it; answer for this folder
        # from its mode bits, as the kernel does for its owner (the CLI's path is the same).
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: (
            not mode & os.W_OK or bool(folder.stat().st_mode & stat.S_IWUSR)) if Path(path) == folder
            else real_access(path, mode))
    try:
        code, stdout, err = run_cli(["match", *pair_images, "--out", folder / "m.png"], capsys)
    finally:
        folder.chmod(0o755)
    assert_one_line_error(code, err, str(folder / "m.png"), "not writable")


def test_out_that_is_a_folder_is_refused(pair_images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("semcorr.modeling.load_matcher", fail_if_called)
    code, stdout, err = run_cli(["match", *pair_images, "--out", tmp_path], capsys)
    assert_one_line_error(code, err, "is a folder")


def test_write_failure_names_the_users_path_not_a_temporary_file(tmp_path):
    from semcorr.pipelines.drawing import save_image

    class FullDisk:
        def save(self, path, format=None):
            raise OSError(28, "No space left on device", str(path))

    target = tmp_path / "m.png"
    with pytest.raises(OSError) as raised:
        save_image(FullDisk(), target)
    assert str(target) in str(raised.value) and ".tmp" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_match_json_writes_no_picture_unless_out_is_given(pair_images, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["match", *pair_images, "--top-k", "3", "--json", "--model", tiny_model_dir], capsys)
    assert code == 0, err
    json.loads(out)
    assert not (tmp_path / "matches.png").exists() and "wrote" not in err
    code, out, err = run_cli(["match", *pair_images, "--top-k", "3", "--model", tiny_model_dir], capsys)
    assert code == 0, err
    assert (tmp_path / "matches.png").is_file() and "wrote matches.png" in out


def test_match_help_documents_the_picture_default(capsys):
    with pytest.raises(SystemExit):
        main(["match", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "matches.png when neither --json nor --out is given" in text


# -- 5. smaller things -----------------------------------------------------------------------------------
def test_empty_keypoints_option_is_an_error(pair_images, monkeypatch, capsys):
    monkeypatch.setattr("semcorr.modeling.load_matcher", fail_if_called)
    code, out, err = run_cli(["match", *pair_images, "--keypoints", ""], capsys)
    assert_one_line_error(code, err, "--keypoints is empty")


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.5])
def test_pipeline_rejects_a_bad_batch_size(tiny_pipeline, pair_images, batch_size):
    source, target = pair_images
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny_pipeline({"source_image": str(source), "target_image": str(target)}, batch_size=batch_size)


@pytest.mark.parametrize("keypoints, message", [
    ([[1.0, 2.0], [3.0]], r"\[\[x, y\], \.\.\.\].*point 1 = \[3.0\] has 1 values, not 2 \(a ragged list\?\)"),
    ([["10", "20"]], r"\[\[x, y\], \.\.\.\].*point 0 = \['10', '20'\] holds the string '10'"),
    (["10,20"], r"point 0 is the string '10,20'"),
    ("10,20", r"got the string '10,20'"),
    ([[1.0, 2.0], 5.0], r"point 1 is the single value 5.0.*wrong nesting.*\[\[x, y\]\]"),
    ([[1.0, [2.0, 3.0]]], r"point 0 .* holds the sequence \[2.0, 3.0\].*wrong nesting"),
    ([10.0, 20.0], r"got shape \(2,\); a single point is written \[\[x, y\]\]"),
    ({"x": 1, "y": 2}, r"\[\[x, y\], \.\.\.\].*got dict"),
])
def test_wrong_keypoint_types_say_what_is_wrong(keypoints, message):
    from semcorr.modeling import validate_keypoints

    with pytest.raises(ValueError, match=message):
        validate_keypoints(keypoints, (40, 40))


def test_keypoints_of_numpy_and_torch_still_pass():
    from semcorr.modeling import validate_keypoints

    expected = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    for given in (expected, torch.from_numpy(expected), [tuple(row) for row in expected.tolist()], list(expected)):
        np.testing.assert_array_equal(validate_keypoints(given, (10, 10)), expected)


@pytest.mark.parametrize("damaged", ["dataset_info.json", "state.json"])
def test_malformed_saved_dataset_json_is_named(damaged, tmp_path, capsys):
    from semcorr.hub_datasets import open_dataset

    folder = tmp_path / "pairs"
    datasets.Dataset.from_dict({"value": [1, 2]}).save_to_disk(str(folder))
    (folder / damaged).write_text('{"truncated": ')
    with pytest.raises(ValueError, match=rf"{damaged}' is not valid JSON.*save_to_disk"):
        open_dataset(folder)
    code, out, err = run_cli(["evaluate", "--dataset", folder], capsys)
    assert_one_line_error(code, err, str(folder / damaged), "not valid JSON")


def test_report_header_names_the_dataset_folder_and_split():
    from semcorr.evaluation import format_table

    config = {"protocol": None, "threshold": "bbox", "average": "pair", "comparison": "<=", "side": "target",
              "frame": "original"}
    result = {"benchmark": None, "split": "test", "data_dir": "/data/my-pairs", "model": "m", "config": config,
              "total": {"pck@0.1": 0.5}, "per_category": {}, "num_pairs": 0, "num_points": 0}
    header = format_table(result).splitlines()[0]
    assert header.startswith("dataset /data/my-pairs, split test, model m") and "None" not in header
    header = format_table({**result, "split": None}).splitlines()[0]
    assert header.startswith("dataset /data/my-pairs, model m")
    benchmark = format_table({**result, "benchmark": "pf-pascal"}).splitlines()[0]
    assert benchmark.startswith("pf-pascal test, model m")


class _ShiftedMatcher(torch.nn.Module):
    """Transfers every point to itself, displaced by ``offset`` model pixels (NaN: a broken model)."""

    def __init__(self, offset, size=(64, 64)):
        super().__init__()
        self.offset = offset
        self.config = SimpleNamespace(image_size=list(size), image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      model_type="shifted")

    def match(self, source_pixel_values, target_pixel_values, source_keypoints=None):
        from semcorr.modeling import CorrespondenceOutput

        return CorrespondenceOutput(target_keypoints=source_keypoints + torch.as_tensor(self.offset),
                                    keypoint_scores=torch.ones(source_keypoints.shape[:2]))


def _in_memory_pairs(count=2, with_category=True):
    image = Image.fromarray(textured_image(40, 50, 0))
    points = [[1.0, 1.0], [25.0, 20.0], [49.0, 39.0]]
    rows = {"source_image": [image] * count, "target_image": [image] * count,
            "source_keypoints": [points] * count, "target_keypoints": [points] * count,
            "source_bbox": [[0, 0, 50, 40]] * count, "target_bbox": [[0, 0, 50, 40]] * count,
            "source_image_size": [[40, 50]] * count, "target_image_size": [[40, 50]] * count}
    if with_category:
        rows["category"] = ["cat"] * count
    return datasets.Dataset.from_dict(rows)


def test_all_nan_predictions_warn_once_naming_the_counts():
    from semcorr.evaluation import evaluate_model

    with pytest.warns(RuntimeWarning) as caught:
        result = evaluate_model(_ShiftedMatcher([float("nan"), 0.0]), None, dataset=_in_memory_pairs(2),
                                alphas=[0.1], progress=False)
    ours = [w for w in caught if "not finite" in str(w.message)]
    assert len(ours) == 1
    assert "6 of 6 points in 2 of 2 pairs" in str(ours[0].message)
    assert result["total"]["pck@0.1"] == 0.0  # they count as misses


def test_cli_prints_the_nan_warning_on_one_line(monkeypatch, tmp_path, capsys):
    from semcorr.modeling import image_processor_for

    matcher = _ShiftedMatcher([float("nan"), float("nan")])
    monkeypatch.setattr("semcorr.modeling.load_matcher",
                        lambda *a, **k: (matcher, image_processor_for(matcher.config), "broken"))
    folder = tmp_path / "pairs"
    _in_memory_pairs(1).save_to_disk(str(folder))
    code, out, err = run_cli(["evaluate", "--dataset", folder, "--no-progress", "--alphas", "0.1"], capsys)
    assert code == 0, err
    warnings_printed = [line for line in err.splitlines() if line.strip()]
    assert len(warnings_printed) == 1 and warnings_printed[0].startswith("semcorr: warning:"), err
    assert "3 of 3 points in 1 of 1 pairs" in warnings_printed[0]


def test_a_directory_given_as_an_image_is_named(tmp_path, pair_images, monkeypatch, capsys):
    from semcorr.modeling import load_image

    with pytest.raises(ValueError, match="is a directory, not an image file"):
        load_image(tmp_path)
    monkeypatch.setattr("semcorr.modeling.load_matcher", fail_if_called)
    code, out, err = run_cli(["match", pair_images[0], tmp_path, "--json"], capsys)
    assert_one_line_error(code, err, str(tmp_path), "is a directory")


def test_keypoints_mapped_back_are_clamped_to_the_image():
    from semcorr.modeling import SemanticCorrespondenceImageProcessor

    processor = SemanticCorrespondenceImageProcessor(size={"height": 64, "width": 64})
    model_points = torch.tensor([[-0.05, 10.0], [64.002, 64.5], [32.0, float("nan")]])
    original = processor.keypoints_to_original(model_points, (300, 400))
    np.testing.assert_allclose(original[:2].numpy(), [[0.0, 10.0 * 300 / 64], [400.0, 300.0]], rtol=1e-6)
    assert original[2, 0] == 200.0 and torch.isnan(original[2, 1])
    assert processor.keypoints_to_original(model_points[:1], (300, 400), clamp=False)[0, 0] < 0


def test_pipeline_transfers_onto_the_image_for_any_model(tiny_pipeline, monkeypatch):
    """A model that overshoots its input frame: the pipeline's points still land on the image."""
    overshoot = _ShiftedMatcher([100.0, -100.0])
    monkeypatch.setattr(tiny_pipeline.model, "match", overshoot.match)
    image = textured_image(40, 50, 0)
    result = tiny_pipeline({"source_image": image, "target_image": image, "source_keypoints": [[10.0, 30.0]]})
    np.testing.assert_allclose(result["target_keypoints"], [[50.0, 0.0]], atol=1e-5)
    result = tiny_pipeline({"source_image": image, "target_image": image,
                            "source_keypoints": [[0.0, 0.0], [50.0, 40.0]]})
    assert all(0 <= x <= 50 and 0 <= y <= 40 for x, y in result["target_keypoints"])


def test_evaluation_scores_the_unclamped_prediction():
    """PCK judges what the model predicted (as the published protocols do): off the image is a miss."""
    from semcorr.evaluation import evaluate_model

    # +32 model pixels in x = +25 original pixels: every point misses at alpha 0.1 (threshold 5 px),
    # although the clamped right-most point (49 -> 50) would be within 1 pixel of its truth.
    result = evaluate_model(_ShiftedMatcher([32.0, 0.0]), None, dataset=_in_memory_pairs(1), alphas=[0.1],
                            progress=False)
    assert result["total"]["pck@0.1"] == 0.0


def test_dataset_without_a_category_column_is_one_category():
    from semcorr.evaluation import evaluate_model

    result = evaluate_model(_ShiftedMatcher([0.0, 0.0]), None, dataset=_in_memory_pairs(2, with_category=False),
                            alphas=[0.1], progress=False)
    assert list(result["per_category"]) == ["all"] and result["per_category"]["all"]["num_pairs"] == 2
    assert result["total"]["pck@0.1"] == 1.0


# -- 6. the command line answers at once ---------------------------------------------------------------
_HEAVY = ("torch", "transformers", "datasets", "evaluate", "timm")
_PROBE = """
import sys, time
started = time.perf_counter()
from semcorr.pipelines.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(name for name in {HEAVY} if name in sys.modules)
print(repr((code, heavy, time.perf_counter() - started)))
"""


@pytest.mark.parametrize("argv, expected_code", [
    (["--help"], 0), (["match", "--help"], 0), (["evaluate", "--help"], 0), (["match"], 2),
    (["evaluate", "--protocol", "nope"], 2), (["match", "a.png", "b.png", "--top-k", "0"], 2),
])
def test_help_and_usage_errors_import_no_heavy_library(argv, expected_code):
    completed = subprocess.run([sys.executable, "-c", _PROBE.replace("{HEAVY}", repr(_HEAVY)), *argv],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    code, heavy, seconds = eval(completed.stdout.strip().splitlines()[-1])
    assert code == expected_code and heavy == [], (heavy, completed.stderr)
    assert seconds < 5, seconds  # about 0.2 s on an idle 2-core machine; bounded loosely for shared CI


def test_importing_the_package_still_registers_the_task_when_transformers_comes_later(tiny_model_dir):
    script = f"""
import sys
import semcorr.pipelines
assert "transformers" not in sys.modules
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY
assert "semantic-correspondence" in PIPELINE_REGISTRY.get_supported_tasks()
pipe = pipeline("semantic-correspondence", model={str(tiny_model_dir)!r})
print(type(pipe).__name__)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "SemanticCorrespondencePipeline"


def test_cli_choices_equal_the_libraries_lists():
    from semcorr.hub_datasets import BENCHMARKS
    from semcorr.pipelines import evaluation as cli_evaluation
    from semcorr.spaces.pck import PROTOCOLS
    from semcorr.spaces.pck.pck import AVERAGES, COMPARISONS, THRESHOLDS

    assert list(cli_evaluation.BENCHMARKS) == list(BENCHMARKS)
    assert list(cli_evaluation.PROTOCOLS) == list(PROTOCOLS)
    assert tuple(cli_evaluation.THRESHOLDS) == tuple(THRESHOLDS)
    assert tuple(cli_evaluation.AVERAGES) == tuple(AVERAGES)
    assert tuple(cli_evaluation.COMPARISONS) == tuple(COMPARISONS)

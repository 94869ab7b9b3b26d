"""The ``semcorr`` command line: ``match``, ``demo`` and its error contract."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from semcorr.pipelines.cli import main, parse_keypoints

from .conftest import textured_image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-images")
    Image.fromarray(textured_image(48, 60, 1)).save(folder / "source.png")
    Image.fromarray(textured_image(40, 72, 2)).save(folder / "target.jpg", quality=95)
    return folder / "source.png", folder / "target.jpg"


def test_parse_keypoints():
    assert parse_keypoints("1,2;3.5,4") == [[1.0, 2.0], [3.5, 4.0]]
    assert parse_keypoints(" 1 , 2 ; ") == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="not 'x,y'"):
        parse_keypoints("1,2,3")
    with pytest.raises(ValueError, match="non-number"):
        parse_keypoints("1,a")
    with pytest.raises(ValueError, match="empty"):
        parse_keypoints(";")


def test_match_keypoints_json_and_picture(images, tiny_model_dir, tmp_path, capsys):
    source, target = images
    out = tmp_path / "pics" / "matches.png"
    code = main(["match", str(source), str(target), "--keypoints", "10,12;50.5,30", "--json",
                 "--model", str(tiny_model_dir), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)  # stdout is pure JSON
    assert len(result["target_keypoints"]) == 2 and len(result["scores"]) == 2
    np.testing.assert_allclose(result["source_keypoints"], [[10, 12], [50.5, 30]], atol=1e-3)
    assert all(0 <= x <= 72 and 0 <= y <= 40 for x, y in result["target_keypoints"])
    assert "wrote" in captured.err  # the file notice goes to stderr with --json
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size[1] == 48


def test_match_top_k_table(images, tiny_model_dir, tmp_path, capsys):
    source, target = images
    out = tmp_path / "top.png"
    code = main(["match", str(source), str(target), "--top-k", "5", "--model", str(tiny_model_dir), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["source", "x", "source", "y", "target", "x", "target", "y", "score"]
    rows = [line for line in lines[1:] if not line.startswith("wrote")]
    assert 1 <= len(rows) <= 5
    scores = [float(row.split()[-1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert out.is_file()


def test_match_top_k_json_without_picture(images, tiny_model_dir, capsys):
    source, target = images
    code = main(["match", str(source), str(target), "--top-k", "3", "--json", "--out", "", "--model", str(tiny_model_dir)])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert 1 <= len(result["scores"]) <= 3 and "wrote" not in captured.err


def test_demo_prints_pck_and_writes_picture(tmp_path, monkeypatch, capsys):
    """The acceptance check: the embedded default on real pairs with known correspondence."""
    monkeypatch.chdir(tmp_path)
    code = main(["demo", "--points", "100", "--out", "tmp/demo.png"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {}
    for line in captured.out.splitlines():
        match = re.match(r"^(stereo|affine).*?\s+(\d+)\s+([01]\.\d{3})\s+([01]\.\d{3})$", line)
        if match:
            rows[match.group(1)] = (int(match.group(2)), float(match.group(3)), float(match.group(4)))
    assert set(rows) == {"stereo", "affine"}, captured.out
    assert rows["stereo"][0] == rows["affine"][0] == 100
    assert rows["stereo"][1] >= 0.92, captured.out  # PCK@0.05
    assert rows["affine"][1] >= 0.95, captured.out
    assert rows["stereo"][2] >= rows["stereo"][1] and rows["affine"][2] >= rows["affine"][1]  # PCK@0.1 >= PCK@0.05
    picture = tmp_path / "tmp" / "demo.png"
    assert picture.is_file()
    from semcorr.pipelines import demo

    with Image.open(picture) as image:
        # A captioned panel per pair: the two dense pairs 360 high, the cross-instance pair (it needs gradio) 480.
        expected = 2 * (demo.CAPTION_HEIGHT + 360)
        if importlib.util.find_spec("gradio") is not None:
            expected += demo.CAPTION_HEIGHT + 480
        assert image.height == expected


# -- errors: exit 2, exactly one line on stderr, no traceback ---------------------------------------
def _assert_one_line_error(code, captured, *fragments, one_line=True):
    assert code == 2
    lines = captured.err.strip("\n").split("\n")
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    if one_line:
        assert len(lines) == 1, captured.err


def test_error_missing_file(images, tiny_model_dir, tmp_path, capsys):
    source, _ = images
    code = main(["match", str(source), str(tmp_path / "absent.png"), "--model", str(tiny_model_dir), "--out", ""])
    _assert_one_line_error(code, capsys.readouterr(), "semcorr: error:", "not found", "absent.png", one_line=False)


def test_error_keypoint_outside_image(images, tiny_model_dir, capsys):
    source, target = images
    code = main(["match", str(source), str(target), "--keypoints", "10,10;500,10", "--model", str(tiny_model_dir),
                 "--out", ""])
    _assert_one_line_error(code, capsys.readouterr(), "semcorr: error:", "[1]", "outside the 60x48 image", one_line=False)


# Errors raised after the model is loaded must not be preceded by library progress bars.
@pytest.mark.parametrize("case", ["missing file", "keypoint outside"])
def test_error_after_model_load_is_exactly_one_line(case, images, tiny_model_dir, tmp_path, capsys):
    source, target = images
    if case == "missing file":
        argv = ["match", str(source), str(tmp_path / "absent.png")]
    else:
        argv = ["match", str(source), str(target), "--keypoints", "500,10"]
    code = main(argv + ["--model", str(tiny_model_dir), "--out", ""])
    _assert_one_line_error(code, capsys.readouterr(), "semcorr: error:")


def test_error_bad_keypoints_text(images, tiny_model_dir, capsys):
    source, target = images
    code = main(["match", str(source), str(target), "--keypoints", "10;20", "--model", str(tiny_model_dir), "--out", ""])
    _assert_one_line_error(code, capsys.readouterr(), "semcorr: error:", "--keypoints", "'10'")


def test_error_unknown_option(images, capsys):
    source, target = images
    code = main(["match", str(source), str(target), "--bogus"])
    _assert_one_line_error(code, capsys.readouterr(), "unrecognized arguments: --bogus")


def test_error_top_k_zero(images, capsys):
    source, target = images
    code = main(["match", str(source), str(target), "--top-k", "0"])
    _assert_one_line_error(code, capsys.readouterr(), "semcorr: error:", "--top-k")


def test_error_no_command_and_bad_points(capsys):
    _assert_one_line_error(main([]), capsys.readouterr(), "semcorr")
    _assert_one_line_error(main(["demo", "--points", "0"]), capsys.readouterr(), "--points")


def test_console_script_match_json(images, tiny_model_dir, tmp_path):
    source, target = images
    executable = shutil.which("semcorr")
    command = [executable] if executable else [sys.executable, "-m", "semcorr.pipelines.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        command + ["match", str(source), str(target), "--keypoints", "10,12;40,30", "--json",
                   "--model", str(tiny_model_dir), "--out", str(tmp_path / "m.png")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout)
    assert len(result["target_keypoints"]) == 2
    assert (tmp_path / "m.png").is_file()

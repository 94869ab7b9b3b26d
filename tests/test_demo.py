"""``semcorr demo``: three rows (stereo, warp, two different animals), and a picture that shows what was right."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
from PIL import Image

from semcorr.pipelines import demo
from semcorr.pipelines.cli import main

HAVE_GRADIO = importlib.util.find_spec("gradio") is not None
ROW = re.compile(r"^(\S.*?)\s+(\d+)\s+([01]\.\d{3})\s+([01]\.\d{3})$")


def _rows(lines):
    return {m.group(1): (int(m.group(2)), float(m.group(3)), float(m.group(4)))
            for m in map(ROW.match, lines) if m}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    if not HAVE_GRADIO:
        pytest.skip('the cross-instance pair needs gradio: pip install "semcorr[demo]"')
    out = tmp_path_factory.mktemp("demo") / "demo.png"
    lines = []
    results = demo.run_demo(out, num_points=100, print_fn=lines.append)
    with Image.open(out) as image:
        picture = np.asarray(image.convert("RGB"))
    return lines, results, picture


def test_prints_three_rows(demo_run):
    lines, results, _ = demo_run
    rows = _rows(lines)
    cross = f"cats: {demo.CROSS_INSTANCE_PAIR[0]} -> {demo.CROSS_INSTANCE_PAIR[1]}"
    assert list(rows) == ["stereo (motorcycle)", "affine warp (chelsea)", cross], lines
    assert rows["stereo (motorcycle)"][0] == rows["affine warp (chelsea)"][0] == 100
    assert rows[cross][0] == len(results[cross].keypoint_names) >= 4
    assert rows["stereo (motorcycle)"][1] >= 0.95 and rows["affine warp (chelsea)"][1] >= 0.95
    assert lines[0].split() == ["pair", "points", "PCK@0.05", "PCK@0.1"]
    assert lines[-1].startswith("wrote ")


def test_cross_instance_pck_equals_an_independent_count(demo_run, default_pipe):
    """The printed PCK@0.1 is the fraction of keypoints the default pipeline puts within 0.1 x the target's longer side."""
    from semcorr.hub_datasets.bigcats import bigcat_pairs

    lines, results, _ = demo_run
    name = f"{demo.CROSS_INSTANCE_PAIR[0]} -> {demo.CROSS_INSTANCE_PAIR[1]}"
    pair = next(p for p in bigcat_pairs() if p.name == name)
    output = default_pipe({"source_image": pair.source_image, "target_image": pair.target_image,
                           "source_keypoints": pair.source_keypoints})
    error = np.linalg.norm(np.asarray(output["target_keypoints"]) - pair.target_keypoints, axis=1)
    expected = float(np.mean(error <= 0.1 * max(pair.target_image.size)))
    printed = _rows(lines)[f"cats: {name}"][2]
    assert printed == pytest.approx(expected, abs=5e-4)
    assert results[f"cats: {name}"].pck[0.1] == pytest.approx(expected)
    np.testing.assert_array_equal(results[f"cats: {name}"].correct, error <= 0.1 * max(pair.target_image.size))


def _dot_colour(picture, xy):
    x, y = (int(round(v)) for v in xy)
    return tuple(int(v) for v in picture[y, x])


def test_picture_is_green_where_correct_and_red_where_wrong(demo_run):
    _, results, picture = demo_run
    checked = {True: 0, False: 0}
    for result in results.values():
        shown_correct = result.correct[result.shown]
        assert result.source_xy.shape == result.target_xy.shape == (len(result.shown), 2)
        for dots in (result.source_xy, result.target_xy):
            for index, (xy, ok) in enumerate(zip(dots, shown_correct)):
                others = np.delete(dots, index, axis=0)
                if len(others) and np.linalg.norm(others - xy, axis=1).min() < 14:  # another dot drawn over it
                    continue
                assert _dot_colour(picture, xy) == (demo.GREEN if ok else demo.RED), (result.name, index, ok)
                checked[bool(ok)] += 1
    assert checked[True] >= 20
    dense = [r for r in results.values() if not r.keypoint_names]
    assert all(len(r.shown) == demo.DENSE_SHOWN for r in dense)
    if any(not r.correct[r.shown].all() for r in results.values()):
        assert checked[False] >= 1


def test_picture_layout(demo_run):
    _, results, picture = demo_run
    assert len(results) == 3
    assert picture.shape[0] == 3 * demo.CAPTION_HEIGHT + 2 * demo.PANEL_HEIGHT + demo.CROSS_PANEL_HEIGHT
    cats = results[f"cats: {demo.CROSS_INSTANCE_PAIR[0]} -> {demo.CROSS_INSTANCE_PAIR[1]}"]
    assert cats.target_xy[:, 1].min() >= picture.shape[0] - demo.CROSS_PANEL_HEIGHT  # the last panel
    assert (cats.target_xy[:, 0] > cats.source_xy[:, 0]).all()  # target on the right


def test_spread_subset_is_spread():
    points = np.random.default_rng(0).random((500, 2)) * 100
    chosen = demo.spread_subset(points, 40)
    assert len(set(chosen.tolist())) == 40
    gaps = np.linalg.norm(points[chosen][:, None] - points[chosen][None], axis=-1) + np.eye(40) * 1e9
    assert gaps.min() > 5.0  # a random subset of 40 of 500 points has pairs far closer
    assert demo.spread_subset(points[:3], 40).tolist() == [0, 1, 2]


def test_without_gradio_the_cross_instance_row_says_how_to_get_it(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from semcorr.hub_datasets.bigcats import BigCatsUnavailableError

    def missing():
        raise BigCatsUnavailableError("no gradio")

    monkeypatch.setattr(demo, "_cross_instance_pair", missing)
    code = main(["demo", "--points", "20", "--out", str(tmp_path / "demo.png"), "--model", str(tiny_model_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert set(_rows(captured.out.splitlines())) == {"stereo (motorcycle)", "affine warp (chelsea)"}
    hint = [line for line in captured.out.splitlines() if line.startswith("cats")]
    assert len(hint) == 1 and 'pip install "semcorr[demo]"' in hint[0] and "gradio" in hint[0], captured.out
    with Image.open(tmp_path / "demo.png") as image:
        assert image.height == 2 * (demo.CAPTION_HEIGHT + demo.PANEL_HEIGHT)

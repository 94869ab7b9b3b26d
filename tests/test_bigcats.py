"""The big-cat cross-instance validation set: loader, protocol, dataset form, and the embedded default's accuracy."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from semcorr.hub_datasets import bigcats
from semcorr.hub_datasets.bigcats import (
    BIGCATS_JSON, BigCatsUnavailableError, bigcat_pairs, bigcats_dataset, bigcats_pck, load_bigcats,
)

HAVE_GRADIO = importlib.util.find_spec("gradio") is not None
needs_gradio = pytest.mark.skipif(not HAVE_GRADIO, reason='gradio ships 3 of the 4 photos: pip install "semcorr[demo]"')


@pytest.fixture(scope="module")
def images():
    if not HAVE_GRADIO:
        pytest.skip('gradio ships 3 of the 4 photos: pip install "semcorr[demo]"')
    return load_bigcats()


@pytest.fixture(scope="module")
def pairs(images):
    return bigcat_pairs(images)


def test_annotation_ships_with_the_package():
    assert BIGCATS_JSON.is_file()
    raw = bigcats.annotation()
    assert list(raw) == ["cheetah1", "cheetah2", "lion", "chelsea"]
    assert all(set(entry["kps"]) <= set(bigcats.KEYPOINT_NAMES) for entry in raw.values())


@needs_gradio
def test_load_bigcats_images_and_keypoints_in_package_convention(images):
    raw = bigcats.annotation()
    assert {key: image.image.size for key, image in images.items()} == {
        "cheetah1": (256, 256), "cheetah2": (762, 787), "lion": (256, 256), "chelsea": (451, 300)}
    for key, image in images.items():
        assert image.image.mode == "RGB"
        assert set(image.keypoints) == set(raw[key]["kps"])
        for name, (x, y) in image.keypoints.items():  # the annotated pixel's centre
            assert (x, y) == (raw[key]["kps"][name][0] + 0.5, raw[key]["kps"][name][1] + 0.5)
            assert 0 <= x <= image.image.width and 0 <= y <= image.image.height


@needs_gradio
def test_protocol_has_12_ordered_pairs_and_52_transfers(pairs):
    assert len(pairs) == 12 and len({p.name for p in pairs}) == 12
    assert sum(len(p.source_keypoints) for p in pairs) == 52
    for pair in pairs:
        assert pair.source_keypoints.shape == pair.target_keypoints.shape == (len(pair.keypoint_names), 2)
    perfect = bigcats_pck(pairs, [p.target_keypoints for p in pairs])
    assert perfect["pck"] == 1.0 and perfect["transfers"] == 52


@needs_gradio
def test_pck_threshold_is_a_tenth_of_the_target_longer_side(pairs):
    pair = next(p for p in pairs if p.name == "chelsea -> cheetah2")  # target 762 x 787: limit 78.7 px
    inside = pair.target_keypoints + [78.6, 0.0]
    outside = pair.target_keypoints + [0.0, 78.8]
    assert bigcats_pck([pair], [inside])["pck"] == 1.0
    assert bigcats_pck([pair], [outside])["pck"] == 0.0


@needs_gradio
def test_dataset_scores_like_the_protocol(pairs, images):
    """``semcorr evaluate --dataset`` on this dataset (default bbox threshold, per point) gives the protocol's number."""
    from semcorr.spaces.pck import compute_pck

    dataset = bigcats_dataset(images)
    assert len(dataset) == 12
    row = dataset[0]
    assert row["source_bbox"] == [0.0, 0.0, float(row["source_image"].width), float(row["source_image"].height)]
    rng = np.random.default_rng(0)
    predictions = [p.target_keypoints + rng.normal(0, 40, p.target_keypoints.shape) for p in pairs]
    metric = compute_pck(predictions, [np.asarray(r) for r in dataset["target_keypoints"]], alphas=[0.1],
                         threshold="bbox", average="point", bboxes=dataset["target_bbox"])
    expected = bigcats_pck(pairs, predictions)
    assert 0.0 < expected["pck"] < 1.0
    assert metric["pck@0.1"] == pytest.approx(expected["pck"])


def test_missing_gradio_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(bigcats.importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(BigCatsUnavailableError, match="pip install gradio"):
        load_bigcats()
    assert issubclass(BigCatsUnavailableError, ImportError)


def test_writer_command(tmp_path, images):
    import datasets

    assert bigcats.main(["--output-dir", str(tmp_path / "cats")]) == 0
    assert len(datasets.load_from_disk(str(tmp_path / "cats"))) == 12


# -- the acceptance check of the embedded default -------------------------------------------------
def _transfer(pipe, pair):
    output = pipe({"source_image": pair.source_image, "target_image": pair.target_image,
                   "source_keypoints": pair.source_keypoints})
    return np.asarray(output["target_keypoints"], dtype=np.float64)


@needs_gradio
def test_embedded_default_matches_different_animals_and_keeps_stereo(default_pipe, pairs):
    """PCK@0.1 >= 0.90 on the 52 cross-instance transfers; stereo PCK@0.05 >= 0.95 (500 points, seed 0)."""
    from semcorr.hub_datasets.skimage_pairs import stereo_pair

    result = bigcats_pck(pairs, [_transfer(default_pipe, pair) for pair in pairs])
    assert result["pck"] >= 0.90, result
    stereo = stereo_pair(500, 0)
    error = np.linalg.norm(_transfer(default_pipe, stereo) - stereo.target_keypoints, axis=1)
    assert (error <= 0.05 * max(stereo.target_image.size)).mean() >= 0.95

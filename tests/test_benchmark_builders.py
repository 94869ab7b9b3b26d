"""PF-PASCAL, PF-WILLOW and SPair-71k builders on tiny copies of their on-disk layouts (no network).

Expected values are recomputed here from the raw files (``.mat``, CSV, JSON) with the documented
conversions: PF-PASCAL / PF-WILLOW ``x - 0.5`` (1-based MATLAB), SPair-71k ``x + 0.5`` (0-based).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import scipy.io
from PIL import Image

from semcorr.hub_datasets import pf_willow
from semcorr.hub_datasets.benchmarks import benchmark_builder, load_benchmark, to_hub_layout
from semcorr.hub_datasets._common import BenchmarkLayoutError
from semcorr.tests.fixtures_benchmarks import write_pf_pascal, write_pf_willow, write_spair

POINTS = datasets.List(datasets.List(datasets.Value("float32"), length=2))


pytestmark = pytest.mark.usefixtures("datasets_offline")


def build(name, root, tmp_path, **config) -> datasets.DatasetDict:
    builder = benchmark_builder(name, root, cache_dir=tmp_path / "cache", **config)
    builder.download_and_prepare()
    return builder.as_dataset()


def size_of(path) -> list[int]:
    with Image.open(path) as image:
        return [image.height, image.width]


def check_common_schema(features: datasets.Features, categories) -> None:
    assert features["category"].names == list(categories)
    for side in ("source", "target"):
        assert features[f"{side}_image"] == datasets.Image()
        assert features[f"{side}_keypoints"] == POINTS
        assert features[f"{side}_bbox"] == datasets.List(datasets.Value("float32"), length=4)
        assert features[f"{side}_image_size"] == datasets.List(datasets.Value("int32"), length=2)


# ---------------------------------------------------------------- PF-PASCAL


def pascal_expected(root: Path, row: dict, category: str, listed: dict) -> dict:
    """Keypoints and boxes of a pair recomputed from the .mat files: NaN rows dropped, minus 0.5."""
    mats = [scipy.io.loadmat(root / "Annotations" / category / (Path(row[f"{side}_image"].filename).stem + ".mat"))
            for side in ("source", "target")]
    if "XA" in listed:
        source = np.stack([np.array(listed["XA"].split(";"), float), np.array(listed["YA"].split(";"), float)], 1)
        target = np.stack([np.array(listed["XB"].split(";"), float), np.array(listed["YB"].split(";"), float)], 1)
    else:
        source, target = mats[0]["kps"], mats[1]["kps"]
    both = np.isfinite(source).all(1) & np.isfinite(target).all(1)
    return {"source_keypoints": source[both] - 0.5, "target_keypoints": target[both] - 0.5,
            "source_bbox": mats[0]["bbox"][0] - 0.5, "target_bbox": mats[1]["bbox"][0] - 0.5,
            "dropped": int((~np.isfinite(mats[0]["kps"]).all(1) | ~np.isfinite(mats[1]["kps"]).all(1)).sum())}


@pytest.mark.parametrize("test_style", ["ncnet", "plain"])
def test_pf_pascal_rows_match_raw_files(tmp_path, test_style):
    root = write_pf_pascal(tmp_path, test_style=test_style)
    dataset = build("pf-pascal", root, tmp_path)
    assert {split: len(ds) for split, ds in dataset.items()} == {"train": 4, "validation": 3, "test": 4}
    check_common_schema(dataset["test"].features, dataset["test"].features["category"].names)
    assert len(dataset["test"].features["category"].names) == 20
    dropped = 0
    for split, list_name in (("train", "trn"), ("validation", "val"), ("test", "test")):
        with open(root / f"{list_name}_pairs.csv") as handle:
            listed_rows = list(csv.DictReader(handle))
        for pair_id, (row, listed) in enumerate(zip(dataset[split], listed_rows)):
            category = dataset[split].features["category"].int2str(row["category"])
            assert row["pair_id"] == pair_id
            assert category == pf_pascal_class(int(listed["class"]))
            assert Path(row["source_image"].filename).name == Path(listed["source_image"]).name
            expected = pascal_expected(root, row, category, listed)
            for key in ("source_keypoints", "target_keypoints", "source_bbox", "target_bbox"):
                np.testing.assert_allclose(np.asarray(row[key]).reshape(expected[key].shape), expected[key], atol=1e-4)
            assert row["source_image_size"] == size_of(row["source_image"].filename)
            assert row["target_image_size"] == size_of(row["target_image"].filename)
            assert row["flip"] == int(listed.get("flip", 0))
            dropped += expected["dropped"]
    assert dropped > 0, "the fixture must exercise the NaN-row drop"


def pf_pascal_class(index: int) -> str:
    return ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
            "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"][index - 1]


def test_pf_pascal_literal_conversion(tmp_path):
    """One pair by hand: fixture box [2, 3, w-1, h-2] (1-based) -> [1.5, 2.5, w-1.5, h-2.5]; 2 NaN rows dropped."""
    dataset = load_benchmark("pf-pascal", write_pf_pascal(tmp_path), split="test", cache_dir=tmp_path / "cache")
    first = dataset[0]  # aeroplane images 0 (48 x 32, NaN row 0) and 2 (44 x 30, NaN row 2)
    assert first["source_image_size"] == [32, 48] and first["target_image_size"] == [30, 44]
    assert first["source_bbox"] == [1.5, 2.5, 46.5, 29.5]
    assert first["target_bbox"] == [1.5, 2.5, 42.5, 27.5]
    assert len(first["source_keypoints"]) == len(first["target_keypoints"]) == 3


def test_pf_pascal_plain_and_ncnet_lists_agree(tmp_path):
    ncnet = load_benchmark("pf-pascal", write_pf_pascal(tmp_path / "a"), cache_dir=tmp_path / "cache")
    plain_root = write_pf_pascal(tmp_path / "b", test_style="plain")
    plain = load_benchmark("pf-pascal", plain_root, cache_dir=tmp_path / "cache")
    for key in ("source_keypoints", "target_keypoints", "source_bbox", "category"):
        assert ncnet[key] == plain[key]


# ---------------------------------------------------------------- PF-WILLOW


def test_pf_willow_rows_match_raw_file(tmp_path):
    root = write_pf_willow(tmp_path)
    dataset = build("pf-willow", root, tmp_path)
    assert list(dataset) == ["test"] and len(dataset["test"]) == 5
    check_common_schema(dataset["test"].features, pf_willow.CATEGORIES)
    with open(root / "test_pairs.csv") as handle:
        listed = list(csv.reader(handle))[1:]
    for pair_id, (row, raw) in enumerate(zip(dataset["test"], listed)):
        values = np.asarray(raw[2:], float)
        source, target = values[:20].reshape(2, 10).T - 0.5, values[20:].reshape(2, 10).T - 0.5
        assert row["pair_id"] == pair_id
        assert dataset["test"].features["category"].int2str(row["category"]) == Path(raw[0]).parent.name
        np.testing.assert_allclose(row["source_keypoints"], source, atol=1e-4)
        np.testing.assert_allclose(row["target_keypoints"], target, atol=1e-4)
        np.testing.assert_allclose(row["source_bbox"], [*source.min(0), *source.max(0)], atol=1e-4)
        np.testing.assert_allclose(row["target_bbox"], [*target.min(0), *target.max(0)], atol=1e-4)
        assert row["source_image_size"] == size_of(row["source_image"].filename)
        assert row["target_image_size"] == size_of(row["target_image"].filename)


def test_pf_willow_minus_one_padding_is_dropped_not_measured(tmp_path):
    dataset = load_benchmark("pf-willow", write_pf_willow(tmp_path, padded_pairs=1), cache_dir=tmp_path / "cache")
    padded, plain = dataset[0], dataset[1]
    assert len(padded["source_keypoints"]) == len(padded["target_keypoints"]) == 8
    assert len(plain["source_keypoints"]) == 10
    assert min(padded["source_bbox"]) > 0  # the extent ignores the -1 entries


# ---------------------------------------------------------------- SPair-71k


def test_spair_rows_match_raw_files(tmp_path):
    root = write_spair(tmp_path)
    dataset = build("spair-71k", root, tmp_path)
    assert {split: len(ds) for split, ds in dataset.items()} == {"train": 4, "validation": 3, "test": 5}
    features = dataset["test"].features
    check_common_schema(features, features["category"].names)
    assert len(features["category"].names) == 18 and features["pair_id"] == datasets.Value("string")
    for split, list_name in (("train", "trn"), ("validation", "val"), ("test", "test")):
        names = (root / "Layout" / "large" / f"{list_name}.txt").read_text().split()
        for name, row in zip(names, dataset[split]):
            pair = json.loads((root / "PairAnnotation" / list_name / f"{name}.json").read_text())
            assert row["pair_id"] == name
            assert features["category"].int2str(row["category"]) == pair["category"]
            np.testing.assert_allclose(row["source_keypoints"], np.asarray(pair["src_kps"]) + 0.5)
            np.testing.assert_allclose(row["target_keypoints"], np.asarray(pair["trg_kps"]) + 0.5)
            np.testing.assert_allclose(row["source_bbox"], np.asarray(pair["src_bndbox"]) + 0.5)
            np.testing.assert_allclose(row["target_bbox"], np.asarray(pair["trg_bndbox"]) + 0.5)
            assert row["kps_ids"] == [int(k) for k in pair["kps_ids"]]
            for key in ("viewpoint_variation", "scale_variation", "truncation", "occlusion"):
                assert row[key] == pair[key]
            assert row["source_image_size"] == [pair["src_imsize"][1], pair["src_imsize"][0]]
            assert row["target_image_size"] == size_of(row["target_image"].filename)
            check_against_image_annotation(root, pair, row)


def check_against_image_annotation(root: Path, pair: dict, row: dict) -> None:
    """Pair keypoints are the per-image keypoints visible in both (the others are null there)."""
    path = root / "ImageAnnotation" / pair["category"] / pair["src_imname"].replace(".jpg", ".json")
    image = json.loads(path.read_text())
    visible = [np.asarray(image["kps"][str(k)]) + 0.5 for k in row["kps_ids"]]
    np.testing.assert_allclose(row["source_keypoints"], np.asarray(visible).reshape(-1, 2))
    assert any(v is None for v in image["kps"].values())


def test_spair_small_layout_and_single_split(tmp_path):
    root = write_spair(tmp_path)
    small = build("spair-71k", root, tmp_path, layout="small", split="val")
    assert list(small) == ["validation"] and len(small["validation"]) == 2


# ---------------------------------------------------------------- load_benchmark


def test_load_benchmark_names_and_split_aliases(tmp_path):
    root = write_pf_pascal(tmp_path)
    assert len(load_benchmark("pf-pascal", root, split="val", cache_dir=tmp_path / "cache")) == 3
    assert len(load_benchmark("PF_PASCAL", root, split="trn", cache_dir=tmp_path / "cache")) == 4
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("caltech-101", root)
    with pytest.raises(ValueError, match="not published"):
        load_benchmark("pf-willow", write_pf_willow(tmp_path), split="train", cache_dir=tmp_path / "cache")


def test_no_data_dir_offline_says_to_pass_one(tmp_path):
    with pytest.raises(BenchmarkLayoutError, match="data_dir"):
        load_benchmark("spair-71k", None, cache_dir=tmp_path / "cache")


class StubDownloads:
    """Stands in for datasets' DownloadManager: maps each URL to a local path."""

    def __init__(self, paths: dict):
        self.paths = paths

    def download_and_extract(self, urls: dict) -> dict:
        return {key: str(self.paths[url]) for key, url in urls.items()}


def test_download_path_checks_layout_and_published_count(tmp_path, monkeypatch):
    root = write_pf_willow(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    stub = StubDownloads({pf_willow.ARCHIVE_URL: root, pf_willow.LIST_URL: root / "test_pairs.csv"})
    builder = benchmark_builder("pf-willow", None, cache_dir=tmp_path / "cache")
    with pytest.raises(BenchmarkLayoutError, match="900"):
        builder._split_generators(stub)
    monkeypatch.setattr(pf_willow, "PUBLISHED_COUNTS", {"test": 5})
    (generator,) = builder._split_generators(stub)
    assert generator.name == "test" and len(generator.gen_kwargs["records"]) == 5


# ---------------------------------------------------------------- bad layouts


def _delete(path: Path) -> None:
    path.unlink()


def _mat_without_kps(path: Path) -> None:
    scipy.io.savemat(path, {"bbox": np.array([[1.0, 2.0, 3.0, 4.0]])})


def _garble(path: Path) -> None:
    path.write_text('{"src_kps": [[1, 2]')


BAD_LAYOUTS = {
    "pf-pascal missing list": ("pf-pascal", "test_pairs.csv", _delete),
    "pf-pascal missing image": ("pf-pascal", "JPEGImages/2001_000002.jpg", _delete),
    "pf-pascal mat without kps": ("pf-pascal", "Annotations/aeroplane/2001_000000.mat", _mat_without_kps),
    "pf-willow missing list": ("pf-willow", "test_pairs.csv", _delete),
    "pf-willow missing image": ("pf-willow", "duck(S)/060_0072.png", _delete),
    "spair malformed json": ("spair-71k", "PairAnnotation/test/000002-2008_000345-2008_000112:cat.json", _garble),
    "spair missing pair json": ("spair-71k", "PairAnnotation/val/000001-2008_000112-2009_001002:cat.json", _delete),
    "spair missing image": ("spair-71k", "JPEGImages/dog/2011_000017.jpg", _delete),
    "spair missing layout list": ("spair-71k", "Layout/large/trn.txt", _delete),
}
WRITERS = {"pf-pascal": write_pf_pascal, "pf-willow": write_pf_willow, "spair-71k": write_spair}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_layout_fails_early_naming_the_file(tmp_path, case):
    name, relative, damage = BAD_LAYOUTS[case]
    root = WRITERS[name](tmp_path)
    damage(root / relative)
    builder = benchmark_builder(name, root, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=re.escape(Path(relative).name)) as raised:
        builder.download_and_prepare()
    assert "Expected layout" in str(raised.value)
    assert not list((tmp_path / "cache").rglob("*.arrow")), "nothing may be generated before the check"


# ---------------------------------------------------------------- Hub layout


@pytest.mark.parametrize("name", list(WRITERS))
def test_to_hub_layout_round_trip(tmp_path, name):
    root = WRITERS[name](tmp_path / "raw")
    builder = benchmark_builder(name, root, cache_dir=tmp_path / "cache")
    out = to_hub_layout(builder, tmp_path / "hub")
    original = builder.as_dataset()
    pixels = {split: [np.asarray(r["source_image"]) for r in ds] for split, ds in original.items()}
    rows = {split: ds.remove_columns(["source_image", "target_image"]).to_list() for split, ds in original.items()}
    shutil.rmtree(tmp_path / "raw")  # the Parquet files must not need the source images
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(f"{s}-00000-of-00001.parquet" for s in original)
    card = (out / "README.md").read_text()
    assert "semantic-correspondence" in card and "configs:" in card and "dataset_info:" in card
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache2"))
    assert set(loaded) == set(original)
    for split, ds in loaded.items():
        assert ds.features == original[split].features
        assert ds.remove_columns(["source_image", "target_image"]).to_list() == rows[split]
        for row, expected in zip(ds, pixels[split]):
            np.testing.assert_array_equal(np.asarray(row["source_image"]), expected)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".hub.")], "no staging folder left behind"


def test_to_hub_layout_refuses_to_clobber(tmp_path):
    dataset = load_benchmark("pf-willow", write_pf_willow(tmp_path), cache_dir=tmp_path / "cache")
    out = tmp_path / "hub"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        to_hub_layout(datasets.DatasetDict({"test": dataset}), out)
    to_hub_layout(datasets.DatasetDict({"test": dataset}), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "data" / "test-00000-of-00001.parquet").is_file()
    assert "PF-WILLOW" in (out / "README.md").read_text()

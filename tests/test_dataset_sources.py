"""``open_dataset`` / ``load_pairs``: one loader for a benchmark name, a dataset folder or a Hub id (offline)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from semcorr.hub_datasets import PAIR_COLUMNS, canonical_benchmark_name, load_pairs, open_dataset
from semcorr.hub_datasets.skimage_pairs import KeypointPair, keypoint_pairs_dataset
from semcorr.tests.fixtures_benchmarks import write_pf_willow

pytestmark = pytest.mark.usefixtures("datasets_offline")


def numbers(*values) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"value": list(values)})


def two_splits() -> datasets.DatasetDict:
    return datasets.DatasetDict({"train": numbers(1, 2, 3), "validation": numbers(4)})


def tiny_pairs() -> datasets.Dataset:
    """One pair in the full benchmark pair schema: a 12 x 16 image and its mirror image."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    points = np.array([[2.0, 3.0], [10.0, 8.0]], dtype=np.float32)
    mirrored = np.stack([16 - points[:, 0], points[:, 1]], axis=1)
    pair = KeypointPair("mirror", image, image.transpose(Image.FLIP_LEFT_RIGHT), points, mirrored)
    return keypoint_pairs_dataset([pair], category="mirror")


# -- open_dataset ------------------------------------------------------------------------------------
def test_save_to_disk_dataset_is_returned_whatever_the_split(tmp_path):
    numbers(1, 2).save_to_disk(str(tmp_path / "one"))
    assert open_dataset(tmp_path / "one")["value"] == [1, 2]
    assert open_dataset(str(tmp_path / "one"), split="test")["value"] == [1, 2]  # one Dataset: no names to choose


def test_save_to_disk_dataset_dict_chooses_the_split(tmp_path):
    two_splits().save_to_disk(str(tmp_path / "dict"))
    assert open_dataset(tmp_path / "dict", split="train")["value"] == [1, 2, 3]
    assert open_dataset(tmp_path / "dict", split="val")["value"] == [4]  # published spelling of validation
    with pytest.raises(ValueError, match=r"dict' holds the splits \['train', 'validation'\]; pass one"):
        open_dataset(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"has no split 'test'; splits available: \['train', 'validation'\]"):
        open_dataset(tmp_path / "dict", split="test")


def test_parquet_folder_is_read_with_load_dataset(tmp_path):
    folder = tmp_path / "parquet"
    two_splits()["train"].to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    numbers(9).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    assert open_dataset(folder, split="test", cache_dir=tmp_path / "cache")["value"] == [9]
    with pytest.raises(ValueError, match="has no split 'validation'"):
        open_dataset(folder, split="validation", cache_dir=tmp_path / "cache")


def test_imagefolder_with_one_split_needs_no_split(tmp_path):
    folder = tmp_path / "pictures" / "train"
    folder.mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (8, 6), (index * 100, 0, 0)).save(folder / f"{index}.png")
    loaded = open_dataset(tmp_path / "pictures", cache_dir=tmp_path / "cache")
    assert len(loaded) == 2 and loaded[0]["image"].size == (8, 6)


def test_dataset_objects_pass_through():
    dataset = numbers(5)
    assert open_dataset(dataset) is dataset
    assert open_dataset(two_splits(), split="validation")["value"] == [4]


def a_file(root):
    (root / "file.txt").write_text("x")
    return root / "file.txt"


@pytest.mark.parametrize("make, expected", [
    (lambda root: root, "not a datasets save_to_disk folder"),  # an empty folder
    (lambda root: root / "absent", "does not exist"),
    (a_file, "is a file; pass the folder"),
])
def test_bad_folders_say_what_to_pass(make, expected, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=expected) as error:
        open_dataset(path)
    assert str(path) in str(error.value)


def test_unreachable_hub_id_is_named():
    with pytest.raises(ValueError, match="'someone/no-such-pairs' is neither a benchmark"):
        open_dataset("someone/no-such-pairs")
    with pytest.raises(TypeError, match="got int"):
        open_dataset(3)


# -- load_pairs --------------------------------------------------------------------------------------
def test_benchmark_names_and_aliases_are_canonical():
    assert canonical_benchmark_name("PF_PASCAL") == "pf-pascal"
    assert canonical_benchmark_name(" spair ") == "spair-71k"
    assert canonical_benchmark_name("pfwillow") == "pf-willow"
    with pytest.raises(ValueError, match="unknown benchmark 'caltech'.*'pf-pascal'"):
        canonical_benchmark_name("caltech")
    with pytest.raises(TypeError):
        canonical_benchmark_name(None)


def test_load_pairs_builds_a_benchmark_by_any_spelling(tmp_path):
    root = write_pf_willow(tmp_path)
    pairs = load_pairs("PF_WILLOW", data_dir=root, cache_dir=tmp_path / "cache", require_keypoints=True)
    assert len(pairs) == 5 and set(PAIR_COLUMNS) <= set(pairs.column_names)
    with pytest.raises(ValueError, match="data_dir is required: the folder holding the extracted pf-willow"):
        load_pairs("pf-willow")
    with pytest.raises(ValueError, match="no-such-folder"):
        load_pairs("pfwillow", data_dir=tmp_path / "no-such-folder")


def test_load_pairs_opens_a_pair_folder_and_checks_its_columns(tmp_path):
    tiny_pairs().save_to_disk(str(tmp_path / "pairs"))
    pairs = load_pairs(tmp_path / "pairs", require_keypoints=True)
    assert pairs[0]["source_keypoints"] == [[2.0, 3.0], [10.0, 8.0]]
    unlabelled = tiny_pairs().remove_columns(["target_keypoints", "source_bbox"])
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    assert len(load_pairs(tmp_path / "unlabelled")) == 1  # fine without require_keypoints
    with pytest.raises(ValueError, match=r"lacks the pair-schema column\(s\) \['target_keypoints', 'source_bbox'\]"):
        load_pairs(tmp_path / "unlabelled", require_keypoints=True)

"""SPair-71k (Min et al., 2019) as a ``datasets`` builder.

Layout read (``data_dir`` is the ``SPair-71k`` folder or its parent)::

    Layout/{large,small}/{trn,val,test}.txt     one pair name per line: <id>-<src>-<trg>:<category>
    PairAnnotation/{trn,val,test}/<name>.json   src_kps, trg_kps (N x 2), kps_ids, src_bndbox, trg_bndbox,
                                                category, viewpoint_variation, scale_variation,
                                                truncation, occlusion, src_imname, trg_imname, ...
    JPEGImages/<category>/<image>.jpg
    ImageAnnotation/<category>/<image>.json     per-image keypoints (null = not visible); not read

An SPair-like folder with other classes (SC-ImageNet's export, ``JPEGImages/<wnid>/``) is read the
same way; its categories are then its ``JPEGImages`` folders, sorted (:func:`categories_of`).

Pairs are those listed in ``Layout/<layout>/<split>.txt`` (config ``layout``, ``"large"`` by default:
53,340 / 5,384 / 12,234 pairs, the benchmark everyone reports), as HPF and DHPF read them. A pair
file already holds only the keypoints visible in both images, with their ids in ``kps_ids``, so
``ImageAnnotation`` is not needed. ``pair_id`` is the pair name (a string; the file name is what
identifies a pair in the lists).

Coordinates: SPair-71k keypoints are integer 0-based pixel indices (the centre of pixel k is at
k + 0.5 in the package convention), so ``x = x_json + 0.5`` and ``y = y_json + 0.5``. Boxes get the
same shift on both corners, which keeps the published width ``x2 - x1`` that PCK@bbox uses. The
dataset's documentation does not state the origin and HPF, DHPF and CATs use the raw values, so
this is a half-pixel decision: it moves ground truth by 0.5 px and leaves every PCK length as is.

Download: with ``data_dir=None`` the official ``SPair-71k.tar.gz`` is fetched. No checksum is
published; the layout (every listed pair file parses, every image present) and the published pair
counts are checked.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import numpy as np

from ._common import (
    SPLIT_NAMES,
    BenchmarkConfig,
    check_published_counts,
    download_root,
    image_size,
    layout_error,
    pair_features,
    wanted_splits,
)

CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)
ARCHIVE_URL = "http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz"
PUBLISHED_COUNTS = {"trn": 53340, "val": 5384, "test": 12234}
REQUIRED_KEYS = ("src_kps", "trg_kps", "src_bndbox", "trg_bndbox", "category", "kps_ids",
                 "viewpoint_variation", "scale_variation", "truncation", "occlusion")
DIFFICULTY = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
OFFSET = 0.5  # 0-based pixel index -> package pixels
LAYOUT = """  <data_dir>/Layout/large/{trn,val,test}.txt        pair names <id>-<src>-<trg>:<category>
  <data_dir>/PairAnnotation/{trn,val,test}/<name>.json  with src_kps, trg_kps, src_bndbox, trg_bndbox,
        category, kps_ids, viewpoint_variation, scale_variation, truncation, occlusion
  <data_dir>/JPEGImages/<category>/<image>.jpg
  (<data_dir> may also be the folder that contains SPair-71k/)"""


@dataclasses.dataclass
class SPairConfig(BenchmarkConfig):
    """:class:`BenchmarkConfig` plus ``layout``: ``"large"`` (default) or ``"small"`` pair lists."""

    layout: str = "large"


def find_root(data_dir: Path) -> Path:
    """``data_dir`` itself or its ``SPair-71k`` child, whichever holds ``Layout/``."""
    for root in (data_dir, data_dir / "SPair-71k"):
        if (root / "Layout").is_dir():
            return root
    raise layout_error(data_dir / "Layout", "missing folder of pair lists", LAYOUT)


def categories_of(data_dir) -> tuple[str, ...]:
    """The 18 SPair-71k categories; for an SPair-like folder whose ``JPEGImages`` holds other class
    folders (SC-ImageNet's export: one folder per wnid), those folders, sorted -- the class list the
    SPair loaders of CATs and DHPF build (``sorted(os.listdir(JPEGImages))``)."""
    if data_dir is None:
        return CATEGORIES
    root = next((r for r in (Path(data_dir), Path(data_dir) / "SPair-71k") if (r / "JPEGImages").is_dir()), None)
    if root is None:
        return CATEGORIES
    folders = sorted(entry.name for entry in (root / "JPEGImages").iterdir() if entry.is_dir())
    return CATEGORIES if not folders or set(folders) <= set(CATEGORIES) else tuple(folders)


def read_names(root: Path, layout: str, split: str) -> list[str]:
    """Pair names of one split, in list order."""
    path = root / "Layout" / layout / f"{split}.txt"
    if not path.is_file():
        raise layout_error(path, f"missing pair list of the {split} split", LAYOUT)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_pair(path: Path) -> dict:
    """A pair annotation as a dict; raises naming the file when absent, malformed or incomplete."""
    if not path.is_file():
        raise layout_error(path, "missing pair annotation", LAYOUT)
    try:
        pair = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise layout_error(path, f"malformed JSON ({error})", LAYOUT) from error
    missing = [key for key in REQUIRED_KEYS if not isinstance(pair, dict) or key not in pair]
    if missing:
        raise layout_error(path, f"missing keys {missing}", LAYOUT)
    return pair


def _array(value, shape_tail: tuple, path: Path, key: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64).reshape((-1, *shape_tail))
    except (TypeError, ValueError) as error:
        raise layout_error(path, f"'{key}' is not a numeric array of rows {shape_tail} ({error})", LAYOUT) from error
    return array


def _image_name(pair: dict, name: str, side: str) -> str:
    """``src_imname`` / ``trg_imname``, or the image id in the pair name + ``.jpg``."""
    key = f"{side}_imname"
    if pair.get(key):
        return pair[key]
    src_id, trg_id = name.split(":")[0].split("-")[1:3]
    return (src_id if side == "src" else trg_id) + ".jpg"


def pair_record(root: Path, split: str, name: str, seen_images: set, categories=CATEGORIES) -> dict:
    """Validated row of one pair (everything but the image sizes)."""
    path = root / "PairAnnotation" / split / f"{name}.json"
    pair = read_pair(path)
    category = pair["category"]
    if category not in categories:
        raise layout_error(path, f"unknown category {category!r}", LAYOUT)
    images = {}
    for side in ("src", "trg"):
        image = root / "JPEGImages" / category / _image_name(pair, name, side)
        if image not in seen_images and not image.is_file():
            raise layout_error(image, f"missing image of pair {name}", LAYOUT)
        seen_images.add(image)
        images[side] = image
    source_kps, target_kps = (_array(pair[k], (2,), path, k) for k in ("src_kps", "trg_kps"))
    if source_kps.shape != target_kps.shape or len(pair["kps_ids"]) != len(source_kps):
        raise layout_error(path, "src_kps, trg_kps and kps_ids differ in length", LAYOUT)
    source_box, target_box = (_array(pair[k], (4,), path, k)[0] for k in ("src_bndbox", "trg_bndbox"))
    return {
        "pair_id": name,
        "category": category,
        "source_image": str(images["src"]),
        "target_image": str(images["trg"]),
        "source_keypoints": (source_kps + OFFSET).tolist(),
        "target_keypoints": (target_kps + OFFSET).tolist(),
        "source_bbox": (source_box + OFFSET).tolist(),
        "target_bbox": (target_box + OFFSET).tolist(),
        "kps_ids": [int(k) for k in pair["kps_ids"]],
        **{key: int(pair[key]) for key in DIFFICULTY},
    }


class SPair71k(datasets.GeneratorBasedBuilder):
    """SPair-71k pairs: train / validation / test = published trn / val / test lists.

    Rows follow :func:`semcorr.hub_datasets._common.pair_features` with a string ``pair_id`` plus
    ``viewpoint_variation``, ``scale_variation``, ``truncation``, ``occlusion`` (int32 levels as
    published) and ``kps_ids`` (int32 keypoint ids of the category, one per keypoint row).
    See the module docstring for the layout and the conversion (``x = x_json + 0.5``).
    """

    BUILDER_CONFIG_CLASS = SPairConfig
    BUILDER_CONFIGS = [SPairConfig(name="default", version=datasets.Version("1.0.0"))]
    DEFAULT_WRITER_BATCH_SIZE = 1000
    CARD = "spair_71k.md"

    def _info(self) -> datasets.DatasetInfo:
        extra = {key: datasets.Value("int32") for key in DIFFICULTY}
        extra["kps_ids"] = datasets.List(datasets.Value("int32"))
        features = pair_features(categories_of(self.config.data_dir), extra)
        features["pair_id"] = datasets.Value("string")
        return datasets.DatasetInfo(
            description="SPair-71k semantic correspondence pairs (keypoints in package pixels).",
            features=features,
            homepage="https://cvlab.postech.ac.kr/research/SPair-71k/",
        )

    def _split_generators(self, dl_manager):
        splits = wanted_splits(self.config, ("trn", "val", "test"))
        if self.config.layout not in ("large", "small"):
            raise ValueError(f"layout must be 'large' or 'small', got {self.config.layout!r}")
        if self.config.data_dir is None:
            root = find_root(Path(download_root(dl_manager, {"archive": ARCHIVE_URL}, LAYOUT)["archive"]))
        else:
            root = find_root(Path(self.config.data_dir))
        seen: set = set()
        records = {
            split: [pair_record(root, split, name, seen, self.info.features["category"].names)
                    for name in read_names(root, self.config.layout, split)]
            for split in splits
        }
        if self.config.data_dir is None and self.config.layout == "large":
            check_published_counts({s: len(r) for s, r in records.items()}, PUBLISHED_COUNTS, ARCHIVE_URL)
        return [datasets.SplitGenerator(name=SPLIT_NAMES[s], gen_kwargs={"records": records[s]}) for s in splits]

    def _generate_examples(self, records):
        sizes: dict = {}
        for record in records:
            for side in ("source", "target"):
                path = record[f"{side}_image"]
                if path not in sizes:
                    sizes[path] = image_size(Path(path))
            yield record["pair_id"], {
                **record,
                "source_image_size": sizes[record["source_image"]],
                "target_image_size": sizes[record["target_image"]],
            }

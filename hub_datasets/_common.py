"""What the three benchmark builders share: the pair schema, the config, layout errors, path lookup.

Every builder yields rows of :func:`pair_features`. Keypoints and boxes are float pixels of the
original image in the package convention: origin at the top-left corner, pixel ``i`` covering
``[i, i+1)`` (its centre at ``i + 0.5``). Each builder states how it converts its dataset's own
convention into this one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import datasets
import numpy as np
from PIL import Image as PILImage

#: published split name -> datasets split name
SPLIT_NAMES = {"trn": "train", "val": "validation", "test": "test"}


class BenchmarkLayoutError(ValueError):
    """A benchmark folder is not laid out as expected; the message names the first bad file."""


@dataclasses.dataclass
class BenchmarkConfig(datasets.BuilderConfig):
    """Config of a benchmark builder.

    Attributes:
        data_dir: local root of the extracted archive(s); None downloads the official archive.
        split: prepare only this split (``"train"``, ``"validation"``, ``"test"`` or the published
            ``"trn"``/``"val"``); None prepares all published splits.
    """

    split: Optional[str] = None


def canonical_split(split: str) -> str:
    """``"trn"``/``"train"`` -> ``"train"``, ``"val"``/``"validation"`` -> ``"validation"``, ``"test"``."""
    name = SPLIT_NAMES.get(split, split)
    if name not in SPLIT_NAMES.values():
        raise ValueError(f"unknown split {split!r}; expected one of train/trn, validation/val, test")
    return name


def wanted_splits(config: BenchmarkConfig, published: Sequence[str]) -> list[str]:
    """The published split names (e.g. ``["trn", "val", "test"]``) the config asks for."""
    if config.split is None:
        return list(published)
    name = canonical_split(config.split)
    chosen = [p for p in published if SPLIT_NAMES[p] == name]
    if not chosen:
        available = ", ".join(SPLIT_NAMES[p] for p in published)
        raise ValueError(f"split {config.split!r} is not published for this benchmark (available: {available})")
    return chosen


def pair_features(categories: Sequence[str], extra: Optional[dict] = None) -> datasets.Features:
    """The pair schema every benchmark builder yields.

    ``pair_id`` (int32, or string when ``extra`` overrides it), ``category`` (ClassLabel),
    ``source_image``/``target_image`` (Image), ``source_keypoints``/``target_keypoints`` ((N, 2)
    float32 (x, y), row i of both is one correspondence), ``source_bbox``/``target_bbox`` (x1, y1,
    x2, y2), ``source_image_size``/``target_image_size`` ((height, width) int32), then ``extra``.
    """
    point_list = datasets.List(datasets.List(datasets.Value("float32"), length=2))
    box = datasets.List(datasets.Value("float32"), length=4)
    size = datasets.List(datasets.Value("int32"), length=2)
    features = {
        "pair_id": datasets.Value("int32"),
        "category": datasets.ClassLabel(names=list(categories)),
        "source_image": datasets.Image(),
        "target_image": datasets.Image(),
        "source_keypoints": point_list,
        "target_keypoints": point_list,
        "source_bbox": box,
        "target_bbox": box,
        "source_image_size": size,
        "target_image_size": size,
    }
    features.update(extra or {})
    return datasets.Features(features)


def layout_error(path: os.PathLike | str, problem: str, layout: str) -> BenchmarkLayoutError:
    """An error naming ``path``, what is wrong with it, and the layout that was expected."""
    return BenchmarkLayoutError(f"{path}: {problem}.\nExpected layout:\n{layout}")


def first_existing(candidates: Iterable[Path]) -> Optional[Path]:
    """The first candidate that is a file, or None."""
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def relative_candidates(relative: str, bases: Sequence[Path]) -> list[Path]:
    """Where a path written in a pair list may live: each base joined with ``relative`` and with
    its leading folders stripped one at a time (lists write e.g. ``PF-dataset-PASCAL/JPEGImages/x.jpg``
    while the folder may be called ``PF-PASCAL`` or be the base itself)."""
    parts = Path(relative.replace("\\", "/")).parts
    return [base.joinpath(*parts[i:]) for base in bases for i in range(len(parts))]


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file (reads the header only)."""
    with PILImage.open(path) as image:
        width, height = image.size
    return int(height), int(width)


def keep_visible(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two (N, 2) arrays where both points are finite (NaN marks an unannotated keypoint)."""
    visible = np.isfinite(source).all(axis=1) & np.isfinite(target).all(axis=1)
    return source[visible], target[visible]


def keypoint_box(points: np.ndarray) -> list[float]:
    """``[x1, y1, x2, y2]`` extent of (N, 2) points; zeros when there are none."""
    if len(points) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    low, high = points.min(axis=0), points.max(axis=0)
    return [float(low[0]), float(low[1]), float(high[0]), float(high[1])]


def download_root(dl_manager, urls: dict, layout: str) -> dict:
    """Download and extract ``urls`` (name -> URL) with the datasets download manager.

    Raises a :class:`BenchmarkLayoutError` up front when datasets is offline, so the user learns to
    pass ``data_dir`` instead of waiting for a connection error.
    """
    if datasets.config.HF_DATASETS_OFFLINE:
        raise BenchmarkLayoutError(
            "data_dir is None and datasets is offline (HF_DATASETS_OFFLINE=1): download the archive "
            f"yourself and pass data_dir=<extracted folder>.\nExpected layout:\n{layout}"
        )
    return dl_manager.download_and_extract(urls)


def check_published_counts(counts: dict, published: dict, where: str) -> None:
    """After a download, fail when a split does not hold the published number of pairs."""
    for split, count in counts.items():
        expected = published.get(split)
        if expected is not None and count != expected:
            raise BenchmarkLayoutError(
                f"{where}: the downloaded {split} list has {count} pairs, the published benchmark has {expected}"
            )

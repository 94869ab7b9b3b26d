"""PF-WILLOW (Ham et al., CVPR 2016) as a ``datasets`` builder.

Layout read (``data_dir`` is the folder holding the pair list, or its parent)::

    test_pairs.csv            (or test_pairs_pf.csv, its name on the CNNGeometric site)
        imageA, imageB, XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10   one header line, 900 pairs
    <class>/<name>.png        10 class folders: car(G), car(M), ..., winebottle(woC)

Columns are read by position, as HPF, DHPF and WeakAlign do (columns 2-21 are the source x then y,
22-41 the target x then y). Image paths are written as ``PF-dataset/<class>/<name>.png`` and are
looked up under ``data_dir``, next to the list, and with their leading folders stripped; the
category is the class folder of the source image. ``pair_id`` is the 0-based row of the pair.

Coordinates: the list holds the Proposal Flow MATLAB annotations, 1-based pixel indices, so
``x = x_csv - 0.5`` and ``y = y_csv - 0.5``.

Padding: the list itself has 10 real keypoints per image. The ``-1`` padding known from the
widely copied loaders (DHPF, CATs pad to 40 points with -1 and then take the keypoint extent of the
padded array as the PCK length) happens in those loaders, not in the file. Should a list carry
padding anyway, a keypoint with a negative or NaN coordinate in either image (impossible for a real
1-based position) is dropped from both.

Boxes: PF-WILLOW has none. ``source_bbox``/``target_bbox`` are the extent
``[min x, min y, max x, max y]`` of the pair's (valid) keypoints in each image, the length HPF uses
for PF-WILLOW's "bbox" PCK threshold, without padding.

Download: with ``data_dir=None`` the official ``PF-dataset.zip`` (images) is fetched together with
the CNNGeometric pair list ``test_pairs_pf.csv`` (the archive has none). No checksum is published;
the layout (every listed image present) and the published count (900 pairs) are checked.
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import numpy as np

from ._common import (
    SPLIT_NAMES,
    BenchmarkConfig,
    check_published_counts,
    download_root,
    first_existing,
    image_size,
    keypoint_box,
    keep_visible,
    layout_error,
    pair_features,
    relative_candidates,
    wanted_splits,
)

CATEGORIES = (
    "car(G)", "car(M)", "car(S)", "duck(S)", "motorbike(G)", "motorbike(M)", "motorbike(S)",
    "winebottle(M)", "winebottle(wC)", "winebottle(woC)",
)
ARCHIVE_URL = "https://www.di.ens.fr/willow/research/proposalflow/dataset/PF-dataset.zip"
LIST_URL = "https://www.di.ens.fr/willow/research/cnngeometric/other_resources/test_pairs_pf.csv"
PUBLISHED_COUNTS = {"test": 900}
LIST_NAMES = ("test_pairs.csv", "test_pairs_pf.csv")
LIST_FOLDERS = ("", "PF-WILLOW", "PF-dataset")
N_POINTS = 10
OFFSET = -0.5  # 1-based MATLAB pixel index -> package pixels
LAYOUT = """  <data_dir>/test_pairs.csv   header + rows: imageA,imageB,XA1..XA10,YA1..YA10,XB1..XB10,YB1..YB10
  <data_dir>/<class>/<name>.png  for the 10 classes car(G) ... winebottle(woC)
                                 (lists may write PF-dataset/<class>/<name>.png)"""


def find_list(root: Path) -> Path:
    """The pair list under ``root``; raises naming ``root/test_pairs.csv`` when absent."""
    candidates = [root / folder / name for name in LIST_NAMES for folder in LIST_FOLDERS]
    path = first_existing(candidates)
    if path is None:
        raise layout_error(candidates[0], "missing pair list", LAYOUT)
    return path


def _points(values: list[float]) -> np.ndarray:
    """(10, 2) from 10 x values followed by 10 y values; negative (padding) entries become NaN."""
    points = np.asarray(values, dtype=np.float64).reshape(2, N_POINTS).T
    points[(points < 0).any(axis=1)] = np.nan
    return points


def read_list(list_path: Path, bases: list[Path]) -> list[dict]:
    """Validated rows of the pair list: everything but the image sizes (read when generating)."""
    bases = list(dict.fromkeys([list_path.parent, *bases, list_path.parent.parent]))
    try:
        with open(list_path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise layout_error(list_path, f"unreadable pair list ({error})", LAYOUT) from error
    width = 2 + 4 * N_POINTS
    if not rows or len(rows[0]) < width:
        raise layout_error(list_path, f"expected a header of {width} columns (imageA, imageB, 40 coordinates)", LAYOUT)
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if row:
            records.append(_record(len(records), row, bases, f"{list_path.name} line {number}", list_path))
    return records


def _image(relative: str, bases: list[Path], where: str) -> Path:
    path = first_existing(relative_candidates(relative, bases))
    if path is None:
        parts = Path(relative.replace("\\", "/")).parts
        raise layout_error(bases[0].joinpath(*parts[-2:]), f"missing image (listed as {relative!r} in {where})", LAYOUT)
    return path


def _record(pair_id: int, row: list[str], bases: list[Path], where: str, list_path: Path) -> dict:
    try:
        values = [float(v) for v in row[2: 2 + 4 * N_POINTS]]
    except ValueError as error:
        raise layout_error(list_path, f"{where}: coordinates are not numbers ({error})", LAYOUT) from error
    if len(values) != 4 * N_POINTS:
        raise layout_error(list_path, f"{where}: expected {4 * N_POINTS} coordinates, got {len(values)}", LAYOUT)
    category = Path(row[0].replace("\\", "/")).parent.name
    if category not in CATEGORIES:
        raise layout_error(list_path, f"{where}: class folder {category!r} is not a PF-WILLOW class", LAYOUT)
    source, target = _image(row[0], bases, where), _image(row[1], bases, where)
    source_kps, target_kps = keep_visible(_points(values[: 2 * N_POINTS]), _points(values[2 * N_POINTS:]))
    source_kps, target_kps = source_kps + OFFSET, target_kps + OFFSET
    return {
        "pair_id": pair_id,
        "category": category,
        "source_image": str(source),
        "target_image": str(target),
        "source_keypoints": source_kps.tolist(),
        "target_keypoints": target_kps.tolist(),
        "source_bbox": keypoint_box(source_kps),
        "target_bbox": keypoint_box(target_kps),
    }


class PFWillow(datasets.GeneratorBasedBuilder):
    """PF-WILLOW pairs: a single test split of 900 pairs.

    Rows follow :func:`semcorr.hub_datasets._common.pair_features`; boxes are keypoint extents.
    See the module docstring for the layout and the coordinate conversion (``x = x_csv - 0.5``).
    """

    BUILDER_CONFIG_CLASS = BenchmarkConfig
    BUILDER_CONFIGS = [BenchmarkConfig(name="default", version=datasets.Version("1.0.0"))]
    DEFAULT_WRITER_BATCH_SIZE = 1000
    CARD = "pf_willow.md"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="PF-WILLOW semantic correspondence pairs (keypoints in package pixels).",
            features=pair_features(CATEGORIES),
            homepage="https://www.di.ens.fr/willow/research/proposalflow/",
        )

    def _split_generators(self, dl_manager):
        wanted_splits(self.config, ("test",))
        if self.config.data_dir is None:
            paths = download_root(dl_manager, {"archive": ARCHIVE_URL, "test": LIST_URL}, LAYOUT)
            root = Path(paths["archive"])
            list_path, bases = Path(paths["test"]), [root / "PF-dataset", root]
        else:
            root = Path(self.config.data_dir)
            list_path, bases = find_list(root), [root, root / "PF-WILLOW", root / "PF-dataset"]
        records = read_list(list_path, bases)
        if self.config.data_dir is None:
            check_published_counts({"test": len(records)}, PUBLISHED_COUNTS, ARCHIVE_URL)
        return [datasets.SplitGenerator(name=SPLIT_NAMES["test"], gen_kwargs={"records": records})]

    def _generate_examples(self, records):
        for record in records:
            yield record["pair_id"], {
                **record,
                "source_image_size": image_size(Path(record["source_image"])),
                "target_image_size": image_size(Path(record["target_image"])),
            }

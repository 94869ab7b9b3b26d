"""PF-PASCAL (Ham et al., TPAMI 2018) as a ``datasets`` builder.

Layout read (``data_dir`` is the folder holding the pair lists, or its parent)::

    {trn,val,test}_pairs.csv     source_image,target_image,class[,flip]   (train may be train_pairs.csv)
                                 or, NCNet style: source_image,target_image,class,XA,YA,XB,YB
    JPEGImages/<name>.jpg
    Annotations/<class>/<name>.mat   kps (N, 2) with NaN rows for unannotated keypoints, bbox (1, 4)

Image paths in the lists are written as ``PF-dataset-PASCAL/JPEGImages/<name>.jpg``; they are looked
up under ``data_dir``, next to the list, and with their leading folders stripped, so the NCNet
layout (lists in ``image_pairs/``, images in ``PF-dataset-PASCAL/``) and the HPF layout (everything in
one ``PF-PASCAL/`` folder) both work. ``class`` is 1..20 into the PASCAL VOC class order (HPF, DHPF
and NCNet all subtract 1 and index the same list).

Coordinates: the ``.mat`` keypoints and boxes come from MATLAB tools and are 1-based pixel indices
(the centre of 1-based pixel k is at k). In the package convention that centre is at k - 0.5, so
``x = x_mat - 0.5`` and ``y = y_mat - 0.5``, for keypoints and for both box corners (the box keeps
its published width ``x2 - x1``, which is what every PCK@bbox implementation uses). The NCNet
``XA;YA;XB;YB`` lists were exported from these annotations (their smallest coordinate in the
published test list is 0.91, consistent with 1-based indices) and are shifted the same way.

Keypoints: only keypoints annotated in both images form a pair (HPF and DHPF drop a row when
either image has NaN in it). When the list carries ``XA;YA;XB;YB`` those points are used (the
NCNet protocol); otherwise they come from the two ``.mat`` files. Boxes always come from the
``.mat`` files.

``pair_id`` is the 0-based row of the pair in its list. ``flip`` (from the lists' flip column):
1 means the published training protocol mirrors both images and their keypoints horizontally.
The stored images and keypoints are *not* flipped; mirror them yourself (``x -> width - x`` in the
package convention). 0 when the list has no flip column.

Download: with ``data_dir=None`` the official ``PF-dataset-PASCAL.zip`` (images and annotations)
is fetched together with NCNet's pair lists (the archive has none). No checksum is published for
either; what is checked is the layout (every listed image and annotation present and readable)
and the published pair counts (2,940 train rows, half of them with flip = 1; 308 validation; 299 test).
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
    keep_visible,
    layout_error,
    pair_features,
    relative_candidates,
    wanted_splits,
)

CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
ARCHIVE_URL = "https://www.di.ens.fr/willow/research/proposalflow/dataset/PF-dataset-PASCAL.zip"
_NCNET_LISTS = "https://raw.githubusercontent.com/ignacio-rocco/ncnet/master/datasets/pf-pascal/image_pairs/"
LIST_URLS = {"trn": _NCNET_LISTS + "train_pairs.csv", "val": _NCNET_LISTS + "val_pairs.csv",
             "test": _NCNET_LISTS + "test_pairs.csv"}
PUBLISHED_COUNTS = {"trn": 2940, "val": 308, "test": 299}
LIST_NAMES = {
    "trn": ("trn_pairs.csv", "train_pairs.csv", "trn_pairs_pf_pascal.csv", "train_pairs_pf_pascal.csv"),
    "val": ("val_pairs.csv", "val_pairs_pf_pascal.csv"),
    "test": ("test_pairs.csv", "test_pairs_pf_pascal.csv"),
}
LIST_FOLDERS = ("", "PF-PASCAL", "PF-dataset-PASCAL", "image_pairs")
OFFSET = -0.5  # 1-based MATLAB pixel index -> package pixels
LAYOUT = """  <data_dir>/{trn,val,test}_pairs.csv   header source_image,target_image,class[,flip]
                                         (NCNet test list: source_image,target_image,class,XA,YA,XB,YB)
  <data_dir>/JPEGImages/<name>.jpg       (lists may write PF-dataset-PASCAL/JPEGImages/<name>.jpg)
  <data_dir>/Annotations/<class>/<name>.mat with 'kps' (N x 2, NaN rows = unannotated) and 'bbox' (1 x 4)"""


def find_lists(root: Path, splits) -> dict[str, Path]:
    """Pair list of each published split under ``root``; raises naming the first one missing."""
    found = {}
    for split in splits:
        candidates = [root / folder / name for name in LIST_NAMES[split] for folder in LIST_FOLDERS]
        path = first_existing(candidates)
        if path is None:
            raise layout_error(candidates[0], f"missing pair list of the {split} split", LAYOUT)
        found[split] = path
    return found


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``kps`` (N, 2) float64 and ``bbox`` (4,) float64 of an annotation file, 1-based as stored."""
    try:
        import scipy.io
    except ImportError as error:  # scipy is only needed for this benchmark
        raise ImportError("reading PF-PASCAL annotations needs scipy: pip install scipy") from error
    try:
        content = scipy.io.loadmat(path)
    except Exception as error:
        raise layout_error(path, f"not a readable MATLAB file ({error})", LAYOUT) from error
    for key in ("kps", "bbox"):
        if key not in content:
            raise layout_error(path, f"has no '{key}' variable", LAYOUT)
    kps = np.asarray(content["kps"], dtype=np.float64)
    bbox = np.asarray(content["bbox"], dtype=np.float64).reshape(-1)
    if kps.ndim != 2 or kps.shape[1] != 2 or bbox.size != 4:
        raise layout_error(path, f"'kps' must be N x 2 and 'bbox' 4 values, got {kps.shape} and {bbox.size}", LAYOUT)
    return kps, bbox


def _points(row: list[str], x_col: int, y_col: int, where: str) -> np.ndarray:
    """(N, 2) from two semicolon-separated coordinate lists."""
    try:
        xs = [float(v) for v in row[x_col].split(";") if v.strip()]
        ys = [float(v) for v in row[y_col].split(";") if v.strip()]
    except ValueError as error:
        raise layout_error(where, f"coordinate list is not numbers ({error})", LAYOUT) from error
    if len(xs) != len(ys):
        raise layout_error(where, f"{len(xs)} x but {len(ys)} y coordinates", LAYOUT)
    return np.stack([xs, ys], axis=1) if xs else np.zeros((0, 2))


class _Resolver:
    """Finds images and annotations named in a pair list; caches what it read."""

    def __init__(self, bases: list[Path]):
        self.bases = list(dict.fromkeys(bases))
        self.annotations: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def image(self, relative: str, where: str) -> Path:
        candidates = relative_candidates(relative, self.bases)
        path = first_existing(candidates)
        if path is None:
            expected = self.bases[0] / "JPEGImages" / Path(relative).name
            raise layout_error(expected, f"missing image (listed as {relative!r} in {where})", LAYOUT)
        return path

    def annotation(self, image: Path, category: str) -> tuple[np.ndarray, np.ndarray]:
        name = image.stem + ".mat"
        candidates = [image.parent.parent / "Annotations" / category / name]
        candidates += [base / "Annotations" / category / name for base in self.bases]
        path = first_existing(candidates)
        if path is None:
            raise layout_error(candidates[0], f"missing annotation of {image.name}", LAYOUT)
        if path not in self.annotations:
            self.annotations[path] = read_mat(path)
        return self.annotations[path]


def read_split(list_path: Path, bases: list[Path]) -> list[dict]:
    """Validated rows of one pair list: everything but the image sizes (read when generating)."""
    resolver = _Resolver([list_path.parent, *bases, list_path.parent.parent])
    try:
        with open(list_path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise layout_error(list_path, f"unreadable pair list ({error})", LAYOUT) from error
    if not rows or len(rows[0]) < 3 or not rows[0][0].strip().lower().startswith("source"):
        raise layout_error(list_path, "expected a header 'source_image,target_image,class[,...]'", LAYOUT)
    has_points = len(rows[0]) >= 7
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        where = f"{list_path.name} line {number}"
        if len(row) < len(rows[0]):
            raise layout_error(list_path, f"line {number} has {len(row)} columns, the header {len(rows[0])}", LAYOUT)
        records.append(_record(len(records), row, has_points, resolver, where, list_path))
    return records


def _record(pair_id: int, row: list[str], has_points: bool, resolver: _Resolver, where: str, list_path) -> dict:
    try:
        category = CATEGORIES[int(float(row[2])) - 1]
    except (ValueError, IndexError) as error:
        raise layout_error(list_path, f"{where}: class {row[2]!r} is not an integer 1..20", LAYOUT) from error
    source, target = resolver.image(row[0], where), resolver.image(row[1], where)
    source_kps, source_box = resolver.annotation(source, category)
    target_kps, target_box = resolver.annotation(target, category)
    if has_points:
        source_kps, target_kps = _points(row, 3, 4, where), _points(row, 5, 6, where)
    if source_kps.shape != target_kps.shape:
        counts = f"{len(source_kps)} source but {len(target_kps)} target keypoints"
        raise layout_error(list_path, f"{where}: {counts}", LAYOUT)
    source_kps, target_kps = keep_visible(source_kps, target_kps)
    flip = 0 if has_points or len(row) < 4 or not row[3].strip() else int(float(row[3]))
    return {
        "pair_id": pair_id,
        "category": category,
        "source_image": str(source),
        "target_image": str(target),
        "source_keypoints": (source_kps + OFFSET).tolist(),
        "target_keypoints": (target_kps + OFFSET).tolist(),
        "source_bbox": (source_box + OFFSET).tolist(),
        "target_bbox": (target_box + OFFSET).tolist(),
        "flip": flip,
    }


class PFPascal(datasets.GeneratorBasedBuilder):
    """PF-PASCAL pairs: train / validation / test = published trn / val / test lists.

    Rows follow :func:`semcorr.hub_datasets._common.pair_features` plus ``flip`` (int32); see the
    module docstring for the layout and the coordinate conversion (``x = x_mat - 0.5``).
    """

    BUILDER_CONFIG_CLASS = BenchmarkConfig
    BUILDER_CONFIGS = [BenchmarkConfig(name="default", version=datasets.Version("1.0.0"))]
    DEFAULT_WRITER_BATCH_SIZE = 1000
    CARD = "pf_pascal.md"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="PF-PASCAL semantic correspondence pairs (keypoints in package pixels).",
            features=pair_features(CATEGORIES, {"flip": datasets.Value("int32")}),
            homepage="https://www.di.ens.fr/willow/research/proposalflow/",
        )

    def _split_generators(self, dl_manager):
        splits = wanted_splits(self.config, ("trn", "val", "test"))
        if self.config.data_dir is None:
            paths = download_root(dl_manager, {"archive": ARCHIVE_URL, **{s: LIST_URLS[s] for s in splits}}, LAYOUT)
            root = Path(paths["archive"])
            lists = {s: Path(paths[s]) for s in splits}
            bases = [root / "PF-dataset-PASCAL", root]
        else:
            root = Path(self.config.data_dir)
            lists, bases = find_lists(root, splits), [root, root / "PF-PASCAL", root / "PF-dataset-PASCAL"]
        records = {split: read_split(lists[split], bases) for split in splits}
        if self.config.data_dir is None:
            check_published_counts({s: len(r) for s, r in records.items()}, PUBLISHED_COUNTS, ARCHIVE_URL)
        return [datasets.SplitGenerator(name=SPLIT_NAMES[s], gen_kwargs={"records": records[s]}) for s in splits]

    def _generate_examples(self, records):
        for record in records:
            yield record["pair_id"], {
                **record,
                "source_image_size": image_size(Path(record["source_image"])),
                "target_image_size": image_size(Path(record["target_image"])),
            }

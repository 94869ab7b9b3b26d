"""Tiny copies of PF-PASCAL, PF-WILLOW and SPair-71k in their exact on-disk layouts.

Each writer fills a folder under ``tmp_dir`` and returns it (the folder to pass as ``data_dir``).
Content is deterministic (seeded); images are small generated JPEG/PNG files of varied sizes, so
(height, width) mix-ups show. The layout quirks of the real archives are reproduced:

* PF-PASCAL: lists write ``PF-dataset-PASCAL/JPEGImages/<name>.jpg`` although the images sit in
  ``PF-PASCAL/JPEGImages`` (the HPF packaging); ``.mat`` keypoints are 1-based with NaN rows for
  unannotated keypoints; the test list is NCNet style (``XA;YA;XB;YB``) or plain.
* PF-WILLOW: one ``test_pairs.csv`` with 10 x, 10 y per image, image paths ``PF-dataset/<class>/...``;
  optional ``-1`` padding (the real file has none; some loaders pad after reading it).
* SPair-71k: 0-based integer keypoints, ``null`` for invisible keypoints in ``ImageAnnotation``,
  pair files holding only keypoints visible in both images, ``Layout/{large,small}`` lists.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

PF_PASCAL_CLASSES = {1: "aeroplane", 8: "cat", 12: "dog"}
PF_PASCAL_SIZES = [(32, 48), (36, 40), (30, 44)]  # (height, width), cycled over images
N_PASCAL_KPS = 5


def _write_image(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _pascal_images() -> list[tuple[int, str, tuple[int, int]]]:
    """(class id, image stem, (h, w)) for three images per class."""
    images, index = [], 0
    for class_id in PF_PASCAL_CLASSES:
        for k in range(3):
            images.append((class_id, f"20{class_id:02d}_{k:06d}", PF_PASCAL_SIZES[index % 3]))
            index += 1
    return images


def _pascal_annotation(rng, size: tuple[int, int], nan_rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """1-based keypoints (N, 2) rounded to 1/4 pixel, NaN in ``nan_rows``, and a 1-based box."""
    height, width = size
    kps = np.stack([rng.uniform(1, width, N_PASCAL_KPS), rng.uniform(1, height, N_PASCAL_KPS)], axis=1)
    kps = np.round(kps * 4) / 4
    kps[nan_rows] = np.nan
    bbox = np.array([2.0, 3.0, width - 1.0, height - 2.0])
    return kps, bbox


def write_pf_pascal(tmp_dir, test_style: str = "ncnet") -> Path:
    """PF-PASCAL in the HPF packaging under ``tmp_dir/PF-PASCAL``; returns that folder.

    Splits: trn 4 rows (2 pairs x flip 0/1), val 3 pairs, test 4 pairs. ``test_style`` is
    ``"ncnet"`` (``source_image,target_image,class,XA,YA,XB,YB``) or ``"plain"``
    (``source_image,target_image,class``).
    """
    from scipy.io import savemat

    root = Path(tmp_dir) / "PF-PASCAL"
    rng = np.random.default_rng(0)
    annotations = {}
    for i, (class_id, stem, size) in enumerate(_pascal_images()):
        _write_image(root / "JPEGImages" / f"{stem}.jpg", *size, seed=i)
        kps, bbox = _pascal_annotation(rng, size, nan_rows=[i % N_PASCAL_KPS] if i % 2 == 0 else [])
        path = root / "Annotations" / PF_PASCAL_CLASSES[class_id] / f"{stem}.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        savemat(path, {"kps": kps, "bbox": bbox[None, :], "class": class_id})
        annotations[stem] = kps
    stems = {c: [s for cid, s, _ in _pascal_images() if cid == c] for c in PF_PASCAL_CLASSES}
    trn = [(stems[1][0], stems[1][1], 1, 0), (stems[1][0], stems[1][1], 1, 1),
           (stems[8][0], stems[8][2], 8, 0), (stems[8][0], stems[8][2], 8, 1)]
    val = [(stems[12][0], stems[12][1], 12, 0), (stems[1][1], stems[1][2], 1, 0), (stems[8][1], stems[8][2], 8, 0)]
    test = [(stems[1][0], stems[1][2], 1), (stems[8][0], stems[8][1], 8),
            (stems[12][0], stems[12][2], 12), (stems[12][1], stems[12][2], 12)]
    header = ["source_image", "target_image", "class", "flip"]
    _write_csv(root / "trn_pairs.csv", header, [[_listed(a), _listed(b), c, f] for a, b, c, f in trn])
    _write_csv(root / "val_pairs.csv", header, [[_listed(a), _listed(b), c, f] for a, b, c, f in val])
    if test_style == "ncnet":
        rows = [[_listed(a), _listed(b), c, *_ncnet_points(annotations[a], annotations[b])] for a, b, c in test]
        _write_csv(root / "test_pairs.csv", ["source_image", "target_image", "class", "XA", "YA", "XB", "YB"], rows)
    elif test_style == "plain":
        _write_csv(root / "test_pairs.csv", header[:3], [[_listed(a), _listed(b), c] for a, b, c in test])
    else:
        raise ValueError(f"test_style must be 'ncnet' or 'plain', got {test_style!r}")
    return root


def _listed(stem: str) -> str:
    """An image as the PF-PASCAL lists write it (a folder name that differs from the HPF packaging)."""
    return f"PF-dataset-PASCAL/JPEGImages/{stem}.jpg"


def _ncnet_points(source: np.ndarray, target: np.ndarray) -> list[str]:
    """XA, YA, XB, YB: semicolon-joined 1-based coordinates of the keypoints annotated in both."""
    both = np.isfinite(source).all(axis=1) & np.isfinite(target).all(axis=1)
    return [";".join(repr(float(v)) for v in column) for column in (*source[both].T, *target[both].T)]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


PF_WILLOW_IMAGES = {"car(G)": ["Cars_006a", "Cars_007a", "Cars_008b"], "duck(S)": ["060_0071", "060_0072"]}
PF_WILLOW_SIZES = [(40, 48), (32, 44)]  # (height, width), alternated over images


def write_pf_willow(tmp_dir, padded_pairs: int = 0) -> Path:
    """PF-WILLOW under ``tmp_dir/PF-WILLOW`` (5 test pairs in 2 classes); returns that folder.

    ``padded_pairs``: in that many first pairs, write the last two source keypoints as -1 (a
    padding the real list does not have, used to test that such points are dropped).
    """
    root = Path(tmp_dir) / "PF-WILLOW"
    rng = np.random.default_rng(1)
    sizes, index = {}, 0
    for category, stems in PF_WILLOW_IMAGES.items():
        for stem in stems:
            sizes[(category, stem)] = PF_WILLOW_SIZES[index % 2]
            _write_image(root / category / f"{stem}.png", *sizes[(category, stem)], seed=100 + index)
            index += 1
    pairs = [("car(G)", 0, 1), ("car(G)", 0, 2), ("car(G)", 1, 2), ("duck(S)", 0, 1), ("duck(S)", 1, 0)]
    header = (["imageA", "imageB"] + [f"XA{i}" for i in range(1, 11)] + [f"YA{i}" for i in range(1, 11)]
              + [f"XB{i}" for i in range(1, 11)] + [f"YB{i}" for i in range(1, 11)])
    rows = []
    for number, (category, a, b) in enumerate(pairs):
        stem_a, stem_b = PF_WILLOW_IMAGES[category][a], PF_WILLOW_IMAGES[category][b]
        source = _willow_points(rng, sizes[(category, stem_a)])
        target = _willow_points(rng, sizes[(category, stem_b)])
        if number < padded_pairs:
            source[8:] = -1
        rows.append([f"PF-dataset/{category}/{stem_a}.png", f"PF-dataset/{category}/{stem_b}.png",
                     *source[:, 0], *source[:, 1], *target[:, 0], *target[:, 1]])
    _write_csv(root / "test_pairs.csv", header, rows)
    return root


def _willow_points(rng, size: tuple[int, int]) -> np.ndarray:
    """10 1-based keypoints (10, 2) rounded to 1/4 pixel inside an image of ``size`` (h, w)."""
    height, width = size
    points = np.stack([rng.uniform(1, width, 10), rng.uniform(1, height, 10)], axis=1)
    return np.round(points * 4) / 4


SPAIR_IMAGES = {
    "cat": ["2008_000112", "2008_000345", "2009_001002"],
    "dog": ["2007_000064", "2010_003333", "2011_000017"],
}
SPAIR_SIZES = [(32, 48), (40, 36), (30, 50)]  # (height, width), cycled over images
N_SPAIR_KPS = 6


def write_spair(tmp_dir) -> Path:
    """SPair-71k under ``tmp_dir/SPair-71k``; returns that folder.

    Splits in ``Layout/large``: trn 4, val 3, test 5 pairs; ``Layout/small`` lists the first 2 of
    each. Every image has a keypoint or two set to ``null``.
    """
    root = Path(tmp_dir) / "SPair-71k"
    rng = np.random.default_rng(2)
    annotations, index = {}, 0
    for category, stems in SPAIR_IMAGES.items():
        for stem in stems:
            height, width = SPAIR_SIZES[index % 3]
            _write_image(root / "JPEGImages" / category / f"{stem}.jpg", height, width, seed=200 + index)
            nulls = {index % N_SPAIR_KPS, (index + 2) % N_SPAIR_KPS}
            annotations[stem] = _spair_image_annotation(rng, category, stem, height, width, nulls)
            _write_json(root / "ImageAnnotation" / category / f"{stem}.json", annotations[stem])
            index += 1
    pairs = {
        "trn": [("cat", 0, 1), ("cat", 1, 2), ("dog", 0, 1), ("dog", 2, 0)],
        "val": [("cat", 0, 2), ("dog", 1, 2), ("dog", 0, 2)],
        "test": [("cat", 2, 0), ("cat", 1, 0), ("dog", 1, 0), ("dog", 2, 1), ("cat", 2, 1)],
    }
    for split, split_pairs in pairs.items():
        names = []
        for number, (category, a, b) in enumerate(split_pairs, start=1):
            src, trg = SPAIR_IMAGES[category][a], SPAIR_IMAGES[category][b]
            name = f"{number:06d}-{src}-{trg}:{category}"
            _write_json(root / "PairAnnotation" / split / f"{name}.json",
                        _spair_pair(number, annotations[src], annotations[trg], rng))
            names.append(name)
        _write_lines(root / "Layout" / "large" / f"{split}.txt", names)
        _write_lines(root / "Layout" / "small" / f"{split}.txt", names[:2])
    return root


def _spair_image_annotation(rng, category, stem, height, width, nulls) -> dict:
    kps = {str(k): None if k in nulls else [int(rng.integers(0, width)), int(rng.integers(0, height))]
           for k in range(N_SPAIR_KPS)}
    return {
        "filename": f"{stem}.jpg", "src_database": "PASCAL VOC 2012", "src_annotation": f"{stem}.xml",
        "src_image": f"{stem}.jpg", "image_width": width, "image_height": height, "image_depth": 3,
        "category": category, "pose": "Unspecified", "truncated": 0, "occluded": 0, "difficult": 0,
        "bndbox": [1, 2, width - 3, height - 1], "kps": kps, "azimuth_id": 0,
    }


def _spair_pair(pair_id: int, src: dict, trg: dict, rng) -> dict:
    """A pair file: keypoints visible in both images, in id order, ids as strings."""
    ids = [k for k in src["kps"] if src["kps"][k] is not None and trg["kps"][k] is not None]
    return {
        "pair_id": pair_id, "src_imname": src["filename"], "trg_imname": trg["filename"],
        "src_imsize": [src["image_width"], src["image_height"], 3],
        "trg_imsize": [trg["image_width"], trg["image_height"], 3],
        "src_bndbox": src["bndbox"], "trg_bndbox": trg["bndbox"], "category": src["category"],
        "src_pose": "Unspecified", "trg_pose": "Unspecified",
        "src_kps": [src["kps"][k] for k in ids], "trg_kps": [trg["kps"][k] for k in ids], "kps_ids": ids,
        "mirror": 0, "viewpoint_variation": int(rng.integers(0, 3)), "scale_variation": int(rng.integers(0, 3)),
        "truncation": int(rng.integers(0, 4)), "occlusion": int(rng.integers(0, 4)),
    }


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))

"""Sparse keypoint supervision for the teacher (the strongly supervised PMD).

Labelled pairs -- a benchmark split (``pf-pascal``, ``pf-willow``, ``spair-71k`` with its data
folder) or a ``save_to_disk`` folder in the benchmark pair schema -- become padded batches in
model-input pixels, ready for ``PMDTeacherModel.forward(source_keypoints=..., target_keypoints=...,
keypoint_mask=...)``. Keypoints that are missing in either image (NaN) are masked out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_keypoint_pairs(name: str, data_dir: str | None = None, split: str = "trn", cache_dir: str | None = None):
    """The labelled pairs: ``datasets.Dataset`` with the benchmark pair schema.

    Raises:
        ValueError: the benchmark needs ``data_dir``, or the folder is missing / not in the schema.
    """
    import datasets

    from semcorr.hub_datasets import BENCHMARKS, load_benchmark

    if name in BENCHMARKS:
        if not data_dir or not Path(data_dir).expanduser().is_dir():
            raise ValueError(f"keypoint dataset {name!r} needs its extracted folder (data.keypoint_data_dir); "
                             f"got {data_dir!r}")
        return load_benchmark(name, str(Path(data_dir).expanduser()), split=split, cache_dir=cache_dir)
    path = Path(name).expanduser()
    if not (path / "state.json").is_file():
        raise ValueError(f"keypoint dataset {name!r} is neither a benchmark ({', '.join(BENCHMARKS)}) nor a "
                         "datasets save_to_disk folder")
    dataset = datasets.load_from_disk(str(path))
    missing = {"source_image", "target_image", "source_keypoints", "target_keypoints"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"keypoint dataset {name!r} lacks the column(s) {sorted(missing)}")
    return dataset


def keypoint_rows(num_pairs: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The labelled pairs of global step ``step``: consecutive slices of seeded permutations of all
    pairs (a new permutation each pass), identical on every process and after a resume."""
    from semcorr.training.trainer import _seed

    per_pass = num_pairs // global_batch
    permutation = np.random.default_rng(_seed(seed, step // per_pass, 3)).permutation(num_pairs)
    start = (step % per_pass) * global_batch
    return permutation[start:start + global_batch]


def keypoint_batch(dataset, indices, processor) -> dict[str, torch.Tensor]:
    """Rows ``indices`` preprocessed for the model, keypoints padded to the batch's largest count.

    Returns:
        ``source_pixel_values``, ``target_pixel_values`` ``(B, 3, H, W)``; ``source_keypoints``,
        ``target_keypoints`` ``(B, N, 2)`` in model-input pixels; ``keypoint_mask`` ``(B, N)`` (True
        for a real keypoint visible in both images).
    """
    rows = [dataset[int(i)] for i in indices]
    inputs = processor.preprocess_pairs([r["source_image"].convert("RGB") for r in rows],
                                        [r["target_image"].convert("RGB") for r in rows])
    width = max([len(r["source_keypoints"]) for r in rows] + [1])
    points = {side: torch.zeros(len(rows), width, 2) for side in ("source", "target")}
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, record in enumerate(rows):
        source = np.asarray(record["source_keypoints"], dtype=np.float32).reshape(-1, 2)
        target = np.asarray(record["target_keypoints"], dtype=np.float32).reshape(-1, 2)
        visible = np.isfinite(source).all(1) & np.isfinite(target).all(1)
        count = len(source)
        mask[row, :count] = torch.from_numpy(visible)
        for side, values in (("source", source), ("target", target)):
            size = tuple(inputs[f"{side}_original_sizes"][row].tolist())
            clean = np.where(visible[:, None], values, 0.0).astype(np.float32)
            points[side][row, :count] = processor.keypoints_to_model(clean, size)
    return {
        "source_pixel_values": inputs["source_pixel_values"], "target_pixel_values": inputs["target_pixel_values"],
        "source_keypoints": points["source"], "target_keypoints": points["target"], "keypoint_mask": mask,
    }

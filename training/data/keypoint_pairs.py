"""Labelled keypoint pairs as training batches (the strongly supervised PMD; keypoint fine-tuning).

Labelled pairs -- a benchmark split (``pf-pascal``, ``pf-willow``, ``spair-71k`` with its data
folder) or a ``save_to_disk`` folder in the benchmark pair schema -- become padded batches in
model-input pixels, ready for ``model(source_keypoints=..., target_keypoints=..., keypoint_mask=...)``.
Keypoints missing in either image (NaN) are masked out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def check_keypoint_source(name: str, data_dir: str | None) -> None:
    """Fail before any work when ``name`` is neither a benchmark with its folder nor a saved dataset folder."""
    from semcorr.hub_datasets import BENCHMARKS

    if name in BENCHMARKS:
        if not data_dir or not Path(data_dir).expanduser().is_dir():
            raise ValueError(f"data.keypoint_dataset {name!r} needs data.keypoint_data_dir (--keypoint-data-dir), "
                             f"the extracted benchmark folder; got {data_dir!r}")
    elif not (Path(name).expanduser() / "state.json").is_file():
        raise ValueError(f"data.keypoint_dataset: {name!r} is neither a benchmark ({', '.join(BENCHMARKS)}) nor a "
                         "datasets save_to_disk folder")


def load_keypoint_pairs(name: str, data_dir: str | None = None, split: str = "trn", cache_dir: str | None = None):
    """The labelled pairs: a ``datasets.Dataset`` in the benchmark pair schema (``ValueError`` otherwise)."""
    from semcorr.hub_datasets import load_pairs

    check_keypoint_source(name, data_dir)
    return load_pairs(name, data_dir, split=split, cache_dir=cache_dir, require_keypoints=True)


def keypoint_rows(num_pairs: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The labelled pairs of global step ``step``: consecutive slices of seeded permutations of all
    pairs, so every pair is used once per ``num_pairs // global_batch`` steps, whatever the process count."""
    from semcorr.training.seeding import derive_seed

    per_pass = num_pairs // global_batch
    permutation = np.random.default_rng(derive_seed(seed, step // per_pass, 3)).permutation(num_pairs)
    start = (step % per_pass) * global_batch
    return permutation[start:start + global_batch]


def keypoint_batch(dataset, indices, processor) -> dict[str, torch.Tensor]:
    """Rows ``indices`` preprocessed for the model, keypoints padded to the batch's largest count.

    Returns:
        ``source_pixel_values``, ``target_pixel_values`` ``(B, 3, H, W)``; ``source_keypoints``,
        ``target_keypoints`` ``(B, N, 2)`` in model-input pixels; ``keypoint_mask`` ``(B, N)`` (True
        for a real keypoint visible in both images).
    """
    from semcorr.modeling import pad_keypoints

    rows = [dataset[int(i)] for i in indices]
    inputs = processor.preprocess_pairs([row["source_image"] for row in rows], [row["target_image"] for row in rows])
    source, source_mask = pad_keypoints([row["source_keypoints"] for row in rows])
    target, target_mask = pad_keypoints([row["target_keypoints"] for row in rows])
    for row in range(len(rows)):  # original pixels -> model-input pixels, each image by its own size
        source[row] = processor.keypoints_to_model(source[row], tuple(inputs["source_original_sizes"][row].tolist()))
        target[row] = processor.keypoints_to_model(target[row], tuple(inputs["target_original_sizes"][row].tolist()))
    return {
        "source_pixel_values": inputs["source_pixel_values"], "target_pixel_values": inputs["target_pixel_values"],
        "source_keypoints": source, "target_keypoints": target, "keypoint_mask": source_mask & target_mask,
    }

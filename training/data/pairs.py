"""Unlabelled real pairs for training: which split to read and which columns hold the two images."""

from __future__ import annotations


def pair_split(pairs: str, split: str | None) -> str:
    """``split``, or the default for ``pairs``: ``test`` for PF-WILLOW (its only split), ``trn`` for the
    other benchmarks (unlabelled training pairs), ``train`` for a dataset folder."""
    from semcorr.hub_datasets import BENCHMARKS

    if split:
        return split
    if pairs in BENCHMARKS:
        return "test" if pairs == "pf-willow" else "trn"
    return "train"


def image_columns(dataset) -> tuple[str, str]:
    """``source_image``/``target_image`` when present, else the first two Image columns."""
    import datasets

    names = list(dataset.column_names)
    if "source_image" in names and "target_image" in names:
        return "source_image", "target_image"
    images = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(images) < 2:
        raise ValueError(f"the pairs dataset needs two Image columns (source_image, target_image); it has {names}")
    return images[0], images[1]

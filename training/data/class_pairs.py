"""Images with class labels, paired by class: the data of weakly supervised training and of labelling.

Sources: an ImageNet-layout folder (``<root>/<class>/*.JPEG``, a class per sub-folder) or any
``datasets`` image dataset with a class column (``imagefolder`` gives ``image`` + ``label``).
Pairs are drawn anew every epoch from a seed: the images of each class are shuffled and taken two
by two, so every image is used once per epoch (an odd one out waits for the next epoch); a class
with fewer than two images is skipped and counted, never an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .images import IMAGE_EXTENSIONS, _decode_image
from ..seeding import derive_seed


@dataclass
class ClassImages:
    """Indexable labelled images: ``read(i)`` gives an RGB PIL image, ``labels[i]`` its class index."""

    names: list[str]  # an identifier per image (a path, or ``row <i>``)
    labels: list[int]
    class_names: list[str]
    reader: object = field(repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int):
        return self.reader(index)

    def class_sizes(self) -> list[int]:
        return torch.bincount(torch.tensor(self.labels, dtype=torch.long), minlength=len(self.class_names)).tolist()


def class_images(source, split: str | None = None, image_column: str | None = None,
                 class_column: str | None = None) -> ClassImages:
    """Labelled images from an ImageNet-layout folder or a ``datasets`` dataset (or a folder / Hub id of one).

    Raises:
        ValueError: a missing folder, a folder with no class sub-folders, or a dataset without a
            class column -- naming the columns it has and ``data.class_column``.
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_dir() and _is_class_folder(Path(source)):
        return _folder_images(Path(source).expanduser())
    if isinstance(source, (str, os.PathLike)):
        from semcorr.hub_datasets import open_dataset

        source = open_dataset(source, split)
    return _dataset_images(source, image_column, class_column)


SPLIT_FOLDERS = {"train", "validation", "val", "test"}


def _is_class_folder(root: Path) -> bool:
    """An ImageNet-layout folder: class sub-folders holding images -- not a saved dataset, not a
    Hub-layout dataset (card, Parquet) and not an ``imagefolder`` split into ``train/``, ``test/``, ..."""
    root = root.expanduser()
    if any((root / marker).is_file() for marker in ("state.json", "dataset_dict.json", "README.md", "metadata.jsonl")):
        return False
    folders = {entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")}
    return bool(folders) and not folders <= SPLIT_FOLDERS


def _folder_images(root: Path) -> ClassImages:
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    names, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        names += [str(path) for path in files]
        labels += [label] * len(files)
    if not names:
        raise ValueError(f"{root}: no images in class sub-folders (expected <root>/<class>/*.JPEG, the ImageNet layout)")
    return ClassImages(names, labels, classes, lambda index: _decode_image(names[index]))


def _dataset_images(dataset, image_column: str | None, class_column: str | None) -> ClassImages:
    import datasets

    from .images import _image_column

    column = class_column or next((name for name, feature in dataset.features.items()
                                   if isinstance(feature, datasets.ClassLabel)), None)
    if column is None:
        column = next((name for name in ("label", "labels", "class", "category") if name in dataset.column_names), None)
    if column is None or column not in dataset.column_names:
        raise ValueError(f"the dataset has no class column{f' {class_column!r}' if class_column else ''}; its columns are "
                         f"{dataset.column_names}; name the class column with data.class_column")
    images, image_name = _image_column(dataset, image_column)
    values = dataset[column]
    feature = dataset.features[column]
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(class_names)}
    labels = [int(v) if isinstance(feature, datasets.ClassLabel) else index[str(v)] for v in values]
    return ClassImages([f"row {i}" for i in range(len(labels))], labels, class_names,
                       lambda row: _decode_image(images[row][image_name]))


def class_pairs(labels: list[int], seed: int, epoch: int) -> tuple[list[tuple[int, int]], int]:
    """The pairs of an epoch: ``([(i, j), ...], classes skipped for having fewer than two images)``.

    Each class's images are permuted by a generator seeded by ``(seed, epoch, class)`` and taken two
    by two; the pairs of all classes are then permuted by ``(seed, epoch)``. Every image appears in
    at most one pair; the number of pairs is the same every epoch.
    """
    members: dict[int, list[int]] = {}
    for image, label in enumerate(labels):
        members.setdefault(label, []).append(image)
    pairs, skipped = [], 0
    for label in sorted(members):
        images = members[label]
        if len(images) < 2:
            skipped += 1
            continue
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(derive_seed(seed, epoch, label)))
        chosen = [images[i] for i in order.tolist()]
        pairs += [(chosen[i], chosen[i + 1]) for i in range(0, len(chosen) - 1, 2)]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).tolist()
    return [pairs[i] for i in order], skipped

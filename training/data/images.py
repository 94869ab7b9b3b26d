"""Unlabelled training images from a folder, a list of paths or a ``datasets`` Image column.

Images are decoded with :func:`semcorr.modeling.load_image` (so EXIF orientation, 16-bit, palette
and RGBA images are handled as everywhere else), resized by the image processor's rule and given
as float tensors in ``[0, 1]``; unreadable images are skipped and counted, never fatal here.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# -- unlabelled images from a folder or a datasets column ------------------------------------------
def _decode_image(item):
    """An RGB PIL image from a path, PIL image or ``datasets`` undecoded ``{"bytes", "path"}`` dict."""
    from semcorr.modeling.image_io import load_image  # lazy: semcorr.modeling imports transformers

    if item is None:
        raise ValueError("missing image")
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            with Image.open(io.BytesIO(item["bytes"])) as opened:
                opened.load()
                return load_image(opened)
        if item.get("path"):
            return load_image(item["path"])
        raise ValueError("image entry has neither bytes nor path")
    return load_image(item)


class ImageBatches:
    """Re-iterable batches ``(B, 3, H, W)`` float in ``[0, 1]`` of unlabelled images.

    Built by :func:`iter_image_batches`. Each pass shuffles with ``seed + pass index`` (when
    ``shuffle``), resizes with PIL (bicubic) to ``image_size`` and skips images that cannot be read;
    ``skipped`` counts them in the latest pass and ``skipped_items`` names them (paths or row
    indices).
    """

    def __init__(
        self, items, reader, batch_size: int, image_size, seed: int = 0, shuffle: bool = True, drop_last: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.items = items
        self.reader = reader
        self.batch_size = int(batch_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.skipped = 0
        self.skipped_items: list = []

    def __len__(self) -> int:
        """Number of candidate images (before skipping unreadable ones)."""
        return len(self.items)

    def _to_tensor(self, image) -> torch.Tensor:
        height, width = self.image_size
        resized = image.resize((width, height), Image.BICUBIC)
        return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = list(range(len(self.items)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.items), generator=generator).tolist()
        self.epoch += 1
        self.skipped, self.skipped_items = 0, []
        pending: list[torch.Tensor] = []
        for position in order:
            try:
                image = self.reader(position)
            except (ValueError, OSError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
                self.skipped += 1
                self.skipped_items.append(self.items[position])
                continue
            pending.append(self._to_tensor(image))
            if len(pending) == self.batch_size:
                yield torch.stack(pending)
                pending = []
        if pending and not self.drop_last:
            yield torch.stack(pending)


def iter_image_batches(
    source,
    batch_size: int,
    image_size: int | tuple[int, int],
    seed: int = 0,
    *,
    image_column: str | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    recursive: bool = True,
) -> ImageBatches:
    """Batches of unlabelled images for :class:`SyntheticPairGenerator`.

    Args:
        source: a folder (``str`` / ``Path``; every file with an image extension, recursively),
            a list of image paths, or a ``datasets.Dataset`` with an ``Image`` column.
        batch_size: images per batch (the last may be smaller unless ``drop_last``).
        image_size: ``(H, W)`` (or one int) every image is resized to (PIL bicubic, aspect not kept).
        seed: shuffling seed (pass ``k`` uses ``seed + k``).
        image_column: the dataset column; default: the first column whose feature is ``Image``.

    Returns:
        an :class:`ImageBatches` (iterate it; ``.skipped`` counts unreadable images of the pass).

    Example::

        batches = iter_image_batches("photos/", batch_size=8, image_size=(256, 256))
        pairs = SyntheticPairGenerator(seed=0)
        for images in batches:
            batch = pairs(images)
        print(batches.skipped, "unreadable files")
    """
    options = (batch_size, image_size, seed, shuffle, drop_last)
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise ValueError(f"not a folder: {root}")
        pattern = root.rglob("*") if recursive else root.glob("*")
        paths = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        return ImageBatches([str(p) for p in paths], lambda i: _decode_image(paths[i]), *options)
    if isinstance(source, (list, tuple)):
        items = list(source)
        return ImageBatches(items, lambda i: _decode_image(items[i]), *options)
    import datasets

    if not isinstance(source, datasets.Dataset):
        raise TypeError(
            f"source must be a folder, a list of paths or a datasets.Dataset, got {type(source).__name__}"
        )
    if image_column is None:
        image_columns = [name for name, feature in source.features.items() if isinstance(feature, datasets.Image)]
        image_column = image_columns[0] if image_columns else None
        if image_column is None:
            raise ValueError(f"the dataset has no Image column (features: {list(source.features)})")
    elif image_column not in source.features:
        raise ValueError(f"no column {image_column!r} (features: {list(source.features)})")
    column = source.select_columns([image_column])
    if isinstance(column.features[image_column], datasets.Image):
        column = column.cast_column(image_column, datasets.Image(decode=False))  # decode here, to skip bad rows
    return ImageBatches(list(range(len(column))), lambda i: _decode_image(column[i][image_column]), *options)

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

import torch
from PIL import Image, UnidentifiedImageError

from semcorr.modeling.image_processing_semcorr import image_to_unit_tensor

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
    ``shuffle``), resizes to ``image_size`` (the image processor's rule) and skips images that cannot be read;
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
        return image_to_unit_tensor(image, self.image_size)

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
        image_size: ``(H, W)`` (or one int) every image is resized to (bilinear, aspect not kept).
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
    column, name = _image_column(source, image_column)
    return ImageBatches(list(range(len(column))), lambda i: _decode_image(column[i][name]), *options)


def _image_column(source, image_column: str | None):
    """``(dataset of that one column, not decoded, name)``: the named Image column, else the first one."""
    import datasets

    if not isinstance(source, datasets.Dataset):
        raise TypeError(f"source must be a folder, a list of paths or a datasets.Dataset, got {type(source).__name__}")
    if image_column is None:
        image_column = next((name for name, feature in source.features.items() if isinstance(feature, datasets.Image)),
                            None)
        if image_column is None:
            raise ValueError(f"the dataset has no Image column (features: {list(source.features)})")
    elif image_column not in source.features:
        raise ValueError(f"no column {image_column!r} (features: {list(source.features)})")
    column = source.select_columns([image_column])
    if isinstance(column.features[image_column], datasets.Image):
        column = column.cast_column(image_column, datasets.Image(decode=False))  # decode here, to skip bad rows
    return column, image_column


# -- indexable sources and the unreadable-image rule ------------------------------------------------
SKIMAGE_PREFIX = "skimage"
READ_ERRORS = (ValueError, OSError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


def resolve_image_source(images: str, key: str = "data.images") -> str | list[str]:
    """``"skimage"`` -> scikit-image's data folder; ``"skimage:a.png,b.png"`` -> those paths; else a folder.

    Raises:
        ValueError: a folder or file that does not exist (naming ``key``, the config key it came from).
    """
    if images == SKIMAGE_PREFIX or images.startswith(SKIMAGE_PREFIX + ":"):
        import skimage

        root = Path(skimage.__file__).parent / "data"
        if images == SKIMAGE_PREFIX:
            return str(root)
        names = [name.strip() for name in images.split(":", 1)[1].split(",") if name.strip()]
        if not names:
            raise ValueError(f"{key} '{images}' names no files")
        missing = [name for name in names if not (root / name).is_file()]
        if missing:
            raise ValueError(f"{key}: not in scikit-image's data folder {root}: {', '.join(missing)}")
        return [str(root / name) for name in names]
    path = Path(images).expanduser()
    if not path.is_dir():
        raise ValueError(f"{key}: folder not found: {path.resolve()}")
    return str(path)


class ImageSource:
    """Indexable unlabelled images (a folder, a list of paths or a ``datasets.Dataset``) as ``(3, H, W)``
    float tensors in ``[0, 1]`` at ``image_size`` (the image processor's resizing rule)."""

    def __init__(self, source, image_size, image_column: str | None = None):
        kwargs = {"image_column": image_column} if image_column is not None else {}
        batches = iter_image_batches(source, 1, tuple(image_size), shuffle=False, **kwargs)
        self.items, self._reader = batches.items, batches.reader
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if len(self.items) == 0:
            raise ValueError(f"no images found in {source}")

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> torch.Tensor:
        """The image as a float tensor; raises one of :data:`READ_ERRORS` when it cannot be read."""
        return image_to_unit_tensor(self._reader(index), self.image_size)


class UnreadableImages:
    """Counts the images of an epoch that could not be read; more than ``limit`` of them stops the run."""

    def __init__(self, limit: float = 0.01):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.attempted, self.unreadable, self.names = 0, 0, []

    def read(self, read, name):
        """``read()``, or None (counted, ``name`` remembered) when the image cannot be read."""
        self.attempted += 1
        try:
            return read()
        except READ_ERRORS:
            self.unreadable += 1
            self.names.append(str(name))
            return None

    def summary(self) -> dict:
        note = f", {self.unreadable} of {self.attempted} images unreadable"
        if self.unreadable:
            note += f" ({', '.join(self.names[:5])})"
        return {"images_attempted": self.attempted, "images_unreadable": self.unreadable, "note": note}

    def check(self, epoch: int, error_class=ValueError) -> None:
        """Raise ``error_class`` when more than ``limit`` of the epoch's images were unreadable."""
        fraction = self.unreadable / max(1, self.attempted)
        if fraction > self.limit:
            raise error_class(
                f"{self.unreadable} of {self.attempted} images ({fraction:.1%}) in epoch {epoch + 1} could not be read "
                f"(more than {self.limit:.0%}), e.g. {', '.join(self.names[:5])}; fix or remove them")

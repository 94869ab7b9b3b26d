"""One loader for "a benchmark name or a dataset": the pairs every semcorr command reads.

``load_pairs("pf-pascal", data_dir=..., split="test")`` builds a benchmark split;
``load_pairs("my-pairs/")`` opens any dataset :func:`open_dataset` takes: a folder written by
``save_to_disk`` (one ``Dataset`` or a ``DatasetDict``), a folder ``datasets.load_dataset`` reads
(the Parquet layout :func:`~semcorr.hub_datasets.to_hub_layout` writes, an ``imagefolder``, ...)
or a Hub dataset id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import datasets

from ._common import SPLIT_NAMES
from .benchmarks import BENCHMARKS, benchmark_key, load_benchmark

#: Columns of the benchmark pair schema (:func:`semcorr.hub_datasets._common.pair_features`) that
#: keypoint evaluation and supervision read.
PAIR_COLUMNS = (
    "source_image", "target_image", "source_keypoints", "target_keypoints",
    "source_bbox", "target_bbox", "source_image_size", "target_image_size",
)
_SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what Dataset / DatasetDict.save_to_disk leave
_SOURCES_HELP = ("pass a save_to_disk folder, a folder of Parquet / image files, or a Hub dataset id "
                 "such as 'org/name'")


def open_dataset(source, split: Optional[str] = None, cache_dir=None) -> datasets.Dataset:
    """One split of a dataset named by a folder, a Hub id, or given as a (dict of) ``datasets.Dataset``.

    Args:
        source: a ``save_to_disk`` folder, a folder ``datasets.load_dataset`` reads, a Hub dataset
            id, or a ``datasets.Dataset`` / ``DatasetDict``.
        split: the split to take from a source with several (``trn``/``val`` also find
            ``train``/``validation`` and back). None takes the only split, and fails on several. A
            source holding one ``Dataset`` has no split names to choose from and is returned as is.
        cache_dir: where ``datasets`` prepares a folder or Hub dataset (default: the HF cache).

    Raises:
        ValueError: the folder is missing or unreadable, or ``split`` is not among its splits; the
            message names the path, the splits available and what to pass.
        TypeError: ``source`` is neither a path, a string nor a dataset.
    """
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _one_split(source, split, "the DatasetDict")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"dataset source must be a folder, a Hub id or a datasets.Dataset, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _open_folder(path, split, cache_dir)
    if path.exists():
        raise ValueError(f"dataset source {str(path)!r} is a file; pass the folder holding the dataset")
    if _looks_like_path(str(source)):
        raise ValueError(f"dataset folder {str(path)!r} does not exist; {_SOURCES_HELP}")
    return _open_hub_id(str(source), split, cache_dir)


def load_pairs(source, data_dir=None, split: Optional[str] = "test", cache_dir=None,
               require_keypoints: bool = False) -> datasets.Dataset:
    """Image pairs: a benchmark split (:func:`~semcorr.hub_datasets.load_benchmark`) or any :func:`open_dataset` source.

    Args:
        source: a benchmark name (a key of :data:`~semcorr.hub_datasets.BENCHMARKS` or an alias such
            as ``"spair"``; a folder spelled like one needs a ``./`` prefix) or a dataset source.
        data_dir: the extracted benchmark folder; required for a benchmark, unused otherwise.
        split: the split (None means ``"test"`` for a benchmark); see :func:`open_dataset`.
        cache_dir: where ``datasets`` prepares the rows.
        require_keypoints: check that the rows carry every column of :data:`PAIR_COLUMNS`.

    Returns:
        ``datasets.Dataset`` of pairs (``source_image`` and ``target_image`` at least).

    Raises:
        ValueError: a benchmark without an existing ``data_dir``, a bad dataset source or split, or
            (with ``require_keypoints``) missing pair-schema columns, each named.
    """
    benchmark = benchmark_key(source)
    if benchmark is not None:
        dataset = _load_benchmark_split(benchmark, data_dir, split or "test", cache_dir)
    else:
        dataset = open_dataset(source, split, cache_dir)
    if require_keypoints:
        check_pair_columns(dataset, source)
    return dataset


def check_pair_columns(dataset: datasets.Dataset, source="dataset") -> None:
    """Raise ``ValueError`` naming the :data:`PAIR_COLUMNS` that ``dataset`` (read from ``source``) lacks."""
    missing = [column for column in PAIR_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{_describe(source)} lacks the pair-schema column(s) {missing} (it has {dataset.column_names}); "
            "keypoint pairs need the columns of semcorr.hub_datasets._common.pair_features"
        )


def choose_split(available: list[str], split: Optional[str], where: str) -> str:
    """The name in ``available`` that ``split`` asks for (published ``trn``/``val`` spellings forgiven)."""
    available = [str(name) for name in available]
    if split is None:
        if len(available) == 1:
            return available[0]
        raise ValueError(f"{where} holds the splits {available}; pass one of them as split (--split)")
    published = {value: key for key, value in SPLIT_NAMES.items()}
    for name in (split, SPLIT_NAMES.get(split), published.get(split)):
        if name in available:
            return name
    raise ValueError(f"{where} has no split {split!r}; splits available: {available}; "
                     "pass one of them as split (--split)")


def _one_split(loaded, split: Optional[str], where: str) -> datasets.Dataset:
    """``loaded`` itself when it is one ``Dataset``, else its split ``split``."""
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[choose_split(list(loaded), split, where)]
    return loaded


def _load_benchmark_split(name: str, data_dir, split: str, cache_dir) -> datasets.Dataset:
    if data_dir is None:
        raise ValueError(f"data_dir is required: the folder holding the extracted {name} archive")
    if not Path(data_dir).expanduser().is_dir():
        raise ValueError(f"benchmark data directory {str(data_dir)!r} does not exist or is not a folder")
    return load_benchmark(name, Path(data_dir).expanduser(), split=split, cache_dir=cache_dir)


def _open_folder(path: Path, split: Optional[str], cache_dir) -> datasets.Dataset:
    """A ``save_to_disk`` folder, else a folder ``load_dataset`` reads."""
    if any((path / marker).is_file() for marker in _SAVED_MARKERS):
        _check_saved_json(path)
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{str(path)!r} looks like a datasets save_to_disk folder but could not be read "
                             f"({type(error).__name__}: {_first_line(error)}); save the dataset there again "
                             "with save_to_disk") from None
        return _one_split(loaded, split, repr(str(path)))
    try:
        builder = datasets.load_dataset_builder(str(path), cache_dir=None if cache_dir is None else str(cache_dir))
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(
            f"{str(path)!r} is not a datasets save_to_disk folder (no {' or '.join(_SAVED_MARKERS)}) nor a "
            f"folder datasets.load_dataset reads ({_first_line(error)}); {_SOURCES_HELP}"
        ) from None
    return _prepare(builder, split, repr(str(path)))


_SAVED_JSON = ("dataset_dict.json", "state.json", "dataset_info.json")


def _check_saved_json(path: Path) -> None:
    """Each JSON file ``save_to_disk`` left in ``path`` (and in its split folders) parses; ValueError naming the file."""
    import json

    candidates = [path / name for name in _SAVED_JSON]
    candidates += [folder / name for folder in sorted(path.iterdir()) if folder.is_dir()
                   for name in _SAVED_JSON[1:]]
    for file in candidates:
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{str(file)!r} is not valid JSON ({_first_line(error)}): the save_to_disk folder "
                             f"{str(path)!r} is damaged; save the dataset there again with save_to_disk") from None
        if not isinstance(value, dict):
            raise ValueError(f"{str(file)!r} holds a JSON {type(value).__name__}, not the object datasets writes: the "
                             f"save_to_disk folder {str(path)!r} is damaged; save the dataset there again")


def _open_hub_id(repo_id: str, split: Optional[str], cache_dir) -> datasets.Dataset:
    try:
        builder = datasets.load_dataset_builder(repo_id, cache_dir=None if cache_dir is None else str(cache_dir))
    except (OSError, ValueError) as error:  # ConnectionError offline, DatasetNotFoundError, ...
        raise ValueError(
            f"{repo_id!r} is neither a benchmark ({', '.join(BENCHMARKS)}), an existing folder nor a Hub dataset "
            f"datasets can load ({_first_line(error)}); {_SOURCES_HELP}"
        ) from None
    return _prepare(builder, split, f"Hub dataset {repo_id!r}")


def _prepare(builder: datasets.DatasetBuilder, split: Optional[str], where: str) -> datasets.Dataset:
    """Choose the split before preparing, so a wrong ``split`` fails without converting anything."""
    available = list(builder.config.data_files or builder.info.splits or [])
    chosen = choose_split(available, split, where)
    builder.download_and_prepare()
    return builder.as_dataset(split=chosen)


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` can only be a file-system path (a Hub id is ``name`` or ``org/name``)."""
    return Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"dataset {str(source)!r}"
    return f"the {type(source).__name__}"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

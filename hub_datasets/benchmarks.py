"""The benchmark registry: build a benchmark split by name, and write a prepared benchmark as a Hub repo.

``load_benchmark("pf-pascal" | "pf-willow" | "spair-71k", data_dir, split)`` returns a
``datasets.Dataset`` of pairs in the package pixel convention (see each builder's module).
``to_hub_layout`` writes the Parquet layout a Hub dataset repo has, so ``load_dataset(out_dir)``
(or the pushed repo) gives the same rows back with images embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import datasets
import pyarrow.parquet as pq
from datasets.arrow_writer import ParquetWriter
from datasets.table import embed_table_storage
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard

from semcorr.utils import atomic_directory

from ._common import canonical_split
from .pf_pascal import PFPascal
from .pf_willow import PFWillow
from .spair import SPair71k

#: The one list of benchmark names: canonical name -> builder class.
BENCHMARKS = {"pf-pascal": PFPascal, "pf-willow": PFWillow, "spair-71k": SPair71k}
#: Spellings people use for the benchmarks (after lower-casing and ``_`` -> ``-``).
BENCHMARK_ALIASES = {"pfpascal": "pf-pascal", "pfwillow": "pf-willow", "spair": "spair-71k", "spair71k": "spair-71k"}
CARDS_DIR = Path(__file__).parent / "cards"
_CARD_BY_BUILDER_NAME = {cls.__module__.rsplit(".", 1)[-1]: cls.CARD for cls in BENCHMARKS.values()}
_DEFAULT_CARD = "---\ntags:\n- semantic-correspondence\n---\n\n# Semantic correspondence pairs\n"
_WRITE_BATCH = 100  # rows per Parquet write: bounds memory when images are embedded


def benchmark_key(name) -> Optional[str]:
    """The canonical name of benchmark ``name`` (case, ``_`` and aliases forgiven), or None if it names none."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower().replace("_", "-")
    key = BENCHMARK_ALIASES.get(key, key)
    return key if key in BENCHMARKS else None


def canonical_benchmark_name(name: str) -> str:
    """``"PF_PASCAL"``, ``"pfpascal"`` -> ``"pf-pascal"``; ``"spair"`` -> ``"spair-71k"``; a key of :data:`BENCHMARKS`.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is no benchmark; the message lists the valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"benchmark name must be a string such as 'pf-pascal', got {type(name).__name__}")
    key = benchmark_key(name)
    if key is None:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return key


def benchmark_builder(name: str, data_dir=None, split: Optional[str] = None, cache_dir=None, **config):
    """A builder for ``name`` reading ``data_dir`` (None downloads), limited to ``split`` if given."""
    return BENCHMARKS[canonical_benchmark_name(name)](
        cache_dir=None if cache_dir is None else str(cache_dir),
        data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
        split=None if split is None else canonical_split(split),
        **config,
    )


def load_benchmark(name: str, data_dir, split: str = "test", cache_dir=None) -> datasets.Dataset:
    """One split of a benchmark as a ``datasets.Dataset``.

    Args:
        name: ``"pf-pascal"``, ``"pf-willow"`` or ``"spair-71k"``.
        data_dir: extracted archive root (layouts in the builders' docstrings); None downloads it.
        split: ``"test"``, ``"train"``/``"trn"`` or ``"validation"``/``"val"``.
        cache_dir: where datasets caches the prepared Arrow files (default: the HF cache). The
            cache is keyed by the path of ``data_dir``, not its content: after editing the files
            in place, use a fresh ``cache_dir``.

    Returns:
        Rows with ``pair_id``, ``category`` (ClassLabel), ``source_image``/``target_image`` (PIL),
        ``source_keypoints``/``target_keypoints`` ((N, 2) float (x, y) package pixels),
        ``source_bbox``/``target_bbox`` (x1, y1, x2, y2), ``source_image_size``/``target_image_size``
        ((h, w)), plus benchmark-specific columns.

    Raises:
        BenchmarkLayoutError (a ValueError): ``data_dir`` is not laid out as the benchmark expects;
            the message names the first missing or malformed file.
    """
    builder = benchmark_builder(name, data_dir, split=split, cache_dir=cache_dir)
    builder.download_and_prepare()
    return builder.as_dataset(split=canonical_split(split))


def to_hub_layout(
    dataset_dict_or_builder: Union[datasets.DatasetDict, datasets.Dataset, datasets.DatasetBuilder],
    out_dir,
    card: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``data/{split}-00000-of-00001.parquet`` (images embedded) and ``README.md`` into ``out_dir``.

    The README is the dataset card (``card`` text, else the builder's card from
    ``hub_datasets/cards``) with ``configs`` and ``dataset_info`` added to its YAML front matter, so
    ``datasets.load_dataset(out_dir)`` restores the splits and features offline. Everything is
    written into a temporary sibling folder first and renamed into place. An existing non-empty
    ``out_dir`` is replaced only with ``overwrite=True``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    dataset_dict, card_text = _as_dataset_dict(dataset_dict_or_builder, card)
    with atomic_directory(out_dir) as staging:
        sizes = {split: _write_parquet(ds, staging / "data" / f"{split}-00000-of-00001.parquet")
                 for split, ds in dataset_dict.items()}
        (staging / "README.md").write_text(_readme(card_text, dataset_dict, sizes))
    return out_dir


def _as_dataset_dict(source, card: Optional[str]) -> tuple[datasets.DatasetDict, str]:
    """The splits to write and the card text to put in front of them."""
    if isinstance(source, datasets.DatasetBuilder):
        source.download_and_prepare()
        card_name = getattr(source, "CARD", None)
        source = source.as_dataset()
    elif isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({str(source.split or "train"): source})
        card_name = None
    else:
        card_name = None
    first = next(iter(source.values()))
    card_name = card_name or _CARD_BY_BUILDER_NAME.get(first.info.builder_name or "")
    if card is None:
        card = (CARDS_DIR / card_name).read_text() if card_name else _DEFAULT_CARD
    return source, card


def _write_parquet(dataset: datasets.Dataset, path: Path) -> int:
    """Stream ``dataset`` into one Parquet file with image bytes embedded; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ParquetWriter(path=str(path), features=dataset.features)
    try:
        for batch in dataset.with_format("arrow").iter(batch_size=_WRITE_BATCH):
            writer.write_table(embed_table_storage(batch))
    finally:
        writer.finalize()
    pq.read_metadata(path)  # fail here, not at load time, if the file is unreadable
    return path.stat().st_size


def _readme(card_text: str, dataset_dict: datasets.DatasetDict, sizes: dict) -> str:
    """The card with ``configs`` (data files per split) and ``dataset_info`` in its front matter."""
    card = DatasetCard(card_text)
    features = next(iter(dataset_dict.values())).features
    splits = datasets.SplitDict()
    for split, ds in dataset_dict.items():
        splits.add(datasets.SplitInfo(name=split, num_bytes=sizes[split], num_examples=len(ds)))
    info = datasets.DatasetInfo(features=features, splits=splits)
    datasets.info.DatasetInfosDict({"default": info}).to_dataset_card_data(card.data)
    data_files = [{"split": split, "path": f"data/{split}-*"} for split in dataset_dict]
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(card.data)
    return str(card)


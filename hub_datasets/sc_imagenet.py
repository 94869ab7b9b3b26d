"""SC-ImageNet: pseudo-labelled ImageNet pairs for semantic correspondence, as a Hub dataset without the images.

Huang et al., *Weakly Supervised Learning of Semantic Correspondence through Cascaded Online
Correspondence Refinement*, ICCV 2023, built SC-ImageNet from the ImageNet-1k train set: unsuitable
classes removed, single-instance images kept, same-class pairs labelled with 32 pseudo keypoint
pairs by their cascaded MIL generator, the most close-loop-consistent 30 % of the images kept. The
authors released their labels by e-mail only, under a non-commercial agreement, and no code.
:mod:`semcorr.training.label_sc_imagenet` rebuilds the dataset from ImageNet with any trained
generator; this module holds the dataset it writes.

**The Hub layout** (what :func:`write_layout` writes and :func:`push_to_hub` uploads)::

    README.md                                  dataset card: statistics, provenance, licence, citation,
                                               and the ``configs`` / ``dataset_info`` front matter
    data/train-00000-of-0000N.parquet          annotation rows (below), ``rows_per_file`` per file
    data/validation-00000-of-00001.parquet

ImageNet's terms of access forbid redistributing its images, so a row names its images by their
path relative to the ImageNet train folder (``n01440764/n01440764_10026.JPEG``) and never holds
them; ``embed_images=True`` embeds them for private use (:func:`push_to_hub` then refuses unless told).

**Rows** (:func:`sc_imagenet_features`): ``pair_id`` (``"<index>-<source stem>-<target stem>"``),
``category`` (ClassLabel of wnids), ``category_name`` (ImageNet's lemmas), ``source_image_path`` /
``target_image_path``, ``source_keypoints`` / ``target_keypoints`` ((N, 2) float32, N <= 32, package
pixels: origin at the top-left corner, pixel ``i`` covering ``[i, i+1)``), ``keypoint_scores`` (the
generator's score of each pair), ``keypoint_consistency`` and ``consistency_score`` (``1 -`` the
close-loop offset over the source image diagonal, per point and averaged over the pair: higher is
more consistent), ``source_bbox`` / ``target_bbox`` (the detector's box, else the whole image),
``source_image_size`` / ``target_image_size`` ((height, width)), and the SPair-71k difficulty fields
``viewpoint_variation``, ``scale_variation``, ``truncation``, ``occlusion`` (0: not annotated).

**Reading**: ``datasets.load_dataset(<folder or Hub id>)`` gives the annotation columns;
:func:`load_sc_imagenet` (``path_or_id, imagenet_root, split``) adds ``source_image`` and
``target_image`` (``datasets.Image``) read from your ImageNet copy (datasets 5 runs no loading scripts,
so this is a function, not a builder).

**The SPair-71k-like layout** the authors' fine-tuning code (forks of CATs and DHPF) reads --
:func:`export_spair_layout` writes it from a dataset, :func:`import_spair_layout` reads one (the
authors' archive) into the Hub layout::

    Layout/large/{trn,val}.txt                  <index>-<source stem>-<target stem>:<wnid>, one pair a line
    PairAnnotation/{trn,val}/<name>.json        src_kps, trg_kps (0-based pixel indices), src_bndbox, trg_bndbox,
                                                category (wnid), viewpoint_variation, scale_variation,
                                                truncation, occlusion (+ kps_ids, src/trg_imname, src/trg_imsize)
    JPEGImages/<wnid>/<file>.JPEG               ImageNet's images (linked, copied, or left for you to add)

As in :mod:`semcorr.hub_datasets.spair`, a keypoint ``x`` of the package is ``x - 0.5`` there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets

from semcorr.utils import atomic_directory

CARD_FILE = Path(__file__).parent / "cards" / "sc_imagenet.md"
DIFFICULTY = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
OFFSET = 0.5  # SPair-like 0-based pixel indices <-> package pixels
SPLIT_FILES = {"train": "trn", "validation": "val", "test": "test"}
ROWS_PER_FILE = 100_000
_BATCH = 256
#: Card metadata key recording where the labels came from ("semcorr" or "huang2023-release").
ORIGIN_KEY = "sc_imagenet_origin"
CITATION = """@inproceedings{huang2023weakly,
  title     = {Weakly Supervised Learning of Semantic Correspondence through Cascaded Online Correspondence Refinement},
  author    = {Huang, Yiwen and Sun, Yixuan and Lai, Chenghang and Xu, Qing and Wang, Xiaomei and Shen, Xuli and Ge, Weifeng},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  pages     = {16254--16263},
  year      = {2023}
}
@article{russakovsky2015imagenet,
  title   = {{ImageNet} Large Scale Visual Recognition Challenge},
  author  = {Russakovsky, Olga and Deng, Jia and Su, Hao and Krause, Jonathan and Satheesh, Sanjeev and Ma, Sean and
             Huang, Zhiheng and Karpathy, Andrej and Khosla, Aditya and Bernstein, Michael and Berg, Alexander C. and
             Fei-Fei, Li},
  journal = {International Journal of Computer Vision},
  volume  = {115},
  number  = {3},
  pages   = {211--252},
  year    = {2015}
}"""


# -- schema ----------------------------------------------------------------------------------------------
def sc_imagenet_features(categories, embed_images: bool = False) -> datasets.Features:
    """The row schema (see the module docstring); ``embed_images`` adds the two Image columns."""
    point_list = datasets.List(datasets.List(datasets.Value("float32"), length=2))
    floats = datasets.List(datasets.Value("float32"))
    box = datasets.List(datasets.Value("float32"), length=4)
    size = datasets.List(datasets.Value("int32"), length=2)
    features = {"pair_id": datasets.Value("string"), "category": datasets.ClassLabel(names=sorted(categories)),
                "category_name": datasets.Value("string"),
                "source_image_path": datasets.Value("string"), "target_image_path": datasets.Value("string")}
    if embed_images:
        features.update(source_image=datasets.Image(), target_image=datasets.Image())
    features.update({
        "source_keypoints": point_list, "target_keypoints": point_list,
        "keypoint_scores": floats, "keypoint_consistency": floats, "consistency_score": datasets.Value("float32"),
        "source_bbox": box, "target_bbox": box, "source_image_size": size, "target_image_size": size,
        **{key: datasets.Value("int32") for key in DIFFICULTY},
    })
    return datasets.Features(features)


def pair_name(index: int, source_path: str, target_path: str) -> str:
    """``"<index:06d>-<source stem>-<target stem>"``, the pair id (and, with ``:<wnid>``, the SPair-like name)."""
    return f"{index:06d}-{Path(source_path).stem}-{Path(target_path).stem}"


# -- the Hub layout ----------------------------------------------------------------------------------------
def write_layout(out_dir, splits: dict[str, Callable[[], Iterable[dict]]], counts: dict[str, int], categories,
                 card_text: str, *, embed_images: bool = False, imagenet_root=None,
                 rows_per_file: int = ROWS_PER_FILE) -> Path:
    """Write the Hub layout: Parquet shards per split, streamed, and the card with its front matter.

    Args:
        out_dir: the folder (replaced atomically when it exists).
        splits: split name -> a function returning that split's rows (dicts of :func:`sc_imagenet_features`
            columns, ``category`` as the wnid; without images); called once, rows are consumed as they come.
        counts: rows per split (the file names say how many files a split has, so it is known up front).
        categories: every wnid ``category`` may take.
        card_text: the card (markdown with optional front matter); ``configs`` and ``dataset_info`` are added.
        embed_images: put the images' bytes in the Parquet files (read from ``imagenet_root``).
        rows_per_file: rows per Parquet file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.table import embed_table_storage

    if embed_images and imagenet_root is None:
        raise ValueError("embed_images needs imagenet_root, the folder the image paths are relative to")
    features = sc_imagenet_features(categories, embed_images)
    splits = {name: rows for name, rows in splits.items() if counts.get(name, 0) > 0}
    if not splits:
        raise ValueError("no rows to write: every split is empty")
    out_dir = Path(out_dir).expanduser()
    sizes = {}
    with atomic_directory(out_dir) as staging:
        for split, rows in splits.items():
            files = max(1, -(-counts[split] // rows_per_file))
            paths = [staging / "data" / f"{split}-{k:05d}-of-{files:05d}.parquet" for k in range(files)]
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            written, current, writer, batch = 0, -1, None, []

            def flush():
                nonlocal current, writer, batch
                if not batch:
                    return
                index = (written - len(batch)) // rows_per_file  # a batch never crosses a file boundary
                if index != current:
                    if writer is not None:
                        writer.close()
                    writer, current = pq.ParquetWriter(str(paths[index]), features.arrow_schema), index
                encoded = features.encode_batch({key: [row[key] for row in batch] for key in features})
                table = pa.Table.from_pydict(encoded, schema=features.arrow_schema)
                writer.write_table(embed_table_storage(table) if embed_images else table)
                batch = []

            for row in rows():
                if embed_images:
                    row = {**row, "source_image": str(Path(imagenet_root) / row["source_image_path"]),
                           "target_image": str(Path(imagenet_root) / row["target_image_path"])}
                batch.append(row)
                written += 1
                if len(batch) == _BATCH or written % rows_per_file == 0:
                    flush()
            flush()
            if writer is not None:
                writer.close()
            if written != counts[split]:
                raise RuntimeError(f"split {split}: {written} rows written, {counts[split]} announced")
            sizes[split] = sum(path.stat().st_size for path in paths)
            for path in paths:
                pq.read_metadata(path)  # fail here, not at load time
        (staging / "README.md").write_text(_card_with_metadata(card_text, features, counts, sizes))
    return out_dir


def _card_with_metadata(card_text: str, features: datasets.Features, counts: dict, sizes: dict) -> str:
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    card = DatasetCard(card_text)
    split_info = datasets.SplitDict()
    for split in sizes:
        split_info.add(datasets.SplitInfo(name=split, num_bytes=sizes[split], num_examples=counts[split]))
    info = datasets.DatasetInfo(features=features, splits=split_info)
    datasets.info.DatasetInfosDict({"default": info}).to_dataset_card_data(card.data)
    MetadataConfigs({"default": {"data_files": [{"split": s, "path": f"data/{s}-*"} for s in sizes]}}
                    ).to_dataset_card_data(card.data)
    return str(card)


def sc_imagenet_card(statistics: dict, provenance: list[str], origin: str = "semcorr") -> str:
    """The dataset card: the shipped template with the statistics table and the provenance lines filled in."""
    rows = "\n".join(f"| {key} | {value:,} |" if isinstance(value, int) and not isinstance(value, bool)
                     else f"| {key} | {value} |" for key, value in statistics.items())
    text = CARD_FILE.read_text(encoding="utf-8")
    text = text.replace("<!-- statistics -->", "| quantity | value |\n|---|---|\n" + rows)
    text = text.replace("<!-- provenance -->", "\n".join(f"- {line}" for line in provenance))
    text = text.replace("<!-- citation -->", CITATION)
    return text.replace(f"{ORIGIN_KEY}: semcorr", f"{ORIGIN_KEY}: {origin}")


def layout_origin(folder) -> str | None:
    """``"semcorr"`` or ``"huang2023-release"`` from a layout's card, None when it says neither."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import DatasetCard

    return DatasetCard.load(readme).data.to_dict().get(ORIGIN_KEY)


# -- reading ----------------------------------------------------------------------------------------------
def load_sc_imagenet(path_or_id, imagenet_root=None, split: str = "train", cache_dir=None) -> datasets.Dataset:
    """One split of SC-ImageNet with its images read from your ImageNet copy.

    Args:
        path_or_id: a folder in the Hub layout (what ``label_sc_imagenet`` or :func:`import_spair_layout`
            write) or a Hub dataset id.
        imagenet_root: the ImageNet train folder the image paths are relative to (``<root>/<wnid>/*.JPEG``).
            None gives the annotation columns only (unless the images are embedded).
        split: ``"train"`` or ``"validation"`` (``trn`` / ``val`` work too).
        cache_dir: where ``datasets`` prepares the Parquet files.

    Returns:
        The rows of :func:`sc_imagenet_features` plus ``source_image`` / ``target_image`` (``datasets.Image``,
        decoded lazily from ``imagenet_root``).

    Raises:
        ValueError: a folder in the SPair-like layout (import it first), or an image missing under
            ``imagenet_root`` (the first row is checked; the message names the file).
    """
    from .sources import open_dataset

    if isinstance(path_or_id, (str, os.PathLike)) and (Path(path_or_id).expanduser() / "Layout").is_dir():
        raise ValueError(f"{path_or_id} is in the SPair-like layout (the authors' archive); convert it once with "
                         "semcorr.hub_datasets.sc_imagenet.import_spair_layout(archive, out_dir, imagenet_root) "
                         "and load out_dir")
    dataset = open_dataset(path_or_id, split, cache_dir=cache_dir)
    if imagenet_root is None or "source_image" in dataset.column_names:
        return dataset
    root = Path(imagenet_root).expanduser()
    if len(dataset):
        for side in ("source", "target"):
            first = root / dataset[0][f"{side}_image_path"]
            if not first.is_file():
                raise ValueError(f"image not found: {first} (imagenet_root must be the ImageNet train folder, "
                                 "<root>/<wnid>/<file>.JPEG)")
    features = datasets.Features({**dataset.features, "source_image": datasets.Image(), "target_image": datasets.Image()})
    return dataset.map(lambda batch: {f"{side}_image": [str(root / path) for path in batch[f"{side}_image_path"]]
                                      for side in ("source", "target")},
                       batched=True, features=features, desc="attaching ImageNet images")


# -- pushing ----------------------------------------------------------------------------------------------
def push_to_hub(layout_dir, repo_id: str, *, token=None, private: bool | None = None, allow_images: bool = False,
                commit_message: str = "Upload SC-ImageNet annotations (semcorr)"):
    """Upload a Hub-layout folder as the dataset repo ``repo_id`` (``HfApi.create_repo`` + ``upload_folder``).

    Refuses a layout with embedded ImageNet images (ImageNet's terms forbid redistributing them)
    unless ``allow_images``, and a public push of labels imported from the authors' release (their
    agreement is non-commercial and personal; pass ``private=True``).

    Returns:
        What ``HfApi.upload_folder`` returns (the commit info).
    """
    from huggingface_hub import HfApi

    folder = Path(layout_dir).expanduser()
    if not (folder / "README.md").is_file() or not list((folder / "data").glob("*.parquet")):
        raise ValueError(f"{folder} is not an SC-ImageNet Hub layout (README.md and data/*.parquet)")
    if not allow_images and _has_embedded_images(folder):
        raise ValueError(f"{folder} embeds ImageNet images, which ImageNet's terms forbid redistributing; push the "
                         "annotation-only layout, or pass allow_images=True for a private copy you may share")
    if layout_origin(folder) == "huang2023-release" and not private:
        raise ValueError("these labels come from the authors' release, shared under a non-commercial agreement: "
                         "push them only to a private repo (private=True)")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                             commit_message=commit_message)


def _has_embedded_images(folder: Path) -> bool:
    import pyarrow.parquet as pq

    first = sorted((folder / "data").glob("*.parquet"))[0]
    return "source_image" in pq.read_schema(first).names


# -- the SPair-71k-like layout ------------------------------------------------------------------------------
def _rows_of(source, split: str, cache_dir=None):
    from .sources import open_dataset

    dataset = open_dataset(source, split, cache_dir=cache_dir)
    if "source_image" in dataset.column_names:
        dataset = dataset.cast_column("source_image", datasets.Image(decode=False))
        dataset = dataset.cast_column("target_image", datasets.Image(decode=False))
    return dataset


def _split_names(source) -> list[str]:
    if isinstance(source, datasets.DatasetDict):
        return list(source)
    if isinstance(source, datasets.Dataset):
        return [str(source.split or "train")]
    return list(datasets.get_dataset_split_names(str(source)))


def export_spair_layout(source, out_dir, imagenet_root=None, images: str = "symlink", cache_dir=None) -> Path:
    """Write SC-ImageNet in the SPair-71k-like layout (module docstring) that the authors' code and
    ``load_benchmark("spair-71k", out_dir)`` read.

    Args:
        source: a Hub-layout folder, a Hub id, or a ``datasets.Dataset`` / ``DatasetDict`` of these rows.
        out_dir: the folder to write (replaced atomically).
        imagenet_root: the ImageNet train folder (for ``images`` ``"symlink"`` / ``"copy"``).
        images: ``"symlink"`` or ``"copy"`` the images into ``JPEGImages/<wnid>/``, or ``"none"`` (the class
            folders are created empty: put ImageNet's files there yourself). Rows with embedded images
            are written out from their bytes.

    Returns:
        ``out_dir``.
    """
    if images not in ("symlink", "copy", "none"):
        raise ValueError(f"images must be 'symlink', 'copy' or 'none', got {images!r}")
    root = None if imagenet_root is None else Path(imagenet_root).expanduser()
    if images != "none" and root is None and not _embedded(source, cache_dir):
        raise ValueError(f"images={images!r} needs imagenet_root (or use images='none')")
    out_dir = Path(out_dir).expanduser()
    with atomic_directory(out_dir) as staging:
        for split in _split_names(source):
            if split not in SPLIT_FILES:
                raise ValueError(f"split {split!r} has no SPair-like name (train, validation, test)")
            dataset = _rows_of(source, split, cache_dir)
            categories = dataset.features["category"]
            names = []
            for row in dataset:
                wnid = categories.int2str(row["category"]) if isinstance(row["category"], int) else row["category"]
                name = f"{row['pair_id']}:{wnid}"
                (staging / "JPEGImages" / wnid).mkdir(parents=True, exist_ok=True)
                annotation = _spair_annotation(row, wnid)
                path = staging / "PairAnnotation" / SPLIT_FILES[split] / f"{name}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(annotation))
                names.append(name)
                for side in ("source", "target"):
                    _place_image(row, side, staging / "JPEGImages" / wnid, root, images)
            listing = staging / "Layout" / "large" / f"{SPLIT_FILES[split]}.txt"
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("".join(name + "\n" for name in names))
        (staging / "README.txt").write_text(
            "SC-ImageNet in the SPair-71k-like layout (written by semcorr). Keypoints and boxes are 0-based pixel\n"
            "indices of the original ImageNet image. JPEGImages/<wnid>/ holds "
            + ("links to " if images == "symlink" else "copies of " if images == "copy" else "nothing: put ")
            + "the ImageNet train images named in the pair files" + (" there yourself.\n" if images == "none" else ".\n"))
    return out_dir


def _embedded(source, cache_dir) -> bool:
    split = _split_names(source)[0]
    return "source_image" in _rows_of(source, split, cache_dir).column_names


def _spair_annotation(row: dict, wnid: str) -> dict:
    def shifted(values):
        return [[float(x) - OFFSET for x in point] for point in values]

    def box(values):
        return [float(x) - OFFSET for x in values]

    annotation = {"pair_id": int(row["pair_id"].split("-")[0]) if row["pair_id"].split("-")[0].isdigit() else row["pair_id"],
                  "src_imname": Path(row["source_image_path"]).name, "trg_imname": Path(row["target_image_path"]).name,
                  "src_impath": row["source_image_path"], "trg_impath": row["target_image_path"]}
    for side, key in (("source", "src"), ("target", "trg")):
        size = row.get(f"{side}_image_size")
        if size:
            annotation[f"{key}_imsize"] = [int(size[1]), int(size[0]), 3]
    annotation.update({
        "src_bndbox": box(row["source_bbox"]), "trg_bndbox": box(row["target_bbox"]),
        "category": wnid, "category_name": row.get("category_name") or "",
        "src_kps": shifted(row["source_keypoints"]), "trg_kps": shifted(row["target_keypoints"]),
        "kps_ids": list(range(len(row["source_keypoints"]))), "mirror": 0,
        **{key: int(row.get(key) or 0) for key in DIFFICULTY},
    })
    for key, value in (("kps_scores", row.get("keypoint_scores")), ("kps_consistency", row.get("keypoint_consistency")),
                       ("consistency_score", row.get("consistency_score"))):
        if value is not None:
            annotation[key] = value
    return annotation


def _place_image(row: dict, side: str, folder: Path, root: Path | None, images: str) -> None:
    target = folder / Path(row[f"{side}_image_path"]).name
    if images == "none" or target.exists() or target.is_symlink():
        return
    embedded = row.get(f"{side}_image")
    if embedded and embedded.get("bytes"):
        target.write_bytes(embedded["bytes"])
        return
    original = root / row[f"{side}_image_path"]
    if not original.is_file():
        raise ValueError(f"image not found: {original} (imagenet_root must be the ImageNet train folder)")
    if images == "symlink":
        target.symlink_to(original.resolve())
    else:
        shutil.copy2(original, target)


def import_spair_layout(archive_dir, out_dir, imagenet_root=None, *, origin: str = "huang2023-release",
                        embed_images: bool = False, rows_per_file: int = ROWS_PER_FILE) -> Path:
    """Convert an SPair-71k-like SC-ImageNet folder (the authors' archive, or an :func:`export_spair_layout`)
    into the Hub layout.

    Image paths are ``src_impath`` when the pair file has it, else ``<wnid>/<src_imname>``, else
    ``<wnid>/<source stem of the pair name>.JPEG``. Image sizes come from ``src_imsize``, else from
    the image header (in ``imagenet_root``, else in the archive's ``JPEGImages``); keypoints and
    boxes get ``+0.5`` (0-based pixel indices -> package pixels). Scores the archive does not have
    are left empty (``consistency_score`` null).

    Raises:
        ValueError: no ``Layout/large/{trn,val,test}.txt``, or a listed pair file that is missing or malformed.
    """
    archive = Path(archive_dir).expanduser()
    lists = {split: archive / "Layout" / "large" / f"{short}.txt" for split, short in SPLIT_FILES.items()}
    lists = {split: path for split, path in lists.items() if path.is_file()}
    if not lists:
        raise ValueError(f"{archive}: no Layout/large/trn.txt (nor val.txt, test.txt): not an SPair-like layout")
    names = {split: [line.strip() for line in path.read_text().splitlines() if line.strip()]
             for split, path in lists.items()}
    categories = sorted({name.rsplit(":", 1)[-1] for split_names in names.values() for name in split_names})
    root = None if imagenet_root is None else Path(imagenet_root).expanduser()
    class_names = _class_names()

    def rows_of(split: str) -> Iterator[dict]:
        for name in names[split]:
            yield _row_from_spair(archive, SPLIT_FILES[split], name, root, class_names)

    splits = {split: (lambda split=split: rows_of(split)) for split in names}
    counts = {split: len(split_names) for split, split_names in names.items()}
    statistics = {"pairs (train)": counts.get("train", 0), "pairs (validation)": counts.get("validation", 0),
                  "classes": len(categories)}
    provenance = [f"imported with `semcorr.hub_datasets.sc_imagenet.import_spair_layout` from `{archive.name}`",
                  "labels: " + ("the authors' release (Huang et al., ICCV 2023), under their non-commercial agreement"
                                if origin == "huang2023-release" else "semcorr")]
    card = sc_imagenet_card(statistics, provenance, origin=origin)
    return write_layout(out_dir, splits, counts, categories, card, embed_images=embed_images, imagenet_root=root,
                        rows_per_file=rows_per_file)


def _class_names() -> dict[str, str]:
    try:
        from semcorr.training.data.imagenet_filters import imagenet_classes

        return imagenet_classes()
    except ImportError:
        return {}


def _row_from_spair(archive: Path, short_split: str, name: str, root: Path | None, class_names: dict) -> dict:
    path = archive / "PairAnnotation" / short_split / f"{name}.json"
    try:
        pair = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: missing or malformed pair file ({error})") from None
    missing = [key for key in ("src_kps", "trg_kps", "src_bndbox", "trg_bndbox") if key not in pair]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    stem, wnid = name.rsplit(":", 1)
    wnid = pair.get("category", wnid)
    parts = stem.split("-")
    row = {"pair_id": stem, "category": wnid, "category_name": pair.get("category_name") or class_names.get(wnid, wnid)}
    for side, key, guess in (("source", "src", parts[1] if len(parts) > 2 else ""),
                             ("target", "trg", parts[2] if len(parts) > 2 else "")):
        relative = pair.get(f"{key}_impath") or f"{wnid}/{pair.get(f'{key}_imname') or guess + '.JPEG'}"
        row[f"{side}_image_path"] = relative
        row[f"{side}_keypoints"] = [[float(x) + OFFSET for x in point] for point in pair[f"{key}_kps"]]
        row[f"{side}_bbox"] = [float(x) + OFFSET for x in pair[f"{key}_bndbox"]]
        size = pair.get(f"{key}_imsize")
        if size:
            row[f"{side}_image_size"] = [int(size[1]), int(size[0])]
        else:
            candidates = ([root / relative] if root is not None else []) + [archive / "JPEGImages" / wnid / Path(relative).name]
            found = next((c for c in candidates if c.is_file()), None)
            row[f"{side}_image_size"] = list(_image_size(found)) if found is not None else None
    count = len(row["source_keypoints"])
    row["keypoint_scores"] = pair.get("kps_scores") or []
    row["keypoint_consistency"] = pair.get("kps_consistency") or []
    if len(row["keypoint_scores"]) not in (0, count) or len(row["keypoint_consistency"]) not in (0, count):
        raise ValueError(f"{path}: kps_scores / kps_consistency do not have one value per keypoint")
    row["consistency_score"] = pair.get("consistency_score")
    row.update({key: int(pair.get(key) or 0) for key in DIFFICULTY})
    return row


def _image_size(path: Path) -> tuple[int, int]:
    from ._common import image_size

    return image_size(path)

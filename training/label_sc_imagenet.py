"""Build SC-ImageNet from ImageNet with a trained cascaded MIL generator (Huang et al., ICCV 2023).

Usage::

    python -m semcorr.training.label_sc_imagenet --config sc_imagenet_full.yaml \\
        --images /data/imagenet/train --generator runs/cascaded-mil-imagenet/final --output-dir runs/sc-imagenet
    accelerate launch --multi_gpu --num_processes 8 -m semcorr.training.label_sc_imagenet --config ...
    torchrun --nproc_per_node 2 -m semcorr.training.label_sc_imagenet --config ...    # 2 CPU processes
    ... --detector none          # skip the single-instance filter (no detector weights here)
    ... --set labels.num_thirds=20 --set data.max_images_per_class=50   # a trial run

Huang et al., *Weakly Supervised Learning of Semantic Correspondence through Cascaded Online
Correspondence Refinement*, ICCV 2023, published the recipe and no code; every detail the paper
leaves open is semcorr's and said so. The job runs in three stages under ``run.output_dir``:

1. ``screen/`` -- every image of the classes not on the drop list (:mod:`~semcorr.training.data.imagenet_filters`)
   is read (an unreadable one is counted and skipped) and shown to the detector; it passes with
   exactly one detection above ``data.detector_threshold`` (the paper: a COCO-trained detector, 0.9).
   One JSON line per image: status, size, box.
2. ``labels/`` -- the images that passed are paired by class (shuffled with the seed and taken two
   by two: each image is in one pair, :func:`~semcorr.training.data.class_pairs.class_pairs`); per
   pair, ``CascadedMILModel.pseudo_label`` gives ``labels.num_pairs`` keypoint pairs (32), converted
   to original-image pixels, and :func:`~semcorr.modeling.cascaded_mil.consistency_scores` carries
   each source point source -> third -> target -> source through ``labels.num_thirds`` other images
   of the class (chosen by ``(seed, pair)``; the paper: 100), in chunks of ``labels.match_batch_size``
   thirds. A point's consistency is ``1 -`` its mean round-trip offset over the source diagonal; a
   pair's is the mean over its points (NaN, and so dropped, when the class has no third image).
3. ``dataset/`` -- on the main process, deterministically: an image's score is its pair's (each image
   is in one pair: reconstruction); the top ``labels.keep_fraction`` of the images (0.3; ties by image
   index) are kept with the pairs whose two images are kept; ``labels.validation_fraction`` of these
   (chosen by the seed) form the validation split. Written as the Hub layout of
   :mod:`semcorr.hub_datasets.sc_imagenet` (Parquet annotations with ImageNet-relative image paths,
   a dataset card with the statistics), plus ``summary.json``.

Stages 1 and 2 are :class:`~semcorr.training.inference.ShardedTask` s: the work is split by shard
over the processes, every shard is written atomically with a checksum, and a killed job rerun with
the same config skips the finished shards (no pair lost, none twice). Every random choice is seeded
by ``(run.seed, pair index)`` and each pair is computed alone, so the dataset is identical whatever
the number of processes. Images are read as they are needed: the job holds paths and indices only.

The config (:class:`SCImageNetConfig`): ``data`` (:class:`SCImageNetDataConfig`), ``labels``
(:class:`SCImageNetLabelsConfig`), ``run`` (:class:`~semcorr.training.config.InferenceRunConfig`);
flags override the file and ``--set section.key=value`` overrides anything. Errors print one line
and exit with status 2, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semcorr.training.config import InferenceRunConfig, SectionedConfig
from semcorr.training.inference import ShardedTask, run_sharded
from semcorr.training.seeding import generator_for
from semcorr.utils import ShardStore, atomic_write_json, read_json, sha256_bytes, sha256_file

SCREEN_FORMAT = "semcorr-sc-imagenet-screen"
LABEL_FORMAT = "semcorr-sc-imagenet-labels"
THIRDS_TAG = 0x7448  # seeds the choice of third images of a pair: (seed, pair, THIRDS_TAG)
VALIDATION_TAG = 0x7661  # seeds the validation split: (seed, VALIDATION_TAG)
NAME = "label_sc_imagenet"


# -- config ----------------------------------------------------------------------------------------------
@dataclass
class SCImageNetDataConfig:
    """The images and the filters.

    Attributes:
        images: the ImageNet train folder, ``<root>/<wnid>/*.JPEG``.
        dataset: instead, a ``datasets`` image dataset with a class column (folder or Hub id); image
            paths in the output are then ``<wnid>/<the file name the dataset records>``.
        split, image_column, class_column: of ``dataset``.
        drop_classes: ``"default"`` (semcorr's list), ``"none"``, or a file of class ids to drop.
        detector: ``"none"`` (skip the single-instance filter), ``"module:function"`` (a callable
            PIL image -> detections) or a transformers object-detection model id / folder.
        detector_threshold: a detection counts when it scores above this.
        max_images_per_class: the first N images (sorted by name) of each class only, for trial runs.
    """

    images: str | None = None
    dataset: str | None = None
    split: str = "train"
    image_column: str | None = None
    class_column: str | None = None
    drop_classes: str = "default"
    detector: str = "facebook/detr-resnet-50"
    detector_threshold: float = 0.9
    max_images_per_class: int | None = None

    def validate(self) -> None:
        from semcorr.training.data.imagenet_filters import load_drop_list

        if (self.images is None) == (self.dataset is None):
            raise ValueError("data needs exactly one of 'images' (the ImageNet train folder, --images) or 'dataset'")
        if self.images is not None and not Path(self.images).expanduser().is_dir():
            raise ValueError(f"data.images / --images: folder not found: {Path(self.images).expanduser().resolve()}")
        if not 0.0 <= self.detector_threshold < 1.0:
            raise ValueError(f"data.detector_threshold must be in [0, 1), got {self.detector_threshold}")
        if self.max_images_per_class is not None and self.max_images_per_class < 2:
            raise ValueError(f"data.max_images_per_class must be >= 2, got {self.max_images_per_class}")
        load_drop_list(self.drop_classes)  # a missing or malformed file fails here


@dataclass
class SCImageNetLabelsConfig:
    """The generator, the labels and the selection.

    Attributes:
        generator: a trained cascaded MIL generator (``save_pretrained`` folder).
        num_pairs: keypoint pairs labelled per image pair (the paper: 32).
        num_thirds: third images of the close-loop check per pair (the paper: 100).
        match_batch_size: image pairs per ``match`` call in the check (part of the job's identity).
        keep_fraction: fraction of the images kept, the most consistent (the paper: 0.3).
        validation_fraction: fraction of the kept pairs that form the validation split.
        embed_images: put the images in the Parquet files (private use only: ImageNet's terms).
        rows_per_file: rows per Parquet file of the dataset.
    """

    generator: str | None = None
    num_pairs: int = 32
    num_thirds: int = 100
    match_batch_size: int = 16
    keep_fraction: float = 0.3
    validation_fraction: float = 0.01
    embed_images: bool = False
    rows_per_file: int = 100_000

    def validate(self) -> None:
        if self.generator is None:
            raise ValueError("labels.generator / --generator is required (a trained cascaded MIL generator folder)")
        folder = Path(self.generator).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(f"labels.generator / --generator: {folder} is not a save_pretrained folder (no config.json)")
        for key in ("num_pairs", "num_thirds", "match_batch_size", "rows_per_file"):
            if getattr(self, key) < 1:
                raise ValueError(f"labels.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"labels.keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"labels.validation_fraction must be in [0, 1), got {self.validation_fraction}")


@dataclass
class SCImageNetConfig(SectionedConfig):
    """``data``, ``labels``, ``run`` (see the module docstring)."""

    data: SCImageNetDataConfig = field(default_factory=SCImageNetDataConfig)
    labels: SCImageNetLabelsConfig = field(default_factory=SCImageNetLabelsConfig)
    run: InferenceRunConfig = field(default_factory=InferenceRunConfig)

    def validate(self) -> None:
        if self.run.output_dir is None:
            raise ValueError("run.output_dir / --output-dir is required (a flag or a key of --config)")


def stage_config(config: SCImageNetConfig, stage: str) -> SCImageNetConfig:
    """``config`` with ``run.output_dir`` set to the folder of ``stage`` (``screen``, ``labels``)."""
    folder = Path(config.run.output_dir).expanduser() / stage
    return dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir=str(folder)))


# -- the images ------------------------------------------------------------------------------------------
class ImageNetImages:
    """The labelled images of ``data`` (a folder or a dataset), their class ids and the class filter.

    ``screen_items`` are the indices of the images to screen (classes not dropped, at most
    ``max_images_per_class`` each); nothing is decoded until :meth:`read`.
    """

    def __init__(self, data: SCImageNetDataConfig):
        from semcorr.training.data.class_pairs import class_images
        from semcorr.training.data.imagenet_filters import imagenet_classes, is_wnid, load_drop_list

        self.root, self._column = None, None
        if data.images is not None:
            self.root = Path(data.images).expanduser().resolve()
            self.images = class_images(str(self.root))
            self.source = str(self.root)
        else:
            from semcorr.hub_datasets import open_dataset
            from semcorr.training.data.images import _image_column

            dataset = open_dataset(data.dataset, data.split)
            self.images = class_images(dataset, image_column=data.image_column, class_column=data.class_column)
            self._column, self._image_name = _image_column(dataset, data.image_column)
            self.source = f"{data.dataset} ({data.split})"
        names = list(self.images.class_names)
        if not all(is_wnid(name) for name in names) and len(names) == 1000:
            names = list(imagenet_classes())  # a 1000-class ImageNet dataset in the standard (sorted wnid) order
        self.class_ids = names
        dropped = load_drop_list(data.drop_classes)
        self.dropped_classes = sorted(set(names) & dropped)
        keep_class = [name not in dropped for name in names]
        per_class: dict[int, int] = {}
        self.screen_items, self.images_in_dropped_classes, self.images_over_limit = [], 0, 0
        for index, label in enumerate(self.images.labels):
            if not keep_class[label]:
                self.images_in_dropped_classes += 1
                continue
            per_class[label] = per_class.get(label, 0) + 1
            if data.max_images_per_class is not None and per_class[label] > data.max_images_per_class:
                self.images_over_limit += 1
                continue
            self.screen_items.append(index)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int):
        """The RGB PIL image (EXIF orientation applied); raises one of ``READ_ERRORS`` when unreadable."""
        return self.images.read(index)

    def relative_path(self, index: int) -> str:
        """The image's path relative to the ImageNet train folder: ``<wnid>/<file>``."""
        if self.root is not None:
            return Path(self.images.names[index]).relative_to(self.root).as_posix()
        item = self._column[index][self._image_name]
        wnid = self.class_ids[self.images.labels[index]]
        name = Path(item.get("path") or "").name if isinstance(item, dict) else ""
        return f"{wnid}/{name or f'row-{index:08d}'}"

    def fingerprint(self) -> str:
        """sha256 of the screened images' names and classes (a changed folder is another job)."""
        text = "\n".join(f"{self.images.names[i]}\t{self.class_ids[self.images.labels[i]]}" for i in self.screen_items)
        return sha256_bytes(text.encode("utf-8"))


# -- stage 1: screen -------------------------------------------------------------------------------------
class ScreenTask(ShardedTask):
    """Read every candidate image and run the single-instance filter (one JSON line per image)."""

    name, format, suffix, what = f"{NAME}/screen", SCREEN_FORMAT, ".jsonl", "screened images"

    def __init__(self, config: SCImageNetConfig, images: ImageNetImages, detector, detector_name: str):
        super().__init__(config)
        self.images, self.detector, self.detector_name = images, detector, detector_name

    def setup(self, accelerator) -> None:
        pass  # the images are listed and the detector loaded before the job, so a failure stops it before any work

    def num_pairs(self) -> int:
        return len(self.images.screen_items)

    def job_config(self) -> dict:
        data = self.config.data
        return {"source": self.images.source, "num_images": self.num_pairs(), "images_sha256": self.images.fingerprint(),
                "dropped_classes": self.images.dropped_classes, "detector": self.detector_name,
                "detector_threshold": data.detector_threshold, "max_images_per_class": data.max_images_per_class,
                "shard_size": self.config.run.shard_size}

    def compute_shard(self, start: int, stop: int, progress) -> bytes:
        from semcorr.training.data.images import READ_ERRORS
        from semcorr.training.data.imagenet_filters import screen_image

        if getattr(progress, "unit", None) == "pair":
            progress.unit = "image"
        lines = []
        for item in range(start, stop):
            index = self.images.screen_items[item]
            record = {"item": item, "image": index, "path": self.images.relative_path(index)}
            try:
                image = self.images.read(index)
            except READ_ERRORS as error:
                record.update(status="unreadable", error=" ".join(str(error).split())[:200])
            else:
                height, width = image.height, image.width
                record["size"] = [height, width]
                box, status = [0.0, 0.0, float(width), float(height)], "ok"
                if self.detector is not None:
                    found = screen_image(self.detector, image, self.config.data.detector_threshold)
                    record["detections"] = found.count
                    if found.count == 1:
                        x1, y1, x2, y2 = found.box
                        box = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                               min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
                        record["score"] = found.score
                    else:
                        status = "rejected"
                record.update(status=status, bbox=box)
            lines.append(json.dumps(record, sort_keys=True))
            progress.update(1)
        return ("\n".join(lines) + "\n").encode("utf-8")


def read_screen(folder) -> list[dict]:
    """Every record of a finished screen stage, in item order (checked against its index)."""
    reader = ShardStore.open(folder, SCREEN_FORMAT, what="screened images")
    records = []
    for shard in range(len(reader.shards)):
        records += [json.loads(line) for line in reader.payload(shard).decode("utf-8").splitlines() if line]
    return records


# -- stage 2: label ---------------------------------------------------------------------------------------
class LabelTask(ShardedTask):
    """Pseudo labels and close-loop consistency of every pair (a safetensors file per shard)."""

    name, format, suffix, what = f"{NAME}/labels", LABEL_FORMAT, ".safetensors", "pseudo labels"

    def __init__(self, config: SCImageNetConfig, images: ImageNetImages, screened: list[dict], screen_index: dict):
        super().__init__(config)
        self.images, self.screened, self.screen_index = images, screened, screen_index

    def setup(self, accelerator) -> None:
        from semcorr.training.data.class_pairs import class_pairs
        from semcorr.modeling import load_matcher

        self.device = accelerator.device
        self.ok = [record for record in self.screened if record["status"] == "ok"]
        labels = [self.images.images.labels[record["image"]] for record in self.ok]
        self.pairs, self.skipped_classes = class_pairs(labels, self.config.run.seed, 0)
        self.members: dict[int, list[int]] = {}
        for position, label in enumerate(labels):
            self.members.setdefault(label, []).append(position)
        self.labels_of = labels
        generator = Path(self.config.labels.generator).expanduser()
        try:
            self.model, self.processor, _ = load_matcher(str(generator), device=self.device)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"labels.generator: cannot load a model from {generator}: {error}") from error
        if not hasattr(self.model, "pseudo_label"):
            raise ValueError(f"labels.generator: {generator} holds a {type(self.model).__name__}, not a cascaded MIL "
                             "generator (no pseudo_label)")
        self.model.eval()
        weights = generator / "model.safetensors"
        self.generator_sha256 = sha256_file(weights) if weights.is_file() else None

    def num_pairs(self) -> int:
        return len(self.pairs)

    def job_config(self) -> dict:
        labels = self.config.labels
        screen = {"config": self.screen_index["config"], "shards": [s["sha256"] for s in self.screen_index["shards"]]}
        return {"screen_sha256": sha256_bytes(json.dumps(screen, sort_keys=True).encode()),
                "generator": str(Path(labels.generator).expanduser().resolve()), "generator_sha256": self.generator_sha256,
                "image_size": list(self.model.config.image_size), "num_pairs": labels.num_pairs,
                "num_thirds": labels.num_thirds, "match_batch_size": labels.match_batch_size,
                "seed": self.config.run.seed, "shard_size": self.config.run.shard_size, "pairs": len(self.pairs)}

    def index_extra(self) -> dict:
        return {"num_keypoint_pairs": self.config.labels.num_pairs}

    def thirds_of(self, pair_index: int) -> list[int]:
        """Positions (in the screened-ok list) of the third images of a pair: other images of its class, seeded."""
        first, second = self.pairs[pair_index]
        pool = [m for m in self.members[self.labels_of[first]] if m not in (first, second)]
        order = torch.randperm(len(pool), generator=generator_for(self.config.run.seed, pair_index, THIRDS_TAG))
        return [pool[i] for i in order[: self.config.labels.num_thirds].tolist()]

    def _pixels(self, positions: list[int]) -> torch.Tensor:
        images = [self.images.read(self.ok[p]["image"]) for p in positions]
        return self.processor.preprocess(images)["pixel_values"].to(self.device)

    def label_pair(self, pair_index: int) -> dict[str, torch.Tensor]:
        """The record of one pair: points (original pixels, NaN where PMPS found none), scores, consistency."""
        from semcorr.modeling.cascaded_mil import consistency_scores

        labels = self.config.labels
        first, second = self.pairs[pair_index]
        source, target = self._pixels([first]), self._pixels([second])
        with torch.no_grad():
            found_pairs = self.model.pseudo_label(source, target, labels.num_pairs)
        found = found_pairs["found"][0].bool()
        offsets, thirds = [], self.thirds_of(pair_index)
        for begin in range(0, len(thirds), labels.match_batch_size):
            chunk = self._pixels(thirds[begin:begin + labels.match_batch_size])
            scores = consistency_scores(self.model.match, source, target, chunk, points=found_pairs["source_points"],
                                        point_mask=found_pairs["found"], chunk_size=labels.match_batch_size)
            offsets.append(scores["per_third"][0])  # (K_chunk, k)
        k = found.shape[0]
        if offsets and bool(found.any()):
            point_consistency = (1.0 - torch.cat(offsets).mean(dim=0)).float().cpu()
            consistency = point_consistency[found.cpu()].mean()
        else:
            point_consistency, consistency = torch.full((k,), float("nan")), torch.tensor(float("nan"))
        nan = torch.full((k, 2), float("nan"))
        points = {}
        for side, position, key in (("source", first, "source_points"), ("target", second, "target_points")):
            height, width = self.ok[position]["size"]
            original = self.processor.keypoints_to_original(found_pairs[key][0].float().cpu(), (height, width))
            points[side] = torch.where(found.cpu()[:, None], original, nan)
        return {"source_points": points["source"], "target_points": points["target"],
                "scores": torch.where(found.cpu(), found_pairs["scores"][0].float().cpu(), torch.tensor(float("nan"))),
                "found": found.cpu().to(torch.uint8), "point_consistency": torch.where(found.cpu(), point_consistency,
                                                                                      torch.tensor(float("nan"))),
                "consistency": consistency.reshape(()).float(), "num_thirds": torch.tensor(len(thirds))}

    def compute_shard(self, start: int, stop: int, progress) -> bytes:
        from safetensors.torch import save

        records = []
        for pair_index in range(start, stop):
            records.append(self.label_pair(pair_index))
            progress.update(1)
        tensors = {key: torch.stack([record[key] for record in records]).contiguous() for key in records[0]}
        tensors["pair_index"] = torch.arange(start, stop, dtype=torch.int64)
        tensors["source"] = torch.tensor([self.ok[self.pairs[p][0]]["image"] for p in range(start, stop)])
        tensors["target"] = torch.tensor([self.ok[self.pairs[p][1]]["image"] for p in range(start, stop)])
        return save(tensors, metadata={"format": LABEL_FORMAT, "pair_start": str(start), "pair_stop": str(stop),
                                       "coordinates": "original-image pixels, origin top-left, pixel i covers [i, i+1)"})


def read_labels(folder):
    """``(reader, decode)`` of a finished label stage: ``reader.decoded(shard, decode)`` gives a shard's tensors."""
    from safetensors.torch import load

    return ShardStore.open(folder, LABEL_FORMAT, what="pseudo labels"), load


# -- stage 3: select and write -------------------------------------------------------------------------------
def select(consistency: list[float], pairs: list[tuple[int, int]], keep_fraction: float) -> list[int]:
    """The pairs kept: rank the images by their pair's consistency (NaN last, ties by image position),
    keep the top ``keep_fraction`` of them, and the pairs whose two images are kept (sorted)."""
    scored = []
    for pair_index, (first, second) in enumerate(pairs):
        value = consistency[pair_index]
        key = -value if math.isfinite(value) else math.inf
        scored += [(key, first), (key, second)]
    scored.sort()
    kept = {image for _, image in scored[: int(round(keep_fraction * len(scored)))]}
    return [p for p, (first, second) in enumerate(pairs) if first in kept and second in kept
            and math.isfinite(consistency[p])]


def write_dataset(config: SCImageNetConfig, images: ImageNetImages, task: LabelTask, screened: list[dict],
                  detector_name: str) -> dict:
    """Stage 3 (main process): select, split, stream the rows into the Hub layout; returns the summary."""
    from semcorr.hub_datasets.sc_imagenet import pair_name, sc_imagenet_card, write_layout
    from semcorr.training.data.imagenet_filters import imagenet_classes

    labels, run = config.labels, config.run
    reader, decode = read_labels(stage_config(config, "labels").run.output_dir)
    consistency = []
    for shard in range(len(reader.shards)):
        consistency += reader.decoded(shard, decode)["consistency"].tolist()
    kept = select(consistency, task.pairs, labels.keep_fraction)
    order = torch.randperm(len(kept), generator=generator_for(run.seed, VALIDATION_TAG)).tolist()
    validation = {kept[i] for i in order[: int(round(labels.validation_fraction * len(kept)))]}
    split_pairs = {"train": [p for p in kept if p not in validation], "validation": [p for p in kept if p in validation]}
    names = imagenet_classes()

    def rows(split: str):
        for pair_index in split_pairs[split]:
            shard, row = reader.locate(pair_index)
            tensors = reader.decoded(shard, decode)
            found = tensors["found"][row].bool()
            first, second = (task.ok[p] for p in task.pairs[pair_index])
            wnid = images.class_ids[images.images.labels[first["image"]]]
            yield {
                "pair_id": pair_name(pair_index, first["path"], second["path"]), "category": wnid,
                "category_name": names.get(wnid, wnid),
                "source_image_path": first["path"], "target_image_path": second["path"],
                "source_keypoints": tensors["source_points"][row][found].tolist(),
                "target_keypoints": tensors["target_points"][row][found].tolist(),
                "keypoint_scores": tensors["scores"][row][found].tolist(),
                "keypoint_consistency": tensors["point_consistency"][row][found].tolist(),
                "consistency_score": float(tensors["consistency"][row]),
                "source_bbox": first["bbox"], "target_bbox": second["bbox"],
                "source_image_size": first["size"], "target_image_size": second["size"],
                "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0,
            }

    summary = summarise(config, images, task, screened, consistency, kept, split_pairs, detector_name)
    categories = sorted({images.class_ids[task.labels_of[task.pairs[p][0]]] for p in kept})  # the classes of the rows
    card = sc_imagenet_card(card_statistics(summary), provenance(config, detector_name))
    counts = {split: len(split_pairs[split]) for split in split_pairs}
    output = Path(run.output_dir).expanduser() / "dataset"
    if sum(counts.values()):
        write_layout(output, {split: (lambda split=split: rows(split)) for split in split_pairs}, counts, categories,
                     card, embed_images=labels.embed_images, imagenet_root=images.root, rows_per_file=labels.rows_per_file)
        summary["dataset"] = str(output)
    atomic_write_json(Path(run.output_dir).expanduser() / "summary.json", summary)
    return summary


def summarise(config, images, task, screened, consistency, kept, split_pairs, detector_name) -> dict:
    status = {}
    for record in screened:
        status[record["status"]] = status.get(record["status"], 0) + 1
    kept_images = 2 * len(kept)
    finite = [value for value in consistency if math.isfinite(value)]
    return {
        "images_seen": len(images), "classes_seen": len(images.class_ids),
        "classes_dropped": len(images.dropped_classes), "images_in_dropped_classes": images.images_in_dropped_classes,
        "images_over_class_limit": images.images_over_limit, "images_screened": len(screened),
        "images_unreadable": status.get("unreadable", 0),
        "images_rejected_by_detector": status.get("rejected", 0) if detector_name != "none" else None,
        "detector": detector_name, "images_passed": status.get("ok", 0),
        "classes_with_fewer_than_two_images": task.skipped_classes, "images_paired": 2 * len(task.pairs),
        "pairs_labelled": len(task.pairs), "pairs_without_consistency": len(consistency) - len(finite),
        "images_kept": kept_images, "pairs_kept": len(kept),
        "pairs_train": len(split_pairs["train"]), "pairs_validation": len(split_pairs["validation"]),
        "keep_fraction": config.labels.keep_fraction, "num_keypoint_pairs": config.labels.num_pairs,
        "num_thirds": config.labels.num_thirds, "seed": config.run.seed,
        "mean_consistency_kept": (sum(consistency[p] for p in kept) / len(kept)) if kept else None,
        "mean_consistency_all": (sum(finite) / len(finite)) if finite else None,
    }


def card_statistics(summary: dict) -> dict:
    detector = summary["detector"]
    rejected = ("skipped (`--detector none`): the single-instance filter was not applied" if detector == "none"
                else summary["images_rejected_by_detector"])
    return {
        "images seen": summary["images_seen"], "classes seen": summary["classes_seen"],
        "classes dropped (drop list)": summary["classes_dropped"],
        "images in dropped classes": summary["images_in_dropped_classes"],
        "images unreadable": summary["images_unreadable"],
        "images rejected by the detector (not exactly one object)": rejected,
        "images paired": summary["images_paired"], "pairs labelled": summary["pairs_labelled"],
        "images kept": summary["images_kept"], "pairs kept": summary["pairs_kept"],
        "pairs (train)": summary["pairs_train"], "pairs (validation)": summary["pairs_validation"],
        "keypoint pairs per image pair (at most)": summary["num_keypoint_pairs"],
        "third images per close-loop check": summary["num_thirds"], "fraction of images kept": summary["keep_fraction"],
    }


def provenance(config: SCImageNetConfig, detector_name: str) -> list[str]:
    data, labels = config.data, config.labels
    detector = ("**skipped** (`--detector none`): the single-instance filter was not applied, boxes are whole images"
                if detector_name == "none" else f"`{detector_name}`, a detection counts above {data.detector_threshold}")
    return [f"labels made by semcorr (`semcorr.training.label_sc_imagenet`), not by the authors; generator "
            f"`{Path(labels.generator).name}`, seed {config.run.seed}",
            f"class drop list: `{data.drop_classes}`", f"detector: {detector}"]


# -- the job ------------------------------------------------------------------------------------------------
def detector_device(config: SCImageNetConfig):
    from semcorr.training.tracking import use_cpu

    return "cpu" if use_cpu(config.run.cpu) else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def build_sc_imagenet(config: SCImageNetConfig, detector=None) -> dict | None:
    """Run the three stages (or continue them); returns the summary on the main process, None elsewhere.

    Args:
        detector: a detector callable to use instead of ``data.detector`` (recorded by its qualified name).

    Raises:
        ValueError: the detector cannot be loaded, the images cannot be listed, an output folder holds
            another job -- all before any work.
    """
    from semcorr.training.data.imagenet_filters import resolve_detector

    data = config.data
    if detector is not None:
        detector_name = f"{getattr(detector, '__module__', '?')}:{getattr(detector, '__qualname__', type(detector).__name__)}"
    else:
        detector_name = data.detector
        detector = resolve_detector(data.detector, data.detector_threshold, device=detector_device(config))
    images = ImageNetImages(data)
    if not images.screen_items:
        raise ValueError(f"no image left to screen in {images.source}: every class is on the drop list")
    print(f"[{NAME}] {len(images)} images of {len(images.class_ids)} classes in {images.source}; "
          f"{len(images.dropped_classes)} classes dropped, {len(images.class_ids) - len(images.dropped_classes)} kept; "
          f"{len(images.screen_items)} images to screen", flush=True)
    screen_config = stage_config(config, "screen")
    run_sharded(ScreenTask(screen_config, images, detector, detector_name))
    screened = read_screen(screen_config.run.output_dir)
    screen_index = read_json(Path(screen_config.run.output_dir) / "index.json")
    task = LabelTask(stage_config(config, "labels"), images, screened, screen_index)
    index = run_sharded(task)
    if index is None:  # not the main process
        return None
    summary = write_dataset(config, images, task, screened, detector_name)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    rejected = ("detector filter skipped" if summary["detector"] == "none"
                else f"rejected by the detector {summary['images_rejected_by_detector']:,}")
    print(f"[{NAME}] summary: images seen {summary['images_seen']:,} | in dropped classes "
          f"{summary['images_in_dropped_classes']:,} ({summary['classes_dropped']} classes) | unreadable "
          f"{summary['images_unreadable']:,} | {rejected} | paired {summary['images_paired']:,} | pairs labelled "
          f"{summary['pairs_labelled']:,} | kept {summary['images_kept']:,} images, {summary['pairs_kept']:,} pairs "
          f"(train {summary['pairs_train']:,}, validation {summary['pairs_validation']:,})"
          + (f" -> {summary['dataset']}" if summary.get("dataset") else " (nothing kept: no dataset written)"), flush=True)


# -- CLI -------------------------------------------------------------------------------------------------
FLAGS = {"images": "data.images", "dataset": "data.dataset", "drop_classes": "data.drop_classes",
         "detector": "data.detector", "detector_threshold": "data.detector_threshold",
         "max_images_per_class": "data.max_images_per_class", "generator": "labels.generator",
         "num_pairs": "labels.num_pairs", "num_thirds": "labels.num_thirds", "keep_fraction": "labels.keep_fraction",
         "embed_images": "labels.embed_images", "output_dir": "run.output_dir", "shard_size": "run.shard_size",
         "seed": "run.seed", "num_threads": "run.num_threads"}


def parse_args(argv=None) -> argparse.Namespace:
    from semcorr.training.cli import add_common_arguments

    parser = argparse.ArgumentParser(prog=f"python -m semcorr.training.{NAME}", description=__doc__.split("\n")[0])
    add_common_arguments(parser, training=False)
    parser.add_argument("--images", help="the ImageNet train folder, <root>/<wnid>/*.JPEG")
    parser.add_argument("--dataset", help="instead: a datasets image dataset with a class column (folder or Hub id)")
    parser.add_argument("--drop-classes", help="default | none | a file of class ids to drop")
    parser.add_argument("--detector", help="facebook/detr-resnet-50 (default) | a model folder | module:function | none")
    parser.add_argument("--detector-threshold", type=float, help="a detection counts above this (default 0.9)")
    parser.add_argument("--max-images-per-class", type=int, help="first N images of each class only (trial runs)")
    parser.add_argument("--generator", help="a trained cascaded MIL generator (save_pretrained folder); required")
    parser.add_argument("--num-pairs", type=int, help="keypoint pairs per image pair (default 32)")
    parser.add_argument("--num-thirds", type=int, help="third images of the close-loop check (default 100)")
    parser.add_argument("--keep-fraction", type=float, help="fraction of the images kept (default 0.3)")
    parser.add_argument("--embed-images", action="store_true", default=None,
                        help="embed the images in the Parquet files (private use only)")
    parser.add_argument("--output-dir", help="screen/, labels/, dataset/ and summary.json go here; required")
    parser.add_argument("--shard-size", type=int, help="images / pairs per shard (default 64)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--num-threads", type=int, help="torch.set_num_threads per process")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> SCImageNetConfig:
    from semcorr.training.cli import overrides_of

    return SCImageNetConfig.load(args.config, overrides_of(args, FLAGS))


def main(argv=None) -> int:
    try:
        build_sc_imagenet(load_config(parse_args(argv)))
    except ValueError as error:
        print(f"{NAME}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

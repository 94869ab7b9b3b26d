"""``semantic-correspondence``: transfer points, or find confident matches, between two images."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import Pipeline

from semcorr.modeling import image_processor_for, pad_keypoints, select_mutual_matches, validate_keypoints
from semcorr.modeling.ops.geometry import grid_to_pixels
from semcorr.modeling.image_io import load_image

_INPUT_KEYS = {"source_image", "target_image", "source_keypoints"}


class SemanticCorrespondencePipeline(Pipeline):
    """Match points between two images of different instances of one category.

    Input: a dict ``{"source_image", "target_image", "source_keypoints"?}`` or a list of them.
    Images are paths, PIL images or numpy arrays of any size; keypoints are ``(N, 2)`` (x, y) in
    pixels of the source image (origin top-left, pixel ``i`` spans ``[i, i+1)``).

    Output (per pair): ``{"source_keypoints", "target_keypoints", "scores"}`` with points in
    original pixels of each image. With ``source_keypoints`` the targets are their transfers; without,
    the ``top_k`` most confident mutual matches (sorted by score).

    Call arguments: ``top_k`` (default 50), ``score_threshold`` (top-k mode: keep only matches
    scoring at least this, default 0), ``batch_size`` (pairs per forward, default 8),
    ``cycle_tolerance`` (cells a mutual match may miss its round trip by, default 1.0).

    Scores are the model's absolute confidences (``CorrespondenceOutput.confidence``), comparable
    across pairs: with the embedded default, true matches of a same-scene pair score about 0.5-0.8,
    matches between unrelated images (noise and a photo, a flat image and itself) below 0.35.
    Transferred ``source_keypoints`` are all returned, each with its score.
    """

    _load_processor = False
    _load_image_processor = None  # use the checkpoint's processor when it has one
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = image_processor_for(self.model.config)

    def _sanitize_parameters(self, top_k=None, cycle_tolerance=None, score_threshold=None, **kwargs):
        if kwargs:
            raise TypeError(
                f"unexpected arguments {sorted(kwargs)}; valid: top_k, score_threshold, cycle_tolerance, batch_size"
            )
        forward_params = {}
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise ValueError(f"top_k must be a positive int, got {top_k!r}")
            forward_params["top_k"] = top_k
        if cycle_tolerance is not None:
            forward_params["cycle_tolerance"] = float(cycle_tolerance)
        if score_threshold is not None:
            if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) or not 0 <= score_threshold <= 1:
                raise ValueError(f"score_threshold must be a number in [0, 1] (scores are absolute confidences), "
                                 f"got {score_threshold!r}")
            forward_params["score_threshold"] = float(score_threshold)
        return {}, forward_params, {}

    def __call__(self, inputs, batch_size: int | None = None, **kwargs):
        single = isinstance(inputs, Mapping)
        if not single and not isinstance(inputs, (list, tuple)):
            raise TypeError(
                f"expected a dict with 'source_image' and 'target_image' or a list of them, got {type(inputs).__name__}"
            )
        items = [inputs] if single else list(inputs)
        for index, item in enumerate(items):
            _check_item(item, index)
        if batch_size is None:
            batch_size = self._batch_size if self._batch_size is not None else 8
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        _, forward_params, _ = self._sanitize_parameters(**kwargs)
        results = []
        for batch in _batches(items, batch_size):
            prepared = [self.preprocess(item) for item in batch]
            outputs = self.forward(_collate(prepared), **forward_params)
            results.extend(self.postprocess(output) for output in _split(outputs, len(prepared)))
        return results[0] if single else results

    def preprocess(self, inputs):
        source = load_image(inputs["source_image"])
        target = load_image(inputs["target_image"])
        keypoints = inputs.get("source_keypoints")
        processed = self.image_processor.preprocess_pairs(
            [source], [target], None if keypoints is None else [validate_keypoints(keypoints, (source.height, source.width))]
        )
        return {
            "source_pixel_values": processed["source_pixel_values"],
            "target_pixel_values": processed["target_pixel_values"],
            "source_keypoints": None if keypoints is None else processed["source_keypoints"][0],
            "source_original_size": processed["source_original_sizes"][0],
            "target_original_size": processed["target_original_sizes"][0],
        }

    def _forward(self, model_inputs, top_k: int = 50, cycle_tolerance: float = 1.0, score_threshold: float = 0.0):
        source_pixels, target_pixels = model_inputs["source_pixel_values"], model_inputs["target_pixel_values"]
        source_size, target_size = tuple(source_pixels.shape[-2:]), tuple(target_pixels.shape[-2:])
        keypoints, counts = model_inputs["source_keypoints"], model_inputs["keypoint_counts"]
        output = self.model.match(source_pixels, target_pixels, source_keypoints=keypoints)
        if keypoints is not None:
            return {
                "source_points": keypoints,
                "target_points": output.target_keypoints,
                "scores": output.keypoint_scores,
                "counts": counts,
                **_sizes(model_inputs),
            }
        if output.grid_trg_to_src is None:
            raise ValueError(f"{type(self.model).__name__} gives no reverse field; pass source_keypoints instead")
        source_grid, target_grid, scores, valid = select_mutual_matches(
            output.grid_src_to_trg, output.grid_trg_to_src, output.confidence, top_k, cycle_tolerance
        )
        valid &= scores >= score_threshold  # sorted by score: the kept ones stay first
        return {
            "source_points": grid_to_pixels(source_grid, source_size),
            "target_points": grid_to_pixels(target_grid, target_size),
            "scores": scores,
            "counts": valid.sum(dim=1),
            **_sizes(model_inputs),
        }

    def postprocess(self, model_outputs):
        count = int(model_outputs["counts"])
        to_original = self.image_processor.keypoints_to_original
        source = to_original(model_outputs["source_points"][:count], model_outputs["source_original_size"])
        target = to_original(model_outputs["target_points"][:count], model_outputs["target_original_size"])
        return {
            "source_keypoints": source.tolist(),
            "target_keypoints": target.tolist(),
            "scores": model_outputs["scores"][:count].clamp(0, 1).tolist(),
        }


def _check_item(item, index: int) -> None:
    if not isinstance(item, Mapping):
        raise TypeError(f"input {index} must be a dict with 'source_image' and 'target_image', got {type(item).__name__}")
    missing = {"source_image", "target_image"} - set(item)
    if missing:
        raise ValueError(f"input {index} lacks {sorted(missing)}; expected keys {sorted(_INPUT_KEYS)}")
    unknown = set(item) - _INPUT_KEYS
    if unknown:
        raise ValueError(f"input {index} has unknown keys {sorted(unknown)}; expected keys {sorted(_INPUT_KEYS)}")


def _batches(items: list, batch_size: int):
    """Consecutive runs of at most ``batch_size`` pairs that all have, or all lack, keypoints."""
    batch = []
    for item in items:
        if batch and (len(batch) == batch_size or _has_points(batch[0]) != _has_points(item)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _has_points(item) -> bool:
    return item.get("source_keypoints") is not None


def _sizes(model_inputs):
    return {key: model_inputs[key] for key in ("source_original_size", "target_original_size")}


def _collate(items: list[dict]) -> dict:
    """Stack preprocessed pairs; keypoint sets of different lengths are zero-padded."""
    batch = {
        "source_pixel_values": torch.cat([item["source_pixel_values"] for item in items]),
        "target_pixel_values": torch.cat([item["target_pixel_values"] for item in items]),
        "source_original_size": torch.stack([item["source_original_size"] for item in items]),
        "target_original_size": torch.stack([item["target_original_size"] for item in items]),
    }
    if items[0]["source_keypoints"] is not None:  # _batches never mixes the two kinds
        # validate_keypoints admitted only finite points, so each row's count is its number of real points
        padded, _ = pad_keypoints([item["source_keypoints"] for item in items])
        counts = torch.tensor([len(item["source_keypoints"]) for item in items])
        batch["source_keypoints"], batch["keypoint_counts"] = padded, counts
    else:
        batch["source_keypoints"], batch["keypoint_counts"] = None, None
    return batch


def _split(outputs: dict, size: int) -> list[dict]:
    return [{key: value[row] for key, value in outputs.items()} for row in range(size)]

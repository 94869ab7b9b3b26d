"""Score a semcorr matcher on a benchmark split or a dataset of keypoint pairs.

How a pair is scored. Pairs are matched in batches straight through the model and its image
processor (no pipeline round trip): ``preprocess_pairs`` resizes both images, the query keypoints
are mapped to model pixels with ``keypoints_to_model``, padded with
:func:`~semcorr.modeling.pad_keypoints` and passed to ``model.match``; the transferred points come
back to original pixels with ``keypoints_to_original``. The protocol (a preset of
:data:`semcorr.spaces.pck.PROTOCOLS`) fixes the threshold length, the averaging, the comparison
and the *side*: ``"target"`` transfers source keypoints to the target image and judges them there
(HPF, DHPF, CHM, DIFT, ...); ``"source"`` (CATs, VAT) swaps the roles, transferring target
keypoints to the source image. The judged image's size, box and keypoints go to
:func:`semcorr.spaces.pck.compute_pck`.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .protocols import DEFAULT_ALPHAS, check_alphas, resolve_settings, to_frame

#: The category of every pair of a dataset without a ``category`` column.
ONE_CATEGORY = "all"


def evaluate_model(
    model_or_id, benchmark: str | None, data_dir=None, split: str = "test", protocol: str | None = "default",
    alphas=DEFAULT_ALPHAS, batch_size: int = 8, cache_dir=None, *, threshold: str | None = None,
    average: str | None = None, comparison: str | None = None, padding_value: float | None = None,
    side: str | None = None, frame: str = "original", image_processor=None, device=None, progress: bool = True,
    dataset=None,
) -> dict:
    """PCK of a semcorr model on one split of a benchmark, or on a dataset of keypoint pairs.

    Args:
        model_or_id: anything :func:`semcorr.modeling.load_matcher` takes (None: the embedded default).
        benchmark: ``"pf-pascal"``, ``"pf-willow"`` or ``"spair-71k"`` (or an alias such as ``"spair"``).
        data_dir: the extracted benchmark folder.
        split: ``"test"``, ``"validation"``/``"val"`` or ``"train"``/``"trn"``; also picks the split
            of a ``dataset`` that holds several.
        protocol: a key of :data:`semcorr.spaces.pck.PROTOCOLS`, or None to use only the explicit
            settings (metric defaults: bbox, pair, ``<=``, target); ``"default"`` is ``"hpf"`` on a
            benchmark and None on a ``dataset``.
        alphas: PCK thresholds.
        batch_size: pairs per ``match`` call.
        cache_dir: datasets cache for the prepared benchmark or dataset.
        threshold, average, comparison, padding_value, side: explicit settings; with a protocol
            they may only repeat its values (a contradiction raises ValueError).
        frame: ``"original"`` or ``"protocol"`` (see :mod:`semcorr.evaluation.protocols`).
        image_processor, device: passed to :func:`~semcorr.modeling.load_matcher`.
        progress: show a tqdm progress bar (stderr).
        dataset: instead of ``benchmark``/``data_dir``: a ``datasets.Dataset`` or anything
            :func:`semcorr.hub_datasets.open_dataset` opens, in the benchmark pair schema.

    Returns:
        A JSON-ready dict: ``model``, ``model_type``, ``benchmark``, ``split`` (for a ``dataset``,
        the split name it records, or None), ``data_dir`` (a dataset's folder or Hub id), ``config``
        (the resolved settings, alphas, batch size, model input size), ``total``
        (``{"pck@<alpha>": float}``), ``per_category``, ``num_pairs``, ``num_points``,
        ``num_empty_pairs``, ``per_pair``, ``seconds`` and ``seconds_per_pair``. PCK values are
        fractions in [0, 1] (NaN when nothing was evaluated).

    Raises:
        ValueError: an unknown benchmark, protocol or setting, a missing ``data_dir``, a folder not
            laid out as expected, a dataset without the pair columns, a model without ``match()``.
    """
    alphas = check_alphas(alphas)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is not None:  # a missing device fails before any data is read
        from semcorr.modeling.loading import resolve_device

        device = resolve_device(device)
    explicit = dict(threshold=threshold, average=average, comparison=comparison, padding_value=padding_value,
                    side=side, frame=frame)
    benchmark, settings = _resolve_run(benchmark, protocol, dataset, explicit)
    from semcorr.modeling.loading import check_model_source

    check_model_source(model_or_id)  # a missing or foreign model fails before any data is read
    pairs, header = _open_pairs(benchmark, data_dir, split, cache_dir, dataset)
    return _score(model_or_id, pairs, header, settings, alphas, batch_size, image_processor, device, progress)


def _resolve_run(benchmark, protocol, dataset, explicit) -> tuple:
    """``(canonical benchmark or None, settings)``, checked before any data is read."""
    from semcorr.hub_datasets import canonical_benchmark_name

    if (benchmark is None) == (dataset is None):
        given = "both" if dataset is not None else "neither"
        raise ValueError(f"give either a benchmark (with data_dir) or a dataset, not {given}")
    if dataset is not None:
        return None, resolve_settings(None if protocol == "default" else protocol, None, **explicit)
    benchmark = canonical_benchmark_name(benchmark)
    return benchmark, resolve_settings("hpf" if protocol == "default" else protocol, benchmark, **explicit)


def _open_pairs(benchmark, data_dir, split, cache_dir, dataset) -> tuple:
    """``(pairs, header)`` of a benchmark split (canonical name) or a dataset."""
    from semcorr.hub_datasets import load_pairs

    if dataset is not None:
        pairs = load_pairs(dataset, data_dir, split=split, cache_dir=cache_dir, require_keypoints=True)
        header = {"benchmark": None, "split": None if pairs.split is None else str(pairs.split),
                  "data_dir": _dataset_location(dataset)}
        return pairs, header
    pairs = load_pairs(benchmark, data_dir, split=split, cache_dir=cache_dir)
    header = {"benchmark": benchmark, "split": split, "data_dir": str(Path(data_dir).expanduser().resolve())}
    return pairs, header


def _dataset_location(dataset) -> str | None:
    """What the report names as the data: a folder's absolute path, a Hub id, or None for an object."""
    if not isinstance(dataset, (str, os.PathLike)):
        return None
    path = Path(dataset).expanduser()
    return str(path.resolve()) if path.exists() else str(dataset)


def _score(model_or_id, dataset, header: dict, settings: dict, alphas, batch_size, image_processor, device,
           progress) -> dict:
    """Load the matcher, score ``dataset`` and wrap the result with ``header`` and timings."""
    from semcorr.modeling import load_matcher

    model, processor, model_id = load_matcher(model_or_id, image_processor=image_processor, device=device)
    started = time.perf_counter()
    result = evaluate_dataset(model, processor, dataset, header["benchmark"] or "dataset", settings, alphas,
                              batch_size, progress)
    elapsed = time.perf_counter() - started
    return {
        "model": model_id,
        "model_type": getattr(getattr(model, "config", None), "model_type", type(model).__name__),
        **header,
        "config": {**settings, "alphas": list(alphas), "batch_size": batch_size,
                   "model_input_size": list(processor.model_size) if hasattr(processor, "model_size") else None},
        **result,
        "seconds": round(elapsed, 3),
        "seconds_per_pair": round(elapsed / max(result["num_pairs"], 1), 4),
    }


@dataclass
class _Judged:
    """Per-pair inputs of :func:`semcorr.spaces.pck.compute_pck`, in the judged image's frame."""

    predictions: list = field(default_factory=list)
    references: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    image_sizes: list = field(default_factory=list)
    bboxes: list = field(default_factory=list)
    categories: list = field(default_factory=list)
    pair_ids: list = field(default_factory=list)


def evaluate_dataset(model, processor, dataset, benchmark: str, settings: dict, alphas, batch_size: int = 8,
                     progress: bool = True) -> dict:
    """Match every pair of a ``datasets.Dataset`` and score it; see :func:`evaluate_model`.

    ``settings`` comes from :func:`~semcorr.evaluation.resolve_settings`. Rows follow the benchmark
    pair schema (``source_image``, ``source_keypoints``, ``source_bbox``, ``source_image_size``, the
    same for the target, optionally ``category`` -- without it every pair is in one category,
    :data:`ONE_CATEGORY` -- and ``pair_id``).

    Non-finite transferred points (a model that gives NaN) count as misses; one warning says how
    many pairs and points had them.

    Returns:
        ``{"total", "per_category", "num_pairs", "num_points", "num_empty_pairs", "per_pair"}``.
    """
    from tqdm.auto import tqdm

    features = getattr(dataset, "features", None) or {}
    names = getattr(features.get("category"), "names", None)
    judged = _Judged()
    bar = tqdm(total=len(dataset), desc=f"evaluate {benchmark}", unit="pair", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            _judge_batch(model, processor, rows, start, settings, names, judged)
            bar.update(len(rows["source_image"]))
    finally:
        bar.close()
    _warn_non_finite(judged)
    return _summarise(judged, settings, alphas, names)


def _warn_non_finite(judged: _Judged) -> None:
    """One warning naming how many judged points (in how many pairs) the model transferred to NaN / inf."""
    counts = [int((mask & ~np.isfinite(prediction).all(axis=1)).sum())
              for prediction, mask in zip(judged.predictions, judged.masks)]
    points, pairs = sum(counts), sum(1 for count in counts if count)
    if points:
        total = int(sum(mask.sum() for mask in judged.masks))
        warnings.warn(
            f"the model's transferred keypoints are not finite (NaN or inf) for {points} of {total} points in "
            f"{pairs} of {len(counts)} pairs; they count as misses (check the model's weights and inputs)",
            RuntimeWarning, stacklevel=3,
        )


def _judge_batch(model, processor, rows: dict, start: int, settings: dict, names, judged: _Judged) -> None:
    """Transfer one batch's query keypoints and append each pair's judged quantities to ``judged``."""
    query, other = ("source", "target") if settings["side"] == "target" else ("target", "source")
    query_points = [_points(p) for p in rows[f"{query}_keypoints"]]
    predicted, valid = _transfer(model, processor, rows[f"{query}_image"], rows[f"{other}_image"], query_points)
    for row, points in enumerate(query_points):
        reference = _points(rows[f"{other}_keypoints"][row])
        if len(reference) != len(points):
            raise ValueError(f"pair {start + row}: {len(points)} {query} keypoints but {len(reference)} {other} keypoints")
        size = [float(v) for v in rows[f"{other}_image_size"][row]]
        box = [float(v) for v in rows[f"{other}_bbox"][row]]
        prediction = predicted[row]
        if settings["frame_size"]:
            prediction, reference, size, box = to_frame(prediction, reference, size, box, settings["frame_size"])
        judged.predictions.append(prediction)
        judged.references.append(reference)
        judged.masks.append(valid[row] & np.isfinite(reference).all(axis=1))
        judged.image_sizes.append(size)
        judged.bboxes.append(box)
        label = rows["category"][row] if "category" in rows else ONE_CATEGORY
        judged.categories.append(names[label] if names is not None and isinstance(label, (int, np.integer)) else str(label))
        judged.pair_ids.append(_plain(rows["pair_id"][row]) if "pair_id" in rows else start + row)


def _transfer(model, processor, query_images, other_images, query_points: list[np.ndarray]):
    """Transfer ``(N_i, 2)`` query keypoints (original pixels, NaN allowed) onto the other images.

    Returns:
        ``(predicted, valid)``: per pair an ``(N_i, 2)`` float64 array in original pixels of the
        other image, and an ``(N_i,)`` bool array, False where the query point was not finite.
    """
    import torch

    from semcorr.modeling import pad_keypoints

    processed = processor.preprocess_pairs(query_images, other_images)
    query_sizes = processed["source_original_sizes"].tolist()
    padded, mask = pad_keypoints([processor.keypoints_to_model(points, tuple(size))
                                  for points, size in zip(query_points, query_sizes)])
    device = _model_device(model)
    with torch.no_grad():
        output = model.match(processed["source_pixel_values"].to(device), processed["target_pixel_values"].to(device),
                             source_keypoints=padded.to(device))
    if getattr(output, "target_keypoints", None) is None:
        raise ValueError(f"{type(model).__name__}.match() returned no target_keypoints for given source_keypoints")
    transferred = output.target_keypoints.detach().float().cpu()
    other_sizes = processed["target_original_sizes"].tolist()
    # Unclamped, unlike the pipeline's output: PCK scores the model's own prediction, as the published
    # protocols do (a point predicted off the image is a miss by its full distance).
    predicted = [processor.keypoints_to_original(transferred[row, : len(points)], tuple(other_sizes[row]), clamp=False)
                 .numpy().astype(np.float64) for row, points in enumerate(query_points)]
    return predicted, [mask[row, : len(points)].numpy() for row, points in enumerate(query_points)]


def _summarise(judged: _Judged, settings: dict, alphas, names) -> dict:
    """PCK of the collected pairs: totals, per category (in label order) and per pair."""
    from semcorr.spaces.pck import compute_pck

    scores = compute_pck(
        judged.predictions, judged.references, alphas=list(alphas), threshold=settings["threshold"],
        average=settings["average"], comparison=settings["comparison"], padding_value=settings["padding_value"],
        image_sizes=judged.image_sizes, bboxes=judged.bboxes, categories=judged.categories, masks=judged.masks,
    )
    order = [name for name in (names or []) if name in scores["per_category"]]
    order += [name for name in scores["per_category"] if name not in order]
    per_category = {}
    for name in order:
        members = [i for i, category in enumerate(judged.categories) if category == name]
        per_category[name] = {"num_pairs": len(members), "num_points": int(sum(judged.masks[i].sum() for i in members)),
                              **scores["per_category"][name]}
    per_pair = [{"pair_id": judged.pair_ids[i], "category": judged.categories[i],
                 "num_points": int(judged.masks[i].sum()), **scores["per_pair"][i]}
                for i in range(len(judged.predictions))]
    return {
        "total": {key: value for key, value in scores.items() if key.startswith("pck@")},
        "per_category": per_category,
        "num_pairs": scores["num_pairs"],
        "num_points": scores["num_points"],
        "num_empty_pairs": scores["num_empty_pairs"],
        "per_pair": per_pair,
    }


def _points(value) -> np.ndarray:
    """Keypoints of one image as a float64 ``(N, 2)`` array (NaN kept: it marks an unannotated point)."""
    return np.asarray(value if value is not None else [], dtype=np.float64).reshape(-1, 2)


def _model_device(model):
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _plain(value):
    return value.item() if hasattr(value, "item") else value

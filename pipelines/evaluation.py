"""``semcorr evaluate``: PCK of any semcorr model on PF-PASCAL, PF-WILLOW, SPair-71k or your own pairs.

Python::

    from semcorr.pipelines.evaluation import evaluate_model
    result = evaluate_model(None, "spair-71k", "/data/SPair-71k")     # None: the embedded model
    result["total"]["pck@0.1"], result["per_category"]["cat"]["pck@0.1"]

Command line::

    semcorr evaluate --benchmark pf-pascal --data-dir /data/PF-PASCAL --protocol hpf --out pck.json
    semcorr evaluate --model runs/student/final --dataset my-pairs/    # a save_to_disk folder of keypoint pairs

How a pair is scored. The benchmark is read with :func:`semcorr.hub_datasets.load_benchmark`.
Pairs are matched in batches straight through the model and its image processor (no pipeline
round trip): ``preprocess_pairs`` resizes both images, the query keypoints are mapped to model
pixels with ``keypoints_to_model``, zero-padded to ``(B, N_max, 2)`` and passed to
``model.match``; the transferred points come back to original pixels with
``keypoints_to_original``. The protocol (a preset of :data:`semcorr.spaces.pck.PROTOCOLS`)
fixes the threshold length, the averaging, the comparison and the *side*: ``"target"`` transfers
source keypoints to the target image and judges them there (HPF, DHPF, CHM, DIFT, ...);
``"source"`` (CATs, VAT) swaps the roles, transferring target keypoints to the source image.
The judged image's size, box and keypoints go to :func:`semcorr.spaces.pck.compute_pck`.

Frames. PCK is measured in original pixels by default (``frame="original"``); every threshold
but ``"bbox-kp-padded"`` is then equal to what an isotropically resizing codebase measures.
``frame="protocol"`` measures after the anisotropic square resize the DHPF/CHM (240 x 240) and
CATs/VAT (256 x 256) codebases apply, which is what their PF-WILLOW numbers depend on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARK_NAMES = ("pf-pascal", "pf-willow", "spair-71k")
DEFAULT_ALPHAS = (0.05, 0.1, 0.15)
EMBEDDED_MODEL_ID = "embedded-default"
FRAMES = ("original", "protocol")
#: (height, width) each codebase squashes images to before measuring; protocols not listed resize
#: isotropically (or not at all), which leaves their thresholds unchanged.
PROTOCOL_FRAMES = {"dhpf": (240, 240), "chm": (240, 240), "cats": (256, 256), "vat": (256, 256)}


# -------------------------------------------------------------------------------------------- CLI
def add_evaluate_arguments(parser) -> None:
    """The options of ``semcorr evaluate``."""
    from semcorr.spaces.pck import PROTOCOLS
    from semcorr.spaces.pck.pck import AVERAGES, COMPARISONS, THRESHOLDS

    parser.add_argument("--model", help="model directory or Hub id (default: the embedded model)")
    parser.add_argument("--benchmark", choices=list(BENCHMARK_NAMES), help="a published benchmark (with --data-dir)")
    parser.add_argument("--data-dir", help="extracted benchmark archive (see the loaders' docstrings)")
    parser.add_argument(
        "--dataset", help="instead of --benchmark: a datasets save_to_disk folder in the benchmark pair schema "
        "(e.g. written by python -m semcorr.hub_datasets.skimage_pairs); metric defaults unless --protocol",
    )
    parser.add_argument("--split", default="test", help="test (default), validation/val or train/trn")
    parser.add_argument(
        "--protocol", default="default", choices=[*PROTOCOLS, "none", "default"],
        help="PCK convention of a published codebase (default: hpf on a benchmark, none on --dataset); "
        "'none': only the explicit options below",
    )
    parser.add_argument("--threshold", choices=list(THRESHOLDS), help="threshold length (default: the protocol's)")
    parser.add_argument("--average", choices=list(AVERAGES), help="averaging (default: the protocol's)")
    parser.add_argument("--comparison", choices=list(COMPARISONS), help="'<=' or '<' (default: the protocol's)")
    parser.add_argument("--padding-value", type=float, help="p of threshold bbox-kp-padded")
    parser.add_argument("--side", choices=["target", "source"], help="judged image (default: the protocol's)")
    parser.add_argument(
        "--frame", default="original", choices=list(FRAMES),
        help="measure in original pixels (default) or in the protocol's square frame (dhpf, chm: 240; cats, vat: 256)",
    )
    parser.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="default 0.05 0.1 0.15")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default 8)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--cache-dir", help="where datasets caches the prepared benchmark")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_evaluate_command(args) -> None:
    """Run ``semcorr evaluate``: evaluate, print the table, write ``--out``."""
    if (args.benchmark is None) == (args.dataset is None):
        raise ValueError("give either --benchmark (with --data-dir) or --dataset")
    result = evaluate_model(
        args.model, args.benchmark, args.data_dir, split=args.split, dataset=args.dataset,
        protocol=None if args.protocol == "none" else args.protocol,
        alphas=tuple(args.alphas), batch_size=args.batch_size, cache_dir=args.cache_dir,
        threshold=args.threshold, average=args.average, comparison=args.comparison,
        padding_value=args.padding_value, side=args.side, frame=args.frame,
        device=args.device, progress=not args.no_progress,
    )
    print(format_table(result))
    if args.out:
        path = write_json_atomically(result, args.out)
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------ evaluation
def evaluate_model(
    model_or_id,
    benchmark: str | None,
    data_dir=None,
    split: str = "test",
    protocol: str | None = "default",
    alphas=DEFAULT_ALPHAS,
    batch_size: int = 8,
    cache_dir=None,
    *,
    threshold: str | None = None,
    average: str | None = None,
    comparison: str | None = None,
    padding_value: float | None = None,
    side: str | None = None,
    frame: str = "original",
    image_processor=None,
    device=None,
    progress: bool = True,
    dataset=None,
) -> dict:
    """PCK of a semcorr model on one split of a benchmark, or on a dataset of keypoint pairs.

    Args:
        model_or_id: ``None`` (the embedded default), a model directory or Hub id, a model object
            with ``match()`` and a ``config``, or a ``semantic-correspondence`` pipeline.
        benchmark: ``"pf-pascal"``, ``"pf-willow"`` or ``"spair-71k"``.
        data_dir: the extracted benchmark folder.
        split: ``"test"``, ``"validation"``/``"val"`` or ``"train"``/``"trn"``.
        protocol: a key of :data:`semcorr.spaces.pck.PROTOCOLS`, or None to use only the explicit
            ``threshold``/``average``/``comparison``/``side`` (metric defaults: bbox, pair, ``<=``,
            target); ``"default"`` is ``"hpf"`` on a benchmark and None on a ``dataset``.
        alphas: PCK thresholds.
        batch_size: pairs per ``match`` call.
        cache_dir: datasets cache for the prepared benchmark.
        threshold, average, comparison, padding_value, side: explicit settings; with a protocol
            they may only repeat its values (a contradiction raises ValueError).
        frame: ``"original"`` or ``"protocol"`` (see the module docstring).
        image_processor: overrides the checkpoint's processor.
        device: torch device for a model loaded here (default cuda when available); a model
            object passed in stays where it is.
        progress: show a tqdm progress bar (stderr).
        dataset: instead of ``benchmark``/``data_dir``: a ``datasets.Dataset`` or a ``save_to_disk``
            folder whose rows follow the benchmark pair schema
            (:func:`semcorr.hub_datasets._common.pair_features`).

    Returns:
        A JSON-ready dict: ``model``, ``benchmark``, ``split``, ``data_dir``, ``config`` (the
        resolved protocol settings, alphas, batch size, model input size), ``total``
        (``{"pck@<alpha>": float}``), ``per_category`` (``{name: {"num_pairs", "num_points",
        "pck@<alpha>"...}}``), ``per_pair``, ``num_pairs``, ``num_points``, ``num_empty_pairs``,
        ``seconds`` and ``seconds_per_pair``. PCK values are fractions in [0, 1] (NaN when
        nothing was evaluated).

    Raises:
        ValueError: unknown benchmark/protocol/setting, a missing ``data_dir``, a benchmark
            folder not laid out as expected, a model without ``match()``.
    """
    from semcorr.hub_datasets import load_benchmark

    alphas = _check_alphas(alphas)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if dataset is not None:
        if benchmark is not None:
            raise ValueError("give either a benchmark (with data_dir) or a dataset, not both")
        return _evaluate_pair_dataset(
            model_or_id, dataset, None if protocol == "default" else protocol, alphas, batch_size,
            dict(threshold=threshold, average=average, comparison=comparison, padding_value=padding_value,
                 side=side, frame=frame), image_processor, device, progress,
        )
    benchmark = _benchmark_name(benchmark)
    protocol = "hpf" if protocol == "default" else protocol
    settings = resolve_settings(protocol, benchmark, threshold, average, comparison, padding_value, side, frame)
    if data_dir is None:
        raise ValueError(f"data_dir is required: the folder holding the extracted {benchmark} archive")
    if not Path(data_dir).is_dir():
        raise ValueError(f"benchmark data directory {str(data_dir)!r} does not exist or is not a folder")

    dataset = load_benchmark(benchmark, data_dir, split=split, cache_dir=cache_dir)
    header = {"benchmark": benchmark, "split": split, "data_dir": str(Path(data_dir).resolve())}
    return _score(model_or_id, dataset, header, settings, alphas, batch_size, image_processor, device, progress)


def _evaluate_pair_dataset(model_or_id, dataset, protocol, alphas, batch_size, explicit, image_processor, device,
                           progress) -> dict:
    """:func:`evaluate_model` on a ``datasets.Dataset`` (or ``save_to_disk`` folder) of keypoint pairs."""
    import datasets

    settings = resolve_settings(protocol, None, **explicit)
    source = None
    if not isinstance(dataset, datasets.Dataset):
        source = Path(dataset).expanduser()
        if not (source / "state.json").is_file():
            raise ValueError(f"dataset {str(source)!r} is not a datasets save_to_disk folder (no state.json)")
        dataset = datasets.load_from_disk(str(source))
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(f"dataset {str(source)!r} holds several splits; pass the folder of one")
    missing = sorted({f"{side}_{name}" for side in ("source", "target") for name in ("image", "keypoints", "bbox", "image_size")}
                     - set(dataset.column_names))
    if missing:
        raise ValueError(f"dataset lacks the pair-schema column(s) {missing}; see semcorr.hub_datasets._common.pair_features")
    header = {"benchmark": None, "split": None, "data_dir": str(source.resolve()) if source else None}
    return _score(model_or_id, dataset, header, settings, alphas, batch_size, image_processor, device, progress)


def _score(model_or_id, dataset, header: dict, settings: dict, alphas, batch_size, image_processor, device,
           progress) -> dict:
    """Load the matcher, score ``dataset`` and wrap the result with ``header`` and timings."""
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


def resolve_settings(protocol, benchmark, threshold=None, average=None, comparison=None, padding_value=None,
                     side=None, frame="original") -> dict:
    """The PCK settings of a run: a protocol preset (or the metric defaults) plus explicit values.

    Returns ``{"protocol", "threshold", "average", "comparison", "padding_value", "side", "frame",
    "frame_size"}``; ``frame_size`` is ``(h, w)`` of the square frame or None for original pixels.
    """
    from semcorr.spaces.pck import PROTOCOLS, resolve_config

    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid values: {[*PROTOCOLS]}")
    config = resolve_config(protocol, benchmark, threshold, average, comparison, padding_value)
    preset_side = PROTOCOLS[protocol]["side"] if protocol is not None else "target"
    if side is not None and side not in ("target", "source"):
        raise ValueError(f"unknown side {side!r}; valid values: ['target', 'source']")
    if protocol is not None and side is not None and side != preset_side:
        raise ValueError(f"side={side!r} contradicts protocol={protocol!r}, which judges on the {preset_side}; drop one")
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; valid values: {list(FRAMES)}")
    frame_size = PROTOCOL_FRAMES.get(protocol) if frame == "protocol" else None
    return {"protocol": protocol, **config, "side": side or preset_side, "frame": frame,
            "frame_size": list(frame_size) if frame_size else None}


def load_matcher(model_or_id=None, image_processor=None, device=None):
    """``(model, image_processor, model_id)`` for a model id, directory, object or pipeline."""
    import torch

    import semcorr.modeling  # noqa: F401  (registers the Auto classes)
    from semcorr.modeling import image_processor_for

    if model_or_id is None or isinstance(model_or_id, (str, os.PathLike)):
        from transformers import AutoImageProcessor, AutoModel

        if model_or_id is None:
            from semcorr.modeling import default_model_dir

            path, model_id = str(default_model_dir()), EMBEDDED_MODEL_ID
        else:
            path = model_id = str(model_or_id)
        model = AutoModel.from_pretrained(path).eval()
        if image_processor is None:
            try:
                image_processor = AutoImageProcessor.from_pretrained(path)
            except (OSError, ValueError, KeyError):
                image_processor = None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
    else:
        model = model_or_id
        if hasattr(model, "model") and not callable(getattr(model, "match", None)):  # a pipeline
            image_processor = image_processor or getattr(model, "image_processor", None)
            model = model.model
        model_id = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        if device is not None:
            model = model.to(device)
    if not callable(getattr(model, "match", None)):
        raise ValueError(f"{type(model).__name__} has no match(); semcorr evaluate needs a semcorr matcher")
    if image_processor is None:
        image_processor = image_processor_for(model.config)
    if hasattr(model, "eval"):
        model.eval()
    return model, image_processor, model_id


def evaluate_dataset(model, processor, dataset, benchmark: str, settings: dict, alphas, batch_size: int = 8,
                     progress: bool = True) -> dict:
    """Match every pair of a benchmark ``datasets.Dataset`` and score it; see :func:`evaluate_model`.

    ``settings`` comes from :func:`resolve_settings`. Rows follow the benchmark pair schema
    (``source_image``, ``source_keypoints``, ``source_bbox``, ``source_image_size``, the same for
    the target, ``category``, ``pair_id``).
    """
    import torch
    from tqdm.auto import tqdm

    from semcorr.spaces.pck import compute_pck

    query, judged = ("source", "target") if settings["side"] == "target" else ("target", "source")
    category_feature = dataset.features.get("category")
    names = getattr(category_feature, "names", None)
    device = _model_device(model)
    predictions, references, masks, image_sizes, bboxes, categories, pair_ids = [], [], [], [], [], [], []
    bar = tqdm(total=len(dataset), desc=f"evaluate {benchmark}", unit="pair", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            count = len(rows[f"{query}_image"])
            processed = processor.preprocess_pairs(rows[f"{query}_image"], rows[f"{judged}_image"])
            query_points = [_points(p) for p in rows[f"{query}_keypoints"]]
            judged_points = [_points(p) for p in rows[f"{judged}_keypoints"]]
            padded = torch.zeros(count, max([len(p) for p in query_points] + [1]), 2)
            for row, points in enumerate(query_points):
                finite = np.isfinite(points).all(axis=1, keepdims=True)
                padded[row, : len(points)] = processor.keypoints_to_model(
                    np.where(finite, points, 0.0).astype(np.float32), tuple(processed["source_original_sizes"][row].tolist())
                )
            with torch.no_grad():
                output = model.match(
                    processed["source_pixel_values"].to(device), processed["target_pixel_values"].to(device),
                    source_keypoints=padded.to(device),
                )
            if getattr(output, "target_keypoints", None) is None:
                raise ValueError(f"{type(model).__name__}.match() returned no target_keypoints for given source_keypoints")
            transferred = output.target_keypoints.detach().float().cpu()
            for row in range(count):
                n = len(query_points[row])
                judged_size = tuple(processed["target_original_sizes"][row].tolist())
                predicted = processor.keypoints_to_original(transferred[row, :n], judged_size).numpy().astype(np.float64)
                reference = judged_points[row]
                if len(reference) != n:
                    raise ValueError(f"pair {start + row}: {n} {query} keypoints but {len(reference)} {judged} keypoints")
                mask = np.isfinite(query_points[row]).all(axis=1) & np.isfinite(reference).all(axis=1)
                size = [float(v) for v in rows[f"{judged}_image_size"][row]]
                box = [float(v) for v in rows[f"{judged}_bbox"][row]]
                if settings["frame_size"]:
                    predicted, reference, size, box = _to_frame(predicted, reference, size, box, settings["frame_size"])
                predictions.append(predicted)
                references.append(reference)
                masks.append(mask)
                image_sizes.append(size)
                bboxes.append(box)
                label = rows["category"][row]
                categories.append(names[label] if names is not None and isinstance(label, (int, np.integer)) else str(label))
                pair_ids.append(_plain(rows["pair_id"][row]) if "pair_id" in rows else start + row)
            bar.update(count)
    finally:
        bar.close()

    scores = compute_pck(
        predictions, references, alphas=list(alphas), threshold=settings["threshold"], average=settings["average"],
        comparison=settings["comparison"], padding_value=settings["padding_value"], image_sizes=image_sizes,
        bboxes=bboxes, categories=categories, masks=masks,
    )
    order = [name for name in (names or []) if name in scores["per_category"]]
    order += [name for name in scores["per_category"] if name not in order]
    per_category = {}
    for name in order:
        members = [i for i, c in enumerate(categories) if c == name]
        per_category[name] = {
            "num_pairs": len(members),
            "num_points": int(sum(masks[i].sum() for i in members)),
            **scores["per_category"][name],
        }
    per_pair = [
        {"pair_id": pair_ids[i], "category": categories[i], "num_points": int(masks[i].sum()), **scores["per_pair"][i]}
        for i in range(len(predictions))
    ]
    return {
        "total": {key: value for key, value in scores.items() if key.startswith("pck@")},
        "per_category": per_category,
        "num_pairs": scores["num_pairs"],
        "num_points": scores["num_points"],
        "num_empty_pairs": scores["num_empty_pairs"],
        "per_pair": per_pair,
    }


# ---------------------------------------------------------------------------------------- output
def format_table(result: dict) -> str:
    """Markdown table: one row per category, then the total (PCK in percent)."""
    keys = [key for key in result["total"]]
    config = result["config"]
    header = "| category | pairs | points | " + " | ".join(f"PCK@{k[4:]} (%)" for k in keys) + " |"
    lines = [
        f"{result['benchmark']} {result['split']}, model {result['model']}, protocol {config['protocol'] or 'none'} "
        f"(threshold {config['threshold']}, average {config['average']}, comparison {config['comparison']}, "
        f"judged on the {config['side']}, frame {config['frame']})",
        "",
        header,
        "|---|---:|---:|" + "---:|" * len(keys),
    ]
    for name, row in result["per_category"].items():
        lines.append(f"| {name} | {row['num_pairs']} | {row['num_points']} | " + " | ".join(_percent(row[k]) for k in keys) + " |")
    lines.append(
        f"| **total ({config['average']})** | {result['num_pairs']} | {result['num_points']} | "
        + " | ".join(_percent(result["total"][k]) for k in keys) + " |"
    )
    return "\n".join(lines)


def write_json_atomically(result: dict, path) -> Path:
    """Write ``result`` as strict JSON (NaN -> null) via a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text + "\n")
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------- helpers
def _benchmark_name(benchmark) -> str:
    key = str(benchmark).strip().lower().replace("_", "-")
    key = {"pfpascal": "pf-pascal", "pfwillow": "pf-willow", "spair": "spair-71k", "spair71k": "spair-71k"}.get(key, key)
    if key not in BENCHMARK_NAMES:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid values: {list(BENCHMARK_NAMES)}")
    return key


def _check_alphas(alphas) -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in (alphas if isinstance(alphas, (list, tuple)) else [alphas]))
    except (TypeError, ValueError):
        raise ValueError(f"alphas must be positive numbers, got {alphas!r}") from None
    if not values or not all(math.isfinite(a) and a > 0 for a in values):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {list(alphas)!r}")
    if len({f"{a:g}" for a in values}) != len(values):
        raise ValueError(f"alphas must be distinct, got {list(values)!r}")
    return values


def _points(value) -> np.ndarray:
    points = np.asarray(value if value is not None else [], dtype=np.float64)
    return points.reshape(-1, 2)


def _to_frame(predicted, reference, size, box, frame_size):
    """Scale one pair's judged-image quantities into an anisotropic ``frame_size = (h, w)`` frame."""
    height, width = size
    scale = np.array([frame_size[1] / width, frame_size[0] / height])
    box = [box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]]
    return predicted * scale, reference * scale, [float(frame_size[0]), float(frame_size[1])], box


def _model_device(model):
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _percent(value) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if not math.isfinite(value) else value
    if isinstance(value, Path):
        return str(value)
    return value

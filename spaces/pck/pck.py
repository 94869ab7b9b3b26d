"""PCK (percentage of correct keypoints) for semantic correspondence, as an `evaluate` metric.

This file is loaded standalone by `evaluate.load(<dir of this file>)`, which copies it
into a module cache: it may only import numpy, datasets and evaluate, one per line.
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{min2019hyperpixel,
  title={Hyperpixel Flow: Semantic Correspondence with Multi-layer Neural Features},
  author={Min, Juhong and Lee, Jongmin and Ponce, Jean and Cho, Minsu},
  booktitle={ICCV},
  year={2019}
}
"""

_DESCRIPTION = """\
PCK@alpha for semantic correspondence: a predicted keypoint is correct when its distance
to the ground-truth keypoint on the judged image is within alpha * L, where L is a
per-pair length (image side, object box side or keypoint extent). The threshold length,
the averaging and the comparison differ between papers, so all three are arguments and
named presets (`protocol=`) reproduce the conventions of published codebases.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per pair, an (N_i, 2) list/array of predicted (x, y) pixels on the judged image.
        NaN or infinite predictions count as wrong.
    references: per pair, an (N_i, 2) list/array of ground-truth (x, y) pixels on the judged image.
        Non-finite references are dropped (treated like masked-out keypoints).
    alphas: list of floats > 0, default [0.05, 0.1, 0.15].
    threshold: "image" (max(h, w) of the judged image, needs image_sizes), "bbox"
        (max(x2 - x1, y2 - y1), needs bboxes), "bbox-kp" (extent of the valid reference
        keypoints) or "bbox-kp-padded" (that extent with the point (p, p) added, p =
        padding_value, default -1; reproduces padded PF-WILLOW loaders). Default "bbox".
    average: "pair" (mean over pairs of per-pair PCK, default), "point" (correct points /
        all points), "category" (mean over categories of the per-pair mean inside each
        category) or "category-point" (mean over categories of the point-pooled PCK inside
        each category). The category modes need categories.
    comparison: "<=" (default) or "<".
    protocol: a key of PROTOCOLS ("hpf", "dhpf", "chm", "cats", "vat", "dift", "sd-dino",
        "geoaware"); fills threshold, average, comparison (and padding_value); needs benchmark.
    benchmark: "pf-pascal", "pf-willow" or "spair-71k"; selects the preset's threshold.
    image_sizes: per pair, (h, w) of the judged image.
    bboxes: per pair, (x1, y1, x2, y2) of the object box on the judged image.
    categories: per pair, a category label.
    masks: per pair, N_i booleans; False marks a keypoint that is not evaluated.
    padding_value: only for threshold="bbox-kp-padded".
Returns:
    "pck@<alpha>" (float in [0, 1], NaN when nothing was evaluated) for each alpha,
    "per_category": {category: {"pck@<alpha>": float}}, empty without categories,
    "per_pair": [{"pck@<alpha>": float}] (NaN for an empty pair),
    "num_pairs", "num_points", "num_empty_pairs": ints.
Examples:
    >>> pck = PCK()
    >>> pck.compute(predictions=[[[10.0, 10.0], [0.0, 0.0]]], references=[[[13.0, 14.0], [40.0, 0.0]]],
    ...             bboxes=[[0, 0, 50, 40]], alphas=[0.1])["pck@0.1"]
    0.5
"""

THRESHOLDS = ("image", "bbox", "bbox-kp", "bbox-kp-padded")
AVERAGES = ("pair", "point", "category", "category-point")
COMPARISONS = ("<=", "<")
BENCHMARKS = ("pf-pascal", "pf-willow", "spair-71k")
DEFAULT_ALPHAS = (0.05, 0.1, 0.15)
DEFAULT_THRESHOLD = "bbox"
DEFAULT_AVERAGE = "pair"
DEFAULT_COMPARISON = "<="
DEFAULT_PADDING_VALUE = -1.0

_BENCHMARK_ALIASES = {
    "pfpascal": "pf-pascal", "pf_pascal": "pf-pascal", "pf-pascal": "pf-pascal",
    "pfwillow": "pf-willow", "pf_willow": "pf-willow", "pf-willow": "pf-willow",
    "spair": "spair-71k", "spair71k": "spair-71k", "spair-71k": "spair-71k", "spair_71k": "spair-71k",
}

# Conventions read from each codebase's evaluation and data-loading code. "threshold" maps
# benchmark -> mode; a benchmark missing from it has no evaluation code in that codebase.
PROTOCOLS = {
    "hpf": {
        "threshold": {"pf-pascal": "image", "pf-willow": "bbox-kp", "spair-71k": "bbox"},
        "average": "pair", "comparison": "<=", "side": "target", "padding_value": None,
        "paper": "Min et al., Hyperpixel Flow, ICCV 2019",
        "codebase": "https://github.com/juhongm999/hpf",
        "frame": "image resized isotropically to a longer side of at most 300 px",
    },
    "dhpf": {
        "threshold": {"pf-pascal": "image", "pf-willow": "bbox-kp-padded", "spair-71k": "bbox"},
        "average": "pair", "comparison": "<=", "side": "target", "padding_value": -1.0,
        "paper": "Min et al., Learning to Compose Hypercolumns for Visual Correspondence, ECCV 2020",
        "codebase": "https://github.com/juhongm999/dhpf",
        "frame": "image resized (anisotropically) to 240 x 240",
    },
    "chm": {
        "threshold": {"pf-pascal": "image", "pf-willow": "bbox-kp-padded", "spair-71k": "bbox"},
        "average": "pair", "comparison": "<=", "side": "target", "padding_value": -2.0,
        "paper": "Min and Cho, Convolutional Hough Matching Networks, CVPR 2021",
        "codebase": "https://github.com/juhongm999/chm",
        "frame": "image resized (anisotropically) to img_size x img_size, 240 by default",
    },
    "cats": {
        "threshold": {"pf-pascal": "image", "pf-willow": "bbox-kp-padded", "spair-71k": "bbox"},
        "average": "pair", "comparison": "<=", "side": "source", "padding_value": -1.0,
        "paper": "Cho et al., CATs: Cost Aggregation Transformers for Visual Correspondence, NeurIPS 2021",
        "codebase": "https://github.com/SunghwanHong/Cost-Aggregation-transformers",
        "frame": "image resized (anisotropically) to 256 x 256",
    },
    "vat": {
        "threshold": {"pf-pascal": "image", "pf-willow": "bbox-kp-padded", "spair-71k": "bbox"},
        "average": "pair", "comparison": "<=", "side": "source", "padding_value": -1.0,
        "paper": "Hong et al., Cost Aggregation with 4D Convolutional Swin Transformer "
                 "for Few-Shot Segmentation, ECCV 2022",
        "codebase": "not checked here; conventions assumed equal to the CATs codebase",
        "frame": "assumed as CATs: 256 x 256",
    },
    "dift": {
        "threshold": {"spair-71k": "bbox"},
        "average": "pair", "comparison": "<=", "side": "target", "padding_value": None,
        "paper": "Tang et al., Emergent Correspondence from Image Diffusion, NeurIPS 2023",
        "codebase": "https://github.com/Tsingularity/dift (eval_spair.py; also prints per point)",
        "frame": "original image",
    },
    "sd-dino": {
        "threshold": {"pf-pascal": "image", "spair-71k": "bbox"},
        "average": "category-point", "comparison": "<", "side": "target", "padding_value": None,
        "paper": "Zhang et al., A Tale of Two Features, NeurIPS 2023",
        "codebase": "https://github.com/Junyi42/sd-dino (pck_spair_pascal.py, 'Average' line)",
        "frame": "image letterboxed isotropically into a square",
    },
    "geoaware": {
        "threshold": {"pf-pascal": "image", "spair-71k": "bbox"},
        "average": "pair", "comparison": "<", "side": "target", "padding_value": None,
        "paper": "Zhang et al., Telling Left from Right: Identifying Geometry-Aware "
                 "Semantic Correspondence, CVPR 2024",
        "codebase": "https://github.com/Junyi42/GeoAware-SC (pck_train.py; --KPT_RESULT gives per point)",
        "frame": "image letterboxed isotropically into an 840 x 840 square",
    },
}


def _check_choice(name, value, choices):
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; valid values: {list(choices)}")


def _normalize_benchmark(benchmark):
    """Canonical benchmark name ("pf-pascal", "pf-willow", "spair-71k")."""
    key = str(benchmark).strip().lower()
    if key not in _BENCHMARK_ALIASES:
        raise ValueError(f"unknown benchmark={benchmark!r}; valid values: {list(BENCHMARKS)}")
    return _BENCHMARK_ALIASES[key]


def _preset_config(protocol, benchmark):
    """The (threshold, average, comparison, padding_value) a preset uses on a benchmark."""
    _check_choice("protocol", protocol, PROTOCOLS)
    preset = PROTOCOLS[protocol]
    if benchmark is None:
        raise ValueError(
            f"protocol={protocol!r} needs benchmark=, one of {list(preset['threshold'])}, "
            "because its threshold depends on the benchmark"
        )
    bench = _normalize_benchmark(benchmark)
    if bench not in preset["threshold"]:
        raise ValueError(
            f"protocol={protocol!r} defines no convention for benchmark {bench!r} "
            f"(it covers {list(preset['threshold'])}); pass threshold/average/comparison instead"
        )
    threshold = preset["threshold"][bench]
    padding = preset["padding_value"] if threshold == "bbox-kp-padded" else None
    return {"threshold": threshold, "average": preset["average"],
            "comparison": preset["comparison"], "padding_value": padding}


def resolve_config(protocol=None, benchmark=None, threshold=None, average=None,
                   comparison=None, padding_value=None):
    """Merge a preset with explicit arguments.

    Returns dict(threshold, average, comparison, padding_value). An explicit argument
    that differs from what the preset uses on that benchmark raises ValueError.
    """
    explicit = {"threshold": threshold, "average": average,
                "comparison": comparison, "padding_value": padding_value}
    if protocol is not None:
        config = _preset_config(protocol, benchmark)
        for key, value in explicit.items():
            if value is not None and value != config[key]:
                raise ValueError(
                    f"{key}={value!r} contradicts protocol={protocol!r} on {_normalize_benchmark(benchmark)}, "
                    f"which uses {key}={config[key]!r}; drop one of the two"
                )
        return config
    if benchmark is not None:
        _normalize_benchmark(benchmark)
    config = {"threshold": DEFAULT_THRESHOLD if threshold is None else threshold,
              "average": DEFAULT_AVERAGE if average is None else average,
              "comparison": DEFAULT_COMPARISON if comparison is None else comparison}
    _check_choice("threshold", config["threshold"], THRESHOLDS)
    _check_choice("average", config["average"], AVERAGES)
    _check_choice("comparison", config["comparison"], COMPARISONS)
    if config["threshold"] == "bbox-kp-padded":
        config["padding_value"] = DEFAULT_PADDING_VALUE if padding_value is None else float(padding_value)
    elif padding_value is not None:
        raise ValueError("padding_value only applies to threshold='bbox-kp-padded'")
    else:
        config["padding_value"] = None
    return config


def _alpha_list(alphas):
    """Validated list of alphas (floats > 0, no duplicate keys)."""
    if alphas is None:
        alphas = DEFAULT_ALPHAS
    values = [float(a) for a in np.atleast_1d(np.asarray(alphas, dtype=float))]
    if not values or not all(np.isfinite(a) and a > 0 for a in values):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas!r}")
    keys = [_key(a) for a in values]
    if len(set(keys)) != len(keys):
        raise ValueError(f"alphas must be distinct, got {alphas!r}")
    return values


def _key(alpha):
    """Result key for one alpha, e.g. 'pck@0.1'."""
    return f"pck@{alpha:g}"


def _as_points(value, index, name):
    """One pair's keypoints as a float64 (N, 2) array; ValueError naming the pair otherwise."""
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"pair {index}: {name} must be an (N, 2) array of numbers ({error})") from None
    if points.size == 0:
        return points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"pair {index}: {name} must have shape (N, 2), got {points.shape}")
    return points


def check_pairs(predictions, references, offset=0):
    """Validate and convert pairs.

    predictions, references: sequences of P arrays, each (N_i, 2); `offset` is added to
    pair indices in error messages. Returns two lists of P float64 (N_i, 2) arrays.
    """
    if predictions is None or references is None:
        raise ValueError("predictions and references must be given together")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references (pairs)")
    preds, refs = [], []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        pred = _as_points(pred, i + offset, "predictions")
        ref = _as_points(ref, i + offset, "references")
        if len(pred) != len(ref):
            raise ValueError(f"pair {i + offset}: {len(pred)} predicted keypoints but {len(ref)} references")
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def _check_length(name, values, num_pairs):
    """Raise unless the per-pair side information has one entry per pair."""
    if len(values) != num_pairs:
        raise ValueError(f"{name} has {len(values)} entries but there are {num_pairs} pairs")


def _valid_masks(refs, masks):
    """Per pair, an (N_i,) bool array: keypoint is evaluated (mask True and reference finite)."""
    if masks is None:
        masks = [None] * len(refs)
    _check_length("masks", masks, len(refs))
    valid = []
    for i, (ref, mask) in enumerate(zip(refs, masks)):
        keep = np.isfinite(ref).all(axis=1)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.size == 0:
                mask = mask.reshape(0)
            if mask.shape != (len(ref),):
                raise ValueError(f"pair {i}: masks must hold {len(ref)} booleans, got shape {mask.shape}")
            keep &= mask.astype(bool)
        valid.append(keep)
    return valid


def _side_array(name, values, num_pairs, width):
    """Per-pair side information as a float64 (P, width) array."""
    if values is None:
        return None
    _check_length(name, values, num_pairs)
    rows = []
    for i, value in enumerate(values):
        try:
            row = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            row = np.array([])
        if row.shape != (width,) or not np.isfinite(row).all():
            raise ValueError(f"pair {i}: {name} entry must be {width} finite numbers, got {value!r}")
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, width))


def _image_lengths(image_sizes):
    """L = max(h, w) per pair; image_sizes: (P, 2) as (h, w)."""
    bad = np.flatnonzero((image_sizes <= 0).any(axis=1))
    if bad.size:
        raise ValueError(f"pair {bad[0]}: image_sizes must be positive (h, w), got {image_sizes[bad[0]].tolist()}")
    return image_sizes.max(axis=1)


def _bbox_lengths(bboxes):
    """L = max(x2 - x1, y2 - y1) per pair; bboxes: (P, 4) as (x1, y1, x2, y2)."""
    sides = np.stack([bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1]], axis=1)
    bad = np.flatnonzero((sides < 0).any(axis=1))
    if bad.size:
        raise ValueError(f"pair {bad[0]}: bboxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1, "
                         f"got {bboxes[bad[0]].tolist()}")
    return sides.max(axis=1)


def _keypoint_lengths(refs, valid, padding_value=None):
    """L = max side of the box around the valid references, per pair (NaN if none).

    With `padding_value` p, the point (p, p) joins the set: this reproduces loaders that
    pad keypoint arrays with p before taking min/max.
    """
    lengths = np.full(len(refs), np.nan)
    for i, (ref, keep) in enumerate(zip(refs, valid)):
        points = ref[keep]
        if len(points) == 0:
            continue
        if padding_value is not None:
            points = np.vstack([points, [padding_value, padding_value]])
        lengths[i] = (points.max(axis=0) - points.min(axis=0)).max()
    return lengths


def _threshold_lengths(config, refs, valid, image_sizes, bboxes):
    """Per-pair threshold length L, shape (P,)."""
    mode, num_pairs = config["threshold"], len(refs)
    sizes = _side_array("image_sizes", image_sizes, num_pairs, 2)
    boxes = _side_array("bboxes", bboxes, num_pairs, 4)
    if mode == "image":
        if sizes is None:
            raise ValueError("threshold='image' needs image_sizes=[(h, w), ...] of the judged images")
        return _image_lengths(sizes)
    if mode == "bbox":
        if boxes is None:
            raise ValueError("threshold='bbox' needs bboxes=[(x1, y1, x2, y2), ...] on the judged images")
        return _bbox_lengths(boxes)
    return _keypoint_lengths(refs, valid, config["padding_value"] if mode == "bbox-kp-padded" else None)


def _correct_counts(preds, refs, valid, lengths, alphas, comparison):
    """Correct-keypoint counts (A, P) and evaluated-keypoint counts (P,)."""
    num_valid = np.array([int(keep.sum()) for keep in valid], dtype=np.int64)
    if num_valid.sum() == 0:
        return np.zeros((len(alphas), len(refs))), num_valid
    pred = np.concatenate([p[keep] for p, keep in zip(preds, valid)])
    ref = np.concatenate([r[keep] for r, keep in zip(refs, valid)])
    pair_index = np.repeat(np.arange(len(refs)), num_valid)
    # NaN predictions give NaN distances, and every comparison with NaN is False: wrong.
    dist = np.sqrt(((pred - ref) ** 2).sum(axis=1))
    limits = np.asarray(alphas)[:, None] * lengths[pair_index][None, :]
    with np.errstate(invalid="ignore"):
        correct = dist[None, :] <= limits if comparison == "<=" else dist[None, :] < limits
    counts = np.stack([np.bincount(pair_index, weights=row, minlength=len(refs)) for row in correct])
    return counts, num_valid


def _pair_mean(counts, num_valid):
    """Mean over non-empty pairs of per-pair PCK: (A, P), (P,) -> (A,); NaN if none."""
    keep = num_valid > 0
    if not keep.any():
        return np.full(counts.shape[0], np.nan)
    return (counts[:, keep] / num_valid[keep]).mean(axis=1)


def _point_mean(counts, num_valid):
    """Pooled PCK, correct points / evaluated points: (A, P), (P,) -> (A,); NaN if none."""
    total = num_valid.sum()
    return counts.sum(axis=1) / total if total > 0 else np.full(counts.shape[0], np.nan)


def _group_indices(categories, num_pairs):
    """{category: array of pair indices}, in order of first appearance."""
    _check_length("categories", categories, num_pairs)
    groups = {}
    for i, category in enumerate(categories):
        try:
            groups.setdefault(category, []).append(i)
        except TypeError:
            raise ValueError(f"pair {i}: category must be hashable, got {category!r}") from None
    return {category: np.asarray(index) for category, index in groups.items()}


def _aggregate(counts, num_valid, categories, average):
    """Overall PCK (A,) and per-category PCK {category: (A,)}."""
    within = _point_mean if average in ("point", "category-point") else _pair_mean
    per_category = {}
    if categories is not None:
        for category, index in _group_indices(categories, len(num_valid)).items():
            per_category[category] = within(counts[:, index], num_valid[index])
    elif average in ("category", "category-point"):
        raise ValueError(f"average={average!r} needs categories=[...] (one per pair)")
    if average == "pair":
        return _pair_mean(counts, num_valid), per_category
    if average == "point":
        return _point_mean(counts, num_valid), per_category
    # A category without any evaluated keypoint has no PCK and is left out of the mean.
    scores = [v for v in per_category.values() if not np.isnan(v).all()]
    overall = np.mean(scores, axis=0) if scores else np.full(counts.shape[0], np.nan)
    return overall, per_category


def _by_alpha(values, alphas):
    """{'pck@<alpha>': float} from an (A,) array."""
    return {_key(a): float(v) for a, v in zip(alphas, values)}


def compute_pck(predictions, references, alphas=None, threshold=None, average=None,
                comparison=None, protocol=None, benchmark=None, image_sizes=None,
                bboxes=None, categories=None, masks=None, padding_value=None):
    """PCK over P pairs; see the module's argument description. Returns the result dict."""
    config = resolve_config(protocol, benchmark, threshold, average, comparison, padding_value)
    alphas = _alpha_list(alphas)
    preds, refs = check_pairs(predictions, references)
    valid = _valid_masks(refs, masks)
    lengths = _threshold_lengths(config, refs, valid, image_sizes, bboxes)
    counts, num_valid = _correct_counts(preds, refs, valid, lengths, alphas, config["comparison"])
    overall, per_category = _aggregate(counts, num_valid, categories, config["average"])
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pair = counts / np.where(num_valid > 0, num_valid, np.nan)
    result = _by_alpha(overall, alphas)
    result["per_category"] = {c: _by_alpha(v, alphas) for c, v in per_category.items()}
    result["per_pair"] = [_by_alpha(per_pair[:, i], alphas) for i in range(len(refs))]
    result["num_pairs"] = len(refs)
    result["num_points"] = int(num_valid.sum())
    result["num_empty_pairs"] = int((num_valid == 0).sum())
    return result


def _points_feature():
    """Feature for ragged (N_i, 2) float keypoints; no fixed inner length so that
    shape errors reach our own checks, which name the pair."""
    list_type = getattr(datasets, "List", None) or datasets.Sequence
    return list_type(list_type(datasets.Value("float64")))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PCK(evaluate.Metric):
    """PCK@alpha metric; per-pair side information is passed to `compute` as keywords."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _points_feature(), "references": _points_feature()}),
            reference_urls=[url for url in (p["codebase"].split(" ")[0] for p in PROTOCOLS.values())
                            if url.startswith("https://")],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Validate shapes (naming the global pair index) before evaluate stores the batch."""
        offset = getattr(self, "_pairs_added", 0)
        if predictions is not None or references is not None:
            check_pairs(predictions, references, offset)
        super().add_batch(predictions=predictions, references=references, **kwargs)
        self._pairs_added = offset + (0 if predictions is None else len(predictions))

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one pair, validated like add_batch."""
        offset = getattr(self, "_pairs_added", 0)
        check_pairs([prediction], [reference], offset)
        super().add(prediction=prediction, reference=reference, **kwargs)
        self._pairs_added = offset + 1

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute PCK over everything added; side information goes in as keywords."""
        try:
            return super().compute(predictions=predictions, references=references, **kwargs)
        except Exception:
            self._release_cache()
            raise
        finally:
            self._pairs_added = 0

    def _release_cache(self):
        """Free the cache-file locks that evaluate frees only after a successful `_compute`;
        otherwise the next instance waits on them. The stale file is overwritten later."""
        for lock in self.filelocks or []:
            lock.release()
        self.filelocks, self.file_paths = None, None
        self.data, self.buf_writer = None, None

    def _compute(self, predictions, references, alphas=None, threshold=None, average=None,
                 comparison=None, protocol=None, benchmark=None, image_sizes=None, bboxes=None,
                 categories=None, masks=None, padding_value=None):
        return compute_pck(predictions, references, alphas=alphas, threshold=threshold,
                           average=average, comparison=comparison, protocol=protocol,
                           benchmark=benchmark, image_sizes=image_sizes, bboxes=bboxes,
                           categories=categories, masks=masks, padding_value=padding_value)

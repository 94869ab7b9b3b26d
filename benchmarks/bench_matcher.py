"""Latency and peak memory of the embedded default matcher (Hyperpixel Flow) against its backbone.

Run from the repository root::

    python benchmarks/bench_matcher.py --repeats 5

Prints markdown tables (medians over ``--repeats`` timed rounds after ``--warmup`` untimed ones):

1. per input size (320², 512²) at batch 1 (``--batches`` adds others): ``model.match`` time per
   pair, the backbone alone (``extract_hyperpixels`` on both images, a separate call in the same
   round) and their ratio (target: at most 1.3x); the split of ``match`` into backbone, fused
   matching (correlation + RHM + arg-max refinement both ways, ``model._dense_fields``) and the
   rest (keypoint transfer), measured inside the same ``match`` calls; and, for comparison, the
   unfused path (``model._match(..., fused=False)``: the full score volume, reduced once per
   direction) and the ``semantic-correspondence`` pipeline call, timed in later rounds;
2. peak resident memory of a pipeline call, each configuration in a fresh subprocess
   (``VmHWM`` of ``/proc/self/status``, the same high-water mark as ``ru_maxrss``, reset with
   ``/proc/self/clear_refs`` after the model is loaded, so the delta is what matching adds);
3. peak memory of correlation + RHM at a 768² input (96 x 96 = 9216 cells per image), each in a
   fresh subprocess: the fused path that ``match`` runs (correlation, RHM and the arg-max of both
   directions; target: at most 1 GiB) and ``model.match_scores`` (the full RHM volume, unfused).

The images are scikit-image's Middlebury stereo pair (``motorcycle_left/right``). Timings are
wall clock on whatever CPU runs this (``torch.get_num_threads()`` threads; printed). Each round
times the calls back to back, so a change of load hits the numerator and the denominator of a
ratio alike; the per-round ratios and the ratio of the fastest rounds (the least disturbed by
other processes) are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench_utils import peak_rss_bytes, reset_peak_rss, rss_bytes

SIZES = (320, 512)
BATCHES = (1,)
NUM_KEYPOINTS = 20
GIB = 1024**3
TARGET_RATIO = 1.3
TARGET_MEMORY = 1 * GIB


# ------------------------------------------------------------------------------------------ utils
def skimage_pair():
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    return (Image.open(data / "motorcycle_left.png").convert("RGB"),
            Image.open(data / "motorcycle_right.png").convert("RGB"))


def load(size: int, device: str = "cpu"):
    from semcorr.modeling import image_processor_for, load_default_model

    model = load_default_model(image_size=[size, size]).to(device)
    return model, image_processor_for(model.config)


def batch_inputs(model, processor, batch: int, device: str):
    source, target = skimage_pair()
    processed = processor.preprocess_pairs([source] * batch, [target] * batch)
    rng = np.random.default_rng(0)
    keypoints = np.stack([rng.uniform(0, source.width, NUM_KEYPOINTS), rng.uniform(0, source.height, NUM_KEYPOINTS)], 1)
    model_points = processor.keypoints_to_model(keypoints, (source.height, source.width))
    return (processed["source_pixel_values"].to(device), processed["target_pixel_values"].to(device),
            model_points.expand(batch, -1, -1).contiguous().to(device), keypoints, source, target)


# -------------------------------------------------------------------------------------- latency
class StageClock:
    """Accumulates the wall time spent inside wrapped callables, per stage name."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            output = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return output

        return wrapped


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_latency(size: int, batch: int, repeats: int, warmup: int, device: str) -> dict:
    """Per-pair seconds of one configuration.

    ``match`` and the backbone alone (``extract_hyperpixels`` on both images) are timed in the
    same rounds, in alternating order (match first in even rounds, second in odd ones), with
    nothing else in between, so that neither inherits the other's position or the page faults
    left by a large call; the unfused ``match`` and the pipeline call are timed in rounds of their
    own afterwards. The breakdown comes from inside ``model.match`` itself: ``extract_hyperpixels``
    and ``_dense_fields`` (the fused correlation -> RHM -> arg-max both ways) are wrapped on the
    instance, so backbone + fused matching + rest add up to the same call ("rest" is keypoint
    transfer and glue); that split is the one of the round with the median ``match``.
    """
    import transformers

    import semcorr.pipelines  # noqa: F401  (registers the task)

    model, processor = load(size, device)
    source_pixels, target_pixels, points, keypoints, source, target = batch_inputs(model, processor, batch, device)
    pipe = transformers.pipeline("semantic-correspondence", model=model, image_processor=processor, device=device)
    requests = [{"source_image": source, "target_image": target, "source_keypoints": keypoints.tolist()}] * batch
    both = torch.cat([source_pixels, target_pixels])
    extract = model.extract_hyperpixels

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        _sync(device)
        return time.perf_counter() - start

    clock = StageClock(device)

    def match_with_stages() -> dict:
        clock.seconds = {}
        total = timed(lambda: model.match(source_pixels, target_pixels, source_keypoints=points))
        stages = dict(clock.seconds)
        return {"match": total, "backbone": stages["backbone"], "fused": stages["fused"],
                "rest": total - stages["backbone"] - stages["fused"]}

    runs, backbone_alone = [], []
    try:
        model.extract_hyperpixels = clock.wrap("backbone", extract)
        model._dense_fields = clock.wrap("fused", model._dense_fields)
        for round_index in range(warmup + repeats):
            if round_index % 2 == 0:
                run, alone = match_with_stages(), timed(lambda: extract(both))
            else:
                alone = timed(lambda: extract(both))
                run = match_with_stages()
            if round_index >= warmup:
                runs.append(run)
                backbone_alone.append(alone)
    finally:
        del model.extract_hyperpixels, model._dense_fields
    unfused, pipeline_calls = [], []
    for round_index in range(1 + repeats):
        unfused_seconds = timed(lambda: model._match(source_pixels, target_pixels, points, fused=False))
        pipeline_seconds = timed(lambda: pipe(requests, batch_size=batch))
        if round_index >= 1:
            unfused.append(unfused_seconds)
            pipeline_calls.append(pipeline_seconds)

    median_run = sorted(runs, key=lambda run: run["match"])[len(runs) // 2]
    row = {name: seconds / batch for name, seconds in median_run.items()}
    row["match"] = statistics.median(run["match"] for run in runs) / batch
    row["backbone_alone"] = statistics.median(backbone_alone) / batch
    row["unfused"] = statistics.median(unfused) / batch
    row["pipeline"] = statistics.median(pipeline_calls) / batch
    row["round_ratios"] = [run["match"] / alone for run, alone in zip(runs, backbone_alone)]
    # The fastest round of each is the one least disturbed by other processes.
    row["fastest_ratio"] = min(run["match"] for run in runs) / min(backbone_alone)
    cells = (size // model.config.feature_stride) ** 2
    row.update(size=size, batch=batch, cells=cells)
    return row


# --------------------------------------------------------------------------------------- memory
def child_pipeline_memory(size: int, batch: int) -> dict:
    """In a fresh process: peak RSS of pipeline calls on the CPU."""
    import transformers

    import semcorr.pipelines  # noqa: F401

    model, processor = load(size)
    _, _, _, keypoints, source, target = batch_inputs(model, processor, 1, "cpu")
    pipe = transformers.pipeline("semantic-correspondence", model=model, image_processor=processor)
    requests = [{"source_image": source, "target_image": target, "source_keypoints": keypoints.tolist()}] * batch
    baseline = rss_bytes()
    was_reset = reset_peak_rss()
    for _ in range(2):
        pipe(requests, batch_size=batch)
    peak = peak_rss_bytes()
    return {"size": size, "batch": batch, "baseline": baseline, "peak": peak, "delta": peak - baseline,
            "reset": was_reset}


def child_correlation_memory(size: int, fused: bool) -> dict:
    """In a fresh process: peak RSS added by correlation + RHM at ``size``².

    ``fused``: ``model._dense_fields``, what ``match`` runs (correlation, RHM and the arg-max
    refinement of both directions); otherwise ``model.match_scores`` (the full RHM volume).
    """
    model, processor = load(size)
    source, target = skimage_pair()
    processed = processor.preprocess_pairs([source], [target])
    with torch.no_grad():
        source_features, target_features = model._features(processed["source_pixel_values"], processed["target_pixel_values"])
    image_size = (size, size)
    compute = model._dense_fields if fused else model.match_scores
    baseline = rss_bytes()
    was_reset = reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        compute(source_features, target_features, image_size, image_size)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    cells = source_features.shape[-2] * source_features.shape[-1]
    return {"size": size, "cells": cells, "volume_bytes": cells * cells * source_features.element_size(),
            "baseline": baseline, "peak": peak, "delta": peak - baseline, "seconds": seconds, "reset": was_reset}


def run_child(*args: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", *args]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- main
def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (median; default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="input sides (default 320 512)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device for the latency table (memory runs on the CPU)")
    parser.add_argument("--correlation-size", type=int, default=768, help="input side of the memory check (default 768)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind, *values = args.child
        if kind == "pipeline":
            result = child_pipeline_memory(int(values[0]), int(values[1]))
        else:
            result = child_correlation_memory(int(values[0]), fused=kind == "fused")
        print(json.dumps(result))
        return

    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} rounds after {args.warmup} warm-up rounds; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    if not args.skip_latency:
        print_latency(args)
    if not args.skip_memory:
        print_memory(args)


def print_latency(args) -> None:
    print("### `match` against the backbone alone (ms per pair)\n")
    print(f"| input | batch | cells/image | `match` | backbone alone | `match` / backbone alone (target ≤ {TARGET_RATIO}x) "
          "| per-round ratios | fastest / fastest | in `match`: backbone | fused matching | rest | unfused `match` "
          "| pipeline call |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        for batch in args.batches:
            row = measure_latency(size, batch, args.repeats, args.warmup, args.device)
            ratio = row["match"] / row["backbone_alone"]
            verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
            share = {k: 100 * row[k] / (row["backbone"] + row["fused"] + row["rest"]) for k in ("backbone", "fused", "rest")}
            rounds = ", ".join(f"{value:.2f}" for value in row["round_ratios"])
            print(f"| {size}² | {batch} | {row['cells']} | {ms(row['match'])} | {ms(row['backbone_alone'])} | "
                  f"**{ratio:.2f}x** ({verdict}) | {rounds} | {row['fastest_ratio']:.2f}x | "
                  f"{ms(row['backbone'])} ({share['backbone']:.0f}%) | "
                  f"{ms(row['fused'])} ({share['fused']:.0f}%) | {ms(row['rest'])} ({share['rest']:.0f}%) | "
                  f"{ms(row['unfused'])} | {ms(row['pipeline'])} |", flush=True)
    print(f"\nload average after the latency table: {os.getloadavg()[0]:.2f} (other processes share the CPU)\n")


def print_memory(args) -> None:
    print("### Peak resident memory of a pipeline call (fresh process per row, CPU)\n")
    print("| input | batch | RSS after loading (MiB) | peak RSS (MiB) | added by matching (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for size in args.sizes:
        for batch in args.batches:
            row = run_child("pipeline", str(size), str(batch))
            note = "" if row["reset"] else " (high-water mark not reset: includes loading)"
            print(f"| {size}² | {batch} | {mib(row['baseline'])} | {mib(row['peak'])} | {mib(row['delta'])}{note} |", flush=True)
    size = args.correlation_size
    print(f"\n### Correlation + RHM at {size}² (fresh process per row, CPU, batch 1)\n")
    print(f"| path | cells/image | score volume (MiB) | time (s) | RSS before (MiB) | peak RSS (MiB) | added (MiB) "
          f"| target ≤ {mib(TARGET_MEMORY)} MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for kind, label in (("fused", "fused, as in `match` (+ arg-max both ways)"), ("scores", "`match_scores` (full volume)")):
        row = run_child(kind, str(size))
        verdict = ("meets" if row["delta"] <= TARGET_MEMORY else "EXCEEDS") if kind == "fused" else "(reference)"
        note = "" if row["reset"] else " (high-water mark not reset)"
        print(f"| {label} | {row['cells']} | {mib(row['volume_bytes'])} | {row['seconds']:.2f} | {mib(row['baseline'])} | "
              f"{mib(row['peak'])} | {mib(row['delta'])}{note} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()

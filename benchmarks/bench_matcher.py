"""Latency, time breakdown and peak memory of the embedded default matcher (Hyperpixel Flow).

Run from the repository root::

    python benchmarks/bench_matcher.py --repeats 5

Prints markdown tables (medians over ``--repeats`` timed runs after ``--warmup`` untimed ones):

1. per input size (320², 512²) and batch (1, 8): ``model.match`` time per pair, its split into
   backbone (``extract_hyperpixels`` on both images), correlation (``dense_cosine_correlation``,
   clamp, power), RHM (``regularized_hough_matching``) and the rest (arg-max refinement both
   ways, keypoint transfer), measured inside the same ``match`` calls; and the whole
   ``semantic-correspondence`` pipeline call (image resizing and keypoint mapping included)
   against the backbone alone (target: at most 2x);
2. peak resident memory of a pipeline call, each configuration in a fresh subprocess
   (``VmHWM`` of ``/proc/self/status``, the same high-water mark as ``ru_maxrss``, reset with
   ``/proc/self/clear_refs`` after the model is loaded, so the delta is what matching adds);
3. peak memory of the dense correlation + RHM at a 768² input (96 x 96 = 9216 cells per image),
   also in a fresh subprocess (target: at most 2 GiB).

The images are scikit-image's Middlebury stereo pair (``motorcycle_left/right``). Timings are
wall clock on whatever CPU runs this (``torch.get_num_threads()`` threads; printed).
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
BATCHES = (1, 8)
NUM_KEYPOINTS = 20
GIB = 1024**3


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

    The breakdown comes from inside ``model.match`` itself: ``extract_hyperpixels`` and
    ``match_scores`` are wrapped on the instance and ``regularized_hough_matching`` in the model's
    module, so backbone + correlation + RHM + rest add up to the same call. "correlation" is
    ``match_scores`` minus RHM (cosine correlation, clamp, power); "rest" is the arg-max
    refinement both ways and the keypoint transfer. The row is the run with the median total.
    The pipeline call and the backbone alone (``extract_hyperpixels`` on both images) are timed as
    separate calls in the same rounds (medians).
    """
    import transformers

    import semcorr.pipelines  # noqa: F401  (registers the task)
    from semcorr.modeling import modeling_hyperpixel

    model, processor = load(size, device)
    source_pixels, target_pixels, points, keypoints, source, target = batch_inputs(model, processor, batch, device)
    pipe = transformers.pipeline("semantic-correspondence", model=model, image_processor=processor, device=device)
    requests = [{"source_image": source, "target_image": target, "source_keypoints": keypoints.tolist()}] * batch
    both = torch.cat([source_pixels, target_pixels])
    extract = model.extract_hyperpixels

    clock = StageClock(device)
    original_rhm = modeling_hyperpixel.regularized_hough_matching
    runs, backbone_alone, pipeline_calls = [], [], []
    try:
        model.extract_hyperpixels = clock.wrap("backbone", extract)
        model.match_scores = clock.wrap("scores", model.match_scores)
        modeling_hyperpixel.regularized_hough_matching = clock.wrap("rhm", original_rhm)
        for round_index in range(warmup + repeats):
            clock.seconds = {}
            _sync(device)
            start = time.perf_counter()
            model.match(source_pixels, target_pixels, source_keypoints=points)
            _sync(device)
            total = time.perf_counter() - start
            stages = dict(clock.seconds)

            start = time.perf_counter()
            with torch.no_grad():
                extract(both)
            _sync(device)
            alone = time.perf_counter() - start

            start = time.perf_counter()
            pipe(requests, batch_size=batch)
            _sync(device)
            pipeline_seconds = time.perf_counter() - start
            if round_index >= warmup:
                runs.append({
                    "match": total, "backbone": stages["backbone"], "rhm": stages["rhm"],
                    "correlation": stages["scores"] - stages["rhm"],
                    "rest": total - stages["backbone"] - stages["scores"],
                })
                backbone_alone.append(alone)
                pipeline_calls.append(pipeline_seconds)
    finally:
        modeling_hyperpixel.regularized_hough_matching = original_rhm
        del model.extract_hyperpixels, model.match_scores
    median_run = sorted(runs, key=lambda run: run["match"])[len(runs) // 2]
    row = {name: seconds / batch for name, seconds in median_run.items()}
    row["backbone_alone"] = statistics.median(backbone_alone) / batch
    row["pipeline"] = statistics.median(pipeline_calls) / batch
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


def child_correlation_memory(size: int) -> dict:
    """In a fresh process: peak RSS added by correlation + RHM (``model.match_scores``) at ``size``²."""
    model, processor = load(size)
    source, target = skimage_pair()
    processed = processor.preprocess_pairs([source], [target])
    with torch.no_grad():
        source_features, target_features = model._features(processed["source_pixel_values"], processed["target_pixel_values"])
    image_size = (size, size)
    baseline = rss_bytes()
    was_reset = reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        scores = model.match_scores(source_features, target_features, image_size, image_size)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    cells = source_features.shape[-2] * source_features.shape[-1]
    return {"size": size, "cells": cells, "scores_bytes": scores.numel() * scores.element_size(), "baseline": baseline,
            "peak": peak, "delta": peak - baseline, "seconds": seconds, "reset": was_reset}


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
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="input sides (default 320 512)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes (default 1 8)")
    parser.add_argument("--device", default="cpu", help="torch device for the latency table (memory runs on the CPU)")
    parser.add_argument("--correlation-size", type=int, default=768, help="input side of the memory check (default 768)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind, *values = args.child
        result = (child_pipeline_memory(int(values[0]), int(values[1])) if kind == "pipeline"
                  else child_correlation_memory(int(values[0])))
        print(json.dumps(result))
        return

    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} runs after {args.warmup} warm-up runs; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    print("### Latency per pair (ms)\n")
    print("| input | batch | cells/image | `match` | backbone | correlation | RHM | rest | backbone alone | pipeline call "
          "| pipeline / backbone alone |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        for batch in args.batches:
            row = measure_latency(size, batch, args.repeats, args.warmup, args.device)
            share = {k: 100 * row[k] / row["match"] for k in ("backbone", "correlation", "rhm", "rest")}
            print(f"| {size}² | {batch} | {row['cells']} | {ms(row['match'])} | {ms(row['backbone'])} ({share['backbone']:.0f}%) | "
                  f"{ms(row['correlation'])} ({share['correlation']:.0f}%) | {ms(row['rhm'])} ({share['rhm']:.0f}%) | "
                  f"{ms(row['rest'])} ({share['rest']:.0f}%) | {ms(row['backbone_alone'])} | {ms(row['pipeline'])} | "
                  f"{row['pipeline'] / row['backbone_alone']:.2f}x |",
                  flush=True)
    print(f"\nload average after the latency table: {os.getloadavg()[0]:.2f} (other processes share the CPU)")
    if args.skip_memory:
        return
    print("\n### Peak resident memory of a pipeline call (fresh process per row, CPU)\n")
    print("| input | batch | RSS after loading (MiB) | peak RSS (MiB) | added by matching (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for size in args.sizes:
        for batch in args.batches:
            row = run_child("pipeline", str(size), str(batch))
            note = "" if row["reset"] else " (high-water mark not reset: includes loading)"
            print(f"| {size}² | {batch} | {mib(row['baseline'])} | {mib(row['peak'])} | {mib(row['delta'])}{note} |", flush=True)
    size = args.correlation_size
    row = run_child("correlation", str(size))
    verdict = "meets" if row["delta"] <= 2 * GIB else "EXCEEDS"
    print(f"\n### Dense correlation + RHM at {size}² (fresh process, CPU, batch 1)\n")
    print("| input | cells/image | score volume (MiB) | time (s) | RSS before (MiB) | peak RSS (MiB) | added (MiB) | target ≤ 2048 MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {size}² | {row['cells']} | {mib(row['scores_bytes'])} | {row['seconds']:.2f} | {mib(row['baseline'])} | "
          f"{mib(row['peak'])} | {mib(row['delta'])} | {verdict} |")


if __name__ == "__main__":
    main()

"""SC-ImageNet labelling: pairs/s per process at 512², 1 -> 2 process scaling, peak memory, FLOPs per pair.

Run from the repository root::

    python benchmarks/bench_sc_imagenet.py                       # both generators, 1 and 2 processes
    python benchmarks/bench_sc_imagenet.py --cases embedded --pairs 3 --num-thirds 2

What is timed is the labelling stage's unit of work, :meth:`semcorr.training.label_sc_imagenet.LabelTask.label_pair`
(read the two images and the third images, ``pseudo_label`` with 32 pairs, the close-loop check
through ``--num-thirds`` third images in chunks of 16, conversion to original pixels), on an
ImageNet-layout folder of scikit-image photos (their own sizes, 300 x 451 to 512 x 512; every class has
``--num-thirds`` + 2 images or more). Two generators with the MVAM sizes of
``training/configs/cascaded_mil_imagenet.yaml`` (the published setting: 512², 128-channel volume tokens,
4^4 windows, fold 2, saliency ``auto``):

* ``embedded``: the embedded ImageNet EfficientNet-Lite0 (levels 3 + 4, stride 16: a 32 x 32 grid);
* ``vit-b16``: ``vit_base_patch16_224`` at 512² with **random weights** (``backbone_weights=None``: no
  Hub access; times do not depend on the weights), its last block (a 32 x 32 token grid).

Each case runs in fresh worker processes (1 thread each): one worker alone, then two at once on
disjoint pairs -- what ``run_sharded`` does with 2 processes (they share nothing but the disk). A
worker times ``--pairs`` pairs after one untimed warm-up pair, plus ``match`` and ``pseudo_label``
alone (median of 3), and reports its peak resident memory (``VmHWM``). The FLOPs of one ``match``
and one ``pseudo_label`` are counted with ``torch.utils.flop_counter`` (matmuls and convolutions).

A pair costs ``pseudo_label + (2 K + ceil(K / 16)) match`` (K third images: source -> third and
third -> target per third, target -> source once per chunk of 16), so the rate at the paper's K =
100 is extrapolated from the measured ``match`` time: the benchmark measures at a small K to stay
short on this CPU and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_utils import median_time, peak_rss_bytes

CASES = ("embedded", "vit-b16")
STAGE = dict(num_attention_heads=8, volume_embed_dim=128, volume_depth=2, volume_heads=4, volume_window=4, volume_fold=2)
COMMON = dict(image_size=[512, 512], image_stage=STAGE, region_stage=STAGE, pixel_stage=STAGE, saliency="auto",
              num_suspects=16, region_window=5, region_image_size=160, num_region_pairs=16, num_pseudo_pairs=32)
BACKBONES = {
    "embedded": dict(backbone="tf_efficientnet_lite0", backbone_weights="embedded", backbone_layers=[3, 4]),
    "vit-b16": dict(backbone="vit_base_patch16_224", backbone_weights=None, backbone_layers=[11]),
}
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "camera.png", "coins.png")
FULL_PAIRS = 189_729  # 379,458 single-instance images of the paper, each in one pair
PAPER_K = 100


def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


# -- setup (main process) ---------------------------------------------------------------------------------
def write_folder(root: Path, per_class: int) -> Path:
    """Two classes of ``per_class`` images each: the photos, flipped and rotated copies (original sizes)."""
    from PIL import Image

    from semcorr.hub_datasets.skimage_pairs import skimage_data_dir

    for index, name in enumerate(PHOTOS):
        image = Image.open(skimage_data_dir() / name).convert("RGB")
        if max(image.size) > 512:
            image.thumbnail((512, 512))
        folder = root / f"n0000000{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(-(-per_class * 2 // len(PHOTOS))):
            variant = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if copy % 2 else image
            variant.rotate(7 * copy, expand=False).save(folder / f"{Path(name).stem}_{copy}.JPEG", quality=90)
    return root


def save_generator(case: str, folder: Path) -> Path:
    from semcorr.modeling import image_processor_for
    from semcorr.training.train_cascaded_mil import build_model

    model = build_model({**BACKBONES[case], **COMMON}, seed=0).eval()
    model.save_pretrained(folder)
    image_processor_for(model.config).save_pretrained(folder)
    return folder


# -- a worker ------------------------------------------------------------------------------------------------
def worker(args) -> dict:
    """Time ``label_pair`` on pairs ``rank, rank + world, ...`` of the folder's pairs (after a warm-up pair)."""
    from accelerate import Accelerator

    from semcorr.training.label_sc_imagenet import ImageNetImages, LabelTask, SCImageNetConfig

    torch.set_num_threads(1)
    config = SCImageNetConfig.load(None, {"data.images": args.images, "data.drop_classes": "none",
                                          "data.detector": "none", "labels.generator": args.generator,
                                          "labels.num_thirds": args.num_thirds, "run.output_dir": args.scratch})
    images = ImageNetImages(config.data)
    screened = []
    for item, index in enumerate(images.screen_items):
        image = images.read(index)
        screened.append({"item": item, "image": index, "path": images.relative_path(index), "status": "ok",
                         "size": [image.height, image.width], "bbox": [0, 0, image.width, image.height]})
    task = LabelTask(config, images, screened, {"config": {}, "shards": []})
    task.setup(Accelerator(cpu=True))
    mine = list(range(args.rank, len(task.pairs), args.world))[: args.pairs + 1]
    task.label_pair(mine[0])  # warm-up: allocator, first-call costs
    times = []
    for pair in mine[1:]:
        start = time.perf_counter()
        task.label_pair(pair)
        times.append(time.perf_counter() - start)
    source = task._pixels([0])
    target = task._pixels([1])
    match = median_time(lambda: task.model.match(source, target), 3, warmup=0)
    pseudo = median_time(lambda: task.model.pseudo_label(source, target, 32), 3, warmup=0)
    return {"rank": args.rank, "pair_seconds": times, "match_seconds": match, "pseudo_label_seconds": pseudo,
            "peak_rss": peak_rss_bytes()}


def flops(generator: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from semcorr.modeling import load_matcher

    model, _, _ = load_matcher(str(generator), device="cpu")
    pixels = torch.randn(1, 3, *model.config.image_size)
    counts = {}
    for name, call in (("match", lambda: model.match(pixels, pixels)),
                       ("pseudo_label", lambda: model.pseudo_label(pixels, pixels, 32))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            call()
        counts[name] = counter.get_total_flops()
    return counts


def run_workers(case: str, world: int, args, generator: Path, images: Path, scratch: Path) -> list[dict]:
    command = [sys.executable, __file__, "--worker", "--images", str(images), "--generator", str(generator),
               "--num-thirds", str(args.num_thirds), "--pairs", str(args.pairs), "--world", str(world),
               "--scratch", str(scratch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([*command, "--rank", str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for rank in range(world)]
    results = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode:
            raise RuntimeError(f"{case} worker failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--pairs", type=int, default=2, help="timed pairs per worker (after one warm-up pair)")
    parser.add_argument("--num-thirds", type=int, default=2, help="K of the close-loop check (the paper: 100)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--images", "--generator", "--scratch"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-sc-imagenet-"))
    per_class = max(args.num_thirds + 3, 2 * math.ceil(max(args.processes) * (args.pairs + 1) / 2))  # 2 classes
    images = write_folder(work / "imagenet", per_class)
    print(f"load average {load_average()}; {torch.__version__}; K = {args.num_thirds} third images, "
          f"{args.pairs} timed pairs per worker after 1 warm-up, 1 thread per worker, 512² input\n")
    rows = []
    for case in args.cases:
        generator = save_generator(case, work / f"generator-{case}")
        counted = flops(generator)
        for world in args.processes:
            results = run_workers(case, world, args, generator, images, work / "scratch")
            pair = statistics.median(t for r in results for t in r["pair_seconds"])
            match = statistics.median(r["match_seconds"] for r in results)
            pseudo = statistics.median(r["pseudo_label_seconds"] for r in results)
            matches_at = lambda k: 2 * k + math.ceil(k / 16)
            at_paper = pseudo + matches_at(PAPER_K) * match
            rows.append({"case": case, "processes": world, "pair_s": pair, "pairs_per_s_process": 1 / pair,
                         "pairs_per_s_total": world / pair, "match_s": match, "pseudo_label_s": pseudo,
                         "pair_s_at_k100": at_paper, "peak_rss_gib": max(r["peak_rss"] for r in results) / 2**30,
                         "match_gflop": counted["match"] / 1e9, "pseudo_label_gflop": counted["pseudo_label"] / 1e9,
                         "pair_tflop_at_k100": (counted["pseudo_label"] + matches_at(PAPER_K) * counted["match"]) / 1e12,
                         "load_average": load_average()})
            print(json.dumps(rows[-1]), flush=True)

    print("\n| generator | processes | s / pair (K = %d) | pairs/s per process | pairs/s total | `match` s | "
          "`pseudo_label` s | s / pair at K = 100 (extrapolated) | peak RSS / process | GFLOP `match` | TFLOP / pair at K = 100 |"
          % args.num_thirds)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['case']} | {row['processes']} | {row['pair_s']:.1f} | {row['pairs_per_s_process']:.3f} | "
              f"{row['pairs_per_s_total']:.3f} | {row['match_s']:.2f} | {row['pseudo_label_s']:.2f} | "
              f"{row['pair_s_at_k100']:.0f} | {row['peak_rss_gib']:.2f} GiB | {row['match_gflop']:.0f} | "
              f"{row['pair_tflop_at_k100']:.1f} |")
    for case in args.cases:
        one = next(r for r in rows if r["case"] == case and r["processes"] == 1)
        for row in (r for r in rows if r["case"] == case and r["processes"] > 1):
            print(f"{case}: {row['processes']} processes give {row['pairs_per_s_total'] / one['pairs_per_s_total']:.2f}x "
                  f"the pairs/s of 1 (per-process rate {row['pairs_per_s_process'] / one['pairs_per_s_process']:.2f}x)")
        print(f"{case}: full run ({FULL_PAIRS:,} pairs, K = {PAPER_K}) = {FULL_PAIRS * one['pair_s_at_k100'] / 3600:,.0f} "
              f"CPU-core-hours at this rate; {FULL_PAIRS * one['pair_tflop_at_k100']:,.0f} TFLOP in all")
    print(f"\nload average at the end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cascaded MIL generator: the paper's ablations on the CPU setting, and speed / memory at 512².

Ablations (``--ablations``): every row of the paper's Tables 4 and 5 (Huang et al., ICCV 2023) as a
config switch, each trained with ``cascaded_mil_cpu_tiny.yaml`` on the warped scikit-image classes
and measured on pairs of two warps of each held-out photo (PCK of the pseudo labels against the
true warp, the image-level AP margin between positive and negative pairs, and the close-loop
Spearman per label and per pair), printed beside the paper's PF-PASCAL numbers. The CPU setting is a toy: the paper trained on 379k ImageNet images; what it
measures is whether each switch works and what it costs here, not the paper's effect sizes. The
paper's input sizes 256 / 384 / 512 map to 128 / 160 / 192 here (the same ratios).

Speed (``--speed``): training samples/s (one forward + backward of a batch of 2 pairs) and
``match`` ms per pair at 512² for the embedded EfficientNet-Lite0 and a ViT-B/16 (random
weights), and the peak memory of one stage's 4D volume and its aggregation at several grids,
with the bound it follows.

Usage::

    python benchmarks/bench_cascaded_mil.py --ablations [--epochs 6] [--work-dir /tmp/mil-ablations] [--rows untrained full]
    python benchmarks/bench_cascaded_mil.py --speed [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

#: Paper, Tables 4 and 5: PF-PASCAL PCK@0.05 / @0.1 (the full model also PF-WILLOW 57.6 / 85.3).
PAPER = {
    "full": (56.8, 81.5), "w/o saliency": (55.9, 80.7), "w/o RHM": (55.6, 79.1), "L = 3": (56.0, 80.8),
    "L = 7": (56.2, 81.1), "shared attention": (52.6, 74.7), "input 256 (128 here)": (53.2, 79.4),
    "input 384 (160 here)": (54.3, 80.2), "w/o stage 3": (56.1, 80.5), "w/o stages 2-3": (51.0, 77.4),
}
SWITCHES = {
    "full": {}, "w/o saliency": {"model.saliency": "none"}, "w/o RHM": {"model.use_rhm": False},
    "L = 3": {"model.hough_kernel_size": 3}, "L = 7": {"model.hough_kernel_size": 7},
    "shared attention": {"model.share_attention": True},
    "input 256 (128 here)": {"model.image_size": [128, 128]}, "input 384 (160 here)": {"model.image_size": [160, 160]},
    "w/o stage 3": {"model.use_pixel_stage": False},
    "w/o stages 2-3": {"model.use_pixel_stage": False, "model.use_region_stage": False},
}


#: Held-out pairs per photo: two random warps of it each (every leg of a close loop equally hard).
PER_PHOTO = 8


def ablation_row(name: str, classes: Path, work_dir: Path, epochs: int) -> dict:
    """Train one switch of the tiny config (``untrained``: none) and measure it on the held-out warps."""
    from transformers import AutoModel

    from semcorr.evaluation.pseudo_labels import consistency_ranking, image_level_scores, label_accuracy, warped_pairs
    from semcorr.hub_datasets.skimage_pairs import MIL_HELD_OUT_PHOTOS
    from semcorr.training import train_cascaded_mil as tm

    output = work_dir / name.replace(" ", "_").replace("/", "")
    overrides = {"data.images": str(classes), "run.output_dir": str(output), "run.log_with": [], "optim.epochs": epochs,
                 "run.save_every_steps": 0, **SWITCHES.get(name, {})}
    config = tm.CascadedMILTrainConfig.load("cascaded_mil_cpu_tiny.yaml", overrides)
    started = time.perf_counter()
    if name == "untrained":
        model = tm.build_model(config.model, config.optim.seed).eval()
    else:
        if not (output / "final").is_dir():
            tm.train(config)
        model = AutoModel.from_pretrained(output / "final").eval()
    seconds = time.perf_counter() - started
    pairs = warped_pairs(model, MIL_HELD_OUT_PHOTOS, per_photo=PER_PHOTO, both_warped=True)
    stage = model.config.enabled_stages[-1]
    accuracy = label_accuracy(model, pairs, stage, num_pairs=16)
    image = accuracy if stage == "image" else label_accuracy(model, pairs, "image", num_pairs=16)
    ranking = consistency_ranking(model, pairs, num_thirds=3, num_pairs=16)
    return {"pck@0.05": accuracy["pck@0.05"], "pck@0.1": accuracy["pck@0.1"], "image pck@0.05": image["pck@0.05"],
            "image pck@0.1": image["pck@0.1"], "margin": image_level_scores(model, pairs)["margin"],
            "spearman": ranking["spearman"], "pair_spearman": ranking["pair_spearman"], "train_seconds": seconds,
            "labels_from": stage}


def run_ablations(work_dir: Path, epochs: int, names=None) -> None:
    from semcorr.hub_datasets.skimage_pairs import write_warped_classes

    classes = work_dir / "classes"
    if not classes.is_dir():
        write_warped_classes(classes, members=8)
    rows = {}
    for name in names or ["untrained", *SWITCHES]:
        rows[name] = ablation_row(name, classes, work_dir, epochs)
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    print(f"\nCPU setting: {epochs} epochs of cascaded_mil_cpu_tiny.yaml; held out: {PER_PHOTO} pairs of two warps of "
          "each of chelsea, coffee, motorcycle; 16 labels per pair; close loops through 3 other warps\n")
    print("| setting | paper PF-PASCAL PCK@0.05 / @0.1 | labels PCK@0.05 | labels PCK@0.1 | labels from | image-stage picks "
          "PCK@0.05 / @0.1 | AP margin | close-loop Spearman, labels / pairs | train s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        paper = " / ".join(str(value) for value in PAPER[name]) if name in PAPER else ""
        print(f"| {name} | {paper} | {100 * row['pck@0.05']:.1f} | {100 * row['pck@0.1']:.1f} | {row['labels_from']} stage | "
              f"{100 * row['image pck@0.05']:.1f} / {100 * row['image pck@0.1']:.1f} | {row['margin']:.3f} | "
              f"{row['spearman']:.2f} / {row['pair_spearman']:.2f} | {row['train_seconds']:.0f} |")
    (work_dir / "ablations.json").write_text(json.dumps(rows, indent=2))


# -- speed and memory ----------------------------------------------------------------------------------
def speed_model(backbone: str):
    from semcorr.modeling import CascadedMILConfig, CascadedMILModel

    layers = [11] if backbone.startswith("vit") else [3, 4]
    stage = {"volume_embed_dim": 32, "volume_depth": 2, "volume_heads": 4, "volume_window": 4, "volume_fold": 2}
    config = CascadedMILConfig(backbone=backbone, backbone_layers=layers, backbone_weights=None, image_size=[512, 512],
                               image_stage=stage, region_stage=stage, pixel_stage=stage, saliency="none")
    torch.manual_seed(0)
    return CascadedMILModel(config)


def measure_speed(backbone: str, repeats: int) -> dict:
    model = speed_model(backbone)
    source, target = torch.randn(2, 3, 512, 512), torch.randn(2, 3, 512, 512)
    model.train()
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model(source, target, class_ids=torch.arange(2)).loss.backward()
        times.append(time.perf_counter() - started)
    train = sorted(times[1:])[len(times[1:]) // 2]
    model.eval()
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model.match(source[:1], target[:1])
        times.append(time.perf_counter() - started)
    match = sorted(times[1:])[len(times[1:]) // 2]
    return {"samples_per_second": 2 / train, "match_ms": 1000 * match}


def volume_memory_child(side: int, fold: int) -> None:
    """In a fresh process: the peak resident memory added by one stage's volume + aggregation at ``side``²."""
    from semcorr.modeling.cascaded_mil.gated_attention import MatchingVolumeAggregation

    torch.manual_seed(0)
    module = MatchingVolumeAggregation(768, 8, embed_dim=128, depth=2, volume_heads=4, window=4, fold=fold).eval()
    tokens = torch.randn(1, side * side, 768)
    global_token = torch.randn(1, 768)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_utils import peak_rss_bytes, reset_peak_rss, rss_bytes

    reset_peak_rss()  # the imports' own peak would hide a smaller one
    before = rss_bytes()
    with torch.no_grad():
        module(tokens, tokens, global_token, global_token, (side, side), (side, side))
    print(json.dumps({"added_mib": (peak_rss_bytes() - before) / 2**20}))


def run_speed(repeats: int) -> None:
    print("| backbone (random weights), 512² | training samples/s (batch 2) | match ms / pair |")
    print("|---|---:|---:|")
    for backbone in ("tf_efficientnet_lite0", "vit_base_patch16_224"):
        row = measure_speed(backbone, repeats)
        print(f"| {backbone} | {row['samples_per_second']:.2f} | {row['match_ms']:.0f} |")
    print("\nOne stage (MVAM, 128-channel volume tokens, window 4) at grid side g: the volume has g^4 cells "
          "and the folded one (g/f)^4 tokens of 128 channels; fresh process per row.\n")
    print("| grid (input at stride 16) | fold | volume cells | added peak RSS (MiB) |")
    print("|---|---:|---:|---:|")
    for side, fold in ((16, 2), (24, 2), (32, 2), (32, 4), (48, 2)):
        result = subprocess.run([sys.executable, __file__, "--memory-child", str(side), str(fold)],
                                capture_output=True, text=True, check=True)
        added = json.loads(result.stdout.strip().splitlines()[-1])["added_mib"]
        print(f"| {side}² ({16 * side}²) | {fold} | {side ** 4:,} | {added:.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rows", nargs="+", help="only these rows of --ablations (e.g. untrained full 'w/o stages 2-3')")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        volume_memory_child(*args.memory_child)
        return 0
    if not (args.ablations or args.speed):
        parser.error("give --ablations and/or --speed")
    if args.ablations:
        unknown = set(args.rows or []) - {"untrained", *SWITCHES}
        if unknown:
            parser.error(f"unknown --rows {sorted(unknown)}; choose from untrained, {', '.join(SWITCHES)}")
        run_ablations(Path(args.work_dir or tempfile.mkdtemp(prefix="mil-ablations-")), args.epochs, args.rows)
    if args.speed:
        run_speed(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

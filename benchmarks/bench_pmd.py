"""PMD teacher and student: inference latency, training throughput, peak memory, official code.

Run from the repository root::

    python benchmarks/bench_pmd.py --repeats 5
    python benchmarks/bench_pmd.py --official-dir /path/to/PMD --repeats 5   # + the official PMDNet

Prints markdown tables (medians over ``--repeats`` timed runs after ``--warmup`` untimed ones):

1. ``match`` time per pair (batch 1) of the teacher (mean gate) and the student at ``--size``²
   (default 320²), with the embedded EfficientNet-Lite0 backbone (levels 2 + 3, as in
   ``training/configs/pmd_cpu_tiny.yaml``) and with ResNet-101 (layer3 + layer4, the published
   configuration, **random weights**: no Hub access is assumed; timing does not depend on them);
2. training samples/s: a teacher step (synthetic affine pairs: forward with
   ``grid_trg_to_src`` / ``valid_trg``, backward, Adam step) and a student distillation step
   (forward with 4 hypotheses each way and the PSR prior, backward, Adam step), batch
   ``--batch-size``;
3. peak memory, each case in a fresh subprocess: the resident set's high-water mark
   (``VmHWM`` of ``/proc/self/status``) reset with ``/proc/self/clear_refs`` once the model and
   inputs exist, so "added" is what two ``match`` calls / two training steps add on top of the
   loaded model (activations, autograd buffers, Adam state, allocator slack);
4. with ``--official-dir`` (a checkout of https://github.com/fanyang587/PMD, never vendored here):
   the official ``PMDNet`` (``model_noise.py``) with random weights (torchvision ResNet-101 and
   heads whose batch-norm statistics are randomised), its heads saved in the official key layout
   and its backbone as safetensors, both converted with
   ``semcorr.modeling.pmd.convert_pmd_original_checkpoint.build_pmd_student``; then the grids of both
   on the same 320² pair (max abs difference; cells whose correlation arg-max is a near tie
   are counted apart, since any float32 rounding may pick the other cell there) and the time per
   pair of each, official ``net(src, tgt, train=False)`` (as ``eval_pascal.py`` calls it) and
   semcorr's ``student.match``, timed alternately (target: semcorr ≤ 0.8x the official time).

The pair is scikit-image's Middlebury stereo pair (``motorcycle_left/right``) resized to the input
size. Timings are wall clock on the CPU with ``torch.get_num_threads()`` threads (``--threads``);
the load average is printed before and after each table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from bench_utils import median_time, peak_rss_bytes, reset_peak_rss, rss_bytes

NUM_HYPOTHESES = 4
CASES = ("embedded", "resnet101")
MODELS = ("teacher", "student")
#: Embedded EfficientNet-Lite0, the levels of training/configs/pmd_cpu_tiny.yaml.
EMBEDDED_FIELDS = dict(backbone="tf_efficientnet_lite0", backbone_weights="embedded", backbone_layers=[2, 3],
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


# ------------------------------------------------------------------------------------------ utils
def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def model_fields(case: str, size: int) -> dict:
    from semcorr.modeling.pmd.convert_pmd_original_checkpoint import PUBLISHED_CONFIG

    if case == "embedded":
        fields = dict(EMBEDDED_FIELDS)
    elif case == "resnet101":
        fields = {**PUBLISHED_CONFIG, "backbone_weights": None}  # published heads, random ResNet-101
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    return {**fields, "image_size": [size, size]}


def build(kind: str, case: str, size: int, seed: int = 0):
    from semcorr.modeling import (PMDStudentConfig, PMDStudentModel, PMDTeacherConfig, PMDTeacherModel,
                                  load_backbone_weights)

    config_class, model_class = (PMDTeacherConfig, PMDTeacherModel) if kind == "teacher" else (PMDStudentConfig, PMDStudentModel)
    config = config_class(**model_fields(case, size))
    torch.manual_seed(seed)
    model = model_class(config)
    if config.backbone_weights:
        load_backbone_weights(model.backbone, config.backbone_weights)
    return model.eval()


def skimage_pair(size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """The Middlebury motorcycle pair resized to ``size``², normalised: two ``(1, 3, size, size)``."""
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    tensors = []
    for name in ("motorcycle_left.png", "motorcycle_right.png"):
        image = Image.open(data / name).convert("RGB").resize((size, size), Image.BILINEAR)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        tensors.append(((array - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None])
    return tensors[0], tensors[1]


def training_step_fn(model, kind: str, source: torch.Tensor, batch_size: int, seed: int = 0):
    """A closure running one training step (forward, backward, Adam step) on synthetic supervision."""
    from semcorr.training.data.synthetic import affine_grid_trg_to_src, random_affine, warp_images

    generator = torch.Generator().manual_seed(seed)
    size = tuple(source.shape[-2:])
    images = source.expand(batch_size, -1, -1, -1).contiguous()
    grid = affine_grid_trg_to_src(random_affine(batch_size, generator=generator), size)
    targets, valid = warp_images(images, grid)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-5)
    if kind == "teacher":
        inputs = dict(grid_trg_to_src=grid, valid_trg=valid)
    else:
        reduction = model.backbone.reductions[0]
        cells = (size[0] // reduction, size[1] // reduction)
        with torch.no_grad():
            base = affine_grid_trg_to_src(random_affine(batch_size, generator=generator), cells)
        noise = lambda: 0.02 * torch.randn(NUM_HYPOTHESES, batch_size, 2, *cells, generator=generator)
        inputs = dict(hypotheses_src_to_trg=base + noise(), hypotheses_trg_to_src=-base + noise(),
                      psr_prior=torch.ones(batch_size, 2, *cells))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(images, targets, **inputs).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


# --------------------------------------------------------------------------------------- memory


def child_memory(kind: str, case: str, mode: str, size: int, batch_size: int) -> dict:
    """In a fresh process: peak RSS added by two ``match`` calls or two training steps."""
    model = build(kind, case, size)
    source, target = skimage_pair(size, model.config.image_mean, model.config.image_std)
    if mode == "inference":
        run = lambda: model.match(source, target)
    else:
        run = training_step_fn(model, kind, source, batch_size)
    baseline = rss_bytes()
    was_reset = reset_peak_rss()
    for _ in range(2):
        run()
    peak = peak_rss_bytes()
    return {"baseline": baseline, "peak": peak, "delta": peak - baseline, "reset": was_reset}


def run_child(*args: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--threads", str(torch.get_num_threads()), "--child", *args]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------- official code
def import_official(official_dir: Path):
    """``model_noise`` of a fanyang587/PMD checkout, building its ResNet-101 without a download."""
    path = Path(official_dir) / "model_noise.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --official-dir must be a checkout of fanyang587/PMD")
    import torchvision

    spec = importlib.util.spec_from_file_location("_pmd_official_model_noise", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # FeatureExtraction calls models.resnet101(pretrained=True); random weights instead (no network).
    module.models = types.SimpleNamespace(resnet101=lambda pretrained=False, **kwargs: torchvision.models.resnet101(weights=None))
    return module


def randomise_batch_norm(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so batch norm is not an identity."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.normal_(0, 0.1, generator=generator)
            layer.running_var.uniform_(0.5, 1.5, generator=generator)
            layer.weight.data.normal_(1, 0.1, generator=generator)
            layer.bias.data.normal_(0, 0.1, generator=generator)


def official_comparison(official_dir: Path, size: int, repeats: int, warmup: int, seed: int = 0) -> dict:
    from safetensors.torch import save_file

    from semcorr.modeling.pmd.configuration_pmd import IMAGENET_MEAN, IMAGENET_STD
    from semcorr.modeling.pmd.convert_pmd_original_checkpoint import build_pmd_student

    official = import_official(official_dir)
    torch.manual_seed(seed)
    cells = size // 16
    net = official.PMDNet(cells, cells, beta=50, kernel_sigma=5)
    generator = torch.Generator().manual_seed(seed + 1)
    for head in (net.adap_layer_feat3, net.adap_layer_feat4, net.chn4):
        randomise_batch_norm(head, generator)
    net.eval()
    heads = ("adap_layer_feat3.", "adap_layer_feat4.", "chn4.")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, backbone = Path(folder) / "pmd_random.pt", Path(folder) / "resnet101_random.safetensors"
        torch.save({k: v for k, v in net.state_dict().items() if k.startswith(heads)}, checkpoint)
        save_file({k: v.contiguous() for k, v in net.feature_extraction.model.state_dict().items()}, str(backbone))
        student = build_pmd_student(checkpoint, str(backbone), config_overrides={"image_size": [size, size]})

    source, target = skimage_pair(size, IMAGENET_MEAN, IMAGENET_STD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official grid_sample calls warn about align_corners

        def run_official():
            with torch.no_grad():
                return net(source, target, train=False)

        reference = run_official()
        ours = student.match(source, target)
        with torch.no_grad():
            source_levels, target_levels = student._encode_pair(source, target)
            corr_st, corr_ts, *_ = student.correlate(source_levels, target_levels)
        rows = []
        for name, theirs, mine, corr in (
            ("source → target", reference["grid_S2T"], ours.grid_src_to_trg, corr_st),
            ("target → source", reference["grid_T2S"], ours.grid_trg_to_src, corr_ts),
        ):
            difference = (theirs.permute(0, 3, 1, 2) - mine).abs().amax(dim=1).flatten()  # per cell
            top2 = corr.topk(2, dim=2).values.flatten(0, 1)
            tie = (top2[:, 0] - top2[:, 1]) < 1e-6
            rows.append(dict(direction=name, max=float(difference.max()), cells=difference.numel(),
                             above=int((difference > 1e-5).sum()), ties=int(tie.sum()),
                             max_clear=float(difference[~tie].max()) if (~tie).any() else 0.0))

        official_times, semcorr_times, backbone_times = [], [], []
        for round_ in range(warmup + repeats):
            start = time.perf_counter()
            run_official()
            official_seconds = time.perf_counter() - start
            start = time.perf_counter()
            student.match(source, target)
            semcorr_seconds = time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                net.feature_extraction(source), net.feature_extraction(target)
            backbone_seconds = time.perf_counter() - start
            if round_ >= warmup:
                official_times.append(official_seconds)
                semcorr_times.append(semcorr_seconds)
                backbone_times.append(backbone_seconds)
    return dict(rows=rows, official=statistics.median(official_times), semcorr=statistics.median(semcorr_times),
                backbone=statistics.median(backbone_times), official_all=official_times, semcorr_all=semcorr_times)


# ----------------------------------------------------------------------------------------- main
def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


def mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--size", type=int, default=320, help="input side (default 320)")
    parser.add_argument("--batch-size", type=int, default=2, help="training batch (>= 2: attention batch norm; default 2)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="backbones (default both)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--official-dir", type=Path, help="checkout of fanyang587/PMD (holds model_noise.py)")
    parser.add_argument("--only-official", action="store_true", help="only the comparison with the official code")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=5, metavar=("KIND", "CASE", "MODE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, case, mode, size, batch = args.child
        print(json.dumps(child_memory(kind, case, mode, int(size), int(batch))))
        return
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (the co-channel attention's batch norm trains on the batch)")

    size = args.size
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; input {size}²; median of "
          f"{args.repeats} runs after {args.warmup} warm-up; load average {load_average()} (1/5/15 min)\n")

    if not args.only_official:
        models = {(kind, case): build(kind, case, size) for case in args.cases for kind in MODELS}
        print("Inference, `match` on one pair (ms per pair):\n")
        print("| backbone | levels | teacher (mean gate) | student |")
        print("|---|---|---:|---:|")
        for case in args.cases:
            cells = []
            for kind in MODELS:
                model = models[(kind, case)].eval()
                source, target = skimage_pair(size, model.config.image_mean, model.config.image_std)
                cells.append(ms(median_time(lambda: model.match(source, target), args.repeats, args.warmup)))
            config = models[("student", case)].config
            print(f"| {case} (`{config.backbone}`) | {config.backbone_layers} | {cells[0]} | {cells[1]} |")
        print(f"\nload average after: {load_average()}\n")

        if not args.skip_training:
            print(f"Training, batch {args.batch_size} (samples/s; step time in s):\n")
            print("| backbone | teacher step (synthetic supervision) | student step (distillation, "
                  f"{NUM_HYPOTHESES} hypotheses) |")
            print("|---|---:|---:|")
            for case in args.cases:
                cells = []
                for kind in MODELS:
                    model = models[(kind, case)]
                    source, _ = skimage_pair(size, model.config.image_mean, model.config.image_std)
                    seconds = median_time(training_step_fn(model, kind, source, args.batch_size), args.repeats, args.warmup)
                    model.eval()
                    cells.append(f"{args.batch_size / seconds:.2f} ({seconds:.2f} s)")
                print(f"| {case} | {cells[0]} | {cells[1]} |")
            print(f"\nload average after: {load_average()}\n")
        del models

        if not args.skip_memory:
            print(f"Peak resident memory, fresh process per row (inference: two `match` calls on one pair; "
                  f"training: two steps of batch {args.batch_size}):\n")
            print("| backbone | model | mode | RSS after loading (MiB) | peak RSS (MiB) | added (MiB) |")
            print("|---|---|---|---:|---:|---:|")
            for case in args.cases:
                for kind in MODELS:
                    for mode in ("inference", "training"):
                        row = run_child(kind, case, mode, str(size), str(args.batch_size))
                        note = "" if row["reset"] else " (peak not reset: includes loading)"
                        print(f"| {case} | {kind} | {mode} | {mib(row['baseline'])} | {mib(row['peak'])} | "
                              f"{mib(row['delta'])}{note} |")
            print()

    if args.official_dir is None:
        print("The official code was not given (--official-dir PATH to a checkout of fanyang587/PMD): no comparison.")
        return
    result = official_comparison(args.official_dir, size, args.repeats, args.warmup)
    print("Official PMDNet vs semcorr's converted student, same random weights (ResNet-101, layer3 + layer4):\n")
    print("| grid | cells | max abs difference | cells > 1e-5 | near-tie cells (top-2 gap < 1e-6) | "
          "max abs difference, other cells |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['direction']} | {row['cells']} | {row['max']:.2e} | {row['above']} | {row['ties']} | "
              f"{row['max_clear']:.2e} |")
    ratio = result["semcorr"] / result["official"]
    print("\n| implementation | ms per pair | vs official |")
    print("|---|---:|---:|")
    print(f"| official `PMDNet(src, tgt, train=False)` | {ms(result['official'])} | 1.00x |")
    print(f"| official backbone alone (two images) | {ms(result['backbone'])} | "
          f"{result['backbone'] / result['official']:.2f}x |")
    print(f"| semcorr `PMDStudentModel.match` | {ms(result['semcorr'])} | {ratio:.2f}x "
          f"({'meets' if ratio <= 0.8 else 'MISSES'} target ≤ 0.8x) |")
    print(f"\nruns (s): official {[round(t, 2) for t in result['official_all']]}, "
          f"semcorr {[round(t, 2) for t in result['semcorr_all']]}; load average after: {load_average()}")


if __name__ == "__main__":
    main()

"""semcorr's regularised Hough matching against the reference implementation of juhongm999/hpf.

Run from the repository root, with a checkout of https://github.com/juhongm999/hpf (never vendored
into this repository)::

    python benchmarks/bench_rhm.py --reference-dir /path/to/hpf --repeats 5

Without ``--reference-dir`` only semcorr's timing is printed.

Equivalent inputs. The reference (``model/rhm.py``) takes, per image, hyperpixel *boxes* (N, 4),
features (N, C) and the image size as ``(w, h)``; it votes at the box centres
``geometry.center(box) = x1 + (x2 - x1) // 2`` (floor division on float tensors), bins a
translation ``(w_s - x_s) + x_t`` with ``(vote / cellsize).long()`` (truncation), smooths the
histogram with its own ``geometry.gaussian2d(7)`` (conv2d, padding 3), and computes the
similarity itself (``appearance_similarity``: cosine clamped at 0, cubed). Here the boxes are
built around *integer* cell centres on rectilinear grids, ``[c - r, c + r]`` with an integer
``r``, so the reference's ``//2`` centre is exactly ``c``; semcorr gets the same centres per axis
(``source_grid=(xs, ys)``), the same image sizes as ``(h, w)``, and the similarity computed by the
reference's own ``appearance_similarity`` (so only the voting is compared). The two images differ
in size and grid spacing in x and y, so a swapped axis or a swapped (h, w) would show.

The features are smooth random fields, the target a shifted copy of the source plus noise, so the
histogram has a real consensus peak. Timings: the reference ``rhm()`` (similarity + voting, its
only entry point), semcorr's similarity (``dense_cosine_correlation``, clamp, power) + RHM for the
same work, and semcorr's RHM alone.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from semcorr.modeling import dense_cosine_correlation, gaussian_kernel2d, regularized_hough_matching
from semcorr.modeling.ops.rhm import _axis_bins, hough_space_shape
from bench_utils import median_time

_PACKAGE = "_hpf_reference_model"


def import_reference(reference_dir: Path):
    """``(rhm, geometry)`` modules of an hpf checkout, imported as a standalone fake package.

    ``model/`` in hpf has no ``__init__.py`` and ``geometry.py`` imports ``util.py``, which pulls
    in the repository's data loaders; neither is needed for RHM, so ``util`` is a stub.
    """
    folder = Path(reference_dir) / "model"
    if not (folder / "rhm.py").is_file() or not (folder / "geometry.py").is_file():
        raise SystemExit(f"{folder} lacks rhm.py / geometry.py: --reference-dir must be a checkout of juhongm999/hpf")
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[_PACKAGE] = package
    sys.modules[f"{_PACKAGE}.util"] = types.ModuleType(f"{_PACKAGE}.util")
    geometry = importlib.import_module(f"{_PACKAGE}.geometry")
    rhm = importlib.import_module(f"{_PACKAGE}.rhm")
    return rhm, geometry


def integer_grid(height: int, width: int, rows: int, cols: int):
    """Integer cell centres ``(xs (cols,), ys (rows,))`` of a ``rows x cols`` grid over an image."""
    step_x, step_y = width // cols, height // rows
    xs = torch.arange(cols, dtype=torch.float32) * step_x + step_x // 2
    ys = torch.arange(rows, dtype=torch.float32) * step_y + step_y // 2
    return xs, ys


def boxes_around(xs, ys, half: int = 8) -> torch.Tensor:
    """Row-major (N, 4) boxes ``[x - half, y - half, x + half, y + half]`` (reference's geometry)."""
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
    return torch.cat([centres - half, centres + half], dim=1)


def smooth_features(channels: int, rows: int, cols: int, shift=(3, 5), noise: float = 0.3, seed: int = 0):
    """Source and target features ``(C, rows, cols)``: the target is the source shifted + noise."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.randn(1, channels, rows + 2 * max(shift), cols + 2 * max(shift), generator=generator)
    field = F.avg_pool2d(field, 5, stride=1, padding=2)[0]
    dy, dx = shift
    source = field[:, :rows, :cols]
    target = field[:, dy : dy + rows, dx : dx + cols] + noise * torch.randn(channels, rows, cols, generator=generator)
    return source.contiguous(), target.contiguous()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-dir", type=Path, help="checkout of juhongm999/hpf (holds model/rhm.py)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median; default 5)")
    parser.add_argument("--grid", type=int, nargs=2, default=[60, 60], metavar=("ROWS", "COLS"),
                        help="hyperpixel grid of each image (default 60 60: 3600 hyperpixels)")
    parser.add_argument("--channels", type=int, default=128, help="feature channels (default 128)")
    parser.add_argument("--bins", type=int, default=8192, help="Hough bins (default 8192, as HPF)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    rows, cols = args.grid
    # Source 360 x 480 (h x w): steps 6 and 8; target 420 x 540: steps 7 and 9.
    source_size, target_size = (6 * rows, 8 * cols), (7 * rows, 9 * cols)
    source_grid = integer_grid(*source_size, rows, cols)
    target_grid = integer_grid(*target_size, rows, cols)
    source_features, target_features = smooth_features(args.channels, rows, cols, seed=args.seed)
    source_flat = source_features.flatten(1).t().contiguous()  # (N, C), row-major cells
    target_flat = target_features.flatten(1).t().contiguous()
    n = rows * cols
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; {n} hyperpixels per image "
          f"({rows} x {cols}), {args.channels} channels, {args.bins} bins; source {source_size[1]} x {source_size[0]}, "
          f"target {target_size[1]} x {target_size[0]} (w x h); median of {args.repeats} runs\n")

    def semcorr_similarity():
        correlation = dense_cosine_correlation(source_features[None], target_features[None], normalize=True)
        return correlation.clamp_min(0).pow(3)

    def semcorr_rhm(similarity):
        return regularized_hough_matching(similarity, source_grid, target_grid, source_size, target_size,
                                          num_bins=args.bins, kernel_size=7)

    similarity_semcorr = semcorr_similarity()
    time_semcorr_rhm = median_time(lambda: semcorr_rhm(similarity_semcorr), args.repeats)
    time_semcorr_total = median_time(lambda: semcorr_rhm(semcorr_similarity()), args.repeats)

    if args.reference_dir is None:
        print("| implementation | similarity + RHM (ms) | RHM alone (ms) |")
        print("|---|---:|---:|")
        print(f"| semcorr `regularized_hough_matching` | {1000 * time_semcorr_total:.1f} | {1000 * time_semcorr_rhm:.1f} |")
        print("\nThe reference was not given (--reference-dir PATH to a checkout of juhongm999/hpf): no comparison.")
        return

    reference, geometry = import_reference(args.reference_dir)
    source_boxes, target_boxes = boxes_around(*source_grid), boxes_around(*target_grid)
    source_imsize, target_imsize = source_size[::-1], target_size[::-1]  # the reference wants (w, h)
    hsfilter = geometry.gaussian2d(7)
    assert torch.equal(geometry.center(source_boxes), boxes_around(*source_grid, half=0)[:, :2])

    def reference_rhm():
        return reference.rhm((source_boxes, source_flat, source_imsize), (target_boxes, target_flat, target_imsize),
                             hsfilter, ncells=args.bins)

    time_reference = median_time(reference_rhm, args.repeats)
    confidence_reference = reference_rhm()
    similarity_reference = reference.appearance_similarity(source_flat, target_flat)
    confidence_semcorr, hough_semcorr = regularized_hough_matching(
        similarity_reference[None], source_grid, target_grid, source_size, target_size, num_bins=args.bins,
        kernel_size=7, return_hough_space=True,
    )
    confidence_semcorr = confidence_semcorr[0]

    # Bins and histograms, to locate any difference.
    nbins_x, nbins_y, cellsize = reference.build_hspace(source_imsize, target_imsize, args.bins)
    bins_y, bins_x, cell_size = hough_space_shape(source_size, target_size, args.bins)
    bin_ids_reference = reference.hspace_bin_ids(source_imsize, source_boxes, target_boxes, cellsize, nbins_x)
    bin_x = _axis_bins(source_grid[0], target_grid[0], source_size[1], cell_size)  # (w_s, w_t)
    bin_y = _axis_bins(source_grid[1], target_grid[1], source_size[0], cell_size)  # (h_s, h_t)
    bin_ids_semcorr = (bin_y[:, None, :, None] * bins_x + bin_x[None, :, None, :]).reshape(n, n)
    differing_bins = int((bin_ids_semcorr != bin_ids_reference).sum())
    hough_reference = torch.zeros(nbins_y * nbins_x).index_add(0, bin_ids_reference.reshape(-1), similarity_reference.reshape(-1))
    hough_reference = F.conv2d(hough_reference.view(1, 1, nbins_y, nbins_x), hsfilter[None, None], padding=3)[0, 0]
    kernel_difference = float((hsfilter - gaussian_kernel2d(7)).abs().max())

    peak = float(confidence_reference.abs().max())
    abs_difference = float((confidence_semcorr - confidence_reference).abs().max())
    hough_difference = float((hough_semcorr[0] - hough_reference).abs().max() / hough_reference.abs().max())
    similarity_difference = float((similarity_semcorr[0] - similarity_reference).abs().max())
    argmax_agreement = float((confidence_semcorr.argmax(1) == confidence_reference.argmax(1)).float().mean())
    ratio = time_semcorr_total / time_reference

    print("| implementation | similarity + RHM (ms) | RHM alone (ms) | vs reference |")
    print("|---|---:|---:|---:|")
    print(f"| hpf `model/rhm.py` `rhm()` (reference) | {1000 * time_reference:.1f} | — | 1.00x |")
    print(f"| semcorr `regularized_hough_matching` | {1000 * time_semcorr_total:.1f} | {1000 * time_semcorr_rhm:.1f} | "
          f"{ratio:.2f}x ({'meets' if ratio <= 0.5 else 'MISSES'} target ≤ 0.5x) |")
    relative = abs_difference / peak
    print("\n| check | value |")
    print("|---|---|")
    print(f"| Hough space shape (bins_y x bins_x, cell) | reference {nbins_y} x {nbins_x}, {cellsize:.4f}; "
          f"semcorr {bins_y} x {bins_x}, {cell_size:.4f} |")
    print(f"| vote bins that differ (of {n * n}) | {differing_bins} |")
    print(f"| Gaussian kernel, max abs difference | {kernel_difference:.2e} |")
    print(f"| smoothed histogram, max abs difference / max | {hough_difference:.2e} |")
    print(f"| confidence, max abs difference | {abs_difference:.3e} (max confidence {peak:.4g}) |")
    print(f"| confidence, max abs difference / max confidence | {relative:.2e} ({'meets' if relative <= 1e-5 else 'MISSES'} "
          "target ≤ 1e-5) |")
    print(f"| arg-max target per source cell, agreement | {100 * argmax_agreement:.2f}% |")
    print(f"| similarity: semcorr correlation vs reference `appearance_similarity`, max abs difference | "
          f"{similarity_difference:.2e} |")
    if differing_bins:
        where = (bin_ids_semcorr != bin_ids_reference).nonzero()[:5].tolist()
        print(f"\nFirst differing (source, target) cells: {where}")


if __name__ == "__main__":
    main()

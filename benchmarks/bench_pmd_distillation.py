"""PMD distillation ablation on CPU: teacher vs student (PSR + CAL) vs student (plain L2), same budget.

Runs :mod:`semcorr.training.cpu_chain` (one teacher and one set of hypotheses, shared) and distils
one student per loss and seed with the same config, steps and data order; every model is scored on
the held-out motorcycle stereo windows (PCK, alpha x the keypoint extent, as PF-WILLOW).

    python benchmarks/bench_pmd_distillation.py --output-dir runs/pmd-ablation --seeds 0 1 2

Rerunning with the same ``--output-dir`` reuses what is finished.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from semcorr.training import cpu_chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/pmd-ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default 0 1 2)")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--losses", nargs="+", default=["cal", "l2"], choices=["cal", "l2"])
    parser.add_argument("--psr-prior-init", type=float,
                        help="PMDStudentConfig.psr_prior_init (default: the config's, 1); use its own --output-dir")
    args = parser.parse_args()

    overrides = {"model.psr_prior_init": args.psr_prior_init} if args.psr_prior_init is not None else {}
    runs = [cpu_chain.run_chain(args.output_dir, losses=tuple(args.losses), num_threads=args.num_threads,
                                student_seed=seed, student_overrides=overrides)
            for seed in args.seeds]
    keys = [f"pck@{alpha:g}" for alpha in runs[0]["alphas"]]
    print(f"\ntorch {torch.__version__}, {args.num_threads} thread(s); {runs[0]['num_pairs']} held-out stereo windows; "
          f"student seeds {args.seeds} (median, then min-max); PSR prior init "
          f"{args.psr_prior_init if args.psr_prior_init is not None else 'as configured'}\n")
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name in runs[0]["pck"]:
        cells = []
        for key in keys:
            values = [100 * run["pck"][name][key] for run in runs]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""``semcorr evaluate``: the command line of :mod:`semcorr.evaluation`.

Usage::

    semcorr evaluate --benchmark pf-pascal --data-dir /data/PF-PASCAL --protocol hpf --out pck.json
    semcorr evaluate --model runs/student/final --dataset my-pairs/    # a dataset folder of keypoint pairs

What is measured, and how, is documented in :mod:`semcorr.evaluation`.
"""

from __future__ import annotations

# The choices of the options, spelled out here so that parsing imports neither datasets
# (semcorr.hub_datasets) nor evaluate (semcorr.spaces.pck): ``semcorr evaluate --help`` answers at
# once. tests/test_robustness.py checks that they equal the libraries' own lists.
BENCHMARKS = ("pf-pascal", "pf-willow", "spair-71k")  # semcorr.hub_datasets.BENCHMARKS
PROTOCOLS = ("hpf", "dhpf", "chm", "cats", "vat", "dift", "sd-dino", "geoaware")  # semcorr.spaces.pck.PROTOCOLS
THRESHOLDS = ("image", "bbox", "bbox-kp", "bbox-kp-padded")  # semcorr.spaces.pck.pck.THRESHOLDS
AVERAGES = ("pair", "point", "category", "category-point")  # semcorr.spaces.pck.pck.AVERAGES
COMPARISONS = ("<=", "<")  # semcorr.spaces.pck.pck.COMPARISONS


def add_evaluate_arguments(parser) -> None:
    """The options of ``semcorr evaluate``."""
    from semcorr.evaluation.protocols import DEFAULT_ALPHAS, FRAMES, SIDES

    parser.add_argument("--model", help="model directory or Hub id (default: the embedded model)")
    parser.add_argument("--benchmark", choices=list(BENCHMARKS), help="a published benchmark (with --data-dir)")
    parser.add_argument("--data-dir", help="extracted benchmark archive (see the loaders' docstrings)")
    parser.add_argument(
        "--dataset", help="instead of --benchmark: pairs in the benchmark pair schema, as a datasets save_to_disk "
        "folder (e.g. written by python -m semcorr.hub_datasets.skimage_pairs), a folder of Parquet files or a "
        "Hub dataset id; metric defaults unless --protocol",
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
    parser.add_argument("--side", choices=list(SIDES), help="judged image (default: the protocol's)")
    parser.add_argument(
        "--frame", default="original", choices=list(FRAMES),
        help="measure in original pixels (default) or in the protocol's square frame (dhpf, chm: 240; cats, vat: 256)",
    )
    parser.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="default 0.05 0.1 0.15")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default 8)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--cache-dir", help="where datasets caches the prepared benchmark")
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_evaluate_command(args, before_work=None) -> None:
    """Run ``semcorr evaluate``: check the options, evaluate, print the table, write ``--out``.

    ``--out`` is checked for writability before anything is loaded; ``before_work`` (optional) is
    called after these checks, before the data and the model are read.
    """
    from semcorr.utils import atomic_write_json, check_writable

    if (args.benchmark is None) == (args.dataset is None):
        raise ValueError("give either --benchmark (with --data-dir) or --dataset")
    if args.out is not None:
        if not args.out:
            raise ValueError("--out is empty; give a file name for the JSON results, or leave --out out")
        check_writable(args.out)
    if before_work is not None:
        before_work()
    from semcorr.evaluation import evaluate_model, format_table

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
        path = atomic_write_json(args.out, result)
        print(f"wrote {path}")

"""The ``semcorr`` command line: ``match``, ``demo``, ``space``, ``evaluate``.

Bad input prints one line to stderr and exits with status 2; no traceback.

Arguments are parsed before anything heavy is imported (torch, transformers, datasets are
imported by the command that needs them), so ``semcorr --help`` and usage errors answer at once.
What can be checked without a model -- option values, that ``--out`` can be written -- is checked
before the model is loaded, so a bad option never costs a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def parse_keypoints(text: str) -> list[list[float]]:
    """``"x,y;x,y"`` -> ``[[x, y], [x, y]]``."""
    points = []
    for index, chunk in enumerate(part for part in text.split(";") if part.strip()):
        values = chunk.split(",")
        if len(values) != 2:
            raise ValueError(f"--keypoints entry {index} '{chunk}' is not 'x,y' (points are separated by ';')")
        try:
            points.append([float(values[0]), float(values[1])])
        except ValueError:
            raise ValueError(f"--keypoints entry {index} '{chunk}' holds a non-number") from None
    if not points:
        raise ValueError("--keypoints is empty; give points as 'x,y;x,y'")
    return points


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="semcorr", description="Semantic correspondence on the Hugging Face stack.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    match = commands.add_parser("match", help="match two images and draw the matches")
    match.add_argument("source")
    match.add_argument("target")
    match.add_argument("--keypoints", help="source points 'x,y;x,y' in source pixels (default: top-k mutual matches)")
    match.add_argument("--top-k", type=int, default=50, help="matches to return without --keypoints (default 50)")
    match.add_argument(
        "--score-threshold", type=float, default=0.0,
        help="without --keypoints, keep only matches scoring at least this (absolute confidence in [0, 1]; default 0)",
    )
    match.add_argument("--model", help="model directory or Hub id (default: the embedded model)")
    match.add_argument(
        "--out", help="write a picture of the matches to this file (default: matches.png when neither --json nor "
        "--out is given; with --json, no picture unless --out is given; '' for no picture)",
    )
    match.add_argument("--json", action="store_true", help="print the matches as JSON (writes no picture unless --out)")

    demo = commands.add_parser("demo", help="accuracy of the embedded model on real pairs with known matches")
    demo.add_argument("--out", default="demo.png")
    demo.add_argument("--points", type=int, default=500)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", help="model directory or Hub id (default: the embedded model)")

    space = commands.add_parser("space", help="serve the demo Space (Gradio) in the browser: click points, see matches")
    space.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; 0.0.0.0 for all)")
    space.add_argument("--port", type=int, default=7860, help="port (default 7860)")

    evaluate = commands.add_parser("evaluate", help="PCK of a model on PF-PASCAL, PF-WILLOW or SPair-71k")
    from .evaluation import add_evaluate_arguments

    add_evaluate_arguments(evaluate)
    return parser


def _match(args) -> None:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if not 0 <= args.score_threshold <= 1:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    keypoints = None if args.keypoints is None else parse_keypoints(args.keypoints)
    out = args.out if args.out is not None else (None if args.json else "matches.png")
    if out:
        check_writable(out)
    _quiet_libraries()

    from transformers import pipeline

    from semcorr.modeling import load_image, load_matcher
    from semcorr.pipelines import TASK, draw_matches
    from semcorr.pipelines.drawing import save_image

    # read both images before the model: a bad file fails at once, and each is decoded once
    source, target = load_image(args.source), load_image(args.target)
    request = {"source_image": source, "target_image": target}
    if keypoints is not None:
        request["source_keypoints"] = keypoints
    model, processor, _ = load_matcher(args.model or None)  # None: the embedded default
    result = pipeline(TASK, model=model, image_processor=processor)(
        request, top_k=args.top_k, score_threshold=args.score_threshold
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'source x':>10}{'source y':>10}{'target x':>10}{'target y':>10}{'score':>8}")
        for (sx, sy), (tx, ty), score in zip(result["source_keypoints"], result["target_keypoints"], result["scores"]):
            print(f"{sx:>10.1f}{sy:>10.1f}{tx:>10.1f}{ty:>10.1f}{score:>8.3f}")
    if out:
        path = save_image(draw_matches(source, target, result), out)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)


def _space(args) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError('semcorr space needs gradio: pip install "semcorr[demo]"') from None
    _quiet_libraries()
    from semcorr.spaces.demo.app import serve

    serve(args.host, args.port)


def check_writable(path) -> None:
    """:func:`semcorr.utils.check_writable` (``ValueError`` naming ``path``), before any work is done."""
    from semcorr.utils import check_writable as check

    check(path)


def _quiet_libraries() -> None:
    """One line per error on stderr: no progress bars or info logs from the libraries (imports transformers)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: ``semcorr: warning: ...`` on one line of stderr."""
    text = " ".join(str(message).split())
    print(f"semcorr: warning: {text}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)  # before any heavy import: --help and usage errors are instant
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            if args.command == "match":
                _match(args)
            elif args.command == "demo":
                if args.points < 1:
                    raise ValueError(f"--points must be at least 1, got {args.points}")
                if args.out:
                    check_writable(args.out)
                _quiet_libraries()
                from .demo import run_demo

                run_demo(args.out, args.points, args.seed, model=args.model)
            elif args.command == "space":
                _space(args)
            else:
                from .evaluation import run_evaluate_command

                run_evaluate_command(args, before_work=_quiet_libraries)
    except _UsageError as error:
        print(str(error), file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as error:
        message = " ".join(str(error).split())
        print(f"semcorr: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semcorr: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

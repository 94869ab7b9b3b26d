"""``semcorr evaluate``: PCK of any semcorr model on a benchmark (being built)."""

from __future__ import annotations


def add_evaluate_arguments(parser) -> None:
    parser.add_argument("--model", help="model directory or Hub id (default: the embedded model)")
    parser.add_argument("--benchmark", required=True, choices=["pf-pascal", "pf-willow", "spair-71k"])
    parser.add_argument("--data-dir", required=True)


def run_evaluate_command(args) -> None:
    raise ValueError("semcorr evaluate is not available yet")

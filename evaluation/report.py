"""What a run reports on the terminal: the Markdown table ``semcorr evaluate`` prints.

The JSON report is the result dict itself, written with :func:`semcorr.utils.atomic_write_json`.
"""

from __future__ import annotations

import math


def format_table(result: dict) -> str:
    """Markdown table of an :func:`~semcorr.evaluation.evaluate_model` result: one row per category, then the total.

    PCK is printed in percent with one decimal (``nan`` where nothing was evaluated).
    """
    keys = [key for key in result["total"]]
    config = result["config"]
    header = "| category | pairs | points | " + " | ".join(f"PCK@{k[4:]} (%)" for k in keys) + " |"
    lines = [
        f"{_data_name(result)}, model {result['model']}, protocol {config['protocol'] or 'none'} "
        f"(threshold {config['threshold']}, average {config['average']}, comparison {config['comparison']}, "
        f"judged on the {config['side']}, frame {config['frame']})",
        "",
        header,
        "|---|---:|---:|" + "---:|" * len(keys),
    ]
    for name, row in result["per_category"].items():
        lines.append(f"| {name} | {row['num_pairs']} | {row['num_points']} | " + " | ".join(_percent(row[k]) for k in keys) + " |")
    lines.append(
        f"| **total ({config['average']})** | {result['num_pairs']} | {result['num_points']} | "
        + " | ".join(_percent(result["total"][k]) for k in keys) + " |"
    )
    return "\n".join(lines)


def _data_name(result: dict) -> str:
    """``pf-pascal test`` for a benchmark; ``dataset <folder or Hub id>, split <name>`` for a dataset."""
    if result.get("benchmark"):
        return f"{result['benchmark']} {result['split']}"
    name = f"dataset {result.get('data_dir') or '(in memory)'}"
    return f"{name}, split {result['split']}" if result.get("split") else name


def _percent(value) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"

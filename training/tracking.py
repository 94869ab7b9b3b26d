"""The accelerator of a run, its trackers, ``metrics.jsonl``, progress bars and model cards."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

METRICS_FILE = "metrics.jsonl"


@contextmanager
def torch_threads(num_threads: int | None):
    """``torch.set_num_threads(num_threads)`` inside the block (``None`` / 0: unchanged); restored after."""
    threads = torch.get_num_threads()
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        yield
    finally:
        torch.set_num_threads(threads)


def use_cpu(cpu: bool | None) -> bool:
    """``cpu`` if set, else True when no GPU is present or ``ACCELERATE_USE_CPU`` is set."""
    if cpu is not None:
        return cpu
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def installed_trackers(names: list[str]) -> list[str]:
    """The accelerate trackers of ``names`` that are installed (the others are skipped with a warning)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    chosen = []
    for name in names:
        check = available.get(name)
        if check is not None and not check():
            print(f"[semcorr.training] tracker '{name}' is not installed; skipped (metrics.jsonl is written anyway)",
                  file=sys.stderr)
            continue
        chosen.append(name)
    return chosen


def make_accelerator(cpu: bool | None, output_dir: Path | None = None, log_with=()):
    """The ``Accelerator`` of a run: the CPU per :func:`use_cpu`, trackers logging to ``output_dir/logs``.

    Launch several CPU processes with ``torchrun --nproc_per_node N`` (or ``accelerate launch
    --multi_gpu``): ``accelerate launch --cpu --num_processes N`` silently starts one process.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = installed_trackers(list(log_with)) if log_with else []
    project = None
    if output_dir is not None:
        project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs"))
    return Accelerator(cpu=use_cpu(cpu), log_with=trackers or None, step_scheduler_with_optimizer=False,
                       project_config=project)


def flat_hparams(config) -> dict:
    """``{"section.key": value}`` of a config (non-scalars as strings), for the trackers."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def append_metrics(accelerator, metrics_file: Path, record: dict) -> None:
    """Append one JSON line to ``metrics.jsonl`` (main process only)."""
    if accelerator.is_main_process:
        with open(metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def log_step(accelerator, metrics_file: Path, record: dict, hidden=()) -> None:
    """Send a step record to the trackers (without ``step`` and the ``hidden`` keys) and to ``metrics.jsonl``."""
    accelerator.log({k: v for k, v in record.items() if k not in ("step", *hidden)}, step=record["step"])
    append_metrics(accelerator, metrics_file, record)


def reduce_terms(accelerator, terms: dict[str, torch.Tensor], epoch_values: dict[str, list[float]]) -> dict[str, float]:
    """The mean over processes of each scalar term; also appended to ``epoch_values[name]``."""
    values = {k: accelerator.reduce(v.detach().float().reshape(1), reduction="mean").item() for k, v in terms.items()}
    for key, value in values.items():
        epoch_values.setdefault(key, []).append(value)
    return values


def epoch_means(epoch_values: dict[str, list[float]], prefix: str) -> dict[str, float]:
    """``{prefix + name: mean}`` of the values collected by :func:`reduce_terms`."""
    return {f"{prefix}{k}": float(np.mean(v)) for k, v in epoch_values.items()}


def progress_bar(accelerator, total: int, description: str, unit: str = "step", leave: bool = False):
    """A tqdm bar on the local main process only (rate and ETA shown)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=not accelerator.is_local_main_process, leave=leave)


# -- model cards -----------------------------------------------------------------------------------------
def card_head(title: str, summary: str, tags=()) -> list[str]:
    """The first lines of a model card: front matter, title, summary and how to load the model."""
    return [
        "---", "library_name: transformers", "tags:", "- semcorr", "- semantic-correspondence",
        *[f"- {tag}" for tag in tags], "---", "",
        f"# {title}", "",
        summary, "",
        "```python", "import semcorr.modeling  # registers the model types",
        "from transformers import AutoModel", "model = AutoModel.from_pretrained('<this folder>')", "```", "",
    ]


def card_tail(metrics: dict, config) -> list[str]:
    """The last lines of a model card: the metrics table and the config as JSON."""
    lines = ["## Metrics (training, last epoch mean)", "", "| metric | value |", "|---|---|"]
    for key, value in sorted(metrics.items()):
        lines.append(f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "## Config", "", "```json", json.dumps(config.to_dict(), indent=2, default=str), "```", ""]
    return lines

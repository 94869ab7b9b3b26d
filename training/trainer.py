"""The machinery shared by the training scripts (:mod:`~semcorr.training.train_teacher`,
:mod:`~semcorr.training.distill_student`): accelerator, batch and step arithmetic, the pieces of the
step loop, checkpoints, metrics and the final model folder.

A script builds its model and data; its step loop then reads::

    accelerator = make_accelerator(config.run, output_dir)
    per_process = per_process_batch(global_batch, accelerator.num_processes)
    model, optimizer, scheduler = prepare_optimizer(accelerator, model, config.optim, steps_per_epoch)
    metrics_file = start_logging(accelerator, output_dir, project, config)
    for epoch, steps in epoch_ranges(step, steps_per_epoch, total_steps):
        for in_epoch in progress_bar(accelerator, steps, epoch, config.optim.epochs):
            output = model(...)                    # this process's slice of the global batch
            check_finite(accelerator, output.loss, step, epoch, output_dir, last_saved)
            optimizer_step(accelerator, output.loss, optimizer, scheduler)
            step += 1
            values = reduce_terms(accelerator, terms, epoch_losses)
            if log_due(step, config.run, total_steps):
                log_step(accelerator, metrics_file, record)
            if save_due(step, config.run, total_steps):
                save_checkpoint(accelerator, output_dir, step, steps_per_epoch, global_batch, keep)
        log_epoch(accelerator, metrics_file, summary, total_steps, script)
    write_final(accelerator, model, output_dir, card, metrics, script)

(all under ``with torch_threads(config.run.num_threads)``).

Outputs under ``output_dir``: ``checkpoints/step-N`` (``accelerator.save_state`` + ``trainer_state.json``
with the step, epoch, steps per epoch, world size and global batch), ``final/`` (``save_pretrained``
+ image processor + model card ``README.md`` + ``training_metrics.json``), ``metrics.jsonl`` (one JSON
record per line, main process only) and tracker logs under ``logs/``. Directories are written under a
temporary name and renamed into place.

Determinism: the scripts draw their seeds from :func:`_seed` (a fixed mix of integers such as
``(seed, epoch, step)``) and the order of an epoch from :func:`epoch_order`, and :func:`epoch_ranges`
restarts mid-epoch at the checkpoint's step, so a run resumed from a checkpoint (model, optimizer,
scheduler and RNG states restored by ``accelerator.load_state``) equals the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """A run stopped on purpose (non-finite loss, too many unreadable images); the message says why."""


class NonFiniteLossError(TrainingError):
    pass


# -- seeds and order -------------------------------------------------------------------------------
def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value


def epoch_order(num_items: int, repeats: int, seed: int, epoch: int) -> list[int]:
    """The items of epoch ``epoch``: ``repeats`` permutations drawn from a generator seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(_seed(seed, epoch))
    return [i for _ in range(repeats) for i in torch.randperm(num_items, generator=generator).tolist()]


# -- setup -----------------------------------------------------------------------------------------
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


def _trackers(names: list[str]) -> list[str]:
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


def make_accelerator(run, output_dir: Path):
    """The ``Accelerator`` of a run (``run``: a :class:`~semcorr.training.config.RunConfig`).

    CPU when ``run.cpu`` says so or, when it is ``None``, when no GPU is present or
    ``ACCELERATE_USE_CPU`` is set; trackers ``run.log_with`` (those installed), logging to ``output_dir/logs``.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = run.cpu
    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    trackers = _trackers(list(run.log_with)) if run.log_with else []
    return Accelerator(
        cpu=cpu, log_with=trackers or None, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def per_process_batch(global_batch: int, world: int) -> int:
    """The per-process share of the global batch; ``ValueError`` unless it divides evenly into >= 2 pairs."""
    if global_batch % world:
        raise ValueError(f"optim.batch_size {global_batch} is not divisible by the {world} processes")
    per_process = global_batch // world
    if per_process < 2:
        raise ValueError(f"optim.batch_size {global_batch} over {world} process(es) gives {per_process} pair per "
                         "process; the batch norm of the co-channel attention needs at least 2 per process")
    return per_process


def count_steps(steps_per_epoch: int, epochs: int, *limits: int | None) -> int:
    """``steps_per_epoch * epochs``, cut to the smallest of ``limits`` that are not ``None``."""
    total_steps = steps_per_epoch * epochs
    for limit in limits:
        if limit is not None:
            total_steps = min(total_steps, limit)
    return total_steps


def prepare_optimizer(accelerator, model, optim, steps_per_epoch: int):
    """Adam over the trainable parameters and the multi-step schedule (milestones in epochs), prepared.

    Returns ``(model, optimizer, scheduler)`` as ``accelerator.prepare`` wraps them.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    milestones = [m * steps_per_epoch for m in optim.lr_milestones]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=optim.lr_gamma)
    return accelerator.prepare(model, optimizer, scheduler)


def _flat_hparams(config) -> dict:
    """``{"section.key": value}`` of a config (non-scalars as strings), for the trackers."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def start_logging(accelerator, output_dir: Path, project: str, config) -> Path:
    """Create ``output_dir``, start the trackers under ``project``; returns the ``metrics.jsonl`` path."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(project, config=_flat_hparams(config))
    return output_dir / METRICS_FILE


# -- the step loop ---------------------------------------------------------------------------------
def epoch_ranges(step: int, steps_per_epoch: int, total_steps: int):
    """``(epoch, range of in-epoch steps)`` for each epoch from global step ``step`` up to ``total_steps``."""
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        last = min(steps_per_epoch, first + total_steps - step)
        yield epoch, range(first, last)
        step += last - first


def progress_bar(accelerator, steps: range, epoch: int, epochs: int):
    """A tqdm bar over the steps of an epoch (local main process only; it disappears when done)."""
    from tqdm.auto import tqdm

    return tqdm(steps, desc=f"epoch {epoch + 1}/{epochs}", disable=not accelerator.is_local_main_process, leave=False)


def check_finite(accelerator, loss: torch.Tensor, step: int, epoch: int, output_dir: Path, last_saved: int | None) -> None:
    """Raise :class:`NonFiniteLossError` (on every process) when the loss of any process is NaN / inf.

    ``step`` is the number of steps done before this one; the message names the step, its epoch and
    the last good checkpoint (``last_saved``).
    """
    finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=accelerator.device)
    if accelerator.reduce(finite, reduction="sum").item() < accelerator.num_processes:
        accelerator.end_training()
        raise NonFiniteLossError(
            f"non-finite loss at step {step + 1} (epoch {epoch + 1}, loss {loss.item()}); stopped without "
            f"saving it; last good checkpoint: "
            f"{output_dir / 'checkpoints' / f'{CHECKPOINT_PREFIX}{last_saved}' if last_saved else 'none'}"
        )


def optimizer_step(accelerator, loss: torch.Tensor, optimizer, scheduler) -> None:
    """One update: clear the gradients, backward, optimizer step, scheduler step."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()


def reduce_terms(accelerator, terms: dict[str, torch.Tensor], epoch_losses: dict[str, list[float]]) -> dict[str, float]:
    """The mean over processes of each scalar term; also appended to ``epoch_losses[name]``."""
    values = {k: accelerator.reduce(v.float().reshape(1), reduction="mean").item() for k, v in terms.items()}
    for key, value in values.items():
        epoch_losses.setdefault(key, []).append(value)
    return values


def epoch_means(epoch_losses: dict[str, list[float]], prefix: str) -> dict[str, float]:
    """``{prefix + name: mean}`` of the values collected by :func:`reduce_terms`."""
    return {f"{prefix}{k}": float(np.mean(v)) for k, v in epoch_losses.items()}


def log_due(step: int, run, total_steps: int) -> bool:
    """A step record is written every ``run.log_every_steps`` steps and at the last step."""
    return step % run.log_every_steps == 0 or step == total_steps


def save_due(step: int, run, total_steps: int) -> bool:
    """A checkpoint is written every ``run.save_every_steps`` steps (0: never) before the last step."""
    return bool(run.save_every_steps) and step % run.save_every_steps == 0 and step < total_steps


def append_metrics(accelerator, metrics_file: Path, record: dict) -> None:
    """Append one JSON line to ``metrics.jsonl`` (main process only)."""
    if accelerator.is_main_process:
        with open(metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def log_step(accelerator, metrics_file: Path, record: dict, hidden: tuple[str, ...] = ()) -> None:
    """Send a step record to the trackers (without ``step`` and the ``hidden`` keys) and to ``metrics.jsonl``."""
    accelerator.log({k: v for k, v in record.items() if k not in ("step", *hidden)}, step=record["step"])
    append_metrics(accelerator, metrics_file, record)


def log_epoch(accelerator, metrics_file: Path, summary: dict, total_steps: int, script: str, note: str = "") -> None:
    """Write the end-of-epoch ``summary`` to ``metrics.jsonl`` and print a line (``note`` appended)."""
    append_metrics(accelerator, metrics_file, summary)
    accelerator.print(f"[{script}] epoch {summary['epoch']}: step {summary['step']}/{total_steps}, "
                      f"loss {summary.get('epoch/loss', float('nan')):.4f}" + note)


def run_metrics(step: int, steps_per_epoch: int, world: int, global_batch: int) -> dict:
    """The first keys of the final metrics: steps, epochs completed, world size, global batch."""
    return {"steps": step, "epochs_completed": round(step / steps_per_epoch, 3), "world_size": world,
            "global_batch_size": global_batch}


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoint_steps(output_dir: Path) -> list[int]:
    """The steps of the complete checkpoints (with ``trainer_state.json``) under ``output_dir``, sorted."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        if entry.name.startswith(CHECKPOINT_PREFIX) and (entry / STATE_FILE).is_file():
            try:
                steps.append(int(entry.name[len(CHECKPOINT_PREFIX):]))
            except ValueError:
                pass
    return sorted(steps)


def _replace_dir(staging: Path, target: Path) -> None:
    """Atomically move ``staging`` to ``target`` (an existing ``target`` is moved aside first)."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def restore_latest_checkpoint(accelerator, output_dir: Path, script: str) -> tuple[int, Path | None]:
    """``--resume``: load the newest ``checkpoints/step-N`` into ``accelerator``; ``(step, dir)``."""
    done = checkpoint_steps(output_dir)
    if not done:
        accelerator.print(f"[{script}] --resume: no checkpoint in {output_dir / 'checkpoints'}; starting at step 0")
        return 0, None
    checkpoint = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{done[-1]}"
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text())["step"], checkpoint


def save_training_checkpoint(accelerator, output_dir: Path, at_step: int, state: dict, keep: int, write_extra=None) -> None:
    """``save_state`` into a staging folder, add ``trainer_state.json`` (and ``write_extra(staging)``),
    rename it to ``checkpoints/step-N`` and prune to the ``keep`` newest (0 keeps all).

    Model and optimizer are written by the main process, RNG files by every process; the folder
    appears whole or not at all.
    """
    root = output_dir / "checkpoints"
    staging = root / f".tmp-{CHECKPOINT_PREFIX}{at_step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(staging)
        (staging / STATE_FILE).write_text(json.dumps({"step": at_step, **state}))
        _replace_dir(staging, root / f"{CHECKPOINT_PREFIX}{at_step}")
        if keep:
            for old in checkpoint_steps(output_dir)[:-keep]:
                shutil.rmtree(root / f"{CHECKPOINT_PREFIX}{old}", ignore_errors=True)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, output_dir: Path, at_step: int, steps_per_epoch: int, global_batch: int,
                    keep: int, write_extra=None) -> None:
    """:func:`save_training_checkpoint` with the loop's state (epoch, steps per epoch, world size, global batch)."""
    state = {"epoch": at_step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
             "world_size": accelerator.num_processes, "global_batch_size": global_batch}
    save_training_checkpoint(accelerator, output_dir, at_step, state, keep, write_extra=write_extra)


# -- the command line ------------------------------------------------------------------------------
def run_command(script: str, load_config, train, args) -> int:
    """The body of a script's ``main``: ``train(load_config(), resume=args.resume, max_steps=args.max_steps)``.

    Returns the exit code: 0; 2 after a ``ValueError`` (bad config, flag or data); 1 after a
    :class:`TrainingError`. The message goes to stderr as ``<script>: error: <message>``.
    """
    try:
        config = load_config()
        if args.max_steps is not None and args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        train(config, resume=args.resume, max_steps=args.max_steps)
    except (ValueError, TrainingError) as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    return 0


# -- the final model -------------------------------------------------------------------------------
def write_final(accelerator, model, output_dir: Path, card: str, metrics: dict, script: str, write_extra=None) -> None:
    """Write ``output_dir/final``: ``save_pretrained``, the image processor, ``write_extra(folder)``,
    the model card ``README.md`` and ``training_metrics.json``.

    The main process writes it under ``.tmp-final`` and renames it into place; every process waits.
    """
    from semcorr.modeling import image_processor_for

    if accelerator.is_main_process:
        final = output_dir / "final"
        staging = output_dir / ".tmp-final"
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(staging)
        image_processor_for(unwrapped.config).save_pretrained(staging)
        if write_extra is not None:
            write_extra(staging)
        (staging / "README.md").write_text(card)
        (staging / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
        _replace_dir(staging, final)
        accelerator.print(f"[{script}] wrote {final}")
    accelerator.wait_for_everyone()


def card_head(title: str, summary: str) -> list[str]:
    """The first lines of a model card: front matter, title, summary and how to load the model."""
    return [
        "---", "library_name: transformers", "tags:", "- semcorr", "- semantic-correspondence", "- pmd",
        "---", "",
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

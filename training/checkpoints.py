"""Training checkpoints: ``checkpoints/step-N`` folders written whole or not at all, and resumed.

A checkpoint is ``accelerator.save_state`` (model, optimizer, scheduler, the RNG states of every
process) plus ``trainer_state.json`` (step, epoch, steps per epoch, world size, global batch) and
whatever extra state the task writes (e.g. the PMD student's PSR prior). Every process writes into
one staging folder, ``checkpoints/.tmp-step-N``; the main process then renames it into place, so a
run killed while saving leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from semcorr.utils import atomic_write_json, replace_directory

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def checkpoint_steps(output_dir: Path) -> list[int]:
    """The steps of the complete checkpoints (with ``trainer_state.json``) under ``output_dir``, sorted."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        if entry.name.startswith(CHECKPOINT_PREFIX) and (entry / STATE_FILE).is_file():
            suffix = entry.name[len(CHECKPOINT_PREFIX):]
            if suffix.isdigit():
                steps.append(int(suffix))
    return sorted(steps)


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, keep: int, write_extra=None) -> None:
    """Write ``checkpoints/step-<step>`` and prune to the ``keep`` newest (0 keeps all).

    ``state`` goes into ``trainer_state.json`` beside ``{"step": step}``; ``write_extra(folder)``
    (main process) adds the task's own files. Every process takes part (``save_state`` writes one
    RNG file per process) and waits for the folder to be in place.
    """
    root = Path(output_dir) / "checkpoints"
    staging = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(staging)
        atomic_write_json(staging / STATE_FILE, {"step": step, **state}, indent=None)
        replace_directory(staging, root / f"{CHECKPOINT_PREFIX}{step}")
        if keep:
            for old in checkpoint_steps(output_dir)[:-keep]:
                shutil.rmtree(root / f"{CHECKPOINT_PREFIX}{old}", ignore_errors=True)
    accelerator.wait_for_everyone()


def restore_latest_checkpoint(accelerator, output_dir: Path) -> tuple[int, Path | None]:
    """Load the newest complete checkpoint into the prepared objects; ``(its step, its folder)`` or ``(0, None)``.

    Raises:
        ValueError: the checkpoint was written with another number of processes or global batch
            (the data order would differ, so the resumed run could not equal the uninterrupted one).
    """
    steps = checkpoint_steps(output_dir)
    if not steps:
        return 0, None
    checkpoint = Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{steps[-1]}"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if state.get("world_size", accelerator.num_processes) != accelerator.num_processes:
        raise ValueError(f"{checkpoint} was written by {state['world_size']} process(es); resume it with the same "
                         f"number (this run has {accelerator.num_processes})")
    accelerator.load_state(str(checkpoint))
    return state["step"], checkpoint

"""The one training loop of semcorr. A task supplies its model, its data and the loss of a step;
:class:`Trainer` does everything else, identically for every task.

What the loop owns: the ``Accelerator`` (one process or many: ``torchrun --nproc_per_node N`` /
``accelerate launch``), torch threads, the optimiser and schedule from the ``optim`` section, the
epoch / step arithmetic, a progress bar, trackers and ``metrics.jsonl``, the stop on a non-finite
loss (naming the step), checkpoints every ``run.save_every_steps`` and ``--resume``, ``run.init_from``
and the ``final/`` folder (``save_pretrained`` + image processor + model card + metrics).

What a task supplies (:class:`TrainingTask`): ``build_model()``, ``num_items()`` (items per epoch),
``step(model, context) -> StepOutput`` (the loss of this process's slice of the global batch),
and optionally state to checkpoint, an end-of-epoch update, an epoch summary and a model card.

Determinism. Step ``s`` of epoch ``e`` takes the items ``order_e[s*B:(s+1)*B]`` of the global batch
``B`` (``order_e = task.epoch_order(e)``, seeded by ``(seed, e)``); every process sees the same
global batch and trains on its slice; tasks seed every other draw from ``(seed, e, s, ...)``
(:mod:`semcorr.training.seeding`). A run resumed from a checkpoint (model, optimiser, schedule and
RNG states restored by ``accelerator.load_state``, plus the task's own state) therefore equals the
uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import CHECKPOINT_PREFIX, checkpoint_steps, restore_latest_checkpoint, save_checkpoint
from .optim import build_optimizer, build_scheduler
from .seeding import epoch_order
from .tracking import (
    METRICS_FILE,
    append_metrics,
    epoch_means,
    flat_hparams,
    log_step,
    make_accelerator,
    progress_bar,
    reduce_terms,
    torch_threads,
)


class TrainingError(RuntimeError):
    """A run stopped on purpose (non-finite loss, too many unreadable images); the message says why."""


class NonFiniteLossError(TrainingError):
    pass


@dataclass
class StepContext:
    """Where a step is: its items (the whole global batch) and this process's place in it."""

    epoch: int  # 0-based
    step_in_epoch: int  # 0-based
    global_step: int  # optimizer steps done before this one
    items: list[int]  # item indices of the global batch, identical on every process
    rank: int
    world: int
    device: torch.device

    @property
    def piece(self) -> slice:
        """This process's slice of the global batch."""
        per_process = len(self.items) // self.world
        return slice(self.rank * per_process, (self.rank + 1) * per_process)


@dataclass
class StepOutput:
    """What a task's step returns.

    Attributes:
        loss: the scalar to minimise (this process's slice).
        terms: scalars logged as ``train/<name>`` (mean over processes) and averaged per epoch;
            ``loss`` is added.
        record: extra fields of the step's ``metrics.jsonl`` record (main process).
        hidden: keys of ``record`` not sent to the trackers (lists, ids).
        progress_key: the term shown on the progress bar.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    hidden: tuple[str, ...] = ()
    progress_key: str = "loss"


class TrainingTask(ABC):
    """A training task: subclass it and implement :meth:`build_model`, :meth:`num_items`, :meth:`step`.

    ``config`` is the entry point's :class:`~semcorr.training.config.SectionedConfig` with ``optim``
    and ``run`` sections. Class attributes: ``name`` (the log prefix: the entry point's name),
    ``project`` (the trackers' project), ``noun`` (how messages call the model),
    ``min_per_process_batch`` (e.g. 2 for batch norm over pairs).
    """

    name = "training"
    project = "semcorr"
    noun = "model"
    min_per_process_batch = 1

    def __init__(self, config):
        self.config = config

    # -- required ------------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self):
        """The model to train (seeded, weights loaded; the loop moves and wraps it)."""

    @abstractmethod
    def num_items(self) -> int:
        """Items (images, pairs) per epoch; ``num_items // batch_size`` steps make an epoch."""

    @abstractmethod
    def step(self, model, context: StepContext) -> StepOutput:
        """The loss of this process's slice of ``context.items`` (the loop does backward and the update)."""

    # -- optional hooks ------------------------------------------------------------------------------
    def setup(self, accelerator) -> None:
        """Called once the accelerator exists, before :meth:`build_model` (load data here)."""

    def begin_epoch(self, epoch: int) -> None:
        """Before an epoch's first step (also the first epoch of a resumed run): reset per-epoch counts."""

    def epoch_order(self, epoch: int) -> list[int]:
        """The items of an epoch in order: a permutation seeded by ``(optim.seed, epoch)``."""
        return epoch_order(self.num_items(), 1, self.config.optim.seed, epoch)

    def after_update(self, accelerator, output: StepOutput, context: StepContext) -> None:
        """After the optimizer step (all processes): accumulate per-item statistics."""

    def end_of_epoch(self, epoch: int) -> None:
        """After an epoch's last step, before its checkpoint: per-epoch state updates."""

    def epoch_summary(self, epoch: int) -> dict:
        """Extra keys of the epoch record; a ``"note"`` key is appended to the printed line."""
        return {}

    def check_epoch(self, epoch: int) -> None:
        """After the epoch is logged: raise :class:`TrainingError` to stop the run."""

    def save_state(self, folder: Path) -> None:
        """Write the task's own state into a checkpoint (or ``final/``) folder (main process)."""

    def load_state(self, folder: Path) -> None:
        """Read what :meth:`save_state` wrote (every process, on ``--resume``)."""

    def final_metrics(self) -> dict:
        """Extra keys of the final metrics (``training_metrics.json``, the card)."""
        return {}

    def model_card(self, metrics: dict) -> str:
        """The ``final/README.md`` model card."""
        return f"# {self.name}\n"


class Trainer:
    """Runs a :class:`TrainingTask` under a config; see the module docstring."""

    def __init__(self, task: TrainingTask, resume: bool = False, max_steps: int | None = None):
        self.task, self.config = task, task.config
        self.resume, self.max_steps = resume, max_steps
        self.output_dir = Path(self.config.run.output_dir).expanduser()

    def run(self) -> dict:
        """Train (or resume); returns the final metrics on every process."""
        with torch_threads(self.config.run.num_threads):
            self._setup()
            self._restore()
            self.started = time.time()
            self.model.train()
            for epoch, steps in self._epochs():
                self._run_epoch(epoch, steps)
            return self._finish()

    # -- setup -----------------------------------------------------------------------------------------
    def _setup(self) -> None:
        optim, run = self.config.optim, self.config.run
        self.accelerator = make_accelerator(run.cpu, self.output_dir, run.log_with)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.task.setup(self.accelerator)
        self.global_batch = optim.batch_size
        self.per_process = self._per_process_batch()
        num_items = self.task.num_items()
        if num_items < self.global_batch:
            raise ValueError(f"optim.batch_size {self.global_batch} exceeds the {num_items} items of an epoch")
        self.steps_per_epoch = num_items // self.global_batch  # drop_last: every step sees a full batch
        limits = [limit for limit in (optim.max_steps, self.max_steps) if limit is not None]
        self.total_steps = min([self.steps_per_epoch * optim.epochs, *limits])
        model = self.task.build_model()
        if run.init_from is not None:
            load_weights(model, Path(run.init_from).expanduser() / "model.safetensors", self.task.noun)
        optimizer = build_optimizer(model.parameters(), optim)
        scheduler = build_scheduler(optimizer, optim, self.steps_per_epoch, self.total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)

    def _per_process_batch(self) -> int:
        if self.global_batch % self.world:
            raise ValueError(f"optim.batch_size {self.global_batch} is not divisible by the {self.world} processes")
        per_process = self.global_batch // self.world
        minimum = self.task.min_per_process_batch
        if per_process < minimum:
            raise ValueError(f"optim.batch_size {self.global_batch} over {self.world} process(es) gives {per_process} "
                             f"item(s) per process; {self.task.name} needs at least {minimum} per process")
        return per_process

    def _restore(self) -> None:
        self.step, self.last_saved = 0, None
        if self.resume:
            self.step, checkpoint = restore_latest_checkpoint(self.accelerator, self.output_dir)
            if checkpoint is None:
                self.accelerator.print(f"[{self.task.name}] --resume: no checkpoint in "
                                       f"{self.output_dir / 'checkpoints'}; starting at step 0")
            else:
                self.task.load_state(checkpoint)
                self.last_saved = self.step
                self.accelerator.print(f"[{self.task.name}] resumed from {checkpoint} at step {self.step}")
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.init_trackers(self.task.project, config=flat_hparams(self.config))
        self.metrics_file = self.output_dir / METRICS_FILE

    def _epochs(self):
        """``(epoch, range of in-epoch steps)`` from the current step up to the last one."""
        step = self.step
        while step < self.total_steps:
            epoch, first = divmod(step, self.steps_per_epoch)
            last = min(self.steps_per_epoch, first + self.total_steps - step)
            yield epoch, range(first, last)
            step += last - first

    # -- the loop ------------------------------------------------------------------------------------
    def _run_epoch(self, epoch: int, steps: range) -> None:
        self.task.begin_epoch(epoch)
        order = self.task.epoch_order(epoch)
        self.epoch_values: dict[str, list[float]] = {}
        bar = progress_bar(self.accelerator, len(steps), f"epoch {epoch + 1}/{self.config.optim.epochs}")
        for in_epoch in steps:
            items = order[in_epoch * self.global_batch:(in_epoch + 1) * self.global_batch]
            values = self._train_step(epoch, in_epoch, items)
            bar.set_postfix({key: f"{value:.4f}" for key, value in values.items()}, refresh=False)
            bar.update(1)
        bar.close()
        summary = {"epoch": epoch + 1, "step": self.step, **self.task.epoch_summary(epoch),
                   **epoch_means(self.epoch_values, "epoch/")}
        note = summary.pop("note", "")
        append_metrics(self.accelerator, self.metrics_file, summary)
        self.accelerator.print(f"[{self.task.name}] epoch {epoch + 1}: step {self.step}/{self.total_steps}, "
                               f"loss {summary.get('epoch/loss', float('nan')):.4f}" + note)
        try:
            self.task.check_epoch(epoch)
        except TrainingError:
            self.accelerator.end_training()
            raise

    def _train_step(self, epoch: int, in_epoch: int, items: list[int]) -> dict[str, float]:
        """One optimizer step; returns the progress-bar value."""
        context = StepContext(epoch, in_epoch, self.step, items, self.rank, self.world, self.accelerator.device)
        output = self.task.step(self.model, context)
        self._check_finite(output.loss, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(output.loss)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.task.after_update(self.accelerator, output, context)
        values = reduce_terms(self.accelerator, {"loss": output.loss, **output.terms}, self.epoch_values)
        if in_epoch + 1 == self.steps_per_epoch:
            self.task.end_of_epoch(epoch)
        run = self.config.run
        if self.step % run.log_every_steps == 0 or self.step == self.total_steps:
            record = {"step": self.step, "epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0],
                      "world_size": self.world, "per_process_batch_size": self.per_process, **output.record,
                      **{f"train/{key}": value for key, value in values.items()}}
            log_step(self.accelerator, self.metrics_file, record, hidden=output.hidden)
        if run.save_every_steps and self.step % run.save_every_steps == 0 and self.step < self.total_steps:
            self._save()
        return {output.progress_key: values.get(output.progress_key, values["loss"])}

    def _check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        """Stop every process when the loss of any is NaN / inf, naming the step and the last good checkpoint."""
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=self.accelerator.device)
        if self.accelerator.reduce(finite, reduction="sum").item() < self.world:
            self.accelerator.end_training()
            last = (self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.last_saved}"
                    if self.last_saved else "none")
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} (epoch {epoch + 1}, loss "
                                     f"{loss.item()}); stopped without saving it; last good checkpoint: {last}")

    def _save(self) -> None:
        state = {"epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                 "world_size": self.world, "global_batch_size": self.global_batch}
        save_checkpoint(self.accelerator, self.output_dir, self.step, state, self.config.run.keep_checkpoints,
                        write_extra=self.task.save_state)
        self.last_saved = self.step

    # -- the end -------------------------------------------------------------------------------------
    def _finish(self) -> dict:
        if self.last_saved != self.step:
            self._save()
        metrics = {"steps": self.step, "epochs_completed": round(self.step / self.steps_per_epoch, 3),
                   "world_size": self.world, "global_batch_size": self.global_batch, **self.task.final_metrics(),
                   "train_seconds": round(time.time() - self.started, 1),
                   **epoch_means(getattr(self, "epoch_values", {}), "train_")}
        write_final(self.accelerator, self.model, self.output_dir, self.task.model_card(metrics), metrics,
                    self.task.name, write_extra=self.task.save_state)
        self.accelerator.end_training()
        return metrics


def write_final(accelerator, model, output_dir: Path, card: str, metrics: dict, name: str, write_extra=None) -> None:
    """``output_dir/final``: ``save_pretrained``, the image processor, ``write_extra(folder)``, the model
    card ``README.md`` and ``training_metrics.json``, built aside and renamed into place (main process)."""
    from semcorr.modeling import image_processor_for
    from semcorr.utils import atomic_directory, json_safe

    if accelerator.is_main_process:
        with atomic_directory(output_dir / "final") as staging:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(staging)
            if hasattr(unwrapped.config, "image_size"):  # a semcorr matcher: its image processor beside it
                image_processor_for(unwrapped.config).save_pretrained(staging)
            if write_extra is not None:
                write_extra(staging)
            (staging / "README.md").write_text(card)
            (staging / "training_metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
        accelerator.print(f"[{name}] wrote {output_dir / 'final'}")
    accelerator.wait_for_everyone()


def load_weights(model, path: Path, noun: str = "model") -> None:
    """Every weight of ``model`` from a safetensors file (``run.init_from``); a misfit raises ValueError."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"run.init_from: {path} does not fit this {noun} ({first}); the same architecture is "
                         "needed") from error
    if missing or unexpected:
        raise ValueError(f"run.init_from: {path} does not fit this {noun}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]} (the same architecture is needed)")


def run_command(name: str, load_config, task_class, args) -> int:
    """The body of an entry point's ``main``: load the config, run the task, map errors to exit codes.

    Returns 0; 2 after a ``ValueError`` (bad config, flag or data); 1 after a :class:`TrainingError`.
    The message goes to stderr as ``<name>: error: <message>``, on one line.
    """
    try:
        if getattr(args, "max_steps", None) is not None and args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        config = load_config()
        Trainer(task_class(config), resume=args.resume, max_steps=args.max_steps).run()
    except (ValueError, TrainingError) as error:
        message = " ".join(str(error).split())
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    return 0


__all__ = [
    "NonFiniteLossError", "StepContext", "StepOutput", "Trainer", "TrainingError", "TrainingTask",
    "checkpoint_steps", "load_weights", "run_command", "write_final",
]

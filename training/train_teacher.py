"""Train the PMD probabilistic teacher on synthetic pairs (random warps of unlabelled images).

Usage::

    python -m semcorr.training.train_teacher --config semcorr/training/configs/pmd_cpu_tiny.yaml \\
        [--output-dir D] [--resume] [--max-steps N]
    torchrun --nproc_per_node 2 -m semcorr.training.train_teacher --config ...     # 2 CPU processes
    accelerate launch [--multi_gpu --num_processes 2] -m semcorr.training.train_teacher --config ...

On a CPU-only host ``accelerate launch --cpu --num_processes 2`` silently runs ONE process; use
``torchrun`` or ``accelerate launch --multi_gpu`` (``Accelerator(cpu=True)`` is chosen automatically
when no GPU is present or ``ACCELERATE_USE_CPU`` is set).

Determinism: step ``s`` of epoch ``e`` reads the images ``order_e[s*B:(s+1)*B]`` (``order_e`` a
permutation seeded by ``(seed, e)``), draws its warps from a generator seeded by
``(seed, e, s)`` and the teacher's gate noise from ``(seed, e, s, rank)``. Every process builds the
whole global batch of pairs and trains on its slice, so the data do not depend on the number of
processes, and a run resumed from a checkpoint equals the uninterrupted one.

Outputs under ``output_dir``: ``checkpoints/step-N`` (``accelerator.save_state`` + ``trainer_state.json``),
``final/`` (``save_pretrained`` + image processor + model card ``README.md``), ``metrics.jsonl``
(one record per logged step and per epoch), tracker logs. Directories are written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semcorr.training.config import TrainConfig, load_config, resolve_image_source

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
MAX_UNREADABLE_FRACTION = 0.01


class TrainingError(RuntimeError):
    """A run stopped on purpose (non-finite loss, too many unreadable images); the message says why."""


class NonFiniteLossError(TrainingError):
    pass


class UnreadableImagesError(TrainingError):
    pass


# -- data ------------------------------------------------------------------------------------------
class ImageSource:
    """Indexable unlabelled images (folder, list of paths, ``datasets.Dataset``) -> ``(3, H, W)`` in [0, 1]."""

    def __init__(self, data, image_size):
        from semcorr.hub_datasets.synthetic import iter_image_batches

        if data.images is not None:
            source = resolve_image_source(data.images)
        else:
            source = _load_dataset(data.dataset, data.dataset_split)
        kwargs = {"image_column": data.image_column} if data.images is None else {}
        batches = iter_image_batches(source, 1, tuple(image_size), shuffle=False, **kwargs)
        self.items, self._reader = batches.items, batches.reader
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if len(self.items) == 0:
            raise ValueError(f"no images found in {data.images or data.dataset}")

    def __len__(self):
        return len(self.items)

    def read(self, index: int) -> torch.Tensor:
        """The image as a float tensor; raises ``ValueError`` / ``OSError`` when unreadable."""
        image = self._reader(index)
        height, width = self.image_size
        resized = image.resize((width, height), Image.BICUBIC)
        return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _load_dataset(name: str, split: str):
    import datasets

    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                          or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(str(path) if path.is_dir() else name, split=split)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value


def epoch_order(num_images: int, repeats: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(_seed(seed, epoch))
    return [i for _ in range(repeats) for i in torch.randperm(num_images, generator=generator).tolist()]


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoint_steps(output_dir: Path) -> list[int]:
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


def append_metrics(accelerator, metrics_file: Path, record: dict) -> None:
    """Append one JSON line to ``metrics.jsonl`` (main process only)."""
    if accelerator.is_main_process:
        with open(metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")


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


def model_card(config: TrainConfig, metrics: dict, model_config) -> str:
    data = config.data.images or f"{config.data.dataset} (split {config.data.dataset_split})"
    lines = [
        "---", "library_name: transformers", "tags:", "- semcorr", "- semantic-correspondence", "- pmd",
        "---", "",
        "# PMD teacher (semcorr)", "",
        "Probabilistic teacher of PMD (Li et al., *Probabilistic Model Distillation for Semantic "
        "Correspondence*, CVPR 2021), trained with `semcorr.training.train_teacher` on synthetic pairs "
        "(random affine / homography / TPS warps, flips and colour jitter of unlabelled images).", "",
        "```python", "import semcorr.modeling  # registers the model types",
        "from transformers import AutoModel", "model = AutoModel.from_pretrained('<this folder>')", "```", "",
        "## Data", "", f"- images: `{data}` ({metrics.get('num_images')} images, image size {model_config.image_size})",
        f"- warps: {', '.join(config.data.warp_kinds)}; flip probability {config.data.flip_prob}; "
        f"colour jitter {config.data.color_jitter}", "",
        "## Training", "",
        f"- backbone `{model_config.backbone}` (frozen, weights `{model_config.backbone_weights}`), "
        f"levels {model_config.backbone_layers}",
        f"- Adam lr {config.optim.lr}, global batch {config.optim.batch_size}, "
        f"{metrics.get('steps')} steps ({metrics.get('epochs_completed')} epochs), lr x{config.optim.lr_gamma} "
        f"at epochs {config.optim.lr_milestones}, seed {config.optim.seed}, {metrics.get('world_size')} process(es)", "",
        "## Metrics (training, last epoch mean)", "",
        "| metric | value |", "|---|---|",
    ]
    for key, value in sorted(metrics.items()):
        lines.append(f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "## Config", "", "```json", json.dumps(config.to_dict(), indent=2, default=str), "```", ""]
    return "\n".join(lines)


# -- training --------------------------------------------------------------------------------------
def build_model(model_fields: dict, seed: int):
    from semcorr.modeling import PMDTeacherConfig, PMDTeacherModel
    from semcorr.modeling.backbone import load_backbone_weights

    model_config = PMDTeacherConfig(**model_fields)
    torch.manual_seed(seed)
    model = PMDTeacherModel(model_config)
    if model_config.backbone_weights:
        load_backbone_weights(model.backbone, model_config.backbone_weights)
    return model


def _trackers(names: list[str]) -> list[str]:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    chosen = []
    for name in names:
        check = available.get(name)
        if check is not None and not check():
            print(f"[train_teacher] tracker '{name}' is not installed; skipped (metrics.jsonl is written anyway)",
                  file=sys.stderr)
            continue
        chosen.append(name)
    return chosen


def _flat_hparams(config: TrainConfig) -> dict:
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(config: TrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a teacher training; see :func:`_train`. ``run.num_threads`` holds only for the run."""
    threads = torch.get_num_threads()
    try:
        if config.run.num_threads:
            torch.set_num_threads(config.run.num_threads)
        return _train(config, resume, max_steps)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a teacher training; returns the final metrics (on every process).

    Raises:
        NonFiniteLossError: the loss of a step was NaN / inf (the step is named; nothing is saved for it).
        UnreadableImagesError: more than 1 % of the images of an epoch could not be read.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from semcorr.hub_datasets.synthetic import ColorJitter, SyntheticPairGenerator
    from semcorr.modeling import image_processor_for

    output_dir = Path(config.run.output_dir)
    images = ImageSource(config.data, config.model.get("image_size") or [320, 320])
    cpu = config.run.cpu
    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    trackers = _trackers(list(config.run.log_with)) if config.run.log_with else []
    accelerator = Accelerator(
        cpu=cpu, log_with=trackers or None, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.optim.batch_size
    if global_batch % world:
        raise ValueError(f"optim.batch_size {global_batch} is not divisible by the {world} processes")
    per_process = global_batch // world
    if per_process < 2:
        raise ValueError(
            f"optim.batch_size {global_batch} over {world} process(es) gives {per_process} pair per process; the "
            "batch norm of the co-channel attention needs at least 2 per process"
        )
    positions_per_epoch = len(images) * config.data.repeats
    if positions_per_epoch < global_batch:
        raise ValueError(
            f"optim.batch_size {global_batch} exceeds the {len(images)} images x {config.data.repeats} repeats of an epoch"
        )
    steps_per_epoch = positions_per_epoch // global_batch  # drop_last: every step sees a full batch
    total_steps = steps_per_epoch * config.optim.epochs
    for limit in (config.optim.max_steps, max_steps):
        if limit is not None:
            total_steps = min(total_steps, limit)

    model = build_model(config.model, config.optim.seed)
    model_config = model.config
    mean = torch.tensor(model_config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model_config.image_std).view(1, 3, 1, 1)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    milestones = [m * steps_per_epoch for m in config.optim.lr_milestones]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.optim.lr_gamma)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    if resume:
        step, checkpoint = restore_latest_checkpoint(accelerator, output_dir, "train_teacher")
        if checkpoint is not None:
            accelerator.print(f"[train_teacher] resumed from {checkpoint} at step {step}")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers("pmd-teacher", config=_flat_hparams(config))
    metrics_file = output_dir / "metrics.jsonl"

    def log(record: dict):
        append_metrics(accelerator, metrics_file, record)

    def save_checkpoint(at_step: int):
        state = {"epoch": at_step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                 "world_size": world, "global_batch_size": global_batch}
        save_training_checkpoint(accelerator, output_dir, at_step, state, config.run.keep_checkpoints)

    jitter = ColorJitter() if config.data.color_jitter else None
    epoch_losses: dict[str, list[float]] = {}
    last_saved = step if resume and step else None
    model.train()
    start_time = time.time()
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        order = epoch_order(len(images), config.data.repeats, config.optim.seed, epoch)
        attempted, unreadable, skipped_names = 0, 0, []
        epoch_losses = {}
        last = min(steps_per_epoch, first + total_steps - step)
        bar = tqdm(range(first, last), desc=f"epoch {epoch + 1}/{config.optim.epochs}",
                   disable=not accelerator.is_local_main_process, leave=False)
        for in_epoch in bar:
            # -- the global batch (identical on every process), then this process's slice
            batch_images = []
            for index in order[in_epoch * global_batch:(in_epoch + 1) * global_batch]:
                attempted += 1
                try:
                    batch_images.append(images.read(index))
                except (ValueError, OSError, SyntaxError):
                    unreadable += 1
                    skipped_names.append(str(images.items[index]))
            if not batch_images:
                raise UnreadableImagesError(f"step {step + 1}: no readable image in the batch ({skipped_names[-global_batch:]})")
            while len(batch_images) < global_batch:  # refill the places of unreadable images
                batch_images.append(batch_images[len(batch_images) % max(1, len(batch_images))])
            pixels = torch.stack(batch_images)
            pairs = SyntheticPairGenerator(
                kinds=config.data.warp_kinds, flip_prob=config.data.flip_prob, jitter=jitter,
                seed=_seed(config.optim.seed, epoch, in_epoch),
            )(pixels)
            fingerprint = float(pairs["grid_trg_to_src"].double().sum() + pairs["target_pixel_values"].double().sum())
            piece = slice(rank * per_process, (rank + 1) * per_process)
            device = accelerator.device
            inputs = {
                "source_pixel_values": ((pairs["source_pixel_values"][piece] - mean) / std).to(device),
                "target_pixel_values": ((pairs["target_pixel_values"][piece] - mean) / std).to(device),
                "grid_trg_to_src": pairs["grid_trg_to_src"][piece].to(device),
                "valid_trg": pairs["valid_trg"][piece].to(device),
            }
            torch.manual_seed(_seed(config.optim.seed, epoch, in_epoch, rank, 1))  # gate noise
            output = model(**inputs)
            loss = output.loss
            finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=device)
            if accelerator.reduce(finite, reduction="sum").item() < world:
                accelerator.end_training()
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1} (epoch {epoch + 1}, loss {loss.item()}); stopped without "
                    f"saving it; last good checkpoint: "
                    f"{output_dir / 'checkpoints' / f'{CHECKPOINT_PREFIX}{last_saved}' if last_saved else 'none'}"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            terms = {"loss": loss.detach(), **{k: v.detach() for k, v in (output.losses or {}).items()}}
            values = {k: accelerator.reduce(v.float().reshape(1), reduction="mean").item() for k, v in terms.items()}
            for key, value in values.items():
                epoch_losses.setdefault(key, []).append(value)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if step % config.run.log_every_steps == 0 or step == total_steps:
                record = {"step": step, "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "world_size": world,
                          "per_process_batch_size": per_process,
                          "data_fingerprint": fingerprint, **{f"train/{k}": v for k, v in values.items()}}
                accelerator.log({k: v for k, v in record.items() if k not in ("step",)}, step=step)
                log(record)
            if config.run.save_every_steps and step % config.run.save_every_steps == 0 and step < total_steps:
                save_checkpoint(step)
                last_saved = step
        bar.close()
        if in_epoch + 1 == steps_per_epoch or step == total_steps:
            fraction = unreadable / max(1, attempted)
            summary = {"epoch": epoch + 1, "step": step, "images_attempted": attempted, "images_unreadable": unreadable,
                       **{f"epoch/{k}": float(np.mean(v)) for k, v in epoch_losses.items()}}
            log(summary)
            accelerator.print(
                f"[train_teacher] epoch {epoch + 1}: step {step}/{total_steps}, loss {summary.get('epoch/loss', float('nan')):.4f}, "
                f"{unreadable} of {attempted} images unreadable" + (f" ({', '.join(skipped_names[:5])})" if unreadable else "")
            )
            if fraction > MAX_UNREADABLE_FRACTION:
                accelerator.end_training()
                raise UnreadableImagesError(
                    f"{unreadable} of {attempted} images ({fraction:.1%}) in epoch {epoch + 1} could not be read "
                    f"(more than {MAX_UNREADABLE_FRACTION:.0%}), e.g. {', '.join(skipped_names[:5])}; fix or remove them"
                )

    if last_saved != step:
        save_checkpoint(step)
    metrics = {
        "steps": step, "epochs_completed": round(step / steps_per_epoch, 3), "world_size": world,
        "global_batch_size": global_batch, "num_images": len(images), "train_seconds": round(time.time() - start_time, 1),
        **{f"train_{k}": float(np.mean(v)) for k, v in epoch_losses.items()},
    }
    if accelerator.is_main_process:
        final = output_dir / "final"
        staging = output_dir / ".tmp-final"
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(staging)
        image_processor_for(unwrapped.config).save_pretrained(staging)
        (staging / "README.md").write_text(model_card(config, metrics, unwrapped.config))
        (staging / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
        _replace_dir(staging, final)
        accelerator.print(f"[train_teacher] wrote {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m semcorr.training.train_teacher", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (sections model, data, optim, run)")
    parser.add_argument("--output-dir", help="overrides run.output_dir")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from semcorr.modeling import PMDTeacherConfig

    args = parse_args(argv)
    overrides = {"run.output_dir": args.output_dir} if args.output_dir else {}
    try:
        config = load_config(args.config, PMDTeacherConfig, overrides)
        if args.max_steps is not None and args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        train(config, resume=args.resume, max_steps=args.max_steps)
    except (ValueError, TrainingError) as error:
        print(f"train_teacher: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

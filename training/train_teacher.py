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

Strong supervision (``--keypoint-dataset`` / ``data.keypoint_dataset``): every step also takes a
global batch of labelled pairs (a benchmark split or a ``save_to_disk`` folder of keypoint pairs; rows
from seeded permutations, see :func:`~semcorr.training.keypoint_supervision.keypoint_rows`) and adds
the teacher's sparse keypoint-flow loss (weight ``model.keypoint_weight``), logged as ``train/keypoints``.

Outputs under ``output_dir``: ``checkpoints/step-N`` (``accelerator.save_state`` + ``trainer_state.json``),
``final/`` (``save_pretrained`` + image processor + model card ``README.md`` + ``training_metrics.json``),
``metrics.jsonl`` (one record per logged step and per epoch), tracker logs. Directories are written
under a temporary name and renamed into place. The step loop, checkpoints and outputs are the pieces
of :mod:`semcorr.training.trainer`, shared with :mod:`semcorr.training.distill_student`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semcorr.training import trainer
from semcorr.training.config import TrainConfig, load_config, resolve_image_source
from semcorr.training.keypoint_supervision import keypoint_batch, keypoint_rows, load_keypoint_pairs
from semcorr.training.trainer import (  # re-exported: importers of this module use these names from here
    CHECKPOINT_PREFIX,
    STATE_FILE,
    NonFiniteLossError,
    TrainingError,
    _seed,
    append_metrics,
    checkpoint_steps,
    epoch_order,
    restore_latest_checkpoint,
    save_training_checkpoint,
)

__all__ = [  # this module's own API and the names it re-exports from semcorr.training.trainer
    "CHECKPOINT_PREFIX", "MAX_UNREADABLE_FRACTION", "STATE_FILE", "ImageSource", "NonFiniteLossError", "TrainingError",
    "UnreadableImagesError", "append_metrics", "build_model", "checkpoint_steps", "epoch_order", "main", "model_card",
    "parse_args", "restore_latest_checkpoint", "save_training_checkpoint", "train",
]

MAX_UNREADABLE_FRACTION = 0.01


class UnreadableImagesError(TrainingError):
    pass


# -- data ------------------------------------------------------------------------------------------
class ImageSource:
    """Indexable unlabelled images (folder, list of paths, ``datasets.Dataset``) -> ``(3, H, W)`` in [0, 1]."""

    def __init__(self, data, image_size):
        from semcorr.training.data.images import iter_image_batches

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


def model_card(config: TrainConfig, metrics: dict, model_config) -> str:
    data = config.data.images or f"{config.data.dataset} (split {config.data.dataset_split})"
    summary = ("Probabilistic teacher of PMD (Li et al., *Probabilistic Model Distillation for Semantic "
               "Correspondence*, CVPR 2021), trained with `semcorr.training.train_teacher` on synthetic pairs "
               "(random affine / homography / TPS warps, flips and colour jitter of unlabelled images).")
    body = [
        "## Data", "", f"- images: `{data}` ({metrics.get('num_images')} images, image size {model_config.image_size})",
        f"- warps: {', '.join(config.data.warp_kinds)}; flip probability {config.data.flip_prob}; "
        f"colour jitter {config.data.color_jitter}", "",
        "## Training", "",
        f"- backbone `{model_config.backbone}` (frozen, weights `{model_config.backbone_weights}`), "
        f"levels {model_config.backbone_layers}",
        f"- Adam lr {config.optim.lr}, global batch {config.optim.batch_size}, "
        f"{metrics.get('steps')} steps ({metrics.get('epochs_completed')} epochs), lr x{config.optim.lr_gamma} "
        f"at epochs {config.optim.lr_milestones}, seed {config.optim.seed}, {metrics.get('world_size')} process(es)", "",
    ]
    return "\n".join(trainer.card_head("PMD teacher (semcorr)", summary) + body + trainer.card_tail(metrics, config))


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


def load_weights(model, path: Path) -> None:
    """Every weight of ``model`` from a safetensors file (fine-tuning); a mismatch raises ValueError."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"run.init_from: {path} does not fit this teacher ({first}); same backbone, levels and "
                         "kernels needed") from error
    if missing or unexpected:
        raise ValueError(f"run.init_from: {path} does not fit this teacher: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]} (same backbone, levels and kernels needed)")


def train(config: TrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a teacher training; see :func:`_train`. ``run.num_threads`` holds only for the run."""
    with trainer.torch_threads(config.run.num_threads):
        return _train(config, resume, max_steps)


def _train(config: TrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a teacher training; returns the final metrics (on every process).

    Raises:
        NonFiniteLossError: the loss of a step was NaN / inf (the step is named; nothing is saved for it).
        UnreadableImagesError: more than 1 % of the images of an epoch could not be read.
    """
    from semcorr.training.data.synthetic import ColorJitter, SyntheticPairGenerator
    from semcorr.modeling import image_processor_for

    output_dir = Path(config.run.output_dir)
    images = ImageSource(config.data, config.model.get("image_size") or [320, 320])
    accelerator = trainer.make_accelerator(config.run, output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.optim.batch_size
    per_process = trainer.per_process_batch(global_batch, world)
    positions_per_epoch = len(images) * config.data.repeats
    if positions_per_epoch < global_batch:
        raise ValueError(
            f"optim.batch_size {global_batch} exceeds the {len(images)} images x {config.data.repeats} repeats of an epoch"
        )
    steps_per_epoch = positions_per_epoch // global_batch  # drop_last: every step sees a full batch
    total_steps = trainer.count_steps(steps_per_epoch, config.optim.epochs, config.optim.max_steps, max_steps)

    model = build_model(config.model, config.optim.seed)
    if config.run.init_from is not None:
        load_weights(model, Path(config.run.init_from).expanduser() / "model.safetensors")
    model_config = model.config
    mean = torch.tensor(model_config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model_config.image_std).view(1, 3, 1, 1)
    labelled = None
    if config.data.keypoint_dataset is not None:
        with accelerator.main_process_first():  # one process prepares a benchmark's Arrow cache
            labelled = load_keypoint_pairs(config.data.keypoint_dataset, config.data.keypoint_data_dir,
                                           config.data.keypoint_split)
        if len(labelled) < global_batch:
            raise ValueError(f"data.keypoint_dataset has {len(labelled)} pairs, fewer than optim.batch_size {global_batch}")
        processor = image_processor_for(model_config)
    model, optimizer, scheduler = trainer.prepare_optimizer(accelerator, model, config.optim, steps_per_epoch)

    step = 0
    if resume:
        step, checkpoint = trainer.restore_latest_checkpoint(accelerator, output_dir, "train_teacher")
        if checkpoint is not None:
            accelerator.print(f"[train_teacher] resumed from {checkpoint} at step {step}")
    metrics_file = trainer.start_logging(accelerator, output_dir, "pmd-teacher", config)

    jitter = ColorJitter() if config.data.color_jitter else None
    epoch_losses: dict[str, list[float]] = {}
    last_saved = step if resume and step else None
    model.train()
    start_time = time.time()
    for epoch, steps in trainer.epoch_ranges(step, steps_per_epoch, total_steps):
        order = trainer.epoch_order(len(images), config.data.repeats, config.optim.seed, epoch)
        attempted, unreadable, skipped_names = 0, 0, []
        epoch_losses = {}
        bar = trainer.progress_bar(accelerator, steps, epoch, config.optim.epochs)
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
            loss, losses = output.loss, dict(output.losses or {})
            if labelled is not None:  # strong supervision: a batch of labelled pairs in the same step
                rows = keypoint_rows(len(labelled), global_batch, config.optim.seed, epoch * steps_per_epoch + in_epoch)
                batch = keypoint_batch(labelled, rows[piece], processor)
                labelled_output = model(**{k: v.to(device) for k, v in batch.items()})
                loss = loss + labelled_output.loss
                losses["keypoints"] = labelled_output.losses["keypoints"]
            trainer.check_finite(accelerator, loss, step, epoch, output_dir, last_saved)
            trainer.optimizer_step(accelerator, loss, optimizer, scheduler)
            step += 1
            terms = {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}
            values = trainer.reduce_terms(accelerator, terms, epoch_losses)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if trainer.log_due(step, config.run, total_steps):
                trainer.log_step(accelerator, metrics_file, {
                    "step": step, "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "world_size": world,
                    "per_process_batch_size": per_process, "data_fingerprint": fingerprint,
                    **{f"train/{k}": v for k, v in values.items()}})
            if trainer.save_due(step, config.run, total_steps):
                trainer.save_checkpoint(accelerator, output_dir, step, steps_per_epoch, global_batch, config.run.keep_checkpoints)
                last_saved = step
        bar.close()
        fraction = unreadable / max(1, attempted)
        summary = {"epoch": epoch + 1, "step": step, "images_attempted": attempted, "images_unreadable": unreadable,
                   **trainer.epoch_means(epoch_losses, "epoch/")}
        trainer.log_epoch(accelerator, metrics_file, summary, total_steps, "train_teacher",
                  f", {unreadable} of {attempted} images unreadable" + (f" ({', '.join(skipped_names[:5])})" if unreadable else ""))
        if fraction > MAX_UNREADABLE_FRACTION:
            accelerator.end_training()
            raise UnreadableImagesError(
                f"{unreadable} of {attempted} images ({fraction:.1%}) in epoch {epoch + 1} could not be read "
                f"(more than {MAX_UNREADABLE_FRACTION:.0%}), e.g. {', '.join(skipped_names[:5])}; fix or remove them"
            )

    if last_saved != step:
        trainer.save_checkpoint(accelerator, output_dir, step, steps_per_epoch, global_batch, config.run.keep_checkpoints)
    metrics = {
        **trainer.run_metrics(step, steps_per_epoch, world, global_batch),
        "num_images": len(images), "train_seconds": round(time.time() - start_time, 1),
        **trainer.epoch_means(epoch_losses, "train_"),
    }
    trainer.write_final(accelerator, model, output_dir, model_card(config, metrics, model_config), metrics, "train_teacher")
    accelerator.end_training()
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m semcorr.training.train_teacher", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (sections model, data, optim, run)")
    parser.add_argument("--output-dir", help="overrides run.output_dir")
    parser.add_argument("--keypoint-dataset", help="adds sparse keypoint supervision (strongly supervised PMD): "
                        "pf-pascal | pf-willow | spair-71k | a save_to_disk folder of keypoint pairs")
    parser.add_argument("--keypoint-data-dir", help="the extracted benchmark folder of --keypoint-dataset")
    parser.add_argument("--keypoint-split", help="split of --keypoint-dataset (default trn)")
    parser.add_argument("--init-from", help="fine-tune: start from this teacher's save_pretrained directory")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from semcorr.modeling import PMDTeacherConfig

    args = parse_args(argv)
    flags = {"run.output_dir": args.output_dir, "data.keypoint_dataset": args.keypoint_dataset,
             "data.keypoint_data_dir": args.keypoint_data_dir, "data.keypoint_split": args.keypoint_split,
             "run.init_from": args.init_from}
    overrides = {key: value for key, value in flags.items() if value is not None}
    return trainer.run_command("train_teacher", lambda: load_config(args.config, PMDTeacherConfig, overrides), train, args)


if __name__ == "__main__":
    sys.exit(main())

"""Train the PMD probabilistic teacher on synthetic pairs (random warps of unlabelled images).

PMD: Li et al., *Probabilistic Model Distillation for Semantic Correspondence*, CVPR 2021.

Usage::

    python -m semcorr.training.train_teacher --config pmd_cpu_tiny.yaml [--output-dir D] [--resume]
        [--max-steps N] [--set optim.lr=1e-4 ...]
    torchrun --nproc_per_node 2 -m semcorr.training.train_teacher --config ...     # 2 CPU processes
    accelerate launch [--multi_gpu --num_processes 8] -m semcorr.training.train_teacher --config ...

The config (:class:`TeacherConfig`) has the sections ``model`` (fields of
:class:`~semcorr.modeling.PMDTeacherConfig`), ``data`` (:class:`TeacherDataConfig`), ``optim`` and
``run`` (:mod:`semcorr.training.config`). The loop, checkpoints, resume and outputs are those of
:mod:`semcorr.training.loop`; this module is the task: the data of a step and its loss.

A step: the images ``order_e[s*B:(s+1)*B]`` of the global batch are read (an unreadable one is
skipped, counted and replaced by another image of the batch; more than 1 % in an epoch stops the
run), resized by the image processor's rule, warped by a :class:`SyntheticPairGenerator` seeded
by ``(seed, e, s)`` (affine / homography / TPS, flips, colour jitter: the ground truth is the
warp), normalised, and this process's slice goes through the teacher with gate noise seeded by
``(seed, e, s, rank)``. The data do not depend on the number of processes.

Strong supervision (``--keypoint-dataset`` / ``data.keypoint_dataset``): every step also takes a
global batch of labelled pairs (a benchmark split or a ``save_to_disk`` folder of keypoint pairs,
rows from seeded permutations, :func:`~semcorr.training.data.keypoint_pairs.keypoint_rows`) and adds
the teacher's sparse keypoint-flow loss (weight ``model.keypoint_weight``), logged as ``train/keypoints``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semcorr.training.checkpoints import checkpoint_steps
from semcorr.training.config import TrainingConfig, build_seeded_model
from semcorr.training.data.images import ImageSource, UnreadableImages, resolve_image_source
from semcorr.training.loop import (
    NonFiniteLossError,
    StepContext,
    StepOutput,
    Trainer,
    TrainingError,
    TrainingTask,
    run_command,
)
from semcorr.training.seeding import derive_seed, epoch_order
from semcorr.training.tracking import card_head, card_tail

__all__ = ["NonFiniteLossError", "TeacherConfig", "TeacherDataConfig", "TeacherTask", "TrainingError",
           "UnreadableImagesError", "build_model", "checkpoint_steps", "main", "train"]


class UnreadableImagesError(TrainingError):
    pass


# -- config ----------------------------------------------------------------------------------------------
@dataclass
class TeacherDataConfig:
    """Where the unlabelled images come from and how synthetic pairs are drawn.

    Exactly one of ``images`` / ``dataset`` is set.

    Attributes:
        images: a folder of images (searched recursively), ``"skimage"`` (scikit-image's data
            folder) or ``"skimage:astronaut.png,coffee.png"`` (those files of it).
        dataset: a ``datasets`` Hub id or a folder (``save_to_disk`` output, or one ``load_dataset`` reads).
        dataset_split, image_column: the split and the Image column (default: the first one) of ``dataset``.
        image_size: ``[height, width]`` of the training images; sets ``model.image_size`` (they
            must agree when both are given).
        repeats: passes over the image list per epoch (tiny image sets).
        warp_kinds, flip_prob, color_jitter: :class:`~semcorr.training.data.synthetic.SyntheticPairGenerator` options.
        keypoint_dataset: labelled pairs for sparse keypoint supervision (the strongly supervised
            PMD): ``pf-pascal``, ``pf-willow``, ``spair-71k`` (with ``keypoint_data_dir``) or a
            ``save_to_disk`` folder in the benchmark pair schema; None: synthetic supervision only.
        keypoint_data_dir, keypoint_split: the benchmark's extracted folder and split.
    """

    images: str | None = None
    dataset: str | None = None
    dataset_split: str = "train"
    image_column: str | None = None
    image_size: list[int] | None = None
    repeats: int = 1
    warp_kinds: list[str] = field(default_factory=lambda: ["affine", "homography", "tps"])
    flip_prob: float = 0.5
    color_jitter: bool = True
    keypoint_dataset: str | None = None
    keypoint_data_dir: str | None = None
    keypoint_split: str = "trn"

    def validate(self) -> None:
        if (self.images is None) == (self.dataset is None):
            raise ValueError("data needs exactly one of 'images' (folder / skimage) or 'dataset' (datasets name or dir)")
        if self.images is not None:
            resolve_image_source(self.images)
        else:
            path = Path(self.dataset).expanduser()
            looks_local = self.dataset.startswith((".", "/", "~")) or path.exists() or self.dataset.count("/") > 1
            if looks_local and not path.exists():
                raise ValueError(f"data.dataset: directory not found: {path.resolve()}")
        if self.repeats < 1:
            raise ValueError(f"data.repeats must be >= 1, got {self.repeats}")
        if self.image_size is not None and len(self.image_size) != 2:
            raise ValueError(f"data.image_size must be [height, width], got {self.image_size}")
        if self.keypoint_dataset is not None:
            from semcorr.training.data.keypoint_pairs import check_keypoint_source

            check_keypoint_source(self.keypoint_dataset, self.keypoint_data_dir)


@dataclass
class TeacherConfig(TrainingConfig):
    """``model`` (:class:`~semcorr.modeling.PMDTeacherConfig` fields), ``data``, ``optim``, ``run``."""

    data: TeacherDataConfig = field(default_factory=TeacherDataConfig)

    MODEL_CONFIG = "PMDTeacherConfig"
    DEFAULTS = {"run.output_dir": "runs/pmd-teacher"}


# -- the task ------------------------------------------------------------------------------------------------
def build_model(model_fields: dict, seed: int):
    """The teacher of ``model_fields`` (seeded initialisation), its backbone weights loaded."""
    from semcorr.modeling import PMDTeacherConfig, PMDTeacherModel

    return build_seeded_model(PMDTeacherConfig, PMDTeacherModel, model_fields, seed)


class TeacherTask(TrainingTask):
    """The PMD teacher on synthetic pairs (see the module docstring)."""

    name, project, noun = "train_teacher", "pmd-teacher", "teacher"
    min_per_process_batch = 2  # the co-channel attention's batch norm

    def setup(self, accelerator) -> None:
        from semcorr.hub_datasets import open_dataset
        from semcorr.modeling import PMDTeacherConfig, image_processor_for

        data = self.config.data
        self.model_config = PMDTeacherConfig(**self.config.model)
        self.processor = image_processor_for(self.model_config)
        source = resolve_image_source(data.images) if data.images is not None else open_dataset(
            data.dataset, data.dataset_split)
        self.images = ImageSource(source, self.model_config.image_size, data.image_column)
        self.unreadable = UnreadableImages()
        self.labelled = None
        if data.keypoint_dataset is not None:
            from semcorr.training.data.keypoint_pairs import load_keypoint_pairs

            with accelerator.main_process_first():  # one process prepares a benchmark's Arrow cache
                self.labelled = load_keypoint_pairs(data.keypoint_dataset, data.keypoint_data_dir, data.keypoint_split)
            if len(self.labelled) < self.config.optim.batch_size:
                raise ValueError(f"data.keypoint_dataset has {len(self.labelled)} pairs, fewer than optim.batch_size "
                                 f"{self.config.optim.batch_size}")

    def build_model(self):
        return build_model(self.config.model, self.config.optim.seed)

    def num_items(self) -> int:
        return len(self.images) * self.config.data.repeats

    def begin_epoch(self, epoch: int) -> None:
        self.unreadable.reset()

    def epoch_order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.images), self.config.data.repeats, self.config.optim.seed, epoch)

    def step(self, model, context: StepContext) -> StepOutput:
        pairs = self._synthetic_pairs(context)
        device, piece = context.device, context.piece
        inputs = {"source_pixel_values": self.processor.normalize(pairs["source_pixel_values"][piece]).to(device),
                  "target_pixel_values": self.processor.normalize(pairs["target_pixel_values"][piece]).to(device),
                  "grid_trg_to_src": pairs["grid_trg_to_src"][piece].to(device),
                  "valid_trg": pairs["valid_trg"][piece].to(device)}
        seed = self.config.optim.seed
        torch.manual_seed(derive_seed(seed, context.epoch, context.step_in_epoch, context.rank, 1))  # gate noise
        output = model(**inputs)
        loss, terms = output.loss, dict(output.losses or {})
        if self.labelled is not None:  # strong supervision: a batch of labelled pairs in the same step
            from semcorr.training.data.keypoint_pairs import keypoint_batch, keypoint_rows

            steps_per_epoch = self.num_items() // self.config.optim.batch_size
            rows = keypoint_rows(len(self.labelled), len(context.items), seed,
                                 context.epoch * steps_per_epoch + context.step_in_epoch)
            batch = keypoint_batch(self.labelled, rows[piece], self.processor)
            labelled = model(**{key: value.to(device) for key, value in batch.items()})
            loss = loss + labelled.loss
            terms["keypoints"] = labelled.losses["keypoints"]
        fingerprint = float(pairs["grid_trg_to_src"].double().sum() + pairs["target_pixel_values"].double().sum())
        return StepOutput(loss, terms, record={"data_fingerprint": fingerprint})

    def _synthetic_pairs(self, context: StepContext) -> dict:
        """The synthetic pairs of the whole global batch (identical on every process)."""
        from semcorr.training.data.synthetic import ColorJitter, SyntheticPairGenerator

        read = self.unreadable.read
        images = [image for image in (read(lambda: self.images.read(i), self.images.items[i]) for i in context.items)
                  if image is not None]
        if not images:
            raise UnreadableImagesError(f"step {context.global_step + 1}: no readable image in the batch "
                                        f"({self.unreadable.names[-len(context.items):]})")
        while len(images) < len(context.items):  # refill the places of unreadable images
            images.append(images[len(images) % max(1, len(images))])
        data = self.config.data
        generator = SyntheticPairGenerator(kinds=data.warp_kinds, flip_prob=data.flip_prob,
                                           jitter=ColorJitter() if data.color_jitter else None,
                                           seed=derive_seed(self.config.optim.seed, context.epoch, context.step_in_epoch))
        return generator(torch.stack(images))

    def epoch_summary(self, epoch: int) -> dict:
        return self.unreadable.summary()

    def check_epoch(self, epoch: int) -> None:
        self.unreadable.check(epoch, UnreadableImagesError)

    def final_metrics(self) -> dict:
        return {"num_images": len(self.images)}

    def model_card(self, metrics: dict) -> str:
        config, model_config = self.config, self.model_config
        data = config.data.images or f"{config.data.dataset} (split {config.data.dataset_split})"
        summary = ("Probabilistic teacher of PMD (Li et al., *Probabilistic Model Distillation for Semantic "
                   "Correspondence*, CVPR 2021), trained with `semcorr.training.train_teacher` on synthetic pairs "
                   "(random affine / homography / TPS warps, flips and colour jitter of unlabelled images).")
        optim = config.optim
        body = [
            "## Data", "", f"- images: `{data}` ({metrics.get('num_images')} images, image size {model_config.image_size})",
            f"- warps: {', '.join(config.data.warp_kinds)}; flip probability {config.data.flip_prob}; "
            f"colour jitter {config.data.color_jitter}", "",
            "## Training", "",
            f"- backbone `{model_config.backbone}` (frozen, weights `{model_config.backbone_weights}`), "
            f"levels {model_config.backbone_layers}",
            f"- {optim.optimizer} lr {optim.lr}, {optim.scheduler} schedule, global batch {optim.batch_size}, "
            f"{metrics.get('steps')} steps ({metrics.get('epochs_completed')} epochs), lr x{optim.lr_gamma} "
            f"at epochs {optim.lr_milestones}, seed {optim.seed}, {metrics.get('world_size')} process(es)", "",
        ]
        return "\n".join(card_head("PMD teacher (semcorr)", summary, ["pmd"]) + body + card_tail(metrics, config))


def train(config: TeacherConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a teacher training; returns the final metrics (on every process).

    Raises:
        NonFiniteLossError: the loss of a step was NaN / inf (the step is named; nothing is saved for it).
        UnreadableImagesError: more than 1 % of the images of an epoch could not be read.
    """
    return Trainer(TeacherTask(config), resume=resume, max_steps=max_steps).run()


# -- CLI ---------------------------------------------------------------------------------------------------
FLAGS = {"output_dir": "run.output_dir", "keypoint_dataset": "data.keypoint_dataset",
         "keypoint_data_dir": "data.keypoint_data_dir", "keypoint_split": "data.keypoint_split",
         "init_from": "run.init_from"}


def parse_args(argv=None) -> argparse.Namespace:
    from semcorr.training.cli import add_common_arguments

    parser = argparse.ArgumentParser(prog="python -m semcorr.training.train_teacher", description=__doc__.split("\n")[0])
    add_common_arguments(parser, config_required=True)
    parser.add_argument("--output-dir", help="overrides run.output_dir")
    parser.add_argument("--keypoint-dataset", help="adds sparse keypoint supervision (strongly supervised PMD): "
                        "pf-pascal | pf-willow | spair-71k | a save_to_disk folder of keypoint pairs")
    parser.add_argument("--keypoint-data-dir", help="the extracted benchmark folder of --keypoint-dataset")
    parser.add_argument("--keypoint-split", help="split of --keypoint-dataset (default trn)")
    parser.add_argument("--init-from", help="fine-tune: start from this teacher's save_pretrained directory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from semcorr.training.cli import overrides_of

    args = parse_args(argv)
    return run_command("train_teacher", lambda: TeacherConfig.load(args.config, overrides_of(args, FLAGS)),
                       TeacherTask, args)


if __name__ == "__main__":
    sys.exit(main())

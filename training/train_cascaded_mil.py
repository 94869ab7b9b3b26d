"""Train the cascaded MIL pseudo-label generator with image-level labels only (Huang et al., ICCV 2023).

Usage::

    python -m semcorr.training.train_cascaded_mil --config cascaded_mil_cpu_tiny.yaml [--output-dir D]
        [--resume] [--max-steps N] [--set optim.lr=1e-4 ...]
    accelerate launch --multi_gpu --num_processes 8 -m semcorr.training.train_cascaded_mil --config cascaded_mil_imagenet.yaml
    torchrun --nproc_per_node 2 -m semcorr.training.train_cascaded_mil --config ...     # 2 CPU processes

The config (:class:`CascadedMILTrainConfig`) has the sections ``model`` (fields of
:class:`~semcorr.modeling.CascadedMILConfig`), ``data`` (:class:`MILDataConfig`), ``optim`` and
``run``. The data are images with class labels -- an ImageNet-layout folder (``<root>/<wnid>/*.JPEG``)
or a ``datasets`` image dataset with a class column -- and nothing else: no keypoints, no boxes.

A step: the pairs ``order_e[s*B:(s+1)*B]`` of epoch ``e`` (each a pair of images of one class, each
image used once per epoch: :func:`~semcorr.training.data.class_pairs.class_pairs`) are read (an
unreadable image is skipped, counted and its pair replaced by another of the batch; more than 1 %
in an epoch stops the run), preprocessed, and this process's slice goes through
``CascadedMILModel.forward`` (positives: the pairs; negatives: the targets shifted by one within the
slice, so every process needs at least 2 pairs). The loop, checkpoints, resume and outputs are those
of :mod:`semcorr.training.loop`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semcorr.training.config import TrainingConfig, build_seeded_model
from semcorr.training.data.images import UnreadableImages
from semcorr.training.loop import StepContext, StepOutput, Trainer, TrainingError, TrainingTask, run_command
from semcorr.training.tracking import card_head, card_tail


class UnreadableImagesError(TrainingError):
    pass


@dataclass
class MILDataConfig:
    """Images with class labels.

    Attributes:
        images: an ImageNet-layout folder, ``<root>/<class>/*.JPEG``.
        dataset: instead, a ``datasets`` folder (``save_to_disk``, Parquet, ``imagefolder``) or Hub id.
        split, image_column, class_column: of ``dataset`` (defaults: ``train``, the first Image
            column, the first ``ClassLabel`` column or one named ``label``).
        image_size: ``[height, width]`` of the model input; sets ``model.image_size``.
    """

    images: str | None = None
    dataset: str | None = None
    split: str = "train"
    image_column: str | None = None
    class_column: str | None = None
    image_size: list[int] | None = None

    def validate(self) -> None:
        if (self.images is None) == (self.dataset is None):
            raise ValueError("data needs exactly one of 'images' (an ImageNet-layout folder) or 'dataset'")
        if self.images is not None and not Path(self.images).expanduser().is_dir():
            raise ValueError(f"data.images: folder not found: {Path(self.images).expanduser().resolve()}")
        if self.image_size is not None and len(self.image_size) != 2:
            raise ValueError(f"data.image_size must be [height, width], got {self.image_size}")


@dataclass
class CascadedMILTrainConfig(TrainingConfig):
    """``model`` (:class:`~semcorr.modeling.CascadedMILConfig` fields), ``data``, ``optim``, ``run``."""

    data: MILDataConfig = field(default_factory=MILDataConfig)

    MODEL_CONFIG = "CascadedMILConfig"
    DEFAULTS = {"run.output_dir": "runs/cascaded-mil"}


def build_model(model_fields: dict, seed: int):
    """The generator of ``model_fields`` (seeded initialisation), its backbone weights loaded."""
    from semcorr.modeling import CascadedMILConfig, CascadedMILModel

    return build_seeded_model(CascadedMILConfig, CascadedMILModel, model_fields, seed)


class CascadedMILTask(TrainingTask):
    """The cascade's three losses on pairs of images of one class (see the module docstring)."""

    name, project, noun = "train_cascaded_mil", "cascaded-mil", "generator"
    min_per_process_batch = 2  # negatives are the other pairs of the slice

    def setup(self, accelerator) -> None:
        from semcorr.modeling import CascadedMILConfig, image_processor_for
        from semcorr.training.data.class_pairs import class_images, class_pairs

        data = self.config.data
        self.model_config = CascadedMILConfig(**self.config.model)
        self.processor = image_processor_for(self.model_config)
        with accelerator.main_process_first():
            self.images = class_images(data.images or data.dataset, data.split, data.image_column, data.class_column)
        self.pairs, self.skipped_classes = class_pairs(self.images.labels, self.config.optim.seed, 0)
        if not self.pairs:
            raise ValueError(f"no class of {data.images or data.dataset} has two images: nothing to pair")
        self.unreadable = UnreadableImages()

    def build_model(self):
        return build_model(self.config.model, self.config.optim.seed)

    def num_items(self) -> int:
        return len(self.pairs)

    def begin_epoch(self, epoch: int) -> None:
        from semcorr.training.data.class_pairs import class_pairs

        self.unreadable.reset()
        self.pairs, self.skipped_classes = class_pairs(self.images.labels, self.config.optim.seed, epoch)

    def step(self, model, context: StepContext) -> StepOutput:
        pairs = [self.pairs[i] for i in context.items][context.piece]
        images = self._read_pairs(pairs, context)
        inputs = self.processor.preprocess_pairs([a for a, _, _ in images], [b for _, b, _ in images])
        class_ids = torch.tensor([label for _, _, label in images], device=context.device)
        output = model(inputs["source_pixel_values"].to(context.device), inputs["target_pixel_values"].to(context.device),
                       class_ids=class_ids)
        terms = {key: value for key, value in output.losses.items()}
        terms["positive_ap"], terms["negative_ap"] = output.positive_scores.mean(), output.negative_scores.mean()
        if output.region_pairs is not None:
            terms["region_pairs"] = output.region_pairs["found"].float().sum(dim=1).mean()
        return StepOutput(output.loss, terms)

    def _read_pairs(self, pairs, context: StepContext) -> list:
        """``[(source PIL, target PIL, class), ...]``; a pair with an unreadable image is replaced by another."""
        read, images = self.unreadable.read, []
        for first, second in pairs:
            source = read(lambda: self.images.read(first), self.images.names[first])
            target = read(lambda: self.images.read(second), self.images.names[second])
            if source is not None and target is not None:
                images.append((source, target, self.images.labels[first]))
        if not images:
            raise UnreadableImagesError(f"step {context.global_step + 1}: no readable pair in the batch "
                                        f"({self.unreadable.names[-2 * len(pairs):]})")
        while len(images) < len(pairs):  # refill, so every process keeps its batch size
            images.append(images[len(images) % max(1, len(images))])
        return images

    def epoch_summary(self, epoch: int) -> dict:
        summary = self.unreadable.summary()
        summary["classes_skipped"] = self.skipped_classes
        return summary

    def check_epoch(self, epoch: int) -> None:
        self.unreadable.check(epoch, UnreadableImagesError)

    def final_metrics(self) -> dict:
        return {"num_images": len(self.images), "num_classes": len(self.images.class_names),
                "pairs_per_epoch": len(self.pairs), "classes_skipped": self.skipped_classes}

    def model_card(self, metrics: dict) -> str:
        config, model = self.config, self.model_config
        summary = ("Cascaded MIL pseudo-label generator (Huang et al., *Weakly Supervised Learning of Semantic "
                   "Correspondence through Cascaded Online Correspondence Refinement*, ICCV 2023), trained with "
                   "`semcorr.training.train_cascaded_mil` from image-level labels only. The authors released no code; "
                   "this is semcorr's reconstruction (see `semcorr/modeling/cascaded_mil`).")
        stages = ", ".join(model.enabled_stages)
        optim = config.optim
        body = [
            "## Data", "", f"- images: `{config.data.images or config.data.dataset}` ({metrics.get('num_images')} images "
            f"of {metrics.get('num_classes')} classes, {metrics.get('pairs_per_epoch')} pairs per epoch, "
            f"{metrics.get('classes_skipped')} classes with fewer than two images skipped)", "",
            "## Model", "",
            f"- backbone `{model.backbone}` (frozen, weights `{model.backbone_weights}`), levels {model.backbone_layers}, "
            f"image size {model.image_size}",
            f"- stages: {stages}; shared attention: {model.share_attention}; RHM: {model.use_rhm} (L = "
            f"{model.hough_kernel_size}); saliency: {model.saliency}",
            f"- suspects {model.num_suspects}, region window {model.region_window} cells, region pairs "
            f"{model.num_region_pairs}; loss weights {model.image_loss_weight} / {model.region_loss_weight} / "
            f"{model.pixel_loss_weight}", "",
            "## Training", "",
            f"- {optim.optimizer} lr {optim.lr} (momentum {optim.momentum}), {optim.scheduler} schedule, global batch "
            f"{optim.batch_size}, {metrics.get('steps')} steps ({metrics.get('epochs_completed')} epochs), seed "
            f"{optim.seed}, {metrics.get('world_size')} process(es)", "",
        ]
        return "\n".join(card_head("Cascaded MIL generator (semcorr)", summary, ["cascaded-mil", "weakly-supervised"])
                         + body + card_tail(metrics, config))


def train(config: CascadedMILTrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a training; returns the final metrics (on every process)."""
    return Trainer(CascadedMILTask(config), resume=resume, max_steps=max_steps).run()


FLAGS = {"output_dir": "run.output_dir", "images": "data.images", "dataset": "data.dataset"}


def parse_args(argv=None) -> argparse.Namespace:
    from semcorr.training.cli import add_common_arguments

    parser = argparse.ArgumentParser(prog="python -m semcorr.training.train_cascaded_mil",
                                     description=__doc__.split("\n")[0])
    add_common_arguments(parser, config_required=True)
    parser.add_argument("--output-dir", help="overrides run.output_dir")
    parser.add_argument("--images", help="overrides data.images (an ImageNet-layout folder)")
    parser.add_argument("--dataset", help="overrides data.dataset (a datasets folder or Hub id with a class column)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from semcorr.training.cli import overrides_of

    args = parse_args(argv)
    return run_command("train_cascaded_mil",
                       lambda: CascadedMILTrainConfig.load(args.config, overrides_of(args, FLAGS)), CascadedMILTask, args)


if __name__ == "__main__":
    sys.exit(main())

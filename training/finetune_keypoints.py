"""Keypoint-supervised training of any trainable semcorr model on any keypoint-pair dataset.

The pre-train -> fine-tune protocol of Huang et al. (ICCV 2023, Table 2): train a matcher on
SC-ImageNet's pseudo keypoint pairs, then fine-tune it on a benchmark's labelled pairs
(SPair-71k, PF-PASCAL), and score each stage with ``semcorr evaluate``.

Usage::

    python -m semcorr.training.finetune_keypoints --config finetune_sc_imagenet.yaml     # pre-train
    python -m semcorr.training.finetune_keypoints --config finetune_spair.yaml           # fine-tune
    accelerate launch --multi_gpu --num_processes 8 -m semcorr.training.finetune_keypoints --config ...

The config (:class:`FinetuneConfig`) has the sections ``model`` (:class:`FinetuneModelSection`: a
``save_pretrained`` folder to start from, or a fresh model of a ``model_type`` with its config
fields), ``data`` (:class:`FinetuneDataConfig`: a benchmark name with its folder, or any dataset in the
benchmark pair schema -- a ``save_to_disk`` / Parquet folder or a Hub id), ``optim`` and ``run``.

A step: the pairs ``order_e[s*B:(s+1)*B]`` of the global batch, this process's slice preprocessed
(keypoints to model pixels, padded, masked where missing in either image) and passed to the
model, whose keypoint-supervised loss (``supervised_keypoint_loss``: the PMD models' sparse
keypoint-flow error, the cascaded MIL pixel stage's binary cross-entropy) is minimised. Any model
whose ``forward`` takes ``source_keypoints``, ``target_keypoints`` and ``keypoint_mask`` trains.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from semcorr.training.config import OptimConfig, RunConfig, SectionedConfig
from semcorr.training.loop import StepContext, StepOutput, Trainer, TrainingTask, run_command
from semcorr.training.tracking import card_head, card_tail


@dataclass
class FinetuneModelSection:
    """Where the model starts: exactly one of ``pretrained`` and ``model_type``.

    Attributes:
        pretrained: a ``save_pretrained`` folder (or Hub id) of a trainable semcorr model.
        model_type: or a fresh model: ``semcorr-pmd-student``, ``semcorr-pmd-teacher`` or
            ``semcorr-cascaded-mil`` ...
        config: ... with these config fields (its backbone weights are loaded from ``backbone_weights``).
    """

    pretrained: str | None = None
    model_type: str | None = None
    config: dict = field(default_factory=dict)

    def validate(self) -> None:
        if (self.pretrained is None) == (self.model_type is None):
            raise ValueError("model needs exactly one of 'pretrained' (a model folder) or 'model_type' (a fresh model)")
        if self.pretrained is not None and self.config:
            raise ValueError("model.config applies to a fresh model (model.model_type), not to model.pretrained")


@dataclass
class FinetuneDataConfig:
    """Labelled keypoint pairs.

    Attributes:
        pairs: ``pf-pascal``, ``pf-willow``, ``spair-71k`` (with ``data_dir``), or a dataset in the
            benchmark pair schema: a ``save_to_disk`` / Parquet folder or a Hub id (SC-ImageNet).
        data_dir, split, cache_dir: the benchmark's folder, the split and the ``datasets`` cache.
        image_root: for SC-ImageNet (annotations only, as its Hub layout ships): the ImageNet root
            its image paths are relative to.
    """

    pairs: str | None = None
    data_dir: str | None = None
    split: str = "trn"
    cache_dir: str | None = None
    image_root: str | None = None

    def validate(self) -> None:
        from semcorr.training.data.keypoint_pairs import check_keypoint_source

        if self.pairs is None:
            raise ValueError("data.pairs (--pairs) is required: a benchmark name or a dataset of keypoint pairs")
        if Path(self.pairs).expanduser().is_dir() and not (Path(self.pairs).expanduser() / "state.json").is_file():
            return  # a Parquet / Hub-layout folder: checked when it is opened
        check_keypoint_source(self.pairs, self.data_dir)


@dataclass
class FinetuneConfig(SectionedConfig):
    """``model`` (where it starts), ``data``, ``optim``, ``run``."""

    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    DEFAULTS = {"run.output_dir": "runs/finetune-keypoints"}

    def validate(self) -> None:
        if self.run.init_from is not None:
            raise ValueError("run.init_from: give the starting model as model.pretrained")


def build_model(section: FinetuneModelSection, seed: int):
    """The model to train: loaded from ``pretrained`` (safetensors only), or fresh with its backbone weights."""
    import torch
    from transformers import AutoConfig, AutoModel

    from semcorr.modeling import load_backbone_weights, load_matcher

    if section.pretrained is not None:
        model, _, _ = load_matcher(section.pretrained, device="cpu")
        return model.train()
    try:
        config = AutoConfig.for_model(section.model_type, **section.config)
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"model.model_type {section.model_type!r} / model.config: {error}") from error
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    if getattr(config, "backbone_weights", None):
        load_backbone_weights(model.backbone, config.backbone_weights)
    return model


class FinetuneTask(TrainingTask):
    """Keypoint-supervised training (see the module docstring)."""

    name, project, noun = "finetune_keypoints", "finetune-keypoints", "model"
    min_per_process_batch = 2  # PMD's co-channel attention normalises over the batch

    def setup(self, accelerator) -> None:
        from semcorr.training.data.keypoint_pairs import load_keypoint_pairs

        data = self.config.data
        with accelerator.main_process_first():  # one process prepares a benchmark's Arrow cache
            if data.image_root is not None:
                from semcorr.hub_datasets import load_sc_imagenet

                self.dataset = load_sc_imagenet(data.pairs, data.image_root, split=data.split)
            else:
                self.dataset = load_keypoint_pairs(data.pairs, data.data_dir, data.split, data.cache_dir)

    def build_model(self):
        from semcorr.modeling import image_processor_for

        from semcorr.modeling import SemanticMatcherPreTrainedModel

        model = build_model(self.config.model, self.config.optim.seed)
        if type(model).supervised_keypoint_loss is SemanticMatcherPreTrainedModel.supervised_keypoint_loss:
            raise ValueError(f"model: a {type(model).__name__} is not trainable with keypoints (training-free); start "
                             "from a PMD student / teacher or a cascaded MIL generator")
        self.model_config, self.processor = model.config, image_processor_for(model.config)
        return model

    def num_items(self) -> int:
        return len(self.dataset)

    def step(self, model, context: StepContext) -> StepOutput:
        from semcorr.training.data.keypoint_pairs import keypoint_batch

        batch = keypoint_batch(self.dataset, context.items[context.piece], self.processor)
        output = model(**{key: value.to(context.device) for key, value in batch.items()})
        return StepOutput(output.loss, {"keypoints_visible": batch["keypoint_mask"].float().sum(dim=1).mean()})

    def final_metrics(self) -> dict:
        return {"num_pairs": len(self.dataset)}

    def model_card(self, metrics: dict) -> str:
        config = self.config
        start = config.model.pretrained or f"a fresh `{config.model.model_type}`"
        summary = (f"A `{self.model_config.model_type}` trained on labelled keypoint pairs with "
                   "`semcorr.training.finetune_keypoints` (the pre-train -> fine-tune protocol of Huang et al., ICCV 2023), "
                   f"starting from {start}.")
        optim = config.optim
        body = ["## Data", "", f"- pairs: `{config.data.pairs}` (data dir `{config.data.data_dir}`, split "
                f"`{config.data.split}`, {metrics.get('num_pairs')} pairs)", "",
                "## Training", "",
                f"- {optim.optimizer} lr {optim.lr}, {optim.scheduler} schedule, global batch {optim.batch_size}, "
                f"{metrics.get('steps')} steps ({metrics.get('epochs_completed')} epochs), seed {optim.seed}, "
                f"{metrics.get('world_size')} process(es)", ""]
        return "\n".join(card_head("Keypoint-supervised semcorr model", summary, ["keypoint-supervision"])
                         + body + card_tail(metrics, config))


def train(config: FinetuneConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a keypoint-supervised training; returns the final metrics."""
    return Trainer(FinetuneTask(config), resume=resume, max_steps=max_steps).run()


FLAGS = {"pretrained": "model.pretrained", "pairs": "data.pairs", "data_dir": "data.data_dir", "split": "data.split",
         "output_dir": "run.output_dir"}


def parse_args(argv=None) -> argparse.Namespace:
    from semcorr.training.cli import add_common_arguments

    parser = argparse.ArgumentParser(prog="python -m semcorr.training.finetune_keypoints",
                                     description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--pretrained", help="overrides model.pretrained (a model folder to start from)")
    parser.add_argument("--pairs", help="overrides data.pairs (a benchmark name or a keypoint-pair dataset)")
    parser.add_argument("--data-dir", help="overrides data.data_dir (the extracted benchmark folder)")
    parser.add_argument("--split", help="overrides data.split")
    parser.add_argument("--output-dir", help="overrides run.output_dir")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from semcorr.training.cli import overrides_of

    args = parse_args(argv)
    return run_command("finetune_keypoints", lambda: FinetuneConfig.load(args.config, overrides_of(args, FLAGS)),
                       FinetuneTask, args)


if __name__ == "__main__":
    sys.exit(main())

"""Distil the static PMD student from teacher hypotheses with PSR weights and CAL.

PMD: Li et al., *Probabilistic Model Distillation for Semantic Correspondence*, CVPR 2021.

Usage::

    python -m semcorr.training.distill_student --hypotheses hyps --output-dir runs/pmd-student \\
        [--pairs pf-pascal --data-dir data/PF-PASCAL --split trn] [--teacher runs/pmd-teacher/final] \\
        [--config student.yaml] [--epochs E] [--batch-size B] [--lr LR] [--seed S] [--save-every-steps N] \\
        [--flip-prob P] [--num-threads T] [--resume] [--max-steps N] [--set section.key=value ...]
    torchrun --nproc_per_node 2 -m semcorr.training.distill_student ...      # 2 CPU processes

``--hypotheses`` is a directory written by :mod:`semcorr.training.generate_hypotheses`. The pairs,
benchmark folder, split and teacher default to the ones recorded in its ``index.json``; the flags
(or the ``data`` section) override them. The pairs must be the rows the hypotheses were made for.

The config (:class:`DistillConfig`) has the sections ``model`` (fields of
:class:`~semcorr.modeling.PMDStudentConfig`, applied over the teacher's architecture), ``data``
(:class:`DistillDataConfig`), ``optim`` and ``run``. The loop, checkpoints, resume and outputs are
those of :mod:`semcorr.training.loop`; this module is the task.

The student is ``PMDStudentModel(PMDStudentConfig(**teacher architecture, **model overrides))``;
its frozen ``backbone.*`` weights are copied from the teacher (which is only read); adaptation
blocks and attention start from the student's own seeded initialisation.

Augmentation: with probability ``flip_prob`` a pair is mirrored horizontally -- both images, and
the flip is composed into its hypotheses (``x -> -x`` in the grid values and the W axis of both
fields reversed), so the supervision stays aligned. The PSR prior is mirrored in and the empirical
variance mirrored back, so ``Sigma`` always lives in the unflipped frame.

PSR prior ``Sigma``: a tensor ``(num_pairs, 2, h, w)`` initialised to ``model.psr_prior_init`` and
part of the training state. During an epoch the empirical variance of ``F_l - F_s`` is accumulated
per pair (mean over the epoch's visits); after the epoch's last step -- once --
``Sigma <- Sigma + rate (var - Sigma)`` for the pairs visited (with ``drop_last`` a pair may be left
out; its ``Sigma`` stays). Checkpoints hold ``psr_state.safetensors`` (``psr_prior``, the running
``variance_sum`` / ``variance_count`` of the current epoch, ``last_epoch_variance`` /
``last_epoch_count``); ``final/`` gets a copy too.

Determinism: step ``s`` of epoch ``e`` reads pairs ``order_e[s*B:(s+1)*B]`` and draws its flips from a
generator seeded by ``(seed, e, s, 2)``; every process builds the whole global batch's flips and
trains on its slice, so a resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semcorr.training.config import TrainingConfig
from semcorr.training.data.hypotheses import load_hypotheses, load_teacher
from semcorr.training.data.pairs import image_columns, pair_split
from semcorr.training.loop import StepContext, StepOutput, Trainer, TrainingTask, run_command
from semcorr.training.seeding import generator_for
from semcorr.training.tracking import card_head, card_tail

PSR_FILE = "psr_state.safetensors"
# PMDConfig fields that define the network (copied from the teacher; a model override wins).
ARCHITECTURE_FIELDS = (
    "backbone", "backbone_layers", "backbone_weights", "image_size", "image_mean", "image_std",
    "adaptation_kernel_sizes", "attention_levels", "soft_argmax_sigma", "soft_argmax_beta",
    "grid_align_corners", "smoothness_weight", "transfer_radius",
)
SCALAR_TERMS = ("objective", "distillation", "smoothness", "variance_kl")


# -- config ----------------------------------------------------------------------------------------------
@dataclass
class DistillDataConfig:
    """Hypotheses and the real pairs they were sampled for (``None``: as recorded in ``index.json``).

    Attributes:
        hypotheses: a :mod:`~semcorr.training.generate_hypotheses` output directory.
        pairs, data_dir, split: as for ``generate_hypotheses`` (benchmark name or datasets directory).
        cache_dir: ``datasets`` cache for a prepared benchmark.
        teacher: the teacher's ``save_pretrained`` directory (architecture + backbone weights).
        flip_prob: probability of mirroring a pair (both images and its hypotheses).
    """

    hypotheses: str | None = None
    pairs: str | None = None
    data_dir: str | None = None
    split: str | None = None
    cache_dir: str | None = None
    teacher: str | None = None
    flip_prob: float = 0.5

    def validate(self) -> None:
        if self.hypotheses is None:
            raise ValueError("data.hypotheses (--hypotheses) is required: a generate_hypotheses output directory")
        if not (Path(self.hypotheses).expanduser() / "index.json").is_file():
            raise ValueError(f"--hypotheses: no index.json in {self.hypotheses} (not a finished generate_hypotheses run)")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob must be in [0, 1], got {self.flip_prob}")

    def fill_from(self, recorded: dict) -> None:
        """Take the pairs, folder, split and teacher the hypotheses were made with, where not given."""
        if self.pairs is None:
            self.pairs, self.data_dir = recorded.get("pairs"), self.data_dir or recorded.get("data_dir")
            self.split = self.split or recorded.get("split")
        self.teacher = self.teacher or recorded.get("teacher")
        if not self.pairs:
            raise ValueError("--pairs is not given and not recorded in the hypotheses index")
        if not self.teacher or not Path(self.teacher).expanduser().is_dir():
            raise ValueError(f"teacher directory not found: {self.teacher} (pass --teacher)")


@dataclass
class DistillConfig(TrainingConfig):
    """``model`` (:class:`~semcorr.modeling.PMDStudentConfig` fields over the teacher's), ``data``, ``optim``, ``run``."""

    data: DistillDataConfig = field(default_factory=DistillDataConfig)

    MODEL_CONFIG = "PMDStudentConfig"
    DEFAULTS = {"run.output_dir": "runs/pmd-student"}

    def validate(self) -> None:
        if self.run.init_from is not None:
            raise ValueError("run.init_from applies to the teacher only: the student starts from the teacher's "
                             "backbone and its own seeded initialisation")
        super().validate()


# -- model and augmentation --------------------------------------------------------------------------------
def build_student(teacher_dir: Path, model_overrides: dict, seed: int):
    """The student (architecture from the teacher + overrides) with the teacher's backbone weights.

    Returns ``(student, its config fields)``; the teacher model is loaded, read and dropped.
    """
    from semcorr.modeling import PMDStudentConfig, PMDStudentModel

    teacher, _ = load_teacher(teacher_dir, label="teacher")
    fields = {name: getattr(teacher.config, name) for name in ARCHITECTURE_FIELDS if hasattr(teacher.config, name)}
    fields.update(model_overrides)
    try:
        config = PMDStudentConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model: {error}") from error
    torch.manual_seed(seed)
    student = PMDStudentModel(config)
    backbone = {k: v.detach().clone() for k, v in teacher.state_dict().items() if k.startswith("backbone.")}
    if not backbone:
        raise ValueError(f"teacher: {teacher_dir} has no backbone.* weights")
    missing, unexpected = student.load_state_dict(backbone, strict=False)
    wanted = {k for k in student.state_dict() if k.startswith("backbone.")}
    if unexpected or wanted & set(missing):
        raise ValueError(f"teacher backbone does not fit the student: missing {sorted(wanted & set(missing))[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return student, fields


def flip_fields(fields: torch.Tensor) -> torch.Tensor:
    """Mirror ``(..., 2, h, w)`` grids for horizontally flipped source AND target: W reversed, x negated."""
    flipped = fields.flip(-1).clone()
    flipped[..., 0, :, :] = -flipped[..., 0, :, :]
    return flipped


# -- the task ------------------------------------------------------------------------------------------------
class DistillTask(TrainingTask):
    """The PMD student distilled from hypotheses with PSR + CAL (see the module docstring)."""

    name, project, noun = "distill_student", "pmd-student", "student"
    min_per_process_batch = 2  # the co-channel attention's batch norm

    def setup(self, accelerator) -> None:
        from semcorr.hub_datasets import load_pairs

        data = self.config.data
        self.store = load_hypotheses(data.hypotheses)
        data.fill_from(self.store.config)
        with accelerator.main_process_first():
            self.dataset = load_pairs(data.pairs, data.data_dir, split=pair_split(data.pairs, data.split),
                                      cache_dir=data.cache_dir)
        self.columns = image_columns(self.dataset)
        if len(self.dataset) != len(self.store):
            raise ValueError(f"the pairs ({len(self.dataset)}) and the hypotheses ({len(self.store)}) differ in number; "
                             "use the pairs the hypotheses were generated for")

    def build_model(self):
        from semcorr.modeling import image_processor_for

        model, _ = build_student(Path(self.config.data.teacher).expanduser(), self.config.model, self.config.optim.seed)
        self.model_config, self.processor = model.config, image_processor_for(model.config)
        shape = (len(self.store), 2, *self.store[0][0].shape[-2:])
        self.psr = {"psr_prior": torch.full(shape, self.model_config.psr_prior_init),
                    "variance_sum": torch.zeros(shape), "variance_count": torch.zeros(shape[0]),
                    "last_epoch_variance": torch.zeros(shape), "last_epoch_count": torch.zeros(shape[0])}
        return model

    def num_items(self) -> int:
        return len(self.store)

    def step(self, model, context: StepContext) -> StepOutput:
        flips = (torch.rand(len(context.items), generator=generator_for(
            self.config.optim.seed, context.epoch, context.step_in_epoch, 2)) < self.config.data.flip_prob).tolist()
        mine = list(range(len(context.items)))[context.piece]
        rows = [self.dataset[int(context.items[i])] for i in mine]
        inputs = self.processor.preprocess_pairs([row[self.columns[0]] for row in rows],
                                                 [row[self.columns[1]] for row in rows])
        source, target = inputs["source_pixel_values"], inputs["target_pixel_values"]
        forward, backward, prior = [], [], []
        for position, i in enumerate(mine):
            src_to_trg, trg_to_src = self.store[int(context.items[i])]
            pair_prior = self.psr["psr_prior"][int(context.items[i])]
            if flips[i]:
                source[position], target[position] = source[position].flip(-1), target[position].flip(-1)
                src_to_trg, trg_to_src, pair_prior = flip_fields(src_to_trg), flip_fields(trg_to_src), pair_prior.flip(-1)
            forward.append(src_to_trg)
            backward.append(trg_to_src)
            prior.append(pair_prior)
        device = context.device
        output = model(source_pixel_values=source.to(device), target_pixel_values=target.to(device),
                       hypotheses_src_to_trg=torch.stack(forward, dim=1).to(device),
                       hypotheses_trg_to_src=torch.stack(backward, dim=1).to(device),
                       psr_prior=torch.stack(prior).to(device))
        self._variance, self._flips = output.losses["empirical_variance"].detach().float(), flips
        # ``objective``: the part of CAL with a gradient. The variance-KL term is a constant for the student
        # (prior and variance carry no gradient) that grows as var shrinks, so ``loss`` can rise while the
        # student learns; ``objective`` is what the optimizer lowers.
        return StepOutput(output.loss, {key: output.losses[key] for key in SCALAR_TERMS},
                          record={"pairs": [int(i) for i in context.items], "flips": [bool(f) for f in flips]},
                          hidden=("pairs", "flips"), progress_key="objective")

    def after_update(self, accelerator, output: StepOutput, context: StepContext) -> None:
        """Accumulate the empirical variance of every pair of the global batch, back in the unflipped frame."""
        variance = accelerator.gather(self._variance).cpu()
        for i, item in enumerate(context.items):
            self.psr["variance_sum"][int(item)] += variance[i].flip(-1) if self._flips[i] else variance[i]
            self.psr["variance_count"][int(item)] += 1

    def end_of_epoch(self, epoch: int) -> None:
        """The one PSR prior update of the epoch: ``Sigma <- Sigma + rate (var - Sigma)`` for the visited pairs."""
        from semcorr.modeling.pmd.losses import update_prior

        psr = self.psr
        seen = psr["variance_count"] > 0
        mean_variance = psr["variance_sum"] / psr["variance_count"].clamp_min(1).view(-1, 1, 1, 1)
        psr["psr_prior"][seen] = update_prior(psr["psr_prior"][seen], mean_variance[seen], self.model_config.psr_prior_rate)
        psr["last_epoch_variance"], psr["last_epoch_count"] = mean_variance, psr["variance_count"].clone()
        psr["variance_sum"], psr["variance_count"] = torch.zeros_like(psr["variance_sum"]), torch.zeros_like(psr["variance_count"])

    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in self.psr.items()}, str(Path(folder) / PSR_FILE))

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        loaded = load_file(str(Path(folder) / PSR_FILE))
        if tuple(loaded["psr_prior"].shape) != tuple(self.psr["psr_prior"].shape):
            raise ValueError(f"{Path(folder) / PSR_FILE}: PSR prior of shape {tuple(loaded['psr_prior'].shape)}, "
                             f"expected {tuple(self.psr['psr_prior'].shape)} (other hypotheses?)")
        self.psr.update(loaded)

    def epoch_summary(self, epoch: int) -> dict:
        return {"psr_prior_mean": float(self.psr["psr_prior"].mean())}

    def final_metrics(self) -> dict:
        return {"num_pairs": len(self.store), "psr_prior_mean": float(self.psr["psr_prior"].mean())}

    def model_card(self, metrics: dict) -> str:
        config, model_config, recorded = self.config, self.model_config, self.store.config
        summary = ("Static student of PMD (Li et al., *Probabilistic Model Distillation for Semantic Correspondence*, "
                   "CVPR 2021), distilled with `semcorr.training.distill_student` from probabilistic-teacher hypotheses "
                   "with PSR (per-pixel hypothesis reweighting with a per-pair prior updated once per epoch) and CAL "
                   "(confidence-aware loss; reconstructed, see `semcorr/modeling/pmd/losses.py`).")
        optim = config.optim
        body = [
            "## Data", "", f"- teacher: `{config.data.teacher}`",
            f"- hypotheses: `{config.data.hypotheses}` ({recorded.get('num_hypotheses')} per pair, seed {recorded.get('seed')})",
            f"- pairs: `{config.data.pairs}` (data dir `{config.data.data_dir}`, split `{config.data.split}`, "
            f"{metrics.get('num_pairs')} pairs); horizontal flip probability {config.data.flip_prob}", "",
            "## Training", "",
            f"- backbone `{model_config.backbone}` (frozen, copied from the teacher), levels "
            f"{model_config.backbone_layers}, image size {model_config.image_size}",
            f"- loss `{model_config.distillation_loss}`: distillation weight {model_config.distillation_weight}, "
            f"smoothness weight {model_config.smoothness_weight}, variance-KL weight {model_config.variance_kl_weight}, "
            f"PSR prior initial value {model_config.psr_prior_init} and rate {model_config.psr_prior_rate}",
            f"- {optim.optimizer} lr {optim.lr}, {optim.scheduler} schedule, global batch {optim.batch_size}, "
            f"{metrics.get('steps')} steps ({metrics.get('epochs_completed')} epochs), lr x{optim.lr_gamma} at epochs "
            f"{optim.lr_milestones}, seed {optim.seed}, {metrics.get('world_size')} process(es)", "",
        ]
        return "\n".join(card_head("PMD student (semcorr)", summary, ["pmd"]) + body + card_tail(metrics, config))


def train(config: DistillConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a distillation; returns the final metrics (on every process)."""
    return Trainer(DistillTask(config), resume=resume, max_steps=max_steps).run()


# -- CLI ---------------------------------------------------------------------------------------------------
FLAGS = {
    "hypotheses": "data.hypotheses", "pairs": "data.pairs", "data_dir": "data.data_dir", "split": "data.split",
    "cache_dir": "data.cache_dir", "teacher": "data.teacher", "flip_prob": "data.flip_prob",
    "epochs": "optim.epochs", "batch_size": "optim.batch_size", "lr": "optim.lr", "seed": "optim.seed",
    "output_dir": "run.output_dir", "save_every_steps": "run.save_every_steps", "num_threads": "run.num_threads",
}


def parse_args(argv=None) -> argparse.Namespace:
    from semcorr.training.cli import add_common_arguments

    parser = argparse.ArgumentParser(prog="python -m semcorr.training.distill_student",
                                     description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--hypotheses", help="generate_hypotheses output directory")
    parser.add_argument("--pairs", help="benchmark name or datasets directory (default: as recorded in the hypotheses)")
    parser.add_argument("--data-dir", help="the extracted benchmark folder (default: as recorded)")
    parser.add_argument("--split", help="split (default: as recorded)")
    parser.add_argument("--cache-dir", help="datasets cache for the prepared benchmark")
    parser.add_argument("--teacher", help="teacher save_pretrained directory (default: as recorded)")
    parser.add_argument("--output-dir", help="overrides run.output_dir")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch (>= 2 per process)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--save-every-steps", type=int)
    parser.add_argument("--flip-prob", type=float, help="probability of mirroring a pair (default 0.5)")
    parser.add_argument("--num-threads", type=int, help="torch.set_num_threads per process")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from semcorr.training.cli import overrides_of

    args = parse_args(argv)
    return run_command("distill_student", lambda: DistillConfig.load(args.config, overrides_of(args, FLAGS)),
                       DistillTask, args)


if __name__ == "__main__":
    sys.exit(main())

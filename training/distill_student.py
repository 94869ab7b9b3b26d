"""Distil the static PMD student from teacher hypotheses with PSR weights and CAL.

Usage::

    python -m semcorr.training.distill_student --hypotheses hyps --output-dir runs/pmd-student \\
        [--pairs pf-pascal --data-dir data/PF-PASCAL --split trn] [--teacher runs/pmd-teacher/final] \\
        [--config student.yaml] [--epochs E] [--batch-size B] [--lr LR] [--seed S] [--save-every-steps N] \\
        [--flip-prob P] [--num-threads T] [--resume] [--max-steps N]
    torchrun --nproc_per_node 2 -m semcorr.training.distill_student ...      # 2 CPU processes

``--hypotheses`` is a directory written by :mod:`semcorr.training.generate_hypotheses`. The pairs,
benchmark folder, split and teacher default to the ones recorded in its ``index.json``; the flags
(or the YAML ``data`` section) override them. The pairs must be the same rows (same count) the
hypotheses were generated for.

The YAML config has the sections of :mod:`semcorr.training.config`: ``model`` (fields of
:class:`~semcorr.modeling.PMDStudentConfig`, applied over the teacher's architecture), ``data``
(``hypotheses``, ``pairs``, ``data_dir``, ``split``, ``cache_dir``, ``teacher``, ``flip_prob``),
``optim`` and ``run`` (as for the teacher). Flags override the file.

The student is ``PMDStudentModel(PMDStudentConfig(**teacher architecture, **model overrides))``;
its (frozen) ``backbone.*`` weights are copied from the teacher checkpoint (loaded with
``AutoModel``; the teacher is only read). Adaptation blocks and attention start from the student's
own seeded initialisation.

Augmentation: with probability ``flip_prob`` a pair is mirrored horizontally -- BOTH images, and
the flip is composed into its hypotheses (``x -> -x`` in the grid values and the W axis of both
fields reversed), so the supervision stays aligned. The PSR prior is mirrored in and the empirical
variance mirrored back, so ``Sigma`` always lives in the unflipped frame. (Only the flip is
implemented; other photometric / geometric augmentations are not.)

PSR prior ``Sigma``: a tensor ``(num_pairs, 2, h, w)`` initialised to ``model.psr_prior_init`` (1, as
DESIGN says) and part of the training state. During an epoch the empirical variance ``var`` of ``F_l - F_s`` is accumulated per pair (mean
over the epoch's visits); at the end of the epoch -- once -- ``Sigma <- update_prior(Sigma, var,
config.psr_prior_rate)`` for the pairs visited in that epoch (with ``drop_last`` a pair may be left
out; its ``Sigma`` stays). Checkpoints hold ``psr_state.safetensors`` with ``psr_prior``, the running
``variance_sum`` / ``variance_count`` of the current epoch and ``last_epoch_variance`` /
``last_epoch_count`` of the last finished epoch; ``final/`` gets a copy too.

Determinism: step ``s`` of epoch ``e`` reads pairs ``order_e[s*B:(s+1)*B]`` (``order_e`` a permutation
seeded by ``(seed, e)``) and draws its flips from a generator seeded by ``(seed, e, s, 2)``; every
process builds the whole global batch and trains on its slice, so a resumed run equals the
uninterrupted one.

Outputs under ``output_dir``: ``checkpoints/step-N`` (``accelerator.save_state``, ``trainer_state.json``,
``psr_state.safetensors``), ``final/`` (``save_pretrained`` + image processor + model card
``README.md`` + ``psr_state.safetensors`` + ``training_metrics.json``), ``metrics.jsonl``, tracker logs.
Directories are written under a temporary name and renamed into place. A non-finite loss stops the
run naming the step. The step loop, checkpoints and outputs are the pieces of
:mod:`semcorr.training.trainer`, shared with :mod:`semcorr.training.train_teacher`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semcorr.training import trainer
from semcorr.training.config import (
    OptimConfig,
    RunConfig,
    _check_section,
    check_sections,
    dataclass_schema,
    model_config_schema,
    parse_optim_run,
    read_config_file,
    validate_optim_run,
)
from semcorr.training.generate_hypotheses import image_columns, load_hypotheses, load_pairs, load_teacher
from semcorr.training.trainer import _seed

PSR_FILE = "psr_state.safetensors"
# PMDConfig fields that define the network (copied from the teacher; a model override wins).
ARCHITECTURE_FIELDS = (
    "backbone", "backbone_layers", "backbone_weights", "image_size", "image_mean", "image_std",
    "adaptation_kernel_sizes", "attention_levels", "soft_argmax_sigma", "soft_argmax_beta",
    "grid_align_corners", "smoothness_weight", "transfer_radius",
)


# -- config ----------------------------------------------------------------------------------------
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


def _student_run_defaults() -> RunConfig:
    return RunConfig(output_dir="runs/pmd-student")


@dataclass
class DistillConfig:
    model: dict = field(default_factory=dict)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=_student_run_defaults)
    source: str | None = None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


def parse_distill_config(raw: dict | None, source: str | None = None) -> DistillConfig:
    """Validate a mapping of sections into a :class:`DistillConfig` (``ValueError`` naming the key)."""
    from semcorr.modeling import PMDStudentConfig

    raw = check_sections(raw or {})
    model = _check_section("model", raw.get("model"), model_config_schema(PMDStudentConfig))
    data = DistillDataConfig(**_check_section("data", raw.get("data"), dataclass_schema(DistillDataConfig)))
    optim, run = parse_optim_run(raw, {"output_dir": "runs/pmd-student"})
    if data.hypotheses is None:
        raise ValueError("data.hypotheses (--hypotheses) is required: a generate_hypotheses output directory")
    if not (Path(data.hypotheses).expanduser() / "index.json").is_file():
        raise ValueError(f"--hypotheses: no index.json in {data.hypotheses} (not a finished generate_hypotheses run)")
    if not 0.0 <= data.flip_prob <= 1.0:
        raise ValueError(f"data.flip_prob must be in [0, 1], got {data.flip_prob}")
    validate_optim_run(optim, run)
    if run.init_from is not None:
        raise ValueError("run.init_from applies to the teacher only: the student starts from the teacher's "
                         "backbone and its own seeded initialisation")
    return DistillConfig(model=model, data=data, optim=optim, run=run, source=source)


def load_distill_config(path: str | None, overrides: dict | None = None) -> DistillConfig:
    """Read the YAML file (optional) and apply ``{"section.key": value}`` overrides, then validate."""
    raw: dict = {}
    if path is not None:
        raw, path = read_config_file(path)
        raw = raw or {}
    if isinstance(raw, dict):
        for dotted, value in (overrides or {}).items():
            section, key = dotted.split(".", 1)
            if raw.get(section) is None:
                raw[section] = {}
            if isinstance(raw[section], dict):
                raw[section][key] = value
    return parse_distill_config(raw, source=str(path) if path is not None else None)


# -- model -----------------------------------------------------------------------------------------
def build_student(teacher_dir: Path, model_overrides: dict, seed: int):
    """The student (architecture from the teacher + overrides) with the teacher's backbone weights.

    Returns ``(student, teacher_config)``; the teacher model is loaded, read and dropped.
    """
    from semcorr.modeling import PMDStudentConfig, PMDStudentModel

    teacher = load_teacher(teacher_dir, label="teacher")
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
        raise ValueError(
            f"teacher backbone does not fit the student: missing {sorted(wanted & set(missing))[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    del teacher
    return student, fields


# -- augmentation ----------------------------------------------------------------------------------
def flip_fields(fields: torch.Tensor) -> torch.Tensor:
    """Mirror ``(..., 2, h, w)`` grids for horizontally flipped source AND target: W reversed, x negated."""
    flipped = fields.flip(-1).clone()
    flipped[..., 0, :, :] = -flipped[..., 0, :, :]
    return flipped


# -- PSR state -------------------------------------------------------------------------------------
def save_psr_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def load_psr_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def model_card(config: DistillConfig, metrics: dict, model_config, hypotheses_config: dict) -> str:
    summary = ("Static student of PMD (Li et al., *Probabilistic Model Distillation for Semantic Correspondence*, "
               "CVPR 2021), distilled with `semcorr.training.distill_student` from probabilistic-teacher hypotheses "
               "with PSR (per-pixel hypothesis reweighting with a per-pair prior updated once per epoch) and CAL "
               "(confidence-aware loss; reconstructed, see `semcorr/modeling/pmd_losses.py`).")
    body = [
        "## Data", "",
        f"- teacher: `{config.data.teacher}`",
        f"- hypotheses: `{config.data.hypotheses}` ({hypotheses_config.get('num_hypotheses')} per pair, "
        f"seed {hypotheses_config.get('seed')})",
        f"- pairs: `{config.data.pairs}` (data dir `{config.data.data_dir}`, split `{config.data.split}`, "
        f"{metrics.get('num_pairs')} pairs); horizontal flip probability {config.data.flip_prob}", "",
        "## Training", "",
        f"- backbone `{model_config.backbone}` (frozen, copied from the teacher), levels {model_config.backbone_layers}, "
        f"image size {model_config.image_size}",
        f"- loss `{model_config.distillation_loss}`: distillation weight {model_config.distillation_weight}, smoothness weight "
        f"{model_config.smoothness_weight}, variance-KL weight {model_config.variance_kl_weight}, "
        f"PSR prior initial value {model_config.psr_prior_init} and rate {model_config.psr_prior_rate}",
        f"- Adam lr {config.optim.lr}, global batch {config.optim.batch_size}, {metrics.get('steps')} steps "
        f"({metrics.get('epochs_completed')} epochs), lr x{config.optim.lr_gamma} at epochs "
        f"{config.optim.lr_milestones}, seed {config.optim.seed}, {metrics.get('world_size')} process(es)", "",
    ]
    return "\n".join(trainer.card_head("PMD student (semcorr)", summary) + body + trainer.card_tail(metrics, config))


# -- training --------------------------------------------------------------------------------------
def train(config: DistillConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a distillation; ``run.num_threads`` holds only for the run."""
    with trainer.torch_threads(config.run.num_threads):
        return _train(config, resume, max_steps)


def _train(config: DistillConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Returns the final metrics (on every process).

    Raises:
        ~semcorr.training.trainer.NonFiniteLossError: the loss of a step was NaN / inf (named; nothing is saved for it).
    """
    from semcorr.modeling import image_processor_for
    from semcorr.modeling.pmd.losses import update_prior

    output_dir = Path(config.run.output_dir)
    store = load_hypotheses(config.data.hypotheses)
    recorded = store.config
    data = config.data
    if data.pairs is None:
        data.pairs, data.data_dir = recorded.get("pairs"), data.data_dir or recorded.get("data_dir")
        data.split = data.split or recorded.get("split")
    if data.teacher is None:
        data.teacher = recorded.get("teacher")
    if not data.pairs:
        raise ValueError("--pairs is not given and not recorded in the hypotheses index")
    if not data.teacher or not Path(data.teacher).expanduser().is_dir():
        raise ValueError(f"teacher directory not found: {data.teacher} (pass --teacher)")
    dataset = load_pairs(data.pairs, data.data_dir, data.split, data.cache_dir)
    source_column, target_column = image_columns(dataset)
    num_pairs = len(dataset)
    if num_pairs != len(store):
        raise ValueError(f"the pairs ({num_pairs}) and the hypotheses ({len(store)}) differ in number; "
                         "use the pairs the hypotheses were generated for")

    accelerator = trainer.make_accelerator(config.run, output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.optim.batch_size
    per_process = trainer.per_process_batch(global_batch, world)
    if num_pairs < global_batch:
        raise ValueError(f"optim.batch_size {global_batch} exceeds the {num_pairs} pairs")
    steps_per_epoch = num_pairs // global_batch  # drop_last
    total_steps = trainer.count_steps(steps_per_epoch, config.optim.epochs, config.optim.max_steps, max_steps)

    model, _ = build_student(Path(data.teacher).expanduser(), config.model, config.optim.seed)
    model_config = model.config
    processor = image_processor_for(model_config)
    grid_shape = tuple(store[0][0].shape[-2:])
    model, optimizer, scheduler = trainer.prepare_optimizer(accelerator, model, config.optim, steps_per_epoch)

    psr = {
        "psr_prior": torch.full((num_pairs, 2, *grid_shape), model_config.psr_prior_init),
        "variance_sum": torch.zeros(num_pairs, 2, *grid_shape),
        "variance_count": torch.zeros(num_pairs),
        "last_epoch_variance": torch.zeros(num_pairs, 2, *grid_shape),
        "last_epoch_count": torch.zeros(num_pairs),
    }
    step = 0
    if resume:
        step, checkpoint = trainer.restore_latest_checkpoint(accelerator, output_dir, "distill_student")
        if checkpoint is not None:
            loaded = load_psr_state(checkpoint / PSR_FILE)
            if tuple(loaded["psr_prior"].shape) != tuple(psr["psr_prior"].shape):
                raise ValueError(f"{checkpoint / PSR_FILE}: PSR prior of shape {tuple(loaded['psr_prior'].shape)}, "
                                 f"expected {tuple(psr['psr_prior'].shape)} (other hypotheses?)")
            psr.update(loaded)
            accelerator.print(f"[distill_student] resumed from {checkpoint} at step {step}")

    metrics_file = trainer.start_logging(accelerator, output_dir, "pmd-student", config)

    def write_psr(folder: Path):
        save_psr_state(folder / PSR_FILE, psr)

    epoch_losses: dict[str, list[float]] = {}
    last_saved = step if resume and step else None
    scalar_terms = ("distillation", "smoothness", "variance_kl")
    model.train()
    start_time = time.time()
    for epoch, steps in trainer.epoch_ranges(step, steps_per_epoch, total_steps):
        order = trainer.epoch_order(num_pairs, 1, config.optim.seed, epoch)
        epoch_losses = {}
        bar = trainer.progress_bar(accelerator, steps, epoch, config.optim.epochs)
        for in_epoch in bar:
            indices = order[in_epoch * global_batch:(in_epoch + 1) * global_batch]
            generator = torch.Generator().manual_seed(_seed(config.optim.seed, epoch, in_epoch, 2))
            flips = (torch.rand(global_batch, generator=generator) < data.flip_prob).tolist()
            mine = list(range(rank * per_process, (rank + 1) * per_process))
            rows = [dataset[int(indices[i])] for i in mine]
            inputs = processor.preprocess_pairs([r[source_column].convert("RGB") for r in rows],
                                                [r[target_column].convert("RGB") for r in rows])
            source, target = inputs["source_pixel_values"], inputs["target_pixel_values"]
            forward, backward, prior = [], [], []
            for position, i in enumerate(mine):
                src_to_trg, trg_to_src = store[int(indices[i])]
                pair_prior = psr["psr_prior"][int(indices[i])]
                if flips[i]:
                    source[position], target[position] = source[position].flip(-1), target[position].flip(-1)
                    src_to_trg, trg_to_src = flip_fields(src_to_trg), flip_fields(trg_to_src)
                    pair_prior = pair_prior.flip(-1)
                forward.append(src_to_trg)
                backward.append(trg_to_src)
                prior.append(pair_prior)
            device = accelerator.device
            output = model(
                source_pixel_values=source.to(device), target_pixel_values=target.to(device),
                hypotheses_src_to_trg=torch.stack(forward, dim=1).to(device),
                hypotheses_trg_to_src=torch.stack(backward, dim=1).to(device),
                psr_prior=torch.stack(prior).to(device),
            )
            trainer.check_finite(accelerator, output.loss, step, epoch, output_dir, last_saved)
            trainer.optimizer_step(accelerator, output.loss, optimizer, scheduler)
            step += 1
            # the empirical variance of every pair of the global batch, back in the unflipped frame
            variance = output.losses["empirical_variance"].detach().float()
            variance = accelerator.gather(variance).cpu()
            for i in range(global_batch):
                value = variance[i].flip(-1) if flips[i] else variance[i]
                psr["variance_sum"][int(indices[i])] += value
                psr["variance_count"][int(indices[i])] += 1
            # ``objective``: the part of CAL with a gradient. The variance-KL term is a constant for the
            # student (prior and variance carry no gradient) that grows as var shrinks, so ``loss`` can rise
            # while the student learns; ``objective`` is what the optimizer lowers.
            terms = {"loss": output.loss.detach(), "objective": output.losses["objective"],
                     **{k: output.losses[k].detach() for k in scalar_terms}}
            values = trainer.reduce_terms(accelerator, terms, epoch_losses)
            bar.set_postfix(objective=f"{values['objective']:.4f}")
            if in_epoch + 1 == steps_per_epoch:  # end of the epoch: the one PSR prior update
                seen = psr["variance_count"] > 0
                mean_variance = psr["variance_sum"] / psr["variance_count"].clamp_min(1).view(-1, 1, 1, 1)
                psr["psr_prior"][seen] = update_prior(psr["psr_prior"][seen], mean_variance[seen],
                                                      model_config.psr_prior_rate)
                psr["last_epoch_variance"] = mean_variance
                psr["last_epoch_count"] = psr["variance_count"].clone()
                psr["variance_sum"] = torch.zeros_like(psr["variance_sum"])
                psr["variance_count"] = torch.zeros_like(psr["variance_count"])
            if trainer.log_due(step, config.run, total_steps):
                trainer.log_step(accelerator, metrics_file, {
                    "step": step, "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "world_size": world,
                    "pairs": [int(indices[i]) for i in range(global_batch)], "flips": [bool(f) for f in flips],
                    **{f"train/{k}": v for k, v in values.items()}}, hidden=("pairs", "flips"))
            if trainer.save_due(step, config.run, total_steps):
                trainer.save_checkpoint(accelerator, output_dir, step, steps_per_epoch, global_batch,
                                config.run.keep_checkpoints, write_extra=write_psr)
                last_saved = step
        bar.close()
        summary = {"epoch": epoch + 1, "step": step, "psr_prior_mean": float(psr["psr_prior"].mean()),
                   **trainer.epoch_means(epoch_losses, "epoch/")}
        trainer.log_epoch(accelerator, metrics_file, summary, total_steps, "distill_student")

    if last_saved != step:
        trainer.save_checkpoint(accelerator, output_dir, step, steps_per_epoch, global_batch,
                        config.run.keep_checkpoints, write_extra=write_psr)
    metrics = {
        **trainer.run_metrics(step, steps_per_epoch, world, global_batch),
        "num_pairs": num_pairs, "train_seconds": round(time.time() - start_time, 1),
        "psr_prior_mean": float(psr["psr_prior"].mean()),
        **trainer.epoch_means(epoch_losses, "train_"),
    }
    card = model_card(config, metrics, model_config, recorded)
    trainer.write_final(accelerator, model, output_dir, card, metrics, "distill_student", write_extra=write_psr)
    accelerator.end_training()
    return metrics


# -- CLI -------------------------------------------------------------------------------------------
FLAG_OVERRIDES = {
    "hypotheses": "data.hypotheses", "pairs": "data.pairs", "data_dir": "data.data_dir", "split": "data.split",
    "cache_dir": "data.cache_dir", "teacher": "data.teacher", "flip_prob": "data.flip_prob",
    "epochs": "optim.epochs", "batch_size": "optim.batch_size", "lr": "optim.lr", "seed": "optim.seed",
    "output_dir": "run.output_dir", "save_every_steps": "run.save_every_steps", "num_threads": "run.num_threads",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m semcorr.training.distill_student",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (sections model, data, optim, run); flags override it")
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
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {key: getattr(args, name) for name, key in FLAG_OVERRIDES.items() if getattr(args, name) is not None}
    return trainer.run_command("distill_student", lambda: load_distill_config(args.config, overrides), train, args)


if __name__ == "__main__":
    sys.exit(main())

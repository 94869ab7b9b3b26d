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

PSR prior ``Sigma``: a tensor ``(num_pairs, 2, h, w)`` initialised to 1 and part of the training
state. During an epoch the empirical variance ``var`` of ``F_l - F_s`` is accumulated per pair (mean
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
``README.md`` + ``psr_state.safetensors``), ``metrics.jsonl``, tracker logs. Directories are written
under a temporary name and renamed into place. A non-finite loss stops the run naming the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from semcorr.training.config import (
    OptimConfig,
    RunConfig,
    _check_section,
    dataclass_schema,
    model_config_schema,
    validate_optim_run,
)
from semcorr.training.generate_hypotheses import image_columns, load_hypotheses, load_pairs
from semcorr.training.train_teacher import (
    CHECKPOINT_PREFIX,
    NonFiniteLossError,
    TrainingError,
    _flat_hparams,
    _replace_dir,
    _seed,
    _trackers,
    append_metrics,
    epoch_order,
    restore_latest_checkpoint,
    save_training_checkpoint,
)

PSR_FILE = "psr_state.safetensors"
SECTIONS = ("model", "data", "optim", "run")
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

    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"a config file must be a mapping of sections {SECTIONS}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
    model = _check_section("model", raw.get("model"), model_config_schema(PMDStudentConfig))
    data = DistillDataConfig(**_check_section("data", raw.get("data"), dataclass_schema(DistillDataConfig)))
    optim = OptimConfig(**_check_section("optim", raw.get("optim"), dataclass_schema(OptimConfig)))
    run_values = _check_section("run", raw.get("run"), dataclass_schema(RunConfig))
    run = RunConfig(**{"output_dir": "runs/pmd-student", **run_values})
    if data.hypotheses is None:
        raise ValueError("data.hypotheses (--hypotheses) is required: a generate_hypotheses output directory")
    if not (Path(data.hypotheses).expanduser() / "index.json").is_file():
        raise ValueError(f"--hypotheses: no index.json in {data.hypotheses} (not a finished generate_hypotheses run)")
    if not 0.0 <= data.flip_prob <= 1.0:
        raise ValueError(f"data.flip_prob must be in [0, 1], got {data.flip_prob}")
    validate_optim_run(optim, run)
    return DistillConfig(model=model, data=data, optim=optim, run=run, source=source)


def load_distill_config(path: str | None, overrides: dict | None = None) -> DistillConfig:
    """Read the YAML file (optional) and apply ``{"section.key": value}`` overrides, then validate."""
    import yaml

    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from error
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
    import semcorr.modeling  # noqa: F401  (registers the model types)
    from semcorr.modeling import PMDStudentConfig, PMDStudentModel
    from transformers import AutoModel

    try:
        teacher = AutoModel.from_pretrained(str(teacher_dir))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"teacher: cannot load a model from {teacher_dir}: {error}") from error
    if not hasattr(teacher, "sample_hypotheses"):
        raise ValueError(f"teacher: {teacher_dir} holds a {type(teacher).__name__}, not a PMD teacher")
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
    lines = [
        "---", "library_name: transformers", "tags:", "- semcorr", "- semantic-correspondence", "- pmd",
        "---", "",
        "# PMD student (semcorr)", "",
        "Static student of PMD (Li et al., *Probabilistic Model Distillation for Semantic Correspondence*, "
        "CVPR 2021), distilled with `semcorr.training.distill_student` from probabilistic-teacher hypotheses "
        "with PSR (per-pixel hypothesis reweighting with a per-pair prior updated once per epoch) and CAL "
        "(confidence-aware loss; reconstructed, see `semcorr/modeling/pmd_losses.py`).", "",
        "```python", "import semcorr.modeling  # registers the model types",
        "from transformers import AutoModel", "model = AutoModel.from_pretrained('<this folder>')", "```", "",
        "## Data", "",
        f"- teacher: `{config.data.teacher}`",
        f"- hypotheses: `{config.data.hypotheses}` ({hypotheses_config.get('num_hypotheses')} per pair, "
        f"seed {hypotheses_config.get('seed')})",
        f"- pairs: `{config.data.pairs}` (data dir `{config.data.data_dir}`, split `{config.data.split}`, "
        f"{metrics.get('num_pairs')} pairs); horizontal flip probability {config.data.flip_prob}", "",
        "## Training", "",
        f"- backbone `{model_config.backbone}` (frozen, copied from the teacher), levels {model_config.backbone_layers}, "
        f"image size {model_config.image_size}",
        f"- CAL: distillation weight {model_config.distillation_weight}, smoothness weight "
        f"{model_config.smoothness_weight}, variance-KL weight {model_config.variance_kl_weight}, "
        f"PSR prior rate {model_config.psr_prior_rate}",
        f"- Adam lr {config.optim.lr}, global batch {config.optim.batch_size}, {metrics.get('steps')} steps "
        f"({metrics.get('epochs_completed')} epochs), lr x{config.optim.lr_gamma} at epochs "
        f"{config.optim.lr_milestones}, seed {config.optim.seed}, {metrics.get('world_size')} process(es)", "",
        "## Metrics (training, last epoch mean)", "",
        "| metric | value |", "|---|---|",
    ]
    for key, value in sorted(metrics.items()):
        lines.append(f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "## Config", "", "```json", json.dumps(config.to_dict(), indent=2, default=str), "```", ""]
    return "\n".join(lines)


# -- training --------------------------------------------------------------------------------------
def train(config: DistillConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) a distillation; ``run.num_threads`` holds only for the run."""
    threads = torch.get_num_threads()
    try:
        if config.run.num_threads:
            torch.set_num_threads(config.run.num_threads)
        return _train(config, resume, max_steps)
    finally:
        torch.set_num_threads(threads)


def _train(config: DistillConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Returns the final metrics (on every process).

    Raises:
        NonFiniteLossError: the loss of a step was NaN / inf (named; nothing is saved for it).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from semcorr.modeling import image_processor_for
    from semcorr.modeling.pmd_losses import update_prior

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
        raise ValueError(f"optim.batch_size {global_batch} over {world} process(es) gives {per_process} pair per "
                         "process; the batch norm of the co-channel attention needs at least 2 per process")
    if num_pairs < global_batch:
        raise ValueError(f"optim.batch_size {global_batch} exceeds the {num_pairs} pairs")
    steps_per_epoch = num_pairs // global_batch  # drop_last
    total_steps = steps_per_epoch * config.optim.epochs
    for limit in (config.optim.max_steps, max_steps):
        if limit is not None:
            total_steps = min(total_steps, limit)

    model, _ = build_student(Path(data.teacher).expanduser(), config.model, config.optim.seed)
    model_config = model.config
    processor = image_processor_for(model_config)
    grid_shape = tuple(store[0][0].shape[-2:])
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    milestones = [m * steps_per_epoch for m in config.optim.lr_milestones]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.optim.lr_gamma)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    psr = {
        "psr_prior": torch.ones(num_pairs, 2, *grid_shape),
        "variance_sum": torch.zeros(num_pairs, 2, *grid_shape),
        "variance_count": torch.zeros(num_pairs),
        "last_epoch_variance": torch.zeros(num_pairs, 2, *grid_shape),
        "last_epoch_count": torch.zeros(num_pairs),
    }
    step = 0
    if resume:
        step, checkpoint = restore_latest_checkpoint(accelerator, output_dir, "distill_student")
        if checkpoint is not None:
            loaded = load_psr_state(checkpoint / PSR_FILE)
            if tuple(loaded["psr_prior"].shape) != tuple(psr["psr_prior"].shape):
                raise ValueError(f"{checkpoint / PSR_FILE}: PSR prior of shape {tuple(loaded['psr_prior'].shape)}, "
                                 f"expected {tuple(psr['psr_prior'].shape)} (other hypotheses?)")
            psr.update(loaded)
            accelerator.print(f"[distill_student] resumed from {checkpoint} at step {step}")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers("pmd-student", config=_flat_hparams(config))
    metrics_file = output_dir / "metrics.jsonl"

    def log(record: dict):
        append_metrics(accelerator, metrics_file, record)

    def save_checkpoint(at_step: int):
        state = {"epoch": at_step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                 "world_size": world, "global_batch_size": global_batch}
        save_training_checkpoint(accelerator, output_dir, at_step, state, config.run.keep_checkpoints,
                                 write_extra=lambda staging: save_psr_state(staging / PSR_FILE, psr))

    epoch_losses: dict[str, list[float]] = {}
    last_saved = step if resume and step else None
    scalar_terms = ("distillation", "smoothness", "variance_kl")
    model.train()
    start_time = time.time()
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        order = epoch_order(num_pairs, 1, config.optim.seed, epoch)
        epoch_losses = {}
        last = min(steps_per_epoch, first + total_steps - step)
        bar = tqdm(range(first, last), desc=f"epoch {epoch + 1}/{config.optim.epochs}",
                   disable=not accelerator.is_local_main_process, leave=False)
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
            objective = loss.detach() - model_config.variance_kl_weight * output.losses["variance_kl"].detach()
            terms = {"loss": loss.detach(), "objective": objective,
                     **{k: output.losses[k].detach() for k in scalar_terms}}
            values = {k: accelerator.reduce(v.float().reshape(1), reduction="mean").item() for k, v in terms.items()}
            for key, value in values.items():
                epoch_losses.setdefault(key, []).append(value)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if in_epoch + 1 == steps_per_epoch:  # end of the epoch: the one PSR prior update
                seen = psr["variance_count"] > 0
                mean_variance = psr["variance_sum"] / psr["variance_count"].clamp_min(1).view(-1, 1, 1, 1)
                psr["psr_prior"][seen] = update_prior(psr["psr_prior"][seen], mean_variance[seen],
                                                      model_config.psr_prior_rate)
                psr["last_epoch_variance"] = mean_variance
                psr["last_epoch_count"] = psr["variance_count"].clone()
                psr["variance_sum"] = torch.zeros_like(psr["variance_sum"])
                psr["variance_count"] = torch.zeros_like(psr["variance_count"])
            if step % config.run.log_every_steps == 0 or step == total_steps:
                record = {"step": step, "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "world_size": world,
                          "pairs": [int(indices[i]) for i in range(global_batch)], "flips": [bool(f) for f in flips],
                          **{f"train/{k}": v for k, v in values.items()}}
                accelerator.log({k: v for k, v in record.items() if k not in ("step", "pairs", "flips")}, step=step)
                log(record)
            if config.run.save_every_steps and step % config.run.save_every_steps == 0 and step < total_steps:
                save_checkpoint(step)
                last_saved = step
        bar.close()
        if epoch_losses:
            summary = {"epoch": epoch + 1, "step": step,
                       "psr_prior_mean": float(psr["psr_prior"].mean()),
                       **{f"epoch/{k}": float(np.mean(v)) for k, v in epoch_losses.items()}}
            log(summary)
            accelerator.print(f"[distill_student] epoch {epoch + 1}: step {step}/{total_steps}, "
                              f"loss {summary.get('epoch/loss', float('nan')):.4f}")

    if last_saved != step:
        save_checkpoint(step)
    metrics = {
        "steps": step, "epochs_completed": round(step / steps_per_epoch, 3), "world_size": world,
        "global_batch_size": global_batch, "num_pairs": num_pairs, "train_seconds": round(time.time() - start_time, 1),
        "psr_prior_mean": float(psr["psr_prior"].mean()),
        **{f"train_{k}": float(np.mean(v)) for k, v in epoch_losses.items()},
    }
    if accelerator.is_main_process:
        final = output_dir / "final"
        staging = output_dir / ".tmp-final"
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(staging)
        image_processor_for(unwrapped.config).save_pretrained(staging)
        save_psr_state(staging / PSR_FILE, psr)
        (staging / "README.md").write_text(model_card(config, metrics, unwrapped.config, recorded))
        (staging / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
        _replace_dir(staging, final)
        accelerator.print(f"[distill_student] wrote {final}")
    accelerator.wait_for_everyone()
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
    try:
        config = load_distill_config(args.config, overrides)
        if args.max_steps is not None and args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        train(config, resume=args.resume, max_steps=args.max_steps)
    except (ValueError, TrainingError) as error:
        print(f"distill_student: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

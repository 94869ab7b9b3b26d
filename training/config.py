"""Typed YAML configs for the training entry points.

A config file has up to four sections (all optional, every key optional)::

    model:  # fields of the model's PretrainedConfig (here PMDTeacherConfig), checked against its signature
      backbone: resnet101.tv_in1k
    data:   # unlabelled images -> synthetic pairs
      images: path/to/folder        # or "skimage" / "skimage:astronaut.png,coffee.png"
    optim:
      lr: 3.0e-5
    run:
      output_dir: runs/pmd-teacher

:func:`load_config` validates everything *before* any work: an unknown key or a value of the wrong
type raises :class:`ValueError` naming the key and the valid keys; a missing data path raises too.
Types are checked strictly (``int`` is accepted where ``float`` is expected; ``bool`` is never an
``int``); ``None`` only where the field allows it.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

SKIMAGE_PREFIX = "skimage"


# -- type checking ----------------------------------------------------------------------------------
def _type_name(hint) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def _matches(value, hint) -> bool:
    """``value`` is an instance of the annotation ``hint`` (None, unions, list[...], scalars, Any)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        return not args or all(_matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _strip_none(hint):
    """``X | None`` -> ``X`` (other unions unchanged)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _coerce(value, hint):
    """Ints given for float fields become floats (also inside lists)."""
    hint = _strip_none(hint)
    if isinstance(value, (list, tuple)) and typing.get_origin(hint) in (list, tuple) and typing.get_args(hint):
        return [_coerce(v, typing.get_args(hint)[0]) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_section(name: str, values: dict, schema: dict[str, Any]) -> dict:
    """Check ``values`` against ``schema`` (key -> type hint); return the coerced values."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config section '{name}' must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; valid keys of '{name}': {', '.join(sorted(schema))}"
        )
    checked = {}
    for key, value in values.items():
        hint = schema[key]
        if not _matches(value, hint):
            raise ValueError(
                f"{name}.{key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})"
            )
        checked[key] = _coerce(value, hint)
    return checked


# -- sections --------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where the unlabelled images come from and how synthetic pairs are drawn.

    Exactly one of ``images`` / ``dataset`` is set.

    Attributes:
        images: a folder of images (searched recursively; relative paths are resolved against the
            current directory), ``"skimage"`` (scikit-image's data folder) or
            ``"skimage:astronaut.png,coffee.png"`` (those files of it).
        dataset: a ``datasets`` name (``load_dataset``) or a directory (``save_to_disk`` output or
            a folder ``load_dataset`` understands).
        dataset_split: the split of ``dataset``.
        image_column: the Image column (default: the first one).
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


@dataclass
class OptimConfig:
    """Adam with a multi-step schedule (milestones in epochs).

    Attributes:
        batch_size: the *global* batch; every process gets ``batch_size / world_size``.
        max_steps: stop after this many optimizer steps (the CLI's ``--max-steps`` overrides it).
    """

    lr: float = 3e-5
    batch_size: int = 16
    epochs: int = 100
    lr_milestones: list[int] = field(default_factory=lambda: [60])
    lr_gamma: float = 0.2
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None


@dataclass
class RunConfig:
    """Outputs, checkpoints and logging.

    Attributes:
        output_dir: ``checkpoints/step-N``, ``final/``, ``metrics.jsonl`` and tracker logs go here.
        save_every_steps: checkpoint period (0: only at the end).
        keep_checkpoints: how many of the newest checkpoints to keep (0: all).
        log_with: accelerate trackers (``"tensorboard"``, ...); ones that are not installed are
            skipped with a warning. ``metrics.jsonl`` is always written.
        log_every_steps: period of tracker / metrics.jsonl records.
        cpu: force CPU; ``None``: CPU when no accelerator is available or ``ACCELERATE_USE_CPU`` is set.
        num_threads: ``torch.set_num_threads`` per process (``None``: torch's default). On a busy
            small CPU host 1 thread can be many times faster than oversubscribed cores.
        init_from: teacher only: start from the weights of this ``save_pretrained`` directory
            (``model.safetensors``; the architecture must match) -- to fine-tune a teacher, e.g.
            with keypoint supervision.
    """

    output_dir: str = "runs/pmd-teacher"
    save_every_steps: int = 500
    keep_checkpoints: int = 0
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    log_every_steps: int = 1
    cpu: bool | None = None
    num_threads: int | None = None
    init_from: str | None = None


@dataclass
class TrainConfig:
    """A whole training config: ``model`` is a dict of model-config fields (validated)."""

    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str | None = None  # the YAML file it came from

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


SECTIONS = ("model", "data", "optim", "run")


def dataclass_schema(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def model_config_schema(config_class) -> dict[str, Any]:
    """``{field: type hint}`` of a ``PretrainedConfig`` subclass, from its ``__init__`` signatures (MRO)."""
    schema: dict[str, Any] = {}
    for klass in config_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith("transformers"):
            continue
        hints = typing.get_type_hints(init)
        for name, parameter in inspect.signature(init).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            schema.setdefault(name, hints.get(name, Any))
    return schema


def resolve_image_source(images: str) -> str | list[str]:
    """``"skimage"`` -> scikit-image's data folder; ``"skimage:a.png,b.png"`` -> those paths; else a folder.

    Raises:
        ValueError: a folder or file that does not exist.
    """
    if images == SKIMAGE_PREFIX or images.startswith(SKIMAGE_PREFIX + ":"):
        from semcorr.hub_datasets.skimage_pairs import skimage_data_dir

        root = skimage_data_dir()
        if images == SKIMAGE_PREFIX:
            return str(root)
        names = [n.strip() for n in images.split(":", 1)[1].split(",") if n.strip()]
        if not names:
            raise ValueError(f"data.images '{images}' names no files")
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise ValueError(f"data.images: not in scikit-image's data folder {root}: {', '.join(missing)}")
        return [str(root / n) for n in names]
    path = Path(images).expanduser()
    if not path.is_dir():
        raise ValueError(f"data.images: folder not found: {path.resolve()}")
    return str(path)


def validate_data(data: DataConfig) -> None:
    """Exactly one source; local paths exist."""
    if (data.images is None) == (data.dataset is None):
        raise ValueError("data needs exactly one of 'images' (folder / skimage) or 'dataset' (datasets name or dir)")
    if data.images is not None:
        resolve_image_source(data.images)
    else:
        path = Path(data.dataset).expanduser()
        looks_local = data.dataset.startswith((".", "/", "~")) or path.exists() or data.dataset.count("/") > 1
        if looks_local and not path.exists():
            raise ValueError(f"data.dataset: directory not found: {path.resolve()}")
    if data.repeats < 1:
        raise ValueError(f"data.repeats must be >= 1, got {data.repeats}")
    if data.image_size is not None and len(data.image_size) != 2:
        raise ValueError(f"data.image_size must be [height, width], got {data.image_size}")
    if data.keypoint_dataset is not None:
        from semcorr.hub_datasets import BENCHMARKS

        if data.keypoint_dataset in BENCHMARKS:
            folder = data.keypoint_data_dir
            if not folder or not Path(folder).expanduser().is_dir():
                raise ValueError(f"data.keypoint_dataset {data.keypoint_dataset!r} needs data.keypoint_data_dir "
                                 f"(--keypoint-data-dir), the extracted benchmark folder; got {folder!r}")
        elif not (Path(data.keypoint_dataset).expanduser() / "state.json").is_file():
            raise ValueError(f"data.keypoint_dataset: {data.keypoint_dataset!r} is neither a benchmark "
                             f"({', '.join(BENCHMARKS)}) nor a datasets save_to_disk folder")


def check_sections(raw) -> dict:
    """A parsed YAML document (``None``: empty) as a mapping of the known :data:`SECTIONS`, else ``ValueError``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"a config file must be a mapping of sections {SECTIONS}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
    return raw


def parse_optim_run(raw: dict, run_defaults: dict | None = None) -> tuple[OptimConfig, RunConfig]:
    """The checked ``optim`` and ``run`` sections of ``raw`` (``run_defaults``: fields under the file's)."""
    optim = OptimConfig(**_check_section("optim", raw.get("optim"), dataclass_schema(OptimConfig)))
    run = RunConfig(**{**(run_defaults or {}), **_check_section("run", raw.get("run"), dataclass_schema(RunConfig))})
    return optim, run


def parse_config(raw: dict, model_config_class, source: str | None = None) -> TrainConfig:
    """Validate a parsed YAML mapping into a :class:`TrainConfig` (no side effects)."""
    raw = check_sections(raw)
    model = _check_section("model", raw.get("model"), model_config_schema(model_config_class))
    data = DataConfig(**_check_section("data", raw.get("data"), dataclass_schema(DataConfig)))
    optim, run = parse_optim_run(raw)
    if data.image_size is not None:
        if "image_size" in model and list(model["image_size"]) != list(data.image_size):
            raise ValueError(f"model.image_size {model['image_size']} and data.image_size {data.image_size} differ")
        model["image_size"] = list(data.image_size)
    validate_optim_run(optim, run)
    validate_data(data)
    try:  # the model config's own checks (kernel sizes, levels, ...)
        model_config_class(**model)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model: {error}") from error
    weights = model.get("backbone_weights")
    if weights not in (None, "timm", "embedded") and not Path(weights).expanduser().is_file():
        raise ValueError(f"model.backbone_weights: file not found: {weights}")
    return TrainConfig(model=model, data=data, optim=optim, run=run, source=source)


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def read_config_file(path: str | Path):
    """``(parsed YAML, path)``; a bare name such as ``pmd_cpu_tiny.yaml`` (or ``pmd_cpu_tiny``) that is
    not a file here is looked up among the configs shipped in ``semcorr/training/configs``.

    Raises:
        ValueError: no such file (the message lists the packaged configs), or invalid YAML.
    """
    import yaml  # PyYAML (a dependency of transformers)

    path = Path(path).expanduser()
    if not path.is_file() and len(path.parts) == 1:
        for candidate in (PACKAGED_CONFIGS / path.name, PACKAGED_CONFIGS / f"{path.name}.yaml"):
            if candidate.is_file():
                path = candidate
                break
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml")))
        raise ValueError(f"config file not found: {path} (configs shipped with semcorr: {shipped})")
    try:
        return yaml.safe_load(path.read_text()), path
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error


def load_config(path: str | Path, model_config_class, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a YAML config; ``overrides`` maps ``"section.key"`` to a value.

    Raises:
        ValueError: missing file, bad YAML, unknown key, wrong type, missing data path.
    """
    raw, path = read_config_file(path)
    raw = raw or {}
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        if not isinstance(raw.get(section) or {}, dict):
            break  # parse_config reports it
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return parse_config(raw, model_config_class, source=str(path))


def validate_optim_run(optim: "OptimConfig", run: "RunConfig") -> None:
    """Range checks of the ``optim`` and ``run`` sections shared by every training script."""
    for key, minimum in (("batch_size", 1), ("epochs", 1)):
        if getattr(optim, key) < minimum:
            raise ValueError(f"optim.{key} must be >= {minimum}, got {getattr(optim, key)}")
    if optim.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {optim.lr}")
    if optim.max_steps is not None and optim.max_steps < 1:
        raise ValueError(f"optim.max_steps must be >= 1, got {optim.max_steps}")
    if run.save_every_steps < 0 or run.keep_checkpoints < 0 or run.log_every_steps < 1:
        raise ValueError("run.save_every_steps and run.keep_checkpoints must be >= 0, run.log_every_steps >= 1")
    if run.init_from is not None and not (Path(run.init_from).expanduser() / "model.safetensors").is_file():
        raise ValueError(f"run.init_from: no model.safetensors in {run.init_from} (a save_pretrained directory)")

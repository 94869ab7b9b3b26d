"""The one config format of every semcorr entry point: sectioned YAML, typed, checked before any work.

A config file is a mapping of sections, each a mapping of keys::

    model:                  # fields of the model's PretrainedConfig, checked against its signature
      backbone: resnet101.tv_in1k
    data:                   # what the task reads (its own dataclass)
      images: path/to/folder
    optim:                  # OptimConfig: optimizer, schedule, batch, epochs
      lr: 3.0e-5
    run:                    # RunConfig (training) or InferenceRunConfig (sharded inference)
      output_dir: runs/pmd-teacher

An entry point declares its sections as a :class:`SectionedConfig` dataclass; :meth:`SectionedConfig.load`
reads the file (a path, or the bare name of a config shipped in ``semcorr/training/configs``),
applies command-line overrides (``--set optim.lr=1e-4``: the value is read as YAML, so ``[1, 2]``,
``null`` and ``true`` work) and validates everything. An unknown section or key, or a value of the
wrong type, raises :class:`ValueError` naming the key and listing the valid ones; a key that was
renamed names its new place. Types are checked strictly (an ``int`` is accepted for a ``float``; a
``bool`` is never an ``int``; ``None`` only where the field allows it).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "step", "multistep", "cosine")


# -- type checking ----------------------------------------------------------------------------------
def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


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
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(item, args[0]) for item in value))
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _coerce(value, hint):
    """Ints given for float fields become floats (also inside lists); strings from ``--set`` that
    YAML left as strings (``1e-4``) become floats where a float is expected."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if isinstance(value, (list, tuple)) and typing.get_origin(hint) in (list, tuple) and typing.get_args(hint):
        return [_coerce(item, typing.get_args(hint)[0]) for item in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_section(name: str, values, schema: dict[str, Any]) -> dict:
    """Check one section's mapping against ``schema`` (key -> type hint); returns the coerced values."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config section '{name}' must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{name}.{key}' for key in unknown)}; "
                         f"valid keys of '{name}': {', '.join(sorted(schema))}")
    checked = {}
    for key, value in values.items():
        hint = schema[key]
        if isinstance(value, str) and _matches(1.0, hint) and not _matches(value, hint):
            try:
                value = float(value)  # "1e-4" from --set
            except ValueError:
                pass
        if not _matches(value, hint):
            raise ValueError(f"{name}.{key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")
        checked[key] = _coerce(value, hint)
    return checked


def dataclass_schema(cls) -> dict[str, Any]:
    """``{field: type hint}`` of a section dataclass."""
    hints = typing.get_type_hints(cls)
    return {item.name: hints[item.name] for item in dataclasses.fields(cls)}


def model_config_schema(config_class) -> dict[str, Any]:
    """``{field: type hint}`` of a ``PretrainedConfig`` subclass, from its ``__init__`` signatures (MRO)."""
    schema: dict[str, Any] = {}
    for klass in config_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith("transformers"):
            continue
        hints = typing.get_type_hints(init)
        for name, parameter in inspect.signature(init).parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                schema.setdefault(name, hints.get(name, Any))
    return schema


# -- the shared sections ---------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """Optimiser, learning-rate schedule, batch and length of a training run.

    Attributes:
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``, optionally ``nesterov``).
        lr, weight_decay, momentum, nesterov: the optimiser's settings.
        scheduler: ``"multistep"`` (lr x ``lr_gamma`` at each epoch of ``lr_milestones``), ``"step"``
            (x ``lr_gamma`` every ``lr_step_epochs`` epochs), ``"cosine"`` (to ``min_lr`` over the
            run) or ``"constant"``; ``warmup_steps`` of linear warm-up precede any of them.
        batch_size: the *global* batch; every process gets ``batch_size / world_size``.
        epochs: passes over the data; ``max_steps`` stops earlier (the CLI's ``--max-steps`` too).
        seed: every random choice of the run derives from it.
    """

    optimizer: str = "adam"
    lr: float = 3e-5
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "multistep"
    lr_milestones: list[int] = field(default_factory=lambda: [60])
    lr_step_epochs: int = 30
    lr_gamma: float = 0.2
    min_lr: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 16
    epochs: int = 100
    max_steps: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"optim.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for key, minimum in (("batch_size", 1), ("epochs", 1), ("lr_step_epochs", 1), ("warmup_steps", 0)):
            if getattr(self, key) < minimum:
                raise ValueError(f"optim.{key} must be >= {minimum}, got {getattr(self, key)}")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError(f"optim.lr must be positive and min_lr, weight_decay >= 0, got {self.lr}, "
                             f"{self.min_lr}, {self.weight_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"optim.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class RunConfig:
    """Outputs, checkpoints and logging of a training run.

    Attributes:
        output_dir: ``checkpoints/step-N``, ``final/``, ``metrics.jsonl`` and tracker logs go here.
        save_every_steps: checkpoint period (0: only at the end).
        keep_checkpoints: how many of the newest checkpoints to keep (0: all).
        log_with: accelerate trackers (``"tensorboard"``, ``"wandb"``); ones that are not installed
            are skipped with a warning. ``metrics.jsonl`` is always written.
        log_every_steps: period of tracker / ``metrics.jsonl`` records.
        cpu: force the CPU; ``None``: the CPU when no GPU is present or ``ACCELERATE_USE_CPU`` is set.
        num_threads: ``torch.set_num_threads`` per process (``None``: torch's default). On a busy
            small CPU host 1 thread can be many times faster than oversubscribed cores.
        init_from: start from the weights of this ``save_pretrained`` directory (its
            ``model.safetensors``; the architecture must match) -- to fine-tune a trained model.
    """

    output_dir: str | None = None
    save_every_steps: int = 500
    keep_checkpoints: int = 0
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    log_every_steps: int = 1
    cpu: bool | None = None
    num_threads: int | None = None
    init_from: str | None = None

    def validate(self) -> None:
        if self.save_every_steps < 0 or self.keep_checkpoints < 0 or self.log_every_steps < 1:
            raise ValueError("run.save_every_steps and run.keep_checkpoints must be >= 0, run.log_every_steps >= 1")
        if self.init_from is not None and not (Path(self.init_from).expanduser() / "model.safetensors").is_file():
            raise ValueError(f"run.init_from: no model.safetensors in {self.init_from} (a save_pretrained directory)")


@dataclass
class InferenceRunConfig:
    """Outputs and work split of a sharded inference job (hypotheses, pseudo labels).

    Attributes:
        output_dir: the shard directory (``shard-*.safetensors`` + sidecars + ``index.json``).
        shard_size: pairs per shard (the unit of work of a process and of a rerun).
        batch_size: pairs read and preprocessed at once (does not change the results).
        seed: every random draw of the job derives from it and the pair index.
        cpu, num_threads: as in :class:`RunConfig`.
    """

    output_dir: str | None = None
    shard_size: int = 64
    batch_size: int = 8
    seed: int = 0
    cpu: bool | None = None
    num_threads: int | None = None

    def validate(self) -> None:
        for key in ("shard_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")


# -- the file --------------------------------------------------------------------------------------------
def read_config_file(path: str | Path):
    """``(parsed YAML, path)``; a bare name such as ``pmd_cpu_tiny.yaml`` (or ``pmd_cpu_tiny``) that is
    not a file here is looked up among the configs shipped in ``semcorr/training/configs``.

    Raises:
        ValueError: no such file (the message lists the shipped configs), or invalid YAML.
    """
    import yaml

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
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error


def parse_overrides(items) -> dict[str, Any]:
    """``["optim.lr=1e-4", "run.log_with=[]"]`` (``--set``) or a dict -> ``{"optim.lr": value}`` (values read as YAML)."""
    import yaml

    if isinstance(items, dict):
        return dict(items)
    overrides = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value (e.g. optim.lr=1e-4)")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            overrides[key.strip()] = text
    return overrides


def _apply(raw: dict, overrides: dict) -> dict:
    """``raw`` with ``{"section.key": value}`` set (sections created as needed)."""
    raw = {section: (dict(values) if isinstance(values, dict) else values) for section, values in raw.items()}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        if raw.get(section) is None:
            raw[section] = {}
        if isinstance(raw[section], dict):
            raw[section][key] = value
    return raw


# -- an entry point's config -------------------------------------------------------------------------
@dataclass
class SectionedConfig:
    """Base of every entry point's config: a dataclass whose fields are its sections.

    Subclasses declare the sections as fields (a dataclass per section; ``model: dict`` for the
    fields of ``MODEL_CONFIG``, a config class or the name of one exported by
    :mod:`semcorr.modeling`, resolved on first use), and may set ``RENAMED`` (old dotted key -> new dotted key; the old
    name then fails with a message giving the new one), ``DEFAULTS`` (dotted key -> value used when
    the file does not set it) and override :meth:`validate` for checks across sections.
    """

    MODEL_CONFIG: ClassVar[Any] = None
    RENAMED: ClassVar[dict[str, str]] = {}
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    source: str | None = field(default=None, kw_only=True)

    @classmethod
    def sections(cls) -> dict[str, Any]:
        """``{section name: its dataclass, or dict for the model section}``."""
        hints = typing.get_type_hints(cls)
        return {item.name: hints[item.name] for item in dataclasses.fields(cls) if item.name != "source"}

    @classmethod
    def from_dict(cls, raw, source: str | None = None):
        """Validate a parsed YAML mapping (no side effects); ``ValueError`` naming the first bad key."""
        raw = _apply(cls._check_names({} if raw is None else raw), {})
        for dotted, value in cls.DEFAULTS.items():  # defaults fill only what the file leaves out
            section, key = dotted.split(".", 1)
            if raw.get(section) is None:
                raw[section] = {}
            if isinstance(raw[section], dict):
                raw[section].setdefault(key, value)
        values = {}
        for name, kind in cls.sections().items():
            if kind is dict or typing.get_origin(kind) is dict:
                values[name] = check_section(name, raw.get(name), model_config_schema(cls.model_config_class()))
            else:
                values[name] = kind(**check_section(name, raw.get(name), dataclass_schema(kind)))
        for section in values.values():  # every key and type is checked before any value
            if hasattr(section, "validate"):
                section.validate()
        config = cls(**values, source=source)
        config.validate()
        return config

    @classmethod
    def model_config_class(cls):
        """``MODEL_CONFIG`` as a class (a name is looked up in :mod:`semcorr.modeling`)."""
        if isinstance(cls.MODEL_CONFIG, str):
            import semcorr.modeling

            return getattr(semcorr.modeling, cls.MODEL_CONFIG)
        return cls.MODEL_CONFIG

    @classmethod
    def _check_names(cls, raw) -> dict:
        if not isinstance(raw, dict):
            raise ValueError(f"a config file must be a mapping of sections ({', '.join(cls.sections())}), "
                             f"got {type(raw).__name__}")
        for section, values in raw.items():
            keys = [str(section)] + ([f"{section}.{key}" for key in values] if isinstance(values, dict) else [])
            for key in keys:
                if key in cls.RENAMED:
                    raise ValueError(f"config key '{key}' is now '{cls.RENAMED[key]}'; rename it in the file")
        unknown = sorted(set(map(str, raw)) - set(cls.sections()))
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(cls.sections())}")
        return raw

    @classmethod
    def load(cls, path: str | Path | None = None, overrides=None):
        """Read ``path`` (optional), apply ``overrides`` (``{"section.key": value}`` or ``--set`` strings), validate."""
        raw, source = {}, None
        if path is not None:
            raw, source = read_config_file(path)
            raw = raw if raw is not None else {}
        if isinstance(raw, dict):
            raw = _apply(raw, parse_overrides(overrides))
        return cls.from_dict(raw, source=str(source) if source is not None else None)

    def validate(self) -> None:
        """Checks across sections (and of the model section); raise ``ValueError``."""
        if self.MODEL_CONFIG is not None and isinstance(getattr(self, "model", None), dict):
            check_model_fields(self.model_config_class(), self.model)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


@dataclass
class TrainingConfig(SectionedConfig):
    """The sections of a training entry point: ``model`` (fields of ``MODEL_CONFIG``), ``data`` (the
    task's dataclass: subclasses redeclare it), ``optim`` and ``run``."""

    model: dict = field(default_factory=dict)
    data: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """A ``data.image_size`` (where the task's data section has one) becomes the model's input size."""
        image_size = getattr(self.data, "image_size", None)
        if image_size is not None:
            if "image_size" in self.model and list(self.model["image_size"]) != list(image_size):
                raise ValueError(f"model.image_size {self.model['image_size']} and data.image_size {image_size} differ")
            self.model["image_size"] = list(image_size)
        super().validate()


def build_seeded_model(config_class, model_class, model_fields: dict, seed: int):
    """``model_class(config_class(**model_fields))`` initialised under ``seed``, its backbone weights loaded
    (``backbone_weights``: embedded, timm or a safetensors file)."""
    import torch

    from semcorr.modeling.backbone import load_backbone_weights

    config = config_class(**model_fields)
    torch.manual_seed(seed)
    model = model_class(config)
    if getattr(config, "backbone_weights", None):
        load_backbone_weights(model.backbone, config.backbone_weights)
    return model


def check_model_fields(config_class, fields: dict) -> None:
    """The model config's own checks (kernel sizes, levels, ...) and an existing weights file."""
    try:
        config_class(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model: {error}") from error
    weights = fields.get("backbone_weights")
    if weights not in (None, "timm", "embedded") and not Path(weights).expanduser().is_file():
        raise ValueError(f"model.backbone_weights: file not found: {weights}")

"""The embedded default model: Hyperpixel Flow on ImageNet EfficientNet-Lite0, fully offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .backbone import load_backbone_weights
from .configuration_hyperpixel import HyperpixelFlowConfig
from .embedded_backbone import cache_dir
from .image_processing_semcorr import SemanticCorrespondenceImageProcessor
from .modeling_hyperpixel import HyperpixelFlowModel


def default_config(**overrides) -> HyperpixelFlowConfig:
    """Config of the embedded default (keyword overrides change any field)."""
    return HyperpixelFlowConfig(**overrides)


def image_processor_for(config) -> SemanticCorrespondenceImageProcessor:
    """The image processor matching a model config's ``image_size``, ``image_mean``, ``image_std``."""
    height, width = config.image_size
    return SemanticCorrespondenceImageProcessor(
        size={"height": height, "width": width}, image_mean=config.image_mean, image_std=config.image_std
    )


def load_default_model(**overrides) -> HyperpixelFlowModel:
    """Hyperpixel Flow with the embedded ImageNet EfficientNet-Lite0 weights, in eval mode."""
    config = default_config(**overrides)
    model = HyperpixelFlowModel(config)
    load_backbone_weights(model.backbone, config.backbone_weights or "embedded")
    return model.eval()


def default_model_dir(**overrides) -> Path:
    """A directory holding the default model as a Hub repo would (config, safetensors, processor).

    Written once into the semcorr cache (atomically: a temporary directory renamed into place),
    so ``AutoModel.from_pretrained`` and ``pipeline(model=...)`` can load it like any checkpoint.
    """
    config = default_config(**overrides)
    key = hashlib.sha256(json.dumps(config.to_diff_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = cache_dir() / f"default-hyperpixel-{key}"
    if (target / "model.safetensors").is_file() and (target / "preprocessor_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-default-"))
    try:
        model = load_default_model(**overrides)
        model.save_pretrained(staging)
        image_processor_for(model.config).save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

"""The embedded default model: Hyperpixel Flow on ImageNet EfficientNet-Lite0, fully offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from semcorr.utils import atomic_directory, cache_dir

from .backbone import load_backbone_weights
from .hyperpixel.configuration_hyperpixel import HyperpixelFlowConfig
from .hyperpixel.modeling_hyperpixel import HyperpixelFlowModel
from .image_processing_semcorr import image_processor_for


def default_config(**overrides) -> HyperpixelFlowConfig:
    """Config of the embedded default (keyword overrides change any field)."""
    return HyperpixelFlowConfig(**overrides)


def load_default_model(**overrides) -> HyperpixelFlowModel:
    """Hyperpixel Flow with the embedded ImageNet EfficientNet-Lite0 weights, in eval mode."""
    config = default_config(**overrides)
    model = HyperpixelFlowModel(config)
    load_backbone_weights(model.backbone, config.backbone_weights or "embedded")
    return model.eval()


def default_model_dir(**overrides) -> Path:
    """A directory holding the default model as a Hub repo would (config, safetensors, processor).

    Written once into the semcorr cache (atomically), so ``AutoModel.from_pretrained`` and
    ``pipeline(model=...)`` can load it like any checkpoint. The folder name hashes the config, so
    a changed default gets a new folder.
    """
    config = default_config(**overrides)
    key = hashlib.sha256(json.dumps(config.to_diff_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = cache_dir() / f"default-hyperpixel-{key}"
    if (target / "model.safetensors").is_file() and (target / "preprocessor_config.json").is_file():
        return target
    with atomic_directory(target, overwrite=False) as staging:  # several processes may race: same content
        model = load_default_model(**overrides)
        model.save_pretrained(staging)
        image_processor_for(model.config).save_pretrained(staging)
    return target

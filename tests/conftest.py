"""Shared fixtures: offline Hub, a per-session semcorr cache, tiny models and real images.

Nothing is downloaded: ``HF_HUB_OFFLINE`` is set before anything imports huggingface_hub, and
``SEMCORR_CACHE`` points at a session temporary directory so the embedded default model is
converted and materialised there (never in the user's cache).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

TINY_SIZE = [64, 64]


@pytest.fixture(scope="session", autouse=True)
def semcorr_cache(tmp_path_factory):
    """``SEMCORR_CACHE`` -> a session temporary directory (also inherited by subprocesses)."""
    cache = tmp_path_factory.mktemp("semcorr-cache")
    previous = os.environ.get("SEMCORR_CACHE")
    os.environ["SEMCORR_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("SEMCORR_CACHE", None)
    else:
        os.environ["SEMCORR_CACHE"] = previous


# -- images ----------------------------------------------------------------------------------------
def skimage_data() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    """scikit-image's ``chelsea`` photo (451 x 300), RGB."""
    return Image.open(skimage_data() / "chelsea.png").convert("RGB")


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture (uint8 HxWx3): blobs a few pixels wide, no flat areas."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 4 + 2, width // 4 + 2, 3)).astype(np.float32)
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(image)


# -- tiny models -----------------------------------------------------------------------------------
def tiny_config(**overrides):
    from semcorr.modeling import HyperpixelFlowConfig

    fields = dict(backbone="resnet18", backbone_layers=[1, 2], image_size=list(TINY_SIZE), backbone_weights=None)
    fields.update(overrides)
    return HyperpixelFlowConfig(**fields)


def tiny_model(seed: int = 0, **overrides):
    import torch

    from semcorr.modeling import HyperpixelFlowModel

    torch.manual_seed(seed)
    return HyperpixelFlowModel(tiny_config(**overrides)).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random model *with* its preprocessor_config.json."""
    from semcorr.modeling import image_processor_for

    directory = tmp_path_factory.mktemp("tiny-model")
    model = tiny_model()
    model.save_pretrained(directory)
    image_processor_for(model.config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    import semcorr.pipelines  # noqa: F401
    from transformers import pipeline

    return pipeline("semantic-correspondence", model=str(tiny_model_dir))


@pytest.fixture(scope="session")
def default_model():
    """The embedded default Hyperpixel Flow model (converted into the session cache once)."""
    from semcorr.modeling import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def default_pipe():
    """``pipeline("semantic-correspondence")`` with no model: the embedded default."""
    import semcorr.pipelines  # noqa: F401
    from transformers import pipeline

    return pipeline("semantic-correspondence")


@pytest.fixture
def datasets_offline(monkeypatch):
    """Offline for `datasets` and the Hub even when they were imported before the env was set."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def save_tiny_pmd_teacher(folder: Path) -> Path:
    """A randomly initialised ResNet-18 PMD teacher at 64 x 64 (seed 0) saved with its processor."""
    import torch

    from semcorr.modeling import PMDTeacherConfig, PMDTeacherModel, image_processor_for

    torch.manual_seed(0)
    config = PMDTeacherConfig(backbone="resnet18", backbone_layers=[2, 3], image_size=[64, 64], backbone_weights=None)
    PMDTeacherModel(config).eval().save_pretrained(folder)
    image_processor_for(config).save_pretrained(folder)
    return folder

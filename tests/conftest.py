"""Shared fixtures: offline Hub, a per-session semcorr cache, tiny models and real images.

Nothing is downloaded and nothing is written to the user's caches: ``HF_HUB_OFFLINE`` is set and
``HF_HOME``, ``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``, the modules/evaluate/metrics caches and
``XDG_CACHE_HOME`` point into one session temporary folder (:data:`HF_TEST_HOME`, removed when the
session ends) before anything imports huggingface_hub, datasets, evaluate or transformers (they
read these variables once, at import; subprocesses inherit them). ``SEMCORR_CACHE`` points at a
session temporary directory so the embedded default model is converted and materialised there.

Helpers shared by several test modules are plain functions here (``from .conftest import ...``):
tiny model configs, image-pair builders with a planted correspondence, subprocess runners.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One temporary HF home per session. The marker makes a second import of this module (as
# ``semcorr.tests.conftest`` next to pytest's ``tests.conftest``, or in a pytest-xdist worker that
# inherited the environment) reuse the folder instead of redirecting the caches again.
_HF_HOME_MARKER = "SEMCORR_TEST_HF_HOME"
_CREATED_HF_HOME = _HF_HOME_MARKER not in os.environ
if _CREATED_HF_HOME:
    os.environ[_HF_HOME_MARKER] = tempfile.mkdtemp(prefix="semcorr-tests-hf-")
    # pytest_sessionfinish removes it; this covers an import outside a pytest session
    atexit.register(shutil.rmtree, os.environ[_HF_HOME_MARKER], ignore_errors=True)
#: the session's stand-in for ``~/.cache`` (``HF_HOME`` is its ``huggingface`` folder)
HF_TEST_HOME = os.environ[_HF_HOME_MARKER]
_HF_HOME = os.path.join(HF_TEST_HOME, "huggingface")
os.environ.update({
    "XDG_CACHE_HOME": HF_TEST_HOME,
    "HF_HOME": _HF_HOME,
    "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),
    "HF_ASSETS_CACHE": os.path.join(_HF_HOME, "assets"),
    "HF_DATASETS_CACHE": os.path.join(_HF_HOME, "datasets"),
    "HF_MODULES_CACHE": os.path.join(_HF_HOME, "modules"),
    "HF_EVALUATE_CACHE": os.path.join(_HF_HOME, "evaluate"),
    "HF_METRICS_CACHE": os.path.join(_HF_HOME, "metrics"),
})

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

TINY_SIZE = [64, 64]


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's HF home (only in the process that created it)."""
    if _CREATED_HF_HOME:
        shutil.rmtree(HF_TEST_HOME, ignore_errors=True)


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


def shifted_crops(source_size, target_size, offset, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two crops of one :func:`textured_image` with a planted correspondence.

    Args:
        source_size, target_size: ``(height, width)`` of the crops.
        offset: whole pixels ``(dx, dy)``: source pixel ``(x, y)`` shows what target pixel
            ``(x + dx, y + dy)`` shows (content outside the target's frame is not in the target).

    Returns:
        ``(source, target)`` uint8 ``H x W x 3`` arrays.
    """
    (source_h, source_w), (target_h, target_w), (dx, dy) = source_size, target_size, offset
    source_x, source_y = max(int(dx), 0), max(int(dy), 0)
    target_x, target_y = source_x - int(dx), source_y - int(dy)
    height = max(source_y + source_h, target_y + target_h)
    width = max(source_x + source_w, target_x + target_w)
    texture = textured_image(height, width, seed)
    return (texture[source_y:source_y + source_h, source_x:source_x + source_w],
            texture[target_y:target_y + target_h, target_x:target_x + target_w])


def pixel_values(*arrays, size=TINY_SIZE):
    """``(B, 3, H, W)`` model inputs of uint8 images, resized to ``size = (h, w)`` by the default processor."""
    from semcorr.modeling import SemanticCorrespondenceImageProcessor

    processor = SemanticCorrespondenceImageProcessor(size={"height": size[0], "width": size[1]})
    return processor.preprocess(list(arrays))["pixel_values"]


def cell_centres(height: int, width: int, stride: int):
    """``(xs, ys)`` ``(height, width)`` tensors: pixel centres of the cells of a stride-``stride`` grid."""
    import torch

    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) * stride, (torch.arange(width) + 0.5) * stride, indexing="ij")
    return xs, ys


def grid_in_pixels(grid, size):
    """``(B, 2, h, w)`` normalised grid (``align_corners=False``) -> ``(x, y)`` pixels of an image of ``size = (h, w)``."""
    return (grid[:, 0] + 1) / 2 * size[1], (grid[:, 1] + 1) / 2 * size[0]


# -- tiny models -----------------------------------------------------------------------------------
#: A tiny PMD teacher / student (``PMDTeacherConfig(**TINY_PMD)``): random ResNet-18, levels 2 and 3, 64 x 64.
TINY_PMD = dict(backbone="resnet18", backbone_layers=[2, 3], image_size=list(TINY_SIZE), backbone_weights=None)


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


def _go_offline(patch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def datasets_offline(monkeypatch):
    """Offline for `datasets` and the Hub even when they were imported before the env was set."""
    _go_offline(monkeypatch)


@pytest.fixture(scope="module")
def datasets_offline_module():
    """:func:`datasets_offline` for module-scoped fixtures (undone at the end of the module)."""
    patch = pytest.MonkeyPatch()
    _go_offline(patch)
    yield
    patch.undo()


# -- subprocesses ----------------------------------------------------------------------------------
def run_module(module: str, *args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` in a subprocess on one thread (``OMP_NUM_THREADS=1``), text output captured."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=timeout)


def torchrun_module(module: str, *args, nproc: int, port: int, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``module`` under ``torch.distributed.run`` with ``nproc`` CPU processes (``ACCELERATE_USE_CPU=1``)."""
    return run_module("torch.distributed.run", "--nproc_per_node", nproc, "--master_port", port, "-m", module, *args,
                      env={"ACCELERATE_USE_CPU": "1", **(env or {})}, timeout=timeout)


def save_tiny_pmd_teacher(folder: Path) -> Path:
    """A randomly initialised ResNet-18 PMD teacher at 64 x 64 (seed 0) saved with its processor."""
    import torch

    from semcorr.modeling import PMDTeacherConfig, PMDTeacherModel, image_processor_for

    torch.manual_seed(0)
    config = PMDTeacherConfig(**TINY_PMD)
    PMDTeacherModel(config).eval().save_pretrained(folder)
    image_processor_for(config).save_pretrained(folder)
    return folder

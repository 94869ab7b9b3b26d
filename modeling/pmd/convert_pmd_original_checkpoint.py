"""Convert the public PMD student checkpoints (Li et al., CVPR 2021) to a semcorr model directory.

The released ``pascal_weakly.pt``, ``pascal_strongly.pt`` and ``spair_strongly.pt`` hold only the
trained heads of the student on a frozen torchvision ResNet-101: the layer3 and layer4 adaptation
blocks (``conv1`` / ``conv2``, each ``0`` = Conv2d, ``1`` = BatchNorm2d) and the layer4 co-channel
attention ``chn4.mu_conv`` (Conv2d 4096 -> 2048, k1, then BatchNorm2d). Accepted layouts:

* flat: ``adap_layer_feat3.*``, ``adap_layer_feat4.*``, ``chn4.*`` (also a whole network state dict,
  whose frozen ``feature_extraction.*`` backbone entries are skipped);
* split per module: ``{"state_dict1": adap3, "state_dict2": adap4, "chn4_dict": chn4}`` (how the
  official evaluation scripts read the released files);
* either one wrapped in ``{"state_dict": ...}`` / ``{"model": ...}`` and/or with the ``module.``
  prefix of ``DataParallel``.

The file is read with ``torch.load(weights_only=True)``: nothing but tensors and plain containers is
unpickled. The backbone is not in the checkpoint; pass ``backbone_weights`` (``"timm"`` downloads
``resnet101.tv_in1k``; or a safetensors file of torchvision / timm ResNet-101 weights, which share
key names).

Usage::

    python -m semcorr.modeling.pmd.convert_pmd_original_checkpoint --checkpoint pascal_weakly.pt \\
        --output-dir pmd-pascal-weakly --backbone-weights resnet101.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from semcorr.utils import atomic_directory, sha256_file

from ..backbone import load_backbone_weights
from ..image_processing_semcorr import image_processor_for
from .configuration_pmd import PMDStudentConfig
from .modeling_pmd import PMDStudentModel

#: Official key prefix -> semcorr key prefix.
KEY_PREFIXES = {
    "adap_layer_feat3.": "adaptation.0.",
    "adap_layer_feat4.": "adaptation.1.",
    "chn4.mu_conv.": "attention.1.mu_conv.",
}
#: Sub-dicts of the split layout -> the official module they belong to.
SPLIT_KEYS = {"state_dict1": "adap_layer_feat3.", "state_dict2": "adap_layer_feat4.", "chn4_dict": "chn4."}
#: Entries of a whole-network state dict that carry no trained head weights (frozen backbone).
SKIPPED_PREFIXES = ("feature_extraction.",)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")

#: The published student: SFNet-style heads on torchvision ResNet-101, 320 x 320 input, 20 x 20 grid.
PUBLISHED_CONFIG = dict(
    backbone="resnet101.tv_in1k",
    backbone_layers=[3, 4],
    backbone_weights="timm",
    image_size=[320, 320],
    adaptation_kernel_sizes=[5, 3],
    attention_levels=[1],
    grid_align_corners=True,
    soft_argmax_sigma=5,
    soft_argmax_beta=50,
)


def _is_tensor_dict(value) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _flatten_layout(obj) -> dict[str, torch.Tensor]:
    """The official flat key layout (``adap_layer_feat3.conv1.0.weight`` ...) from any accepted layout."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a dict of tensors in the checkpoint, got {type(obj).__name__}")
    if any(key in obj for key in SPLIT_KEYS):
        flat = {}
        for split_key, prefix in SPLIT_KEYS.items():
            part = obj.get(split_key)
            if part is None:
                continue
            if not _is_tensor_dict(part):
                raise ValueError(f"checkpoint entry '{split_key}' is not a dict of tensors")
            flat.update({prefix + _strip_module(k): v for k, v in part.items()})
        return flat
    for wrapper in _WRAPPER_KEYS:
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            return _flatten_layout(obj[wrapper])
    if not _is_tensor_dict(obj):
        raise ValueError(
            "the checkpoint is not a PMD state dict: expected tensors under 'adap_layer_feat3.*', "
            "'adap_layer_feat4.*', 'chn4.*' (or 'state_dict1', 'state_dict2', 'chn4_dict'); "
            f"top-level keys: {sorted(map(str, obj))[:10]}"
        )
    return {_strip_module(k): v for k, v in obj.items()}


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def map_official_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename official keys to semcorr keys.

    Returns:
        ``(mapped, unexpected)``: renamed tensors, and the keys no rule covers (backbone entries
        of a whole-network dict are dropped silently).
    """
    mapped, unexpected = {}, []
    for key, value in state_dict.items():
        for old, new in KEY_PREFIXES.items():
            if key.startswith(old):
                mapped[new + key[len(old):]] = value
                break
        else:
            if not key.startswith(SKIPPED_PREFIXES):
                unexpected.append(key)
    return mapped, unexpected


def load_official_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official checkpoint safely and return its tensors in the flat official key layout."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refusals, truncated files, not a torch file at all
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not read {path} as a tensors-only torch checkpoint: {first}") from None
    return _flatten_layout(obj)


def _check_heads(mapped: dict, unexpected: list, expected: dict) -> None:
    """Every head key present with the right shape; ``num_batches_tracked`` may be absent (old PyTorch)."""
    missing = sorted(k for k in expected if k not in mapped and not k.endswith("num_batches_tracked"))
    unexpected = sorted(unexpected + [k for k in mapped if k not in expected])
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ValueError("checkpoint does not fit the PMD student heads (semcorr key names) - " + " | ".join(problems))


def build_pmd_student(state_dict_path: str | os.PathLike, backbone_weights="timm", config_overrides: dict | None = None):
    """A :class:`PMDStudentModel` (eval mode) holding the converted heads of an official checkpoint."""
    official = load_official_state_dict(state_dict_path)
    mapped, unexpected = map_official_keys(official)
    config = PMDStudentConfig(**{**PUBLISHED_CONFIG, **(config_overrides or {})})
    model = PMDStudentModel(config)
    full = model.state_dict()
    heads = {k: v for k, v in full.items() if not k.startswith("backbone.")}
    _check_heads(mapped, unexpected, heads)
    full.update(mapped)
    model.load_state_dict(full, strict=True)
    if backbone_weights not in (None, "none"):
        try:
            load_backbone_weights(model.backbone, backbone_weights)
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(
                f"could not load backbone weights {backbone_weights!r} for '{config.backbone}' "
                f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                "offline, pass a safetensors file of torchvision/timm resnet101 weights "
                "(safetensors.torch.save_file(torchvision.models.resnet101(weights='IMAGENET1K_V1').state_dict(), "
                "'resnet101.safetensors'))"
            ) from None
    return model.eval()




def _model_card(checkpoint: Path, sha256: str, config: PMDStudentConfig, backbone_weights) -> str:
    if backbone_weights in (None, "none"):
        backbone_note = ("**The backbone is randomly initialised** (converted without backbone weights): "
                         "this directory is only useful for tests.")
    elif backbone_weights == "timm":
        backbone_note = f"Backbone weights: timm `{config.backbone}` (ImageNet, torchvision release)."
    else:
        backbone_note = f"Backbone weights: `{Path(str(backbone_weights)).name}`."
    height, width = config.image_size
    return f"""---
library_name: transformers
pipeline_tag: image-feature-extraction
tags:
- semcorr
- semantic-correspondence
- pmd
---

# PMD student (converted)

Student network of *Probabilistic Model Distillation for Semantic Correspondence* (Li et al.,
CVPR 2021), converted from the authors' released checkpoint `{checkpoint.name}`
(sha256 `{sha256}`) with `semcorr.modeling.pmd.convert_pmd_original_checkpoint`.
Check the original authors' terms before redistributing these weights.

- Backbone: `{config.backbone}`, levels {config.backbone_layers}, frozen. {backbone_note}
- Input: {height} x {width}, ImageNet normalisation; correlation grid {height // 16} x {width // 16}.
- Heads: residual adaptation (kernels {config.adaptation_kernel_sizes}), co-channel attention on
  level(s) {config.attention_levels}, kernel soft-argmax (sigma {config.soft_argmax_sigma:g},
  beta {config.soft_argmax_beta:g}), corner-aligned grids as in the official code.

```python
import semcorr.pipelines
from transformers import pipeline

matcher = pipeline("semantic-correspondence", model="path/to/this/directory")
result = matcher({{"source_image": "a.jpg", "target_image": "b.jpg", "source_keypoints": [[120, 80]]}})
```
"""


def convert_pmd_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    backbone_weights: str | os.PathLike | None = "timm",
    config_overrides: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an official PMD student checkpoint into a ``from_pretrained`` directory.

    Args:
        checkpoint_path: the released ``.pt`` file (any layout in the module docstring).
        output_dir: directory to write (config, ``model.safetensors``, image processor, README.md).
        backbone_weights: ``"timm"``, a safetensors path, or ``None`` / ``"none"`` to leave the
            backbone random (tests only).
        config_overrides: :class:`PMDStudentConfig` fields replacing the published ones (tests use
            a small backbone with a checkpoint of matching channels).
        overwrite: replace an existing non-empty ``output_dir``.

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`, written atomically (staged, then renamed).

    Raises:
        ValueError: unreadable checkpoint, missing / unexpected keys, shape mismatches, backbone
            weights that cannot be loaded, or an existing output directory without ``overwrite``.
    """
    checkpoint = Path(checkpoint_path)
    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
        raise ValueError(f"output directory {target} exists and is not empty (pass overwrite=True / --overwrite)")
    model = build_pmd_student(checkpoint, backbone_weights, config_overrides)
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        image_processor_for(model.config).save_pretrained(staging)
        (staging / "README.md").write_text(_model_card(checkpoint, sha256_file(checkpoint), model.config, backbone_weights))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semcorr.modeling.pmd.convert_pmd_original_checkpoint",
        description="Convert an official PMD student checkpoint (pascal_weakly.pt, ...) to a semcorr model directory.",
    )
    parser.add_argument("--checkpoint", required=True, help="the released .pt file")
    parser.add_argument("--output-dir", required=True, help="directory to write")
    parser.add_argument(
        "--backbone-weights", default="timm",
        help="'timm' (download resnet101.tv_in1k), a safetensors file of torchvision/timm resnet101 weights, "
             "or 'none' (random backbone, tests only)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    weights = None if args.backbone_weights.lower() == "none" else args.backbone_weights
    try:
        out = convert_pmd_checkpoint(args.checkpoint, args.output_dir, weights, overwrite=args.overwrite)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

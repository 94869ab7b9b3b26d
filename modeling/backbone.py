"""Feature backbone: any timm model in ``features_only`` mode, frozen by default."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from .embedded_backbone import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS, embedded_weights_file


class FeatureBackbone(nn.Module):
    """Multi-level features of a timm backbone.

    Args:
        name: timm model name (``tf_efficientnet_lite0``, ``resnet101.tv_in1k``,
            ``vit_base_patch16_224.dino``, ...).
        levels: feature levels to return, as timm ``out_indices`` (stage indices for CNNs, block
            indices for ViTs).
        frozen: no gradients and eval-mode batch norm, whatever ``train()`` says.
        image_size: input size for models with a fixed one (ViTs), ``(height, width)``.

    Weights are random here; use :func:`load_backbone_weights`. ``forward(pixel_values (B, 3, H, W))``
    returns one ``(B, C_l, H / r_l, W / r_l)`` map per level.
    """

    def __init__(self, name: str, levels: list[int], frozen: bool = True, image_size: tuple[int, int] | None = None):
        super().__init__()
        self.create_kwargs = {"img_size": tuple(image_size)} if image_size is not None and _is_vit(name) else {}
        self.body = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=tuple(levels), **self.create_kwargs
        )
        self.name = name
        self.frozen = frozen
        if frozen:
            self.body.requires_grad_(False)
        for module in self.body.modules():
            module._semcorr_backbone = True  # skipped by SemanticMatcherPreTrainedModel._init_weights

    @property
    def channels(self) -> list[int]:
        return list(self.body.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        return list(self.body.feature_info.reduction())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.body.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.frozen:
            with torch.no_grad():
                return list(self.body(pixel_values))
        return list(self.body(pixel_values))


def _is_vit(name: str) -> bool:
    return name.split(".")[0].startswith(("vit_", "deit", "eva", "beit"))


def load_backbone_weights(backbone: FeatureBackbone, weights: str | Path) -> None:
    """Load pretrained weights into a :class:`FeatureBackbone`.

    Args:
        weights: ``"embedded"`` (EfficientNet-Lite0 from the installed package, only for
            ``tf_efficientnet_lite0``), ``"timm"`` (timm's pretrained tag from the Hub, needs
            network or a warm Hub cache), or a path to a safetensors file holding the *full* timm
            model's state dict (what ``timm.create_model(name, pretrained=True).state_dict()``
            saves). Pickled checkpoints are refused: convert them to safetensors first.
    """
    levels = tuple(backbone.body.feature_info.out_indices)
    if weights == EMBEDDED_WEIGHTS:
        if backbone.name.split(".")[0] != EMBEDDED_BACKBONE:
            raise ValueError(
                f"the embedded weights are for '{EMBEDDED_BACKBONE}', not '{backbone.name}'; "
                "pass weights='timm' or a safetensors file"
            )
        overlay = {"file": str(embedded_weights_file())}
    elif weights == "timm":
        overlay = None
    else:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"backbone weights file not found: {path}")
        if path.suffix != ".safetensors":
            raise ValueError(
                f"only safetensors weights are loaded from user paths, got '{path.name}'; convert it with "
                "safetensors.torch.save_file(state_dict, 'weights.safetensors')"
            )
        overlay = {"file": str(path)}
    kwargs = dict(backbone.create_kwargs)
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    # timm filters and renames the full checkpoint for the features_only wrapper.
    # timm logs the classifier keys a features_only model drops; they are expected here.
    timm_logger = logging.getLogger("timm.models._builder")
    previous = timm_logger.level
    timm_logger.setLevel(logging.ERROR)
    try:
        pretrained = timm.create_model(backbone.name, pretrained=True, features_only=True, out_indices=levels, **kwargs)
    finally:
        timm_logger.setLevel(previous)
    backbone.body.load_state_dict(pretrained.state_dict(), strict=True)

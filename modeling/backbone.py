"""Feature backbone: any timm CNN (``features_only``) or vision transformer, frozen by default.

CNNs are timm ``features_only`` models: one map per stage. Vision transformers (ViT, DeiT, EVA,
BEiT, DINO / DINOv2 and other ``timm`` ViTs) are held whole and give the *patch tokens* of chosen
blocks as maps, class and register tokens excluded, with the class token after the final norm
as the global token (:meth:`FeatureBackbone.forward_with_global`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import is_model, model_entrypoint
from timm.models._features import feature_take_indices
from torch import nn

from .embedded_backbone import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS, embedded_weights_file

# timm modules whose models are plain patch-token transformers with ``forward_intermediates``.
_VIT_MODULES = {"vision_transformer", "deit", "eva", "beit", "vision_transformer_relpos", "vision_transformer_hybrid"}
_VIT_PREFIXES = ("vit_", "deit", "eva", "beit")


class FeatureBackbone(nn.Module):
    """Multi-level features of a timm backbone.

    Args:
        name: timm model name, optionally with a pretrained tag (``tf_efficientnet_lite0``,
            ``resnet101.tv_in1k``, ``vit_base_patch16_224.dino``, ``vit_base_patch14_dinov2.lvd142m``).
        levels: feature levels, as timm ``out_indices``: stage indices for CNNs, block indices
            (0-based, negative from the end) for vision transformers.
        frozen: no gradients and eval mode (batch norm, dropout), whatever ``train()`` says.
        image_size: ``(height, width)`` a ViT is built for: its position embedding is stored at
            this grid, so inputs of this size need no interpolation. Ignored for CNNs.
        model_kwargs: extra ``timm.create_model`` arguments (``depth``, ``embed_dim``, ...).

    Weights are random here; use :func:`load_backbone_weights`. ``forward(pixel_values (B, 3, H, W))``
    returns one ``(B, C_l, H / r_l, W / r_l)`` map per level, shallowest first.

    Vision transformers take any input size: timm interpolates the position embedding to the
    input's patch grid (``dynamic_img_size``). An input whose side is not a multiple of the patch
    size ``p`` is first resized to the nearest multiple, so the ``n`` patches tile the whole image
    and cell ``i`` is centred at pixel ``(i + 0.5) * H / n`` -- the package's cell convention
    (:mod:`semcorr.modeling.ops.geometry`); at multiples of ``p`` that is ``(i + 0.5) * p``.
    Transformers without dynamic sizes in timm (BEiT, relative-position ViTs) are resized to
    their built ``image_size``. A ViT's maps are its blocks' outputs before the final norm (the
    ``token`` descriptors of Amir et al., 2021, which the DINOv2 matchers use too); :attr:`body`
    is the timm model itself, classifier removed, so its state dict has timm's keys.
    """

    def __init__(
        self,
        name: str,
        levels: list[int],
        frozen: bool = True,
        image_size: tuple[int, int] | None = None,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        self.name = name
        self.levels = tuple(levels)
        self.frozen = frozen
        self.is_vit = _is_vit(name)
        if self.is_vit:
            self.create_kwargs = _vit_create_kwargs(image_size, model_kwargs)
            self.body = self._create_vit()
            _persist_buffers(self.body)
            self._take_indices = sorted(feature_take_indices(len(self.body.blocks), list(self.levels))[0])
        else:
            self.create_kwargs = dict(model_kwargs or {})
            self.body = timm.create_model(name, pretrained=False, **self.timm_kwargs())
        if frozen:  # from the start, not only after the first call of train() or of eval mode
            self.body.requires_grad_(False).eval()
        for module in self.body.modules():
            module._semcorr_backbone = True  # skipped by SemanticMatcherPreTrainedModel._init_weights

    def _create_vit(self) -> nn.Module:
        try:
            return timm.create_model(self.name, pretrained=False, **self.timm_kwargs())
        except TypeError as error:  # BEiT, relative-position ViTs: fixed input size only
            if "dynamic_img_size" not in str(error):
                raise
            self.create_kwargs.pop("dynamic_img_size")
            return timm.create_model(self.name, pretrained=False, **self.timm_kwargs())

    def timm_kwargs(self) -> dict:
        """Arguments of ``timm.create_model`` (besides the name) that build :attr:`body`."""
        if self.is_vit:
            return dict(self.create_kwargs)
        return dict(features_only=True, out_indices=self.levels, **self.create_kwargs)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def channels(self) -> list[int]:
        """Channels of each returned map (the embedding width for ViTs)."""
        if self.is_vit:
            return [self.body.feature_info[i]["num_chs"] for i in self._take_indices]
        return list(self.body.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        """Stride in input pixels of each returned map (the patch size for ViTs)."""
        if self.is_vit:
            return [self.body.feature_info[i]["reduction"] for i in self._take_indices]
        return list(self.body.feature_info.reduction())

    @property
    def patch_size(self) -> tuple[int, int]:
        """``(height, width)`` of a ViT patch in input pixels."""
        if not self.is_vit:
            raise AttributeError(f"'{self.name}' is not a vision transformer: it has no patch size")
        ratio = self.body.patch_embed.feat_ratio(as_scalar=False)
        return (int(ratio[0]), int(ratio[1]))

    def patch_grid_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of a ViT's maps for an ``height x width`` input.

        The input is resized to ``(h * p_h, w * p_w)`` first (see the class docstring), so
        cell ``(r, c)`` covers input pixels ``[c * W / w, (c + 1) * W / w) x [r * H / h, (r + 1) * H / h)``.
        """
        if not getattr(self.body, "dynamic_img_size", False):
            return tuple(int(n) for n in self.body.patch_embed.grid_size)
        patch_h, patch_w = self.patch_size
        # floor(x + 0.5): the nearest multiple of the patch, ties upwards (round() would go to even)
        return max(1, int(height / patch_h + 0.5)), max(1, int(width / patch_w + 0.5))

    # -- modes ------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.body.eval()
        return self

    # -- forward ----------------------------------------------------------------------------------
    def _grad_mode(self):
        # frozen: never build a graph; trainable: leave the caller's grad mode alone
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> one ``(B, C_l, H / r_l, W / r_l)`` map per level, shallowest first."""
        with self._grad_mode():
            if self.is_vit:
                return self._vit_features(pixel_values, with_global=False)[0]
            return list(self.body(pixel_values))

    def forward_with_global(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The maps of :meth:`forward` and one global token per image.

        Returns:
            ``(maps, global_token (B, C))``. ViTs: the class token of the *last* block after the
            model's final norm -- the image embedding DINO and DINOv2 train (Caron et al., 2021;
            Oquab et al., 2023) and timm's ``pre_logits`` feature -- whatever blocks the maps come
            from (the blocks after the deepest level run only here); a ViT without a class token
            gives its own pooled ``pre_logits`` feature. CNNs: global average pooling of the
            deepest returned map, ``C = channels[-1]``.
        """
        with self._grad_mode():
            if self.is_vit:
                return self._vit_features(pixel_values, with_global=True)
            maps = list(self.body(pixel_values))
            return maps, maps[-1].mean(dim=(-2, -1))

    def _vit_features(self, pixel_values: torch.Tensor, with_global: bool):
        """``(maps, global token or None)`` of a ViT; maps are block outputs before the final norm."""
        pixel_values = self._fit_to_patch_grid(pixel_values)
        outputs = self.body.forward_intermediates(
            pixel_values, indices=list(self.levels), norm=False, output_fmt="NCHW",
            stop_early=not with_global, intermediates_only=not with_global,
        )
        if not with_global:
            return list(outputs), None
        final_tokens, maps = outputs
        return list(maps), self._global_token(final_tokens)

    def _global_token(self, final_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` normed tokens of the last block -> ``(B, C)``."""
        if getattr(self.body, "cls_token", None) is not None:
            return final_tokens[:, 0]  # the class token always comes first, before registers
        return self.body.forward_head(final_tokens, pre_logits=True)

    def _fit_to_patch_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Resize ``(B, 3, H, W)`` to whole patches (no-op when ``H``, ``W`` are multiples)."""
        height, width = pixel_values.shape[-2:]
        grid_h, grid_w = self.patch_grid_size(height, width)
        patch_h, patch_w = self.patch_size
        size = (grid_h * patch_h, grid_w * patch_w)
        if size == (height, width):
            return pixel_values
        return F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False, antialias=True)


def _is_vit(name: str) -> bool:
    """Whether timm builds ``name`` as a patch-token transformer (by its module, else its name)."""
    architecture = name.split(".")[0]
    if architecture.startswith(_VIT_PREFIXES):
        return True
    return is_model(architecture) and model_entrypoint(architecture).__module__.rsplit(".", 1)[-1] in _VIT_MODULES


def _persist_buffers(module: nn.Module) -> None:
    """Make every buffer part of the state dict (EVA's rotary tables, its zero key bias, ...).

    ``from_pretrained`` builds the model on the meta device and fills only what the checkpoint
    holds; a non-persistent buffer would be left as an uninitialised placeholder, because backbone
    modules are skipped by ``_init_weights``. Saved with the weights, they load back exactly.
    """
    for submodule in module.modules():
        submodule._non_persistent_buffers_set.clear()


def _vit_create_kwargs(image_size, model_kwargs) -> dict:
    # No classifier (the maps and the global token never need it); position embedding stored at
    # the configured size and interpolated for other inputs.
    kwargs = {"num_classes": 0, "dynamic_img_size": True}
    if image_size is not None:
        kwargs["img_size"] = tuple(int(side) for side in image_size)
    kwargs.update(model_kwargs or {})
    return kwargs


def load_backbone_weights(backbone: FeatureBackbone, weights: str | Path) -> None:
    """Load pretrained weights into a :class:`FeatureBackbone`.

    Args:
        weights: ``"embedded"`` (EfficientNet-Lite0 from the installed package, only for
            ``tf_efficientnet_lite0``), ``"timm"`` (timm's pretrained tag from the Hugging Face
            Hub, needs network or a warm Hub cache), or a path to a safetensors file holding the
            *full* timm model's state dict (what ``timm.create_model(name, pretrained=True).state_dict()``
            saves). Pickled checkpoints are refused: convert them to safetensors first. A ViT
            checkpoint trained at another resolution loads too: timm resamples its position
            embedding to the backbone's ``image_size``.

    Raises:
        ValueError: a missing or non-safetensors file, embedded weights for another model, or
            ``"timm"`` when the Hub cannot be reached (the message says which file to pass).
    """
    overlay = _pretrained_overlay(backbone.name, weights)
    kwargs = backbone.timm_kwargs()
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    # timm logs the classifier keys a features_only model drops; they are expected here.
    timm_logger = logging.getLogger("timm.models._builder")
    previous = timm_logger.level
    timm_logger.setLevel(logging.ERROR)
    try:
        # timm filters the full checkpoint for this architecture (features_only renaming, position
        # embedding resampling) before we copy it.
        pretrained = timm.create_model(backbone.name, pretrained=True, **kwargs)
    except OSError as error:
        if overlay:
            raise
        raise ValueError(_hub_unreachable_message(backbone.name, error)) from error
    finally:
        timm_logger.setLevel(previous)
    # named_buffers: a ViT's buffers that timm keeps out of its state dict (see _persist_buffers)
    state = pretrained.state_dict()
    if backbone.is_vit:
        state = {**dict(pretrained.named_buffers()), **state}
    backbone.body.load_state_dict(state, strict=True)


def _pretrained_overlay(name: str, weights: str | Path) -> dict | None:
    """timm ``pretrained_cfg_overlay`` for ``weights`` (None: timm's own Hub weights)."""
    if weights == EMBEDDED_WEIGHTS:
        if name.split(".")[0] != EMBEDDED_BACKBONE:
            raise ValueError(
                f"the embedded weights are for '{EMBEDDED_BACKBONE}', not '{name}'; "
                "pass weights='timm' or a safetensors file"
            )
        return {"file": str(embedded_weights_file())}
    if weights == "timm":
        return None
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"backbone weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"only safetensors weights are loaded from user paths, got '{path.name}'; convert it with "
            "safetensors.torch.save_file(state_dict, 'weights.safetensors')"
        )
    return {"file": str(path)}


def _hub_unreachable_message(name: str, error: Exception) -> str:
    return (
        f"weights='timm' could not fetch the pretrained weights of '{name}' from the Hugging Face Hub "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}). Offline, pass a "
        f"local safetensors file of the full timm model instead: weights='/path/to/{name}.safetensors', written "
        f"where the Hub is reachable with safetensors.torch.save_file(timm.create_model('{name}', "
        "pretrained=True).state_dict(), path)"
    )

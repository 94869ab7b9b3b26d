"""Foreground saliency for pseudo matching pair selection, pluggable.

A saliency model is any callable ``pixel_values (B, 3, H, W) -> mask (B, H', W')`` with values in
``[0, 1]`` (1: foreground); :func:`saliency_on_grid` resamples its mask to a feature grid.
Huang et al. (ICCV 2023) use SelfReformer (Yun & Lin, *SelfReformer: Self-Refined Network with
Transformer for Salient Object Detection*, 2022); semcorr does not ship or download it. Wrap it,
or any other detector, in a callable that returns its mask in ``[0, 1]`` at any resolution and
pass that callable instead of a name.

Two defaults need no extra weights:

* :class:`ClassTokenSaliency` (ViTs): the attention of the class token to the patch tokens in the
  last block of the frozen backbone, averaged over heads. Self-supervised ViTs learn to segment
  objects with exactly this map (Caron et al., *Emerging Properties in Self-Supervised Vision
  Transformers*, ICCV 2021).
* :class:`ClassActivationSaliency` (CNNs): class activation maps (Zhou et al., *Learning Deep
  Features for Discriminative Localization*, CVPR 2016) of the embedded ImageNet
  EfficientNet-Lite0 classifier.

Both are min-max normalised per image. The substitution of these defaults for SelfReformer is
this package's choice, not the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import FeatureBackbone
from ..embedded_backbone import EMBEDDED_BACKBONE, embedded_state_dict

SaliencyFn = Callable[[torch.Tensor], torch.Tensor]
SALIENCY_NAMES = ("auto", "class-token", "cam", "none")
#: Normalisation of the package's image processor by default (ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def min_max_normalize(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each ``(B, H, W)`` map to ``[0, 1]``; a flat map (no information) becomes all ones,
    so it masks nothing out instead of everything."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    scaled = (maps - low) / span.clamp_min(eps)
    return torch.where(span > eps, scaled, torch.ones_like(maps))


def saliency_on_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a mask ``(B, H', W')`` to a feature grid ``(B, h, w)``, clamped to ``[0, 1]``.

    Bilinear and anti-aliased, so a shrunk cell gets the mean saliency of the area it covers.
    """
    if tuple(mask.shape[-2:]) == tuple(grid):
        return mask.float().clamp(0, 1)
    resized = F.interpolate(mask[:, None].float(), size=tuple(grid), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized[:, 0].clamp(0, 1)


class _StopForward(Exception):
    """Raised by the pre-hook once it has the last block's input: the rest of the ViT is not needed."""


class ClassTokenSaliency:
    """Class-token attention of the last ViT block, averaged over heads: ``(B, h, w)`` in ``[0, 1]``.

    The backbone runs up to its last block; a forward pre-hook takes that block's input ``x``,
    and the attention of the class token is recomputed from the block's own ``norm1`` and
    ``attn.qkv`` (timm's fused attention never materialises the weights):
    ``softmax(q_cls . k / sqrt(d))`` over *all* tokens, as the block computes it, of which the
    patch entries are kept (class and register tokens excluded after the softmax, as DINO's
    visualisation does). ``q_norm`` / ``k_norm`` of the block are applied when present.

    Args:
        backbone: a :class:`FeatureBackbone` holding a timm ViT with a class token and a standard
            ``timm.layers.Attention`` in its last block (ViT, DeiT, DINO, DINOv2 with or without
            registers). It is used as is, frozen or not, without gradients.

    The mask is on the backbone's patch grid for the input (``backbone.patch_grid_size(H, W)``).
    """

    def __init__(self, backbone: FeatureBackbone):
        problem = _class_token_problem(backbone)
        if problem:
            raise ValueError(f"class-token saliency needs {problem}; use saliency='cam', 'none' or a callable")
        self.backbone = backbone

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        body = self.backbone.body
        tokens = self._last_block_input(pixel_values)  # (B, T, C)
        attention = class_token_attention(body.blocks[-1], tokens)  # (B, heads, T)
        grid_h, grid_w = self.backbone.patch_grid_size(*pixel_values.shape[-2:])
        patches = attention[:, :, body.num_prefix_tokens:].mean(dim=1)  # (B, h * w)
        return min_max_normalize(patches.reshape(-1, grid_h, grid_w))

    def _last_block_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        captured = {}

        def grab(module, args):
            captured["tokens"] = args[0]
            raise _StopForward

        handle = self.backbone.body.blocks[-1].register_forward_pre_hook(grab)
        try:
            # The backbone's own resizing to whole patches, then timm's embedding and blocks.
            self.backbone.body.forward_features(self.backbone._fit_to_patch_grid(pixel_values))
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["tokens"]


def class_token_attention(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Attention weights of token 0 in a timm ViT ``block`` for its input ``tokens (B, T, C)``: ``(B, heads, T)``."""
    attn = block.attn
    batch_size, num_tokens, _ = tokens.shape
    qkv = attn.qkv(block.norm1(tokens)).reshape(batch_size, num_tokens, 3, attn.num_heads, attn.head_dim)
    query, key = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, heads, 1 | T, d)
    query, key = attn.q_norm(query), attn.k_norm(key)
    logits = (query * attn.scale) @ key.transpose(-2, -1)  # (B, heads, 1, T)
    return logits.softmax(dim=-1)[:, :, 0]


def _class_token_problem(backbone) -> str | None:
    """Why class-token saliency cannot run on ``backbone`` (None: it can)."""
    if not getattr(backbone, "is_vit", False):
        return f"a vision transformer backbone, got '{getattr(backbone, 'name', type(backbone).__name__)}'"
    body = backbone.body
    if getattr(body, "cls_token", None) is None:
        return f"a class token, which '{backbone.name}' does not have"
    from timm.layers import Attention

    last = body.blocks[-1]
    # timm's plain Attention only: EVA's rotary embeddings or BEiT's relative position bias would
    # change the weights in ways a bare q . k does not reproduce.
    if not hasattr(last, "norm1") or not isinstance(getattr(last, "attn", None), Attention):
        return f"timm's standard attention (norm1, attn.qkv) in the last block of '{backbone.name}'"
    return None


class ClassActivationSaliency:
    """Class activation map of the embedded ImageNet EfficientNet-Lite0: ``(B, H / 32, W / 32)`` in ``[0, 1]``.

    ``CAM = ReLU(sum_c p_c * w_c . f)`` over the ``top_k`` classes ``c`` of the classifier's
    softmax ``p``, with ``w_c`` the classifier row of class ``c`` and ``f`` the final
    ``1280``-channel map; then min-max normalised per image. ``top_k=1`` is the top-1 CAM of
    Zhou et al. (2016). The default, ``top_k=5`` weighted by probability, is this package's choice:
    ImageNet splits one object over near-synonym classes (tabby, tiger and Egyptian cat), whose
    maps cover the same object, and weighting keeps the top-1 class dominant while smoothing the
    choice among them.

    Args:
        image_mean, image_std: normalisation of the ``pixel_values`` it is given (the model's image
            processor; ImageNet statistics by default). They are converted to the classifier's own
            (0.5, 0.5).
        top_k: classes combined.

    The classifier is built on first use and moved to the input's device; it is not part of any
    model's weights.
    """

    def __init__(self, image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 top_k: int = 5):
        self.image_mean, self.image_std, self.top_k = tuple(image_mean), tuple(image_std), int(top_k)
        self.classifier = None

    def _classifier(self, device, dtype) -> nn.Module:
        if self.classifier is None:
            import timm

            model = timm.create_model(EMBEDDED_BACKBONE, pretrained=False)
            model.load_state_dict(embedded_state_dict())
            self.classifier = model.eval().requires_grad_(False)
        return self.classifier.to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        classifier = self._classifier(pixel_values.device, pixel_values.dtype)
        features = classifier.forward_features(self._renormalize(pixel_values))  # (B, 1280, h, w)
        logits = classifier.forward_head(features)
        probability, classes = logits.softmax(dim=-1).topk(min(self.top_k, logits.shape[-1]), dim=-1)
        weights = (probability[..., None] * classifier.classifier.weight[classes]).sum(dim=1)  # (B, 1280)
        cam = torch.einsum("bc,bchw->bhw", weights, features).relu()
        return min_max_normalize(cam)

    def _renormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Input normalisation -> the TF EfficientNet-Lite's ``(x - 0.5) / 0.5``."""
        mean = pixel_values.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = pixel_values.new_tensor(self.image_std).view(1, 3, 1, 1)
        return (pixel_values * std + mean - 0.5) / 0.5


def no_saliency(pixel_values: torch.Tensor) -> torch.Tensor:
    """Everything is foreground: ones ``(B, H, W)``."""
    return pixel_values.new_ones(pixel_values.shape[0], *pixel_values.shape[-2:])


def resolve_saliency(
    spec: str | SaliencyFn,
    backbone: FeatureBackbone | None = None,
    *,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> SaliencyFn:
    """The saliency callable named by ``spec``.

    Args:
        spec: ``"auto"`` (class-token attention for a ViT backbone, CAM otherwise),
            ``"class-token"``, ``"cam"``, ``"none"`` (all ones) or any callable
            ``pixel_values (B, 3, H, W) -> (B, H', W')`` in ``[0, 1]`` (SelfReformer or another
            salient object detector), returned unchanged.
        backbone: the model's :class:`FeatureBackbone` (needed for ``"class-token"`` / ``"auto"``).
        image_mean, image_std: normalisation of the pixel values the CAM will see.

    Raises:
        ValueError: an unknown name, or ``"class-token"`` on a backbone that cannot provide it.
    """
    if callable(spec):
        return spec
    if spec not in SALIENCY_NAMES:
        raise ValueError(f"saliency must be one of {', '.join(SALIENCY_NAMES)} or a callable, got {spec!r}")
    if spec == "none":
        return no_saliency
    if spec == "auto":
        spec = "class-token" if backbone is not None and _class_token_problem(backbone) is None else "cam"
    if spec == "class-token":
        if backbone is None:
            raise ValueError("class-token saliency needs the model's backbone")
        return ClassTokenSaliency(backbone)
    return ClassActivationSaliency(image_mean, image_std)

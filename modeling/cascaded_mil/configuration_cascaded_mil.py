"""Configuration of the cascaded MIL pseudo-label generator (Huang et al., ICCV 2023).

Huang et al., *Weakly Supervised Learning of Semantic Correspondence through Cascaded Online
Correspondence Refinement*, ICCV 2023. One :class:`CascadedMILConfig` holds the backbone, the pair
selection (PMPS), the losses and one :class:`CascadedMILStageConfig` per stage (image, region,
pixel), as ``LightGlueConfig`` nests its keypoint detector's config.
"""

from __future__ import annotations

from transformers import PretrainedConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
STAGES = ("image", "region", "pixel")
SALIENCY_CHOICES = ("auto", "class-token", "cam", "none")


class CascadedMILStageConfig(PretrainedConfig):
    r"""One stage's matching volume aggregation module (MVAM): gated cross attention, then 4D window
    attention over the cosine volume.

    Args:
        num_attention_heads: heads of the gated cross attention (must divide the token width).
        volume_embed_dim: channels of a token of the folded 4D volume.
        volume_depth: Swin-style 4D blocks (every other one with shifted windows).
        volume_heads: heads of the 4D window attention.
        volume_window: side of a 4D window (``window^4`` tokens; VAT uses 4).
        volume_fold: factor of the 4D space-to-channel fold applied before the windows (and
            undone by channel redistribution after them); 1 keeps the full resolution.
        mlp_ratio: hidden width of the blocks' MLP over their width.
    """

    model_type = "semcorr-cascaded-mil-stage"

    def __init__(
        self,
        num_attention_heads: int = 4,
        volume_embed_dim: int = 32,
        volume_depth: int = 2,
        volume_heads: int = 4,
        volume_window: int = 4,
        volume_fold: int = 2,
        mlp_ratio: float = 2.0,
        **kwargs,
    ):
        self.num_attention_heads = int(num_attention_heads)
        self.volume_embed_dim = int(volume_embed_dim)
        self.volume_depth = int(volume_depth)
        self.volume_heads = int(volume_heads)
        self.volume_window = int(volume_window)
        self.volume_fold = int(volume_fold)
        self.mlp_ratio = float(mlp_ratio)
        super().__init__(**kwargs)
        for name in ("num_attention_heads", "volume_embed_dim", "volume_depth", "volume_heads", "volume_window",
                     "volume_fold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.volume_embed_dim % self.volume_heads:
            raise ValueError(f"volume_embed_dim {self.volume_embed_dim} must be divisible by volume_heads {self.volume_heads}")


def _stage_config(value, name: str) -> CascadedMILStageConfig:
    if value is None:
        return CascadedMILStageConfig()
    if isinstance(value, CascadedMILStageConfig):
        return value
    if isinstance(value, dict):
        fields = {key: item for key, item in value.items() if key not in ("model_type", "transformers_version")}
        return CascadedMILStageConfig(**fields)
    raise TypeError(f"{name} must be a dict or a CascadedMILStageConfig, got {type(value).__name__}")


class CascadedMILConfig(PretrainedConfig):
    r"""The cascaded MIL generator: frozen backbone, three MVAM stages, PMPS, close-loop check.

    Args:
        backbone: timm model name, frozen. The paper: iBOT ViT-B/16 at 512² (convert its checkpoint
            with :mod:`~semcorr.modeling.cascaded_mil.convert_ibot_checkpoint`); online,
            ``vit_base_patch16_224.dino``; offline, the embedded ``tf_efficientnet_lite0``.
        backbone_layers: timm ``out_indices`` (blocks of a ViT, stages of a CNN) whose maps are
            L2-normalised, resampled to the first one's grid and concatenated into the tokens.
        backbone_weights: ``"embedded"``, ``"timm"`` or a safetensors path (used when built from scratch).
        image_size: ``[height, width]`` of the model input (512² as published; the ablation uses 256, 384).
        image_mean, image_std: input normalisation of the backbone.
        image_stage, region_stage, pixel_stage: :class:`CascadedMILStageConfig` of each stage's MVAM.
        share_attention: one MVAM for all three stages (the paper's ablation; separate weights by default).
        use_region_stage, use_pixel_stage: the cascade's later stages (the ablations "w/o stage 3",
            "w/o stages 2-3"); without the pixel stage, ``match()`` uses the last enabled stage's volume.
        use_rhm: re-score volumes with regularised Hough matching in PMPS (ablation "w/o RHM").
        hough_kernel_size: the Hough smoothing kernel side, the paper's "hyperpixel length" L (3, 5, 7).
        hough_bins: RHM translation bins.
        saliency: foreground prior of PMPS: ``"auto"`` (class-token attention for ViTs, class
            activation maps for CNNs), ``"class-token"``, ``"cam"`` or ``"none"`` (ablation "w/o
            saliency"); any callable can be passed to the model at run time instead.
        saliency_threshold: saliency at or above which a cell is foreground.
        num_suspects: pairs the image stage hands to the region stage per image pair.
        region_window: side (cells) of the window grown around each suspect.
        region_image_size: side (pixels) a region crop is resized to before it is re-encoded.
        num_region_pairs: pairs kept after the region stage (and non-maximum suppression), the
            pixel stage's supervision.
        nms_radius: cells within which a weaker region pair is suppressed.
        num_pseudo_pairs: keypoint pairs the pixel stage labels per image pair (SC-ImageNet: 32).
        image_loss_weight, region_loss_weight, pixel_loss_weight: ``lambda_1..3`` of
            ``L = lambda_1 L_I + lambda_2 L_R + lambda_3 L_P``.
        pooling_temperature: temperature of the softmax over candidates before the adaptive
            max-mean pooling of a volume (image and region losses).
        pixel_temperature: scale of the refined volume before the pixel stage's binary cross-entropy.
        refine_radius, refine_beta: local soft-argmax that refines a dense field's arg-max (``match()``).
        transfer_radius: neighbourhood (cells) of a keypoint used by keypoint transfer.
    """

    model_type = "semcorr-cascaded-mil"
    sub_configs = {"image_stage": CascadedMILStageConfig, "region_stage": CascadedMILStageConfig,
                   "pixel_stage": CascadedMILStageConfig}

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        backbone_layers: list[int] | None = None,
        backbone_weights: str | None = "embedded",
        image_size: list[int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        image_stage: dict | None = None,
        region_stage: dict | None = None,
        pixel_stage: dict | None = None,
        share_attention: bool = False,
        use_region_stage: bool = True,
        use_pixel_stage: bool = True,
        use_rhm: bool = True,
        hough_kernel_size: int = 5,
        hough_bins: int = 8192,
        saliency: str = "auto",
        saliency_threshold: float = 0.3,
        num_suspects: int = 16,
        region_window: int = 5,
        region_image_size: int = 160,
        num_region_pairs: int = 16,
        nms_radius: float = 1.0,
        num_pseudo_pairs: int = 32,
        image_loss_weight: float = 1.0,
        region_loss_weight: float = 1.0,
        pixel_loss_weight: float = 1.0,
        pooling_temperature: float = 0.05,
        pixel_temperature: float = 10.0,
        refine_radius: int = 1,
        refine_beta: float = 20.0,
        transfer_radius: float = 1.5,
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_layers = list(backbone_layers) if backbone_layers is not None else [3, 4]
        self.backbone_weights = backbone_weights
        self.image_size = list(image_size) if image_size is not None else [512, 512]
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        self.image_stage = _stage_config(image_stage, "image_stage")
        self.region_stage = _stage_config(region_stage, "region_stage")
        self.pixel_stage = _stage_config(pixel_stage, "pixel_stage")
        self.share_attention = bool(share_attention)
        self.use_region_stage = bool(use_region_stage)
        self.use_pixel_stage = bool(use_pixel_stage)
        self.use_rhm = bool(use_rhm)
        self.hough_kernel_size = int(hough_kernel_size)
        self.hough_bins = int(hough_bins)
        self.saliency = saliency
        self.saliency_threshold = float(saliency_threshold)
        self.num_suspects = int(num_suspects)
        self.region_window = int(region_window)
        self.region_image_size = int(region_image_size)
        self.num_region_pairs = int(num_region_pairs)
        self.nms_radius = float(nms_radius)
        self.num_pseudo_pairs = int(num_pseudo_pairs)
        self.image_loss_weight = float(image_loss_weight)
        self.region_loss_weight = float(region_loss_weight)
        self.pixel_loss_weight = float(pixel_loss_weight)
        self.pooling_temperature = float(pooling_temperature)
        self.pixel_temperature = float(pixel_temperature)
        self.refine_radius = int(refine_radius)
        self.refine_beta = float(refine_beta)
        self.transfer_radius = float(transfer_radius)
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if not self.backbone_layers or not all(isinstance(i, int) for i in self.backbone_layers):
            raise ValueError(f"backbone_layers must be a non-empty list of ints, got {self.backbone_layers!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise ValueError(f"image_size must be [height, width] >= 16, got {self.image_size!r}")
        if self.hough_kernel_size < 1 or self.hough_kernel_size % 2 == 0:
            raise ValueError(f"hough_kernel_size (the paper's L) must be odd, got {self.hough_kernel_size}")
        if self.saliency not in SALIENCY_CHOICES:
            raise ValueError(f"saliency must be one of {', '.join(SALIENCY_CHOICES)}, got {self.saliency!r}")
        if self.use_pixel_stage and not self.use_region_stage:
            raise ValueError("use_pixel_stage needs use_region_stage: the pixel stage learns from the region stage's pairs")
        for name in ("num_suspects", "num_region_pairs", "num_pseudo_pairs", "region_image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.region_window < 1 or self.region_window % 2 == 0:
            raise ValueError(f"region_window must be odd (a window centred on its suspect), got {self.region_window}")

    @property
    def enabled_stages(self) -> tuple[str, ...]:
        """The stages of the cascade that run: ``("image",)``, ``("image", "region")`` or all three."""
        return STAGES[: 1 + self.use_region_stage + self.use_pixel_stage]

    def to_dict(self):
        return self._lean_stages(super().to_dict())

    def to_diff_dict(self):
        return self._lean_stages(super().to_diff_dict())

    def _lean_stages(self, output: dict) -> dict:
        """Each stage config as its own fields only (not every generic ``PretrainedConfig`` field)."""
        for name in ("image_stage", "region_stage", "pixel_stage"):
            stage = getattr(self, name)
            output[name] = {field: getattr(stage, field) for field in STAGE_FIELDS}
        return output


STAGE_FIELDS = ("num_attention_heads", "volume_embed_dim", "volume_depth", "volume_heads", "volume_window",
                "volume_fold", "mlp_ratio")

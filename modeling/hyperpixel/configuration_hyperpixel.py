"""Configuration of the training-free Hyperpixel Flow matcher."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..ops.correlation import CORRELATION_DTYPES


class HyperpixelFlowConfig(PretrainedConfig):
    r"""Hyperpixel Flow (Min et al., ICCV 2019) on any timm backbone.

    Args:
        backbone: timm model name; the default is the embedded ImageNet EfficientNet-Lite0.
        backbone_layers: timm ``out_indices`` whose maps form the hyperpixels. For
            ``tf_efficientnet_lite0`` index 1, 2, 3, 4 are strides 4, 8, 16, 32 (24, 40, 112, 320
            channels). The default ``[2, 3, 4]`` (strides 8, 16, 32) won a search over every
            subset, input size, similarity power, Hough kernel and RHM on / off
            (``benchmarks/search_default.py``): scored on faces of different animals
            (:mod:`semcorr.hub_datasets.bigcats`, PCK@0.1 0.90 against 0.79 for the earlier
            ``[1, 2, 3]``) with the Middlebury stereo pair and an affine warp as guards (PCK@0.05
            1.00 and 0.99). Stride 8 localises; strides 16 and 32 carry the semantics that
            matching different instances needs; stride 4 helps same-scene pairs but hurts
            matching across instances.
        backbone_weights: where the backbone weights came from (``"embedded"``, ``"timm"``, a
            file name); informational once the model is saved.
        feature_stride: stride of the hyperpixel grid in input pixels; every level is resampled
            to it.
        image_size: ``[height, width]`` of the model input (the image processor's size). The
            search kept 448 x 448, similarity power 3 and Hough kernel 7 with RHM: the best
            neighbourhood of settings, not only the best single one.
        image_mean, image_std: input normalisation of the backbone.
        similarity_power: exponent of the clamped cosine similarity.
        use_rhm: re-score matches with regularised Hough matching (False: nearest neighbour).
        hough_bins, hough_kernel_size: RHM translation bins and Gaussian smoothing side.
        refine_radius, refine_beta: neighbourhood (cells) and temperature of the local soft-argmax
            that refines each arg-max to sub-cell precision.
        transfer_radius: neighbourhood (cells) of a keypoint used by keypoint transfer.
        correlation_dtype: dtype of the correlation's matrix product: ``"float32"``,
            ``"bfloat16"`` or ``"auto"`` (bfloat16 on CPUs with native bfloat16 matrix units,
            float32 elsewhere; :func:`semcorr.modeling.ops.correlation.correlation_compute_dtype`).
            Everything after the product (power, RHM, refinement) stays in float32.
    """

    model_type = "semcorr-hyperpixel"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        backbone_layers: list[int] | None = None,
        backbone_weights: str | None = "embedded",
        feature_stride: int = 8,
        image_size: list[int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        similarity_power: float = 3.0,
        use_rhm: bool = True,
        hough_bins: int = 8192,
        hough_kernel_size: int = 7,
        refine_radius: int = 1,
        refine_beta: float = 20.0,
        transfer_radius: float = 1.5,
        correlation_dtype: str = "auto",
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_layers = list(backbone_layers) if backbone_layers is not None else [2, 3, 4]
        self.backbone_weights = backbone_weights
        self.feature_stride = int(feature_stride)
        self.image_size = list(image_size) if image_size is not None else [448, 448]
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.similarity_power = float(similarity_power)
        self.use_rhm = bool(use_rhm)
        self.hough_bins = int(hough_bins)
        self.hough_kernel_size = int(hough_kernel_size)
        self.refine_radius = int(refine_radius)
        self.refine_beta = float(refine_beta)
        self.transfer_radius = float(transfer_radius)
        self.correlation_dtype = correlation_dtype
        super().__init__(**kwargs)
        self._validate()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HyperpixelFlowConfig":
        """Config of a named zero-shot preset (``"dino-base"``, ``"dinov2-small"``, ``"dinov2-base"``,
        ``"dinov2-base-nn"``; see :mod:`semcorr.modeling.presets`); keyword overrides change any field."""
        from ..presets import preset_config

        return preset_config(name, **overrides)

    def _validate(self):
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a timm model name, got {self.backbone!r}")
        if not self.backbone_layers or not all(isinstance(i, int) for i in self.backbone_layers):
            raise ValueError(f"backbone_layers must be a non-empty list of ints, got {self.backbone_layers!r}")
        if len(self.image_size) != 2 or min(self.image_size) < self.feature_stride:
            raise ValueError(f"image_size must be [height, width] >= feature_stride, got {self.image_size!r}")
        if self.feature_stride < 1 or self.hough_bins < 16 or self.hough_kernel_size % 2 == 0:
            raise ValueError("feature_stride must be >= 1, hough_bins >= 16 and hough_kernel_size odd")
        if self.correlation_dtype not in CORRELATION_DTYPES:
            raise ValueError(f"correlation_dtype must be one of {CORRELATION_DTYPES}, got {self.correlation_dtype!r}")

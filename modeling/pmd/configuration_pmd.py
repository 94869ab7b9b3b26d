"""Configurations of PMD (Li et al., Probabilistic Model Distillation for Semantic Correspondence, CVPR 2021)."""

from __future__ import annotations

from transformers import PretrainedConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DISTILLATION_LOSSES = ("cal", "l2")


class PMDConfig(PretrainedConfig):
    r"""Shared fields of the PMD teacher and student (the SFNet-based network of the paper).

    Args:
        backbone: timm model name, frozen (``resnet101.tv_in1k`` as published; the embedded
            ``tf_efficientnet_lite0`` for offline use; any timm CNN).
        backbone_layers: timm ``out_indices`` of the matched levels (ResNet: 3 = layer3,
            4 = layer4). The first level fixes the correlation grid; coarser ones are upsampled.
        backbone_weights: ``"timm"``, ``"embedded"`` or a safetensors path used by
            :func:`~semcorr.modeling.load_backbone_weights` when building from scratch.
        image_size: ``[height, width]`` of the model input (320 x 320 as published).
        image_mean, image_std: input normalisation of the backbone.
        adaptation_kernel_sizes: kernel of the two residual conv-BN-ReLU blocks of each level
            (5 for layer3, 3 for layer4 as published).
        attention_levels: positions in ``backbone_layers`` that get co-channel attention
            (published: layer4 only).
        soft_argmax_sigma, soft_argmax_beta: kernel soft-argmax window (cells) and temperature.
        grid_align_corners: place feature cells on ``linspace(-1, 1, n)`` and upsample coarse
            levels with ``align_corners=True``, as the official code does (needed to reproduce
            converted checkpoints); False follows the package's ``align_corners=False`` convention.
        smoothness_weight: weight of the flow smoothness term in the training losses.
        transfer_radius: neighbourhood (cells) used by keypoint transfer.
    """

    model_type = "semcorr-pmd"

    def __init__(
        self,
        backbone: str = "resnet101.tv_in1k",
        backbone_layers: list[int] | None = None,
        backbone_weights: str | None = "timm",
        image_size: list[int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        adaptation_kernel_sizes: list[int] | None = None,
        attention_levels: list[int] | None = None,
        soft_argmax_sigma: float = 5.0,
        soft_argmax_beta: float = 50.0,
        grid_align_corners: bool = False,
        smoothness_weight: float = 0.5,
        transfer_radius: float = 1.0,
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_layers = list(backbone_layers) if backbone_layers is not None else [3, 4]
        self.backbone_weights = backbone_weights
        self.image_size = list(image_size) if image_size is not None else [320, 320]
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        self.adaptation_kernel_sizes = (
            list(adaptation_kernel_sizes) if adaptation_kernel_sizes is not None
            else ([5, 3] + [3] * max(0, len(self.backbone_layers) - 2))[: len(self.backbone_layers)]
        )
        self.attention_levels = list(attention_levels) if attention_levels is not None else [len(self.backbone_layers) - 1]
        self.soft_argmax_sigma = float(soft_argmax_sigma)
        self.soft_argmax_beta = float(soft_argmax_beta)
        self.grid_align_corners = bool(grid_align_corners)
        self.smoothness_weight = float(smoothness_weight)
        self.transfer_radius = float(transfer_radius)
        super().__init__(**kwargs)
        self._validate()

    def _validate(self):
        levels = len(self.backbone_layers)
        if levels == 0 or not all(isinstance(i, int) for i in self.backbone_layers):
            raise ValueError(f"backbone_layers must be a non-empty list of ints, got {self.backbone_layers!r}")
        if len(self.adaptation_kernel_sizes) != levels or any(k < 1 or k % 2 == 0 for k in self.adaptation_kernel_sizes):
            raise ValueError(
                f"adaptation_kernel_sizes needs one odd kernel per backbone level ({levels}), got {self.adaptation_kernel_sizes!r}"
            )
        if any(not 0 <= i < levels for i in self.attention_levels):
            raise ValueError(f"attention_levels index backbone_layers (0..{levels - 1}), got {self.attention_levels!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ValueError(f"image_size must be [height, width] >= 32, got {self.image_size!r}")
        if self.soft_argmax_beta <= 0:
            raise ValueError(f"soft_argmax_beta must be positive, got {self.soft_argmax_beta}")


class PMDTeacherConfig(PMDConfig):
    r"""The probabilistic teacher: a stochastic channel gate ``sigmoid(mu + sigma * eps)``.

    Args:
        kl_weight: weight of ``KL(N(mu, sigma^2) || N(0, 1))`` in the teacher's training loss.
        keypoint_weight: weight of the sparse keypoint-flow loss (strongly supervised PMD).
    """

    model_type = "semcorr-pmd-teacher"

    def __init__(self, kl_weight: float = 1e-3, keypoint_weight: float = 1.0, **kwargs):
        self.kl_weight = float(kl_weight)
        self.keypoint_weight = float(keypoint_weight)
        super().__init__(**kwargs)


class PMDStudentConfig(PMDConfig):
    r"""The static student: the same network with a deterministic gate ``sigmoid(mu)``.

    Args:
        distillation_weight, psr_prior_rate, variance_kl_weight: lambda_2, the per-epoch update
            rate of the PSR prior, and the weight of its KL term in CAL (defaults 16, 0.01, 0.01: the
            reconstruction in :mod:`semcorr.modeling.pmd.losses`).
        cycle_sharpness, cycle_offset: the cycle-consistency mask ``1 - sigmoid(a (d - b))``.
        psr_prior_init: the value ``Sigma`` starts from (default 1, in grid units, where the PSR
            weights of sub-cell disagreements stay close to 1; smaller values make PSR selective).
        distillation_loss: ``"cal"`` (PSR weights, cycle mask and the prior's KL, as published) or
            ``"l2"`` (the ablation: every hypothesis weighted alike, no mask, no KL).
    """

    model_type = "semcorr-pmd-student"

    def __init__(
        self,
        distillation_weight: float = 16.0,
        psr_prior_rate: float = 0.01,
        variance_kl_weight: float = 0.01,
        cycle_sharpness: float = 50.0,
        cycle_offset: float = 0.08,
        distillation_loss: str = "cal",
        psr_prior_init: float = 1.0,
        **kwargs,
    ):
        if not psr_prior_init > 0:
            raise ValueError(f"psr_prior_init must be positive, got {psr_prior_init!r}")
        self.psr_prior_init = float(psr_prior_init)
        if distillation_loss not in DISTILLATION_LOSSES:
            raise ValueError(f"distillation_loss must be one of {DISTILLATION_LOSSES}, got {distillation_loss!r}")
        self.distillation_loss = distillation_loss
        self.distillation_weight = float(distillation_weight)
        self.psr_prior_rate = float(psr_prior_rate)
        self.variance_kl_weight = float(variance_kl_weight)
        self.cycle_sharpness = float(cycle_sharpness)
        self.cycle_offset = float(cycle_offset)
        super().__init__(**kwargs)

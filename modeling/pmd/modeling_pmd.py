"""PMD: probabilistic teacher and static student (Li et al., CVPR 2021), SFNet-based.

frozen backbone -> per-level residual adaptation -> co-channel attention (stochastic gate in the
teacher) -> per-level cosine correlation, ReLU, levels multiplied and L2-normalised over the
candidates -> kernel soft-argmax -> dense grids in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import FeatureBackbone
from ..modeling_matcher import CorrespondenceOutput, SemanticMatcherPreTrainedModel
from ..ops.correlation import dense_cosine_correlation
from ..ops.geometry import grid_to_pixels, identity_grid, pixels_to_grid, sample_grid_at
from ..ops.keypoint_transfer import transfer_keypoints
from ..ops.soft_argmax import kernel_soft_argmax
from .configuration_pmd import PMDConfig, PMDStudentConfig, PMDTeacherConfig
from .layers import AdaptationBlock, CoChannelAttention, gaussian_kl_to_unit
from .losses import (
    confidence_aware_loss,
    cycle_errors,
    cycle_mask,
    empirical_variance,
    flow_smoothness,
    keypoint_flow_loss,
    masked_grid_loss,
    psr_weights,
)


@dataclass
class PMDOutput(CorrespondenceOutput):
    """:class:`CorrespondenceOutput` plus the training terms.

    Args:
        kl: ``KL(q(z) || N(0, 1))`` of the teacher's gates (teacher only).
        smoothness: smoothness of the predicted fields.
        losses: the named terms that make up ``loss``.
    """

    kl: torch.FloatTensor | None = None
    smoothness: torch.FloatTensor | None = None
    losses: dict | None = None


class PMDPreTrainedModel(SemanticMatcherPreTrainedModel):
    """The network shared by teacher and student; ``stochastic`` selects the gate."""

    config_class = PMDConfig
    stochastic = False

    def __init__(self, config: PMDConfig):
        super().__init__(config)
        self.backbone = FeatureBackbone(config.backbone, config.backbone_layers, frozen=True, image_size=config.image_size)
        channels = self.backbone.channels
        self.adaptation = nn.ModuleList(
            AdaptationBlock(c, k) for c, k in zip(channels, config.adaptation_kernel_sizes)
        )
        self.attention = nn.ModuleDict(
            {str(level): CoChannelAttention(channels[level], stochastic=self.stochastic) for level in config.attention_levels}
        )
        self.post_init()

    # -- network --------------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Adapted features, one ``(B, C_l, h_l, w_l)`` map per level."""
        return [block(feature) for block, feature in zip(self.adaptation, self.backbone(pixel_values))]

    def correlate(self, source_levels, target_levels, sample: bool = False, generator=None):
        """Correlations both ways from adapted features.

        Returns:
            ``(corr_src_to_trg (B, N_s, N_t), corr_trg_to_src (B, N_t, N_s), source_shape,
            target_shape, kl)``: each row L2-normalised over its candidates; ``kl`` is None for
            a deterministic gate.
        """
        align = self.config.grid_align_corners
        source_shape, target_shape = tuple(source_levels[0].shape[-2:]), tuple(target_levels[0].shape[-2:])
        product, kl = None, None
        for level, (source, target) in enumerate(zip(source_levels, target_levels)):
            key = str(level)
            if key in self.attention:
                # As in the official code, the target's gate sees the already gated source.
                source, mu_s, sigma_s = self.attention[key](source, target, sample=sample, generator=generator)
                target, mu_t, sigma_t = self.attention[key](target, source, sample=sample, generator=generator)
                if sigma_s is not None:
                    term = gaussian_kl_to_unit(mu_s, sigma_s) + gaussian_kl_to_unit(mu_t, sigma_t)
                    kl = term if kl is None else kl + term
            if tuple(source.shape[-2:]) != source_shape:
                source = F.interpolate(source, size=source_shape, mode="bilinear", align_corners=align)
            if tuple(target.shape[-2:]) != target_shape:
                target = F.interpolate(target, size=target_shape, mode="bilinear", align_corners=align)
            correlation = dense_cosine_correlation(source, target).clamp_min(0)
            product = correlation if product is None else product * correlation
        corr_src_to_trg = F.normalize(product, dim=2, eps=1e-6)
        corr_trg_to_src = F.normalize(product.transpose(1, 2), dim=2, eps=1e-6)
        return corr_src_to_trg, corr_trg_to_src, source_shape, target_shape, kl

    def fields(self, corr_src_to_trg, corr_trg_to_src, source_shape, target_shape):
        """Kernel soft-argmax grids ``(grid_src_to_trg, grid_trg_to_src)``."""
        kwargs = dict(sigma=self.config.soft_argmax_sigma, beta=self.config.soft_argmax_beta,
                      align_corners=self.config.grid_align_corners)
        return (kernel_soft_argmax(corr_src_to_trg, source_shape, target_shape, **kwargs),
                kernel_soft_argmax(corr_trg_to_src, target_shape, source_shape, **kwargs))

    def predict(self, source_pixel_values, target_pixel_values, sample: bool = False, generator=None):
        """Grids both ways, confidence ``(B, h_s, w_s)`` (peak normalised correlation), KL."""
        source_levels, target_levels = self._encode_pair(source_pixel_values, target_pixel_values)
        corr_st, corr_ts, source_shape, target_shape, kl = self.correlate(source_levels, target_levels, sample, generator)
        grid_src_to_trg, grid_trg_to_src = self.fields(corr_st, corr_ts, source_shape, target_shape)
        confidence = corr_st.amax(dim=2).view(-1, *source_shape)
        return grid_src_to_trg, grid_trg_to_src, confidence, kl

    def _encode_pair(self, source_pixel_values, target_pixel_values):
        if source_pixel_values.shape == target_pixel_values.shape:
            levels = self.encode(torch.cat([source_pixel_values, target_pixel_values]))
            return [level.chunk(2)[0] for level in levels], [level.chunk(2)[1] for level in levels]
        return self.encode(source_pixel_values), self.encode(target_pixel_values)

    # -- the matching contract ------------------------------------------------------------------
    def match(self, source_pixel_values, target_pixel_values, source_keypoints=None) -> PMDOutput:
        """Deterministic matching (the teacher uses its mean gate); see :class:`CorrespondenceOutput`."""
        with torch.no_grad():
            grid_src_to_trg, grid_trg_to_src, confidence, _ = self.predict(source_pixel_values, target_pixel_values)
        output = PMDOutput(grid_src_to_trg=grid_src_to_trg, grid_trg_to_src=grid_trg_to_src, confidence=confidence)
        if source_keypoints is not None:
            source_size, target_size = tuple(source_pixel_values.shape[-2:]), tuple(target_pixel_values.shape[-2:])
            points = source_keypoints.to(grid_src_to_trg.dtype)
            if self.config.grid_align_corners:
                output.target_keypoints, output.keypoint_scores = _transfer_corner_aligned(
                    points, grid_src_to_trg, confidence, source_size, target_size
                )
            else:
                target_points, scores = transfer_keypoints(
                    pixels_to_grid(points, source_size), grid_src_to_trg, confidence, radius=self.config.transfer_radius
                )
                output.target_keypoints = grid_to_pixels(target_points, target_size)
                output.keypoint_scores = scores
        return output

    def _cell_targets(self, grid_trg_to_src: torch.Tensor, valid_trg: torch.Tensor | None, shape):
        """Ground truth at the target cells from a field ``(B, 2, H, W)`` at any resolution."""
        cells = identity_grid(1, *shape, device=grid_trg_to_src.device, dtype=grid_trg_to_src.dtype,
                              align_corners=self.config.grid_align_corners)
        points = cells.flatten(2).transpose(1, 2).expand(grid_trg_to_src.shape[0], -1, -1)
        target = sample_grid_at(grid_trg_to_src, points).transpose(1, 2).reshape(-1, 2, *shape)
        valid = None
        if valid_trg is not None:
            valid = sample_grid_at(valid_trg[:, None].float(), points)[..., 0].reshape(-1, *shape) > 0.999
        return target, valid

    def supervised_keypoint_loss(self, source_pixel_values, target_pixel_values, source_keypoints, target_keypoints,
                                 keypoint_mask=None) -> torch.Tensor:
        """Keypoint-supervised loss (fine-tuning on labelled pairs, e.g. SC-ImageNet or SPair-71k): the sparse
        keypoint-flow error of the deterministic prediction (the teacher's mean gate) plus its smoothness term."""
        _, grid_trg_to_src, _, _ = self.predict(source_pixel_values, target_pixel_values)
        error = keypoint_flow_loss(grid_trg_to_src, source_keypoints, target_keypoints, keypoint_mask,
                                   tuple(source_pixel_values.shape[-2:]), tuple(target_pixel_values.shape[-2:]))
        return error + self.config.smoothness_weight * flow_smoothness(grid_trg_to_src, self.config.grid_align_corners)


def _transfer_corner_aligned(points, grid_src_to_trg, confidence, source_size, target_size):
    """Keypoint transfer as the official PMD evaluation does it (``grid_align_corners=True``).

    The official code reads the field, upsampled with ``align_corners=True``, at the rounded
    pixel index and maps grid units back with ``(g + 1) (size - 1) / 2``; sampling the cell field
    at the normalised index with ``align_corners=True`` is the same computation. Pixel index ``i``
    is the centre ``i + 0.5`` of the package's convention, hence the half-pixel shifts.

    Args:
        points: ``(B, N, 2)`` source model-input pixels. Returns target pixels ``(B, N, 2)`` and
        scores ``(B, N)``.
    """
    (h_s, w_s), (h_t, w_t) = source_size, target_size
    index = torch.round(points - 0.5)
    index = torch.minimum(index.clamp_min(0), index.new_tensor([w_s - 1, h_s - 1]))
    normalised = 2 * index / index.new_tensor([max(w_s - 1, 1), max(h_s - 1, 1)]) - 1
    sample = lambda field: F.grid_sample(field, normalised[:, :, None], mode="bilinear", align_corners=True)[..., 0]
    grid = sample(grid_src_to_trg).transpose(1, 2)  # (B, N, 2)
    target = (grid + 1) * grid.new_tensor([(w_t - 1) / 2, (h_t - 1) / 2]) + 0.5
    return target, sample(confidence[:, None])[:, 0]


class PMDTeacherModel(PMDPreTrainedModel):
    """The probabilistic teacher: ``sample_hypotheses`` draws gates, ``forward`` trains it."""

    config_class = PMDTeacherConfig
    stochastic = True

    def sample_hypotheses(self, source_pixel_values, target_pixel_values, num_hypotheses: int, generator=None):
        """Draw ``num_hypotheses`` flow hypotheses for each pair (no gradient).

        Returns:
            ``(grids_src_to_trg (n, B, 2, h_s, w_s), grids_trg_to_src (n, B, 2, h_t, w_t))``.
        """
        with torch.no_grad():
            source_levels, target_levels = self._encode_pair(source_pixel_values, target_pixel_values)
            forward, backward = [], []
            for _ in range(num_hypotheses):
                corr_st, corr_ts, source_shape, target_shape, _ = self.correlate(
                    source_levels, target_levels, sample=True, generator=generator
                )
                grid_st, grid_ts = self.fields(corr_st, corr_ts, source_shape, target_shape)
                forward.append(grid_st)
                backward.append(grid_ts)
        return torch.stack(forward), torch.stack(backward)

    def forward(
        self,
        source_pixel_values: torch.Tensor,
        target_pixel_values: torch.Tensor,
        grid_trg_to_src: torch.Tensor | None = None,
        valid_trg: torch.Tensor | None = None,
        source_keypoints: torch.Tensor | None = None,
        target_keypoints: torch.Tensor | None = None,
        keypoint_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> PMDOutput:
        """Training step on a batch with known correspondence.

        Args:
            grid_trg_to_src: ``(B, 2, H, W)`` dense ground truth (synthetic pairs), any resolution.
            valid_trg: ``(B, H, W)`` where that ground truth is defined.
            source_keypoints, target_keypoints: ``(B, N, 2)`` model-input pixels (strong supervision).
            keypoint_mask: ``(B, N)`` which keypoints are real (padding is False).

        Returns:
            :class:`PMDOutput` with ``loss`` = masked grid regression + smoothness + KL (+ sparse
            keypoint-flow term), and the terms in ``losses``.
        """
        grid_st, grid_ts, confidence, kl = self.predict(source_pixel_values, target_pixel_values, sample=self.training)
        smoothness = flow_smoothness(grid_ts, self.config.grid_align_corners)
        losses = {"smoothness": smoothness}
        if kl is not None:
            losses["kl"] = kl
        total = self.config.smoothness_weight * smoothness + self.config.kl_weight * (kl if kl is not None else 0.0)
        supervised = False
        if grid_trg_to_src is not None:
            target, valid = self._cell_targets(grid_trg_to_src, valid_trg, tuple(grid_ts.shape[-2:]))
            losses["grid"] = masked_grid_loss(grid_ts, target, valid)
            total = total + losses["grid"]
            supervised = True
        if source_keypoints is not None and target_keypoints is not None:
            losses["keypoints"] = keypoint_flow_loss(grid_ts, source_keypoints, target_keypoints, keypoint_mask,
                                                     tuple(source_pixel_values.shape[-2:]), tuple(target_pixel_values.shape[-2:]))
            total = total + self.config.keypoint_weight * losses["keypoints"]
            supervised = True
        return PMDOutput(
            loss=total if supervised else None, grid_src_to_trg=grid_st, grid_trg_to_src=grid_ts,
            confidence=confidence, kl=kl, smoothness=smoothness, losses=losses,
        )


class PMDStudentModel(PMDPreTrainedModel):
    """The static student, distilled from teacher hypotheses with PSR weights and CAL."""

    config_class = PMDStudentConfig
    stochastic = False

    def forward(
        self,
        source_pixel_values: torch.Tensor,
        target_pixel_values: torch.Tensor,
        hypotheses_src_to_trg: torch.Tensor | None = None,
        hypotheses_trg_to_src: torch.Tensor | None = None,
        psr_prior: torch.Tensor | None = None,
        source_keypoints: torch.Tensor | None = None,
        target_keypoints: torch.Tensor | None = None,
        keypoint_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> PMDOutput:
        """Distillation step (or, given keypoints instead of hypotheses, a keypoint-supervised step:
        :meth:`supervised_keypoint_loss`).

        Args:
            hypotheses_src_to_trg: ``(L, B, 2, h_s, w_s)`` teacher grids (in the frame of the
                images given here: augmentations must already be composed into them).
            hypotheses_trg_to_src: ``(L, B, 2, h_t, w_t)``, for the cycle-consistency mask.
            psr_prior: ``(B, 2, h_s, w_s)`` the PSR prior ``Sigma`` of these pairs
                (``config.psr_prior_init`` initially, and when not given).

        Returns:
            :class:`PMDOutput`; ``loss`` is CAL (plain L2 to every hypothesis with
            ``distillation_loss="l2"``) and ``losses`` also holds ``psr_weights``,
            ``cycle_mask`` and ``empirical_variance`` (used to update ``Sigma`` once per epoch).
        """
        if source_keypoints is not None and hypotheses_src_to_trg is None:
            loss = self.supervised_keypoint_loss(source_pixel_values, target_pixel_values, source_keypoints,
                                                 target_keypoints, keypoint_mask)
            return PMDOutput(loss=loss, losses={"keypoints": loss.detach()})
        grid_st, grid_ts, confidence, _ = self.predict(source_pixel_values, target_pixel_values)
        smoothness = flow_smoothness(grid_st, self.config.grid_align_corners)
        output = PMDOutput(grid_src_to_trg=grid_st, grid_trg_to_src=grid_ts, confidence=confidence, smoothness=smoothness)
        if hypotheses_src_to_trg is None:
            return output
        hypotheses = hypotheses_src_to_trg.to(grid_st.dtype)
        prior = psr_prior if psr_prior is not None else torch.full_like(grid_st, self.config.psr_prior_init)
        plain_l2 = self.config.distillation_loss == "l2"
        with torch.no_grad():
            weights = psr_weights(hypotheses, grid_st.detach(), prior)
            variance = empirical_variance(hypotheses, grid_st.detach())
            if plain_l2:
                weights, mask = torch.ones_like(weights), torch.ones_like(weights)
            elif hypotheses_trg_to_src is not None:
                mask = cycle_mask(
                    cycle_errors(hypotheses, hypotheses_trg_to_src.to(grid_st.dtype), self.config.grid_align_corners),
                    self.config.cycle_sharpness, self.config.cycle_offset,
                )
            else:
                mask = torch.ones_like(weights)
        terms = confidence_aware_loss(
            hypotheses, grid_st, weights, mask, smoothness, prior, variance,
            distillation_weight=self.config.distillation_weight,
            smoothness_weight=self.config.smoothness_weight,
            variance_kl_weight=0.0 if plain_l2 else self.config.variance_kl_weight,
        )
        output.loss = terms.pop("loss")
        output.losses = {**terms, "psr_weights": weights, "cycle_mask": mask, "empirical_variance": variance}
        return output

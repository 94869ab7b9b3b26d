"""Hyperpixel Flow (Min et al., ICCV 2019): training-free semantic matching.

Hyperpixels = several backbone levels resampled to one grid, each L2-normalised, concatenated.
Cosine correlation, clamped at 0 and raised to a power, is re-scored by regularised Hough
matching; each source cell's best match is refined to sub-cell precision with a kernel
soft-argmax, and keypoints are transferred through the resulting dense field. ``match()`` runs
these steps fused over blocks of source rows (:mod:`..ops.fused_matching`), holding one
similarity volume; :meth:`HyperpixelFlowModel.match_scores` still gives the full volume.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from ..backbone import FeatureBackbone
from ..modeling_matcher import CorrespondenceOutput, SemanticMatcherPreTrainedModel
from ..ops.correlation import dense_cosine_correlation
from ..ops.fused_matching import fused_hough_matching
from ..ops.geometry import cell_axes, grid_to_pixels, pixels_to_grid
from ..ops.keypoint_transfer import transfer_keypoints
from ..ops.rhm import regularized_hough_matching
from ..ops.soft_argmax import local_soft_argmax
from .configuration_hyperpixel import HyperpixelFlowConfig


class HyperpixelFlowPreTrainedModel(SemanticMatcherPreTrainedModel):
    config: HyperpixelFlowConfig
    config_class = HyperpixelFlowConfig


class HyperpixelFlowModel(HyperpixelFlowPreTrainedModel):
    """Training-free matcher: ``match()`` gives dense fields both ways and transferred keypoints.

    On the CPU, ``match()`` keeps the memory of its similarity volume (``B * N_s * N_t`` floats)
    for the next call: the page faults of a fresh allocation of that size cost about a fifth of
    the matching time at 512². :meth:`free_matching_workspace` releases it.
    """

    # Class-wide, so that the model stays picklable; a call that finds it taken (another thread
    # matching) allocates its own volume instead of waiting.
    _workspace_lock = threading.Lock()

    def __init__(self, config: HyperpixelFlowConfig):
        super().__init__(config)
        self.backbone = FeatureBackbone(config.backbone, config.backbone_layers, frozen=True, image_size=config.image_size)
        self.post_init()

    # -- features -------------------------------------------------------------------------------
    def extract_hyperpixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, H / s, W / s)`` hyperpixels (s = ``feature_stride``).

        Each level is resampled to the stride-``s`` grid (area pooling when finer, bilinear when
        coarser) and L2-normalised; the concatenation is scaled by ``1 / sqrt(levels)`` so it has
        unit norm and its cosine is the mean of the per-level cosines.
        """
        height, width = pixel_values.shape[-2:]
        grid_size = (max(1, height // self.config.feature_stride), max(1, width // self.config.feature_stride))
        levels = []
        for feature in self.backbone(pixel_values):
            if feature.shape[-2] > grid_size[0] or feature.shape[-1] > grid_size[1]:
                feature = F.adaptive_avg_pool2d(feature, grid_size)
            if tuple(feature.shape[-2:]) != grid_size:
                feature = F.interpolate(feature, size=grid_size, mode="bilinear", align_corners=False)
            levels.append(F.normalize(feature, dim=1))
        return torch.cat(levels, dim=1) / math.sqrt(len(levels))

    def _features(self, source_pixel_values, target_pixel_values):
        if source_pixel_values.shape == target_pixel_values.shape:
            both = self.extract_hyperpixels(torch.cat([source_pixel_values, target_pixel_values]))
            return both.chunk(2)
        return self.extract_hyperpixels(source_pixel_values), self.extract_hyperpixels(target_pixel_values)

    # -- matching -------------------------------------------------------------------------------
    def match_scores(self, source_features: torch.Tensor, target_features: torch.Tensor, source_image_size, target_image_size):
        """RHM confidences ``(B, N_s, N_t)`` between two hyperpixel maps (two volumes at the peak)."""
        correlation = dense_cosine_correlation(source_features, target_features, normalize=False)
        similarity = correlation.clamp_min_(0).pow_(self.config.similarity_power)
        if not self.config.use_rhm:
            return similarity
        (h_s, w_s), (h_t, w_t) = source_features.shape[-2:], target_features.shape[-2:]
        return regularized_hough_matching(
            similarity, cell_axes(h_s, w_s, source_image_size), cell_axes(h_t, w_t, target_image_size),
            source_image_size, target_image_size,
            num_bins=self.config.hough_bins, kernel_size=self.config.hough_kernel_size,
        )

    def _dense_field(self, scores: torch.Tensor, source_shape, target_shape):
        """Refined arg-max field ``(B, 2, h_s, w_s)`` and confidence ``(B, h_s, w_s)`` in [0, 1]."""
        best = scores.amax(dim=2, keepdim=True)
        grid = local_soft_argmax(
            scores, source_shape, target_shape, radius=self.config.refine_radius, beta=self.config.refine_beta
        )
        peak = scores.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        return grid, (best / peak).view(scores.shape[0], *source_shape)

    def _dense_fields_unfused(self, source_features, target_features, source_size, target_size):
        """Reference for :meth:`_dense_fields`: the full score volume, reduced once per direction."""
        source_shape, target_shape = tuple(source_features.shape[-2:]), tuple(target_features.shape[-2:])
        scores = self.match_scores(source_features, target_features, source_size, target_size)
        grid_src_to_trg, confidence = self._dense_field(scores, source_shape, target_shape)
        grid_trg_to_src, _ = self._dense_field(scores.transpose(1, 2), target_shape, source_shape)
        return grid_src_to_trg, confidence, grid_trg_to_src

    def _dense_fields(self, source_features, target_features, source_size, target_size):
        """Fields both ways and the source confidence (best score / global peak), fused."""
        (h_s, w_s), (h_t, w_t) = source_features.shape[-2:], target_features.shape[-2:]
        config = self.config

        def fused(workspace=None):
            return fused_hough_matching(
                source_features, target_features, cell_axes(h_s, w_s, source_size), cell_axes(h_t, w_t, target_size),
                source_size, target_size, power=config.similarity_power,
                num_bins=config.hough_bins if config.use_rhm else None, kernel_size=config.hough_kernel_size,
                radius=config.refine_radius, beta=config.refine_beta, workspace=workspace,
            )

        if source_features.device.type != "cpu" or not self._workspace_lock.acquire(blocking=False):
            fields = fused()  # accelerators' caching allocators already reuse memory
        else:
            try:
                numel = source_features.shape[0] * h_s * w_s * h_t * w_t
                fields = fused(self._matching_workspace(numel, source_features.dtype))
            finally:
                self._workspace_lock.release()
        best = fields.best_src_to_trg
        peak = best.amax(dim=1, keepdim=True).clamp_min(1e-12)
        return fields.grid_src_to_trg, (best / peak).view(-1, h_s, w_s), fields.grid_trg_to_src

    def _matching_workspace(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The kept CPU buffer for the similarity volume, grown to ``numel`` elements when needed."""
        workspace = getattr(self, "_similarity_workspace", None)
        if workspace is None or workspace.numel() < numel or workspace.dtype != dtype:
            self._similarity_workspace = None  # free the old one before allocating the new one
            self._similarity_workspace = workspace = torch.empty(numel, dtype=dtype)
        return workspace

    def free_matching_workspace(self) -> None:
        """Release the similarity volume that ``match()`` keeps between calls on the CPU."""
        self._similarity_workspace = None

    def match(
        self,
        source_pixel_values: torch.Tensor,
        target_pixel_values: torch.Tensor,
        source_keypoints: torch.Tensor | None = None,
    ) -> CorrespondenceOutput:
        """Match a batch of image pairs.

        Args:
            source_pixel_values: ``(B, 3, H_s, W_s)`` from the image processor.
            target_pixel_values: ``(B, 3, H_t, W_t)``.
            source_keypoints: optional ``(B, N, 2)`` (x, y) in source model-input pixels.

        Returns:
            :class:`CorrespondenceOutput` with ``grid_src_to_trg``, ``grid_trg_to_src``,
            ``confidence`` and, with keypoints, ``target_keypoints (B, N, 2)`` in target
            model-input pixels and ``keypoint_scores (B, N)``.
        """
        return self._match(source_pixel_values, target_pixel_values, source_keypoints, fused=True)

    def _match(self, source_pixel_values, target_pixel_values, source_keypoints=None, fused: bool = True):
        """:meth:`match`; ``fused=False`` takes the unfused reference path (same outputs)."""
        source_size, target_size = tuple(source_pixel_values.shape[-2:]), tuple(target_pixel_values.shape[-2:])
        dense_fields = self._dense_fields if fused else self._dense_fields_unfused
        with torch.no_grad():
            source_features, target_features = self._features(source_pixel_values, target_pixel_values)
            grid_src_to_trg, confidence, grid_trg_to_src = dense_fields(
                source_features, target_features, source_size, target_size
            )
            output = CorrespondenceOutput(
                grid_src_to_trg=grid_src_to_trg, confidence=confidence, grid_trg_to_src=grid_trg_to_src
            )
            if source_keypoints is not None:
                points = pixels_to_grid(source_keypoints.to(grid_src_to_trg.dtype), source_size)
                target_points, scores_kp = transfer_keypoints(
                    points, grid_src_to_trg, confidence, radius=self.config.transfer_radius
                )
                output.target_keypoints = grid_to_pixels(target_points, target_size)
                output.keypoint_scores = scores_kp
        return output

    def forward(self, source_pixel_values, target_pixel_values, source_keypoints=None, **kwargs) -> CorrespondenceOutput:
        """Training-free: the same as :meth:`match`."""
        return self.match(source_pixel_values, target_pixel_values, source_keypoints)

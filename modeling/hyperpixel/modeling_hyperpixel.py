"""Hyperpixel Flow (Min et al., ICCV 2019): training-free semantic matching.

Hyperpixels = several backbone levels resampled to one grid, each L2-normalised, concatenated.
Cosine correlation, clamped at 0 and raised to a power, is re-scored by regularised Hough
matching; each source cell's best match is refined to sub-cell precision with a kernel
soft-argmax, and keypoints are transferred through the resulting dense field. ``match()`` runs
these steps fused over blocks of source columns (:mod:`..ops.fused_matching`), holding one
similarity volume; :meth:`HyperpixelFlowModel.match_scores` still gives the full RHM volume.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from ..backbone import FeatureBackbone
from ..modeling_matcher import CorrespondenceOutput, SemanticMatcherPreTrainedModel
from ..ops.correlation import correlation_compute_dtype, dense_cosine_correlation
from ..ops.fused_matching import fused_hough_matching, workspace_size
from ..ops.geometry import cell_axes, grid_to_pixels, pixels_to_grid
from ..ops.keypoint_transfer import transfer_keypoints
from ..ops.matches import SCORE_RADIUS, match_confidence
from ..ops.rhm import regularized_hough_matching
from ..ops.soft_argmax import arg_max_neighbourhood, local_soft_argmax
from .configuration_hyperpixel import HyperpixelFlowConfig


class HyperpixelFlowPreTrainedModel(SemanticMatcherPreTrainedModel):
    config: HyperpixelFlowConfig
    config_class = HyperpixelFlowConfig


class HyperpixelFlowModel(HyperpixelFlowPreTrainedModel):
    """Training-free matcher: ``match()`` gives dense fields both ways and transferred keypoints.

    On the CPU, ``match()`` keeps the memory of its similarity volume (``B * N_s * N_t`` floats,
    plus a 16 MiB block buffer) for the next call: the page faults of a fresh allocation of that
    size cost about a fifth of the matching time at 512². :meth:`free_matching_workspace`
    releases it.
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
        similarity = self._similarity(source_features, target_features)
        return self._hough_scores(similarity, source_features, target_features, source_image_size, target_image_size)

    def _similarity(self, source_features, target_features):
        """``relu(cos)^p`` ``(B, N_s, N_t)``."""
        correlation = dense_cosine_correlation(
            source_features, target_features, normalize=False, compute_dtype=self._correlation_dtype(source_features)
        )
        return correlation.clamp_min_(0).pow_(self.config.similarity_power)

    def _correlation_dtype(self, features: torch.Tensor) -> torch.dtype:
        return correlation_compute_dtype(self.config.correlation_dtype, features)

    def _hough_scores(self, similarity, source_features, target_features, source_image_size, target_image_size):
        if not self.config.use_rhm:
            return similarity
        (h_s, w_s), (h_t, w_t) = source_features.shape[-2:], target_features.shape[-2:]
        return regularized_hough_matching(
            similarity, cell_axes(h_s, w_s, source_image_size), cell_axes(h_t, w_t, target_image_size),
            source_image_size, target_image_size,
            num_bins=self.config.hough_bins, kernel_size=self.config.hough_kernel_size,
        )

    def _dense_field(self, scores: torch.Tensor, source_shape, target_shape):
        """Refined arg-max field ``(B, 2, h_s, w_s)`` and best score over the pair's peak ``(B, h_s, w_s)``."""
        best = scores.amax(dim=2, keepdim=True)
        grid = local_soft_argmax(
            scores, source_shape, target_shape, radius=self.config.refine_radius, beta=self.config.refine_beta
        )
        peak = scores.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        return grid, (best / peak).view(scores.shape[0], *source_shape)

    def _dense_fields_unfused(self, source_features, target_features, source_size, target_size):
        """Reference for :meth:`_dense_fields`: the full score volume, reduced once per direction."""
        source_shape, target_shape = tuple(source_features.shape[-2:]), tuple(target_features.shape[-2:])
        similarity = self._similarity(source_features, target_features)
        scores = self._hough_scores(similarity, source_features, target_features, source_size, target_size)
        grid_src_to_trg, relative = self._dense_field(scores, source_shape, target_shape)
        grid_trg_to_src, _ = self._dense_field(scores.transpose(1, 2), target_shape, source_shape)
        best_index = scores.argmax(dim=2)
        around = arg_max_neighbourhood(best_index, target_shape, SCORE_RADIUS)
        confidence = match_confidence(similarity.gather(2, best_index[..., None])[..., 0],
                                      torch.gather(scores, 2, around.index), around, scores.sum(dim=2),
                                      self.config.similarity_power)
        return grid_src_to_trg, confidence.view_as(relative), grid_trg_to_src, relative

    def _dense_fields(self, source_features, target_features, source_size, target_size):
        """Fields both ways, the confidence (:func:`~..ops.matches.match_confidence`) of every source
        cell and its best score over the pair's peak (the keypoint-transfer weight), fused."""
        (h_s, w_s), (h_t, w_t) = source_features.shape[-2:], target_features.shape[-2:]
        config = self.config
        fields = self._with_workspace(
            lambda workspace: fused_hough_matching(
                source_features, target_features, cell_axes(h_s, w_s, source_size), cell_axes(h_t, w_t, target_size),
                source_size, target_size, power=config.similarity_power,
                num_bins=config.hough_bins if config.use_rhm else None, kernel_size=config.hough_kernel_size,
                radius=config.refine_radius, beta=config.refine_beta, workspace=workspace,
                compute_dtype=self._correlation_dtype(source_features),
            ),
            workspace_size(source_features.shape[0], (h_s, w_s), (h_t, w_t)), source_features,
        )
        best = fields.best_src_to_trg
        relative = best / best.amax(dim=1, keepdim=True).clamp_min(1e-12)
        return (fields.grid_src_to_trg, fields.confidence_src_to_trg.view(-1, h_s, w_s), fields.grid_trg_to_src,
                relative.view(-1, h_s, w_s))

    def _with_workspace(self, run, numel: int, like: torch.Tensor):
        """``run(workspace)`` with the kept CPU workspace of at least ``numel`` elements, or with
        ``None`` on accelerators (their caching allocators already reuse memory) and while another
        thread holds it."""
        if like.device.type != "cpu" or not self._workspace_lock.acquire(blocking=False):
            return run(None)
        try:
            workspace = getattr(self, "_similarity_workspace", None)
            if workspace is None or workspace.numel() < numel or workspace.dtype != like.dtype:
                self._similarity_workspace = None  # free the old one before allocating the new one
                self._similarity_workspace = workspace = torch.empty(numel, dtype=like.dtype)
            return run(workspace)
        finally:
            self._workspace_lock.release()

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
            grid_src_to_trg, confidence, grid_trg_to_src, transfer_weights = dense_fields(
                source_features, target_features, source_size, target_size
            )
            output = CorrespondenceOutput(
                grid_src_to_trg=grid_src_to_trg, confidence=confidence, grid_trg_to_src=grid_trg_to_src,
                transfer_weights=transfer_weights,
            )
            if source_keypoints is not None:
                points = pixels_to_grid(source_keypoints.to(grid_src_to_trg.dtype), source_size)
                # Cells vote for a keypoint's transfer by their score relative to the pair's best (what
                # the default was chosen with); its reported score is the same average of absolute ones.
                target_points, scores_kp = transfer_keypoints(
                    points, grid_src_to_trg, transfer_weights, radius=self.config.transfer_radius, scores=confidence
                )
                output.target_keypoints = grid_to_pixels(target_points, target_size)
                output.keypoint_scores = scores_kp
        return output

    def forward(self, source_pixel_values, target_pixel_values, source_keypoints=None, **kwargs) -> CorrespondenceOutput:
        """Training-free: the same as :meth:`match`."""
        return self.match(source_pixel_values, target_pixel_values, source_keypoints)

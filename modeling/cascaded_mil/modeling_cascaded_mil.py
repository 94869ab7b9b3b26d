"""The cascaded MIL pseudo-label generator (Huang et al., ICCV 2023), trained with image-level labels only.

Huang et al., *Weakly Supervised Learning of Semantic Correspondence through Cascaded Online
Correspondence Refinement*, ICCV 2023. The authors published no code; every detail the paper leaves
open is reconstructed here and said so where it is made.

The cascade, on a batch of image pairs of one class each (multiple-instance learning: a pair of
the same class holds matching points somewhere, a pair of different classes does not)::

    frozen backbone -> tokens F (B, N, C) and a global token T (B, C) per image
    image stage   MVAM_I(F_s, F_t)  -> refined volume v_I (B, N_s, N_t)
                  L_I = -AP(v_I[pos]) + AP(v_I[neg])      (negatives: the targets shifted by one, as NCNet)
                  PMPS(v_I) -> k suspects (RHM re-scoring, foreground only, one-to-one)
    region stage  a window of region_window^2 cells around each suspect, cropped from both images
                  and re-encoded -> MVAM_R per region pair -> L_R = -AP(pos) + AP(neg)
                  (negatives: a source region with a target region of the next pair: another class)
                  each suspect's match refined in its region volume, back in image pixels, NMS -> 16 pairs
    pixel stage   MVAM_P(F_s, F_t) -> v_P; L_P = binary cross-entropy of each pair's row of v_P
                  against its region-stage target (as MMNet)
    L = lambda_1 L_I + lambda_2 L_R + lambda_3 L_P

``match()`` is the pixel stage (the last enabled stage): dense fields both ways from its refined
volume, a confidence per cell, keypoint transfer -- so the pipeline, ``semcorr evaluate`` and the
demo use the generator like any semcorr model. :meth:`CascadedMILModel.pseudo_label` gives the
pairs SC-ImageNet stores (PMPS on the pixel stage's volume).

AP, "adaptive pooling" of a volume, is reconstructed as the weak-supervision score of NCNet
(Rocco et al., NeurIPS 2018): a softmax over the candidates of each cell (temperature
``pooling_temperature``), its maximum, averaged over the cells, both directions -- high when every
cell has one clear match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import FeatureBackbone
from ..modeling_matcher import CorrespondenceOutput, SemanticMatcherPreTrainedModel
from ..ops.geometry import grid_to_pixels, pixels_to_grid
from ..ops.hyperpixels import stack_levels
from ..ops.keypoint_transfer import transfer_keypoints
from ..ops.soft_argmax import arg_max_neighbourhood, local_soft_argmax, soft_argmax_around
from .configuration_cascaded_mil import CascadedMILConfig, CascadedMILStageConfig
from .gated_attention import MatchingVolumeAggregation
from .pmps import select_pseudo_pairs


@dataclass
class CascadedMILOutput(CorrespondenceOutput):
    """:class:`CorrespondenceOutput` plus the cascade's training terms.

    Args:
        losses: ``{"image", "region", "pixel"}`` scalar losses of the stages that ran.
        positive_scores, negative_scores: ``(B,)`` image-level AP of the positive and negative pairs.
        image_pairs, region_pairs: what the image stage handed on and what the region stage kept:
            ``{"source_points", "target_points"}`` ``(B, k, 2)`` model-input pixels, ``"scores"``
            and ``"found"`` ``(B, k)``.
    """

    losses: dict | None = None
    positive_scores: torch.FloatTensor | None = None
    negative_scores: torch.FloatTensor | None = None
    image_pairs: dict | None = None
    region_pairs: dict | None = None


class CascadedMILPreTrainedModel(SemanticMatcherPreTrainedModel):
    config: CascadedMILConfig
    config_class = CascadedMILConfig

    def _init_weights(self, module):
        """transformers' initialisation, except that zero-initialised output projections stay at zero:
        an untrained stage then returns the backbone's cosine volume (see ``gated_attention``)."""
        super()._init_weights(module)
        if getattr(module, "_semcorr_zero_init", False):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def volume_pooling(volume: torch.Tensor, temperature: float) -> torch.Tensor:
    """AP of volumes ``(B, N_s, N_t)`` -> ``(B,)``: mean over cells of the best softmax match, both ways."""
    forward = torch.softmax(volume / temperature, dim=2).amax(dim=2).mean(dim=1)
    backward = torch.softmax(volume / temperature, dim=1).amax(dim=1).mean(dim=1)
    return (forward + backward) / 2


class CascadedMILModel(CascadedMILPreTrainedModel):
    """The generator: frozen backbone, one MVAM per stage (or one shared), PMPS, ``match()``."""

    def __init__(self, config: CascadedMILConfig):
        super().__init__(config)
        self.backbone = FeatureBackbone(config.backbone, config.backbone_layers, frozen=True,
                                        image_size=config.image_size)
        width = sum(self.backbone.channels)
        self.image_mvam = self._mvam(width, config.image_stage)
        # Stages that do not run get no weights (a multi-process run would otherwise wait for their gradients).
        for stage, enabled in (("region", config.use_region_stage), ("pixel", config.use_pixel_stage)):
            module = None
            if enabled:
                module = self.image_mvam if config.share_attention else self._mvam(width, getattr(config, f"{stage}_stage"))
            setattr(self, f"{stage}_mvam", module)
        if config.share_attention:  # one module under several names: safetensors stores it once (image_mvam)
            self._tied_weights_keys = {f"{stage}_mvam": "image_mvam" for stage in config.enabled_stages[1:]}
        object.__setattr__(self, "_saliency", None)  # built on first use, never a submodule: not part of the weights
        self.post_init()

    @staticmethod
    def _mvam(width: int, stage: CascadedMILStageConfig) -> MatchingVolumeAggregation:
        return MatchingVolumeAggregation(
            width, stage.num_attention_heads, embed_dim=stage.volume_embed_dim, depth=stage.volume_depth,
            volume_heads=stage.volume_heads, window=stage.volume_window, fold=stage.volume_fold,
            mlp_ratio=stage.mlp_ratio)

    # -- features -----------------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor):
        """Tokens ``(B, N, C)``, the global token ``(B, C)`` and the grid ``(h, w)`` of images ``(B, 3, H, W)``.

        Tokens are hyperpixels (the levels L2-normalised on the first level's grid, concatenated)
        brought to norm ``sqrt(C)``, the norm a LayerNorm gives: the gates ``sigmoid(F T / sqrt(C))``
        then see ``sqrt(C) cos(F, T)``, in the range where a sigmoid discriminates (reconstruction).
        The global token is a ViT's class token (repeated per level) or, for a CNN, the average of
        the tokens (global average pooling), brought to the same norm.
        """
        maps, class_token = self.backbone.forward_with_global(pixel_values)
        grid = tuple(maps[0].shape[-2:])
        hyperpixels = stack_levels(maps, grid)  # (B, C, h, w), unit norm per cell
        width = hyperpixels.shape[1]
        tokens = hyperpixels.flatten(2).transpose(1, 2) * width ** 0.5
        if self.backbone.is_vit:
            global_token = F.normalize(class_token, dim=-1).repeat(1, len(maps)) / len(maps) ** 0.5
        else:
            global_token = F.normalize(hyperpixels.mean(dim=(2, 3)), dim=-1)
        return tokens, global_token * width ** 0.5, grid

    # -- volumes ------------------------------------------------------------------------------------
    def stage_volume(self, stage: str, source, target) -> dict:
        """The MVAM of ``stage`` on encoded images (``encode`` outputs); see ``MatchingVolumeAggregation``."""
        mvam = {"image": self.image_mvam, "region": self.region_mvam, "pixel": self.pixel_mvam}[stage]
        (source_tokens, source_global, source_shape), (target_tokens, target_global, target_shape) = source, target
        return mvam(source_tokens, target_tokens, source_global, target_global, source_shape, target_shape)

    def image_level_loss(self, source, target, class_ids=None):
        """``(L_I, refined positive volume, positive AP (B,), negative AP (B,))``; negatives are the
        targets shifted by one (pairs whose two classes are equal are left out when ``class_ids`` says so)."""
        positive = self.stage_volume("image", source, target)["refined"]
        shifted = tuple(part.roll(1, dims=0) if torch.is_tensor(part) else part for part in target)
        negative = self.stage_volume("image", source, shifted)["refined"]
        temperature = self.config.pooling_temperature
        positive_scores, negative_scores = volume_pooling(positive, temperature), volume_pooling(negative, temperature)
        keep = torch.ones_like(negative_scores, dtype=torch.bool)
        if class_ids is not None:
            keep = class_ids != class_ids.roll(1, dims=0)
        loss = -positive_scores.mean() + (negative_scores * keep).sum() / keep.sum().clamp_min(1)
        return loss, positive, positive_scores, negative_scores

    # -- suspects and the region stage ----------------------------------------------------------------
    def saliency(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
        """Foreground saliency ``(B, h, w)`` in ``[0, 1]`` on the feature grid (None when switched off).

        ``config.saliency`` picks the method (:func:`~semcorr.modeling.cascaded_mil.saliency.resolve_saliency`);
        :meth:`set_saliency` plugs in any callable ``pixel_values -> mask``.
        """
        from .saliency import resolve_saliency, saliency_on_grid

        if self.config.saliency == "none" and self._saliency is None:
            return None
        if self._saliency is None:
            self.set_saliency(resolve_saliency(self.config.saliency, self.backbone, image_mean=self.config.image_mean,
                                               image_std=self.config.image_std))
        if isinstance(self._saliency, nn.Module):
            self._saliency.to(pixel_values.device)
        with torch.no_grad():
            return saliency_on_grid(self._saliency(pixel_values), grid)

    def set_saliency(self, saliency) -> None:
        """Use ``saliency`` (a callable ``(B, 3, H, W) -> (B, H', W')`` in ``[0, 1]``, e.g. a wrapped
        SelfReformer) as PMPS's foreground prior; kept out of the model's weights."""
        object.__setattr__(self, "_saliency", saliency)

    def select_pairs(self, volume: torch.Tensor, source_pixels, target_pixels, source_grid, target_grid, k: int,
                     refine: bool = False) -> dict:
        """PMPS on a volume ``(B, N_s, N_t)``: RHM re-scoring, the foreground, one-to-one; ``k`` pairs.

        Source points are cell centres; with ``refine`` each target point is moved to the local
        soft-argmax of its source cell's row around the picked cell (sub-cell precision, as ``match()``).
        """
        config = self.config
        with torch.no_grad():
            selected = select_pseudo_pairs(
                volume.detach(), source_grid, target_grid, tuple(source_pixels.shape[-2:]),
                tuple(target_pixels.shape[-2:]), k, use_rhm=config.use_rhm, hough_kernel_size=config.hough_kernel_size,
                hough_bins=config.hough_bins, source_saliency=self.saliency(source_pixels, source_grid),
                target_saliency=self.saliency(target_pixels, target_grid),
                saliency_threshold=config.saliency_threshold)
            target_points = selected["target_pixels"]
            if refine:
                target_points = self._refine_targets(volume.detach(), selected["source_index"], selected["target_index"],
                                                     target_grid, tuple(target_pixels.shape[-2:]))
        return {"source_points": selected["source_pixels"], "target_points": target_points,
                "scores": selected["scores"], "found": selected["found"]}

    def _refine_targets(self, volume, source_index, target_index, target_grid, target_size) -> torch.Tensor:
        """``(B, k, 2)`` model pixels: the soft-argmax of row ``source_index`` of ``volume`` around ``target_index``."""
        rows = torch.gather(volume.clamp_min(0), 1, source_index[..., None].expand(-1, -1, volume.shape[2]))
        around = arg_max_neighbourhood(target_index, target_grid, self.config.refine_radius)
        picked = torch.gather(rows, 2, target_index[..., None])[..., 0]
        refined = soft_argmax_around(torch.gather(rows, 2, around.index), picked, around, target_grid,
                                     self.config.refine_beta)
        return grid_to_pixels(refined.transpose(1, 2), target_size)

    def _crop_regions(self, pixel_values: torch.Tensor, centres: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of ``region_window`` cells around ``centres (B, k, 2)`` (model pixels), resampled to
        ``region_image_size``: ``(crops (B*k, 3, R, R), boxes (B*k, 4) as x1, y1, x2, y2 pixels)``."""
        from torchvision.ops import roi_align

        height, width = pixel_values.shape[-2:]
        half = centres.new_tensor([width / grid[1], height / grid[0]]) * self.config.region_window / 2
        boxes = torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4)
        batch_index = torch.arange(centres.shape[0], device=centres.device).repeat_interleave(centres.shape[1])
        size = self.config.region_image_size
        crops = roi_align(pixel_values, torch.cat([batch_index[:, None].to(boxes), boxes], dim=1), (size, size),
                          aligned=True)  # zeros (the mean colour) outside the image
        return crops, boxes

    def region_stage(self, source_pixels, target_pixels, suspects: dict, source_grid, target_grid):
        """``(L_R, the kept pairs)``: each suspect's window pair re-encoded and matched by MVAM_R."""
        batch_size, k = suspects["found"].shape
        source_crops, source_boxes = self._crop_regions(source_pixels, suspects["source_points"], source_grid)
        target_crops, target_boxes = self._crop_regions(target_pixels, suspects["target_points"], target_grid)
        source, target = self.encode(source_crops), self.encode(target_crops)
        positive = self.stage_volume("region", source, target)["refined"]  # (B*k, n, n)
        # Negatives: each source window against the window of the same suspect rank in the next pair of the
        # batch -- another class, as the image stage's negatives (reconstruction: windows of the same image
        # pair would let the stage tell positives by alignment instead of by content).
        others = tuple(part.unflatten(0, (batch_size, k)).roll(1, dims=0).flatten(0, 1) if torch.is_tensor(part)
                       else part for part in target)
        negative = self.stage_volume("region", source, others)["refined"]
        found = suspects["found"].reshape(-1).float()
        temperature = self.config.pooling_temperature
        loss = (-(volume_pooling(positive, temperature) * found).sum()
                + (volume_pooling(negative, temperature) * found).sum()) / found.sum().clamp_min(1)
        pairs = self._best_region_pairs(positive.detach(), source[2], source_boxes, target_boxes, suspects["found"])
        return loss, pairs

    def _best_region_pairs(self, volume, region_grid, source_boxes, target_boxes, found) -> dict:
        """Each suspect's match refined in its region volume ``(B*k, n, n)``, in image pixels, then NMS
        -> ``num_region_pairs``.

        The pair keeps the suspect's source point (the centre of its source window; its row of the
        volume is read there bilinearly: the mean of the central cells' rows) and finds its match in
        the target window at the crop's finer grid: the arg-max of that row, refined by the local
        soft-argmax (``refine_radius``, ``refine_beta``). The score is the row's maximum.
        Reconstruction: "the best pixel pair of each region" taken anywhere in the window pair drifts
        to whichever cells match best, often spurious ones near the window border (on held-out warps
        of strength 0.55, region pairs PCK@0.05 0.64 against 0.73 for the image stage's picks);
        anchored at the suspect the region stage refines it (0.84 there).
        """
        batch_size, k = found.shape
        height, width = region_grid
        rows = [height // 2 - 1, height // 2] if height % 2 == 0 else [height // 2]
        cols = [width // 2 - 1, width // 2] if width % 2 == 0 else [width // 2]
        centre_cells = torch.tensor([r * width + c for r in rows for c in cols], device=volume.device)
        centre_row = volume.clamp_min(0)[:, centre_cells].mean(dim=1)  # (B*k, n) the window centre's scores
        best, target_cell = centre_row.max(dim=1)
        around = arg_max_neighbourhood(target_cell[:, None], region_grid, self.config.refine_radius)
        refined = soft_argmax_around(torch.gather(centre_row[:, None], 2, around.index), best[:, None], around,
                                     region_grid, self.config.refine_beta)[:, :, 0]  # (B*k, 2) grid units
        target_points = target_boxes[:, :2] + (refined + 1) / 2 * (target_boxes[:, 2:] - target_boxes[:, :2])
        source_points = (source_boxes[:, :2] + source_boxes[:, 2:]) / 2
        source_points, target_points = source_points.reshape(batch_size, k, 2), target_points.reshape(batch_size, k, 2)
        scores = torch.where(found, best.reshape(batch_size, k), torch.full_like(best.reshape(batch_size, k), -1.0))
        keep = self._non_maximum_suppression(source_points, scores, source_boxes)
        order = torch.where(keep, scores, torch.full_like(scores, -2.0)).argsort(dim=1, descending=True)
        order = order[:, : self.config.num_region_pairs]
        take = lambda tensor: torch.gather(tensor, 1, order if tensor.ndim == 2 else order[..., None].expand(-1, -1, 2))
        return {"source_points": take(source_points), "target_points": take(target_points),
                "scores": take(scores), "found": take(keep & found)}

    def _non_maximum_suppression(self, points: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, k)`` True for pairs no better pair lies within ``nms_radius`` cells of (in the source)."""
        cell = (boxes[:1, 2:] - boxes[:1, :2]).reshape(2) / self.config.region_window  # pixels per image cell
        distance = ((points[:, :, None] - points[:, None]) / cell).norm(dim=-1)  # (B, k, k) in cells
        better = scores[:, None, :] > scores[:, :, None]  # [b, i, j]: j scores higher than i
        return ~((distance <= self.config.nms_radius) & better).any(dim=2)

    # -- the pixel stage ------------------------------------------------------------------------------
    def pixel_stage_loss(self, volume: torch.Tensor, pairs: dict, source_size, target_size, source_grid, target_grid):
        """Binary cross-entropy of the source row of each pair in ``volume (B, N_s, N_t)`` against its
        region-stage target (as MMNet, Zhao et al., ICCV 2021).

        A row's match probabilities are a softmax of ``pixel_temperature * volume`` over the target
        cells; the target map spreads 1 bilinearly over the four cells around the target point
        (reconstruction: a one-hot cell would throw away the sub-cell position the region stage
        found, which :meth:`pseudo_label` reads back by soft-argmax).
        """
        source_cells = _nearest_cell(pairs["source_points"], source_size, source_grid)  # (B, m)
        rows = torch.gather(volume, 1, source_cells[..., None].expand(-1, -1, volume.shape[2]))  # (B, m, N_t)
        probability = torch.softmax(self.config.pixel_temperature * rows, dim=2).clamp(1e-6, 1 - 1e-6)
        truth = _bilinear_cell_weights(pairs["target_points"], target_size, target_grid).to(probability.dtype)
        per_pair = F.binary_cross_entropy(probability, truth, reduction="none").sum(dim=2)
        found = pairs["found"].to(per_pair.dtype)
        return (per_pair * found).sum() / found.sum().clamp_min(1)

    # -- training -------------------------------------------------------------------------------------
    def forward(self, source_pixel_values: torch.Tensor, target_pixel_values: torch.Tensor,
                class_ids: torch.Tensor | None = None, source_keypoints: torch.Tensor | None = None,
                target_keypoints: torch.Tensor | None = None, keypoint_mask: torch.Tensor | None = None,
                **kwargs) -> CascadedMILOutput:
        """One training step's losses on ``B`` positive pairs (images of one class each); given labelled
        keypoints instead, the keypoint-supervised loss of fine-tuning (:meth:`supervised_keypoint_loss`).

        Args:
            source_pixel_values, target_pixel_values: ``(B, 3, H, W)``; pair ``b`` shows two images of one class.
            class_ids: ``(B,)`` the pairs' classes; a negative pair (source ``b``, target ``b - 1``) of
                one class is left out of the image-level loss.

        Returns:
            :class:`CascadedMILOutput` with ``loss`` = ``lambda_1 L_I (+ lambda_2 L_R + lambda_3 L_P)``.
        """
        if source_keypoints is not None:
            loss = self.supervised_keypoint_loss(source_pixel_values, target_pixel_values, source_keypoints,
                                                 target_keypoints, keypoint_mask)
            return CascadedMILOutput(loss=loss, losses={"keypoints": loss.detach()})
        config = self.config
        source, target = self.encode(source_pixel_values), self.encode(target_pixel_values)
        loss_image, volume, positive, negative = self.image_level_loss(source, target, class_ids)
        output = CascadedMILOutput(losses={"image": loss_image}, positive_scores=positive.detach(),
                                   negative_scores=negative.detach())
        total = config.image_loss_weight * loss_image
        if config.use_region_stage:
            suspects = self.select_pairs(volume, source_pixel_values, target_pixel_values, source[2], target[2],
                                         config.num_suspects)
            loss_region, pairs = self.region_stage(source_pixel_values, target_pixel_values, suspects, source[2],
                                                   target[2])
            output.losses["region"], output.image_pairs, output.region_pairs = loss_region, suspects, pairs
            total = total + config.region_loss_weight * loss_region
            if config.use_pixel_stage:
                pixel_volume = self.stage_volume("pixel", source, target)["refined"]
                output.losses["pixel"] = self.pixel_stage_loss(
                    pixel_volume, pairs, tuple(source_pixel_values.shape[-2:]), tuple(target_pixel_values.shape[-2:]),
                    source[2], target[2])
                total = total + config.pixel_loss_weight * output.losses["pixel"]
        output.loss = total
        return output

    def supervised_keypoint_loss(self, source_pixel_values, target_pixel_values, source_keypoints, target_keypoints,
                                 keypoint_mask=None) -> torch.Tensor:
        """Keypoint-supervised loss (fine-tuning on labelled pairs): the pixel stage's binary cross-entropy
        (:meth:`pixel_stage_loss`) against the labelled pairs instead of the region stage's."""
        volume, source_grid, target_grid = self.final_volume(source_pixel_values, target_pixel_values)
        found = torch.ones(source_keypoints.shape[:2], dtype=torch.bool, device=volume.device)
        pairs = {"source_points": source_keypoints, "target_points": target_keypoints,
                 "found": found if keypoint_mask is None else keypoint_mask.bool()}
        return self.pixel_stage_loss(volume, pairs, tuple(source_pixel_values.shape[-2:]),
                                     tuple(target_pixel_values.shape[-2:]), source_grid, target_grid)

    # -- the matching contract -----------------------------------------------------------------------
    def final_volume(self, source_pixel_values, target_pixel_values):
        """The last enabled stage's refined volume ``(B, N_s, N_t)`` and the two grids."""
        source, target = self.encode(source_pixel_values), self.encode(target_pixel_values)
        stage = self.config.enabled_stages[-1]
        return self.stage_volume(stage, source, target)["refined"], source[2], target[2]

    def match(self, source_pixel_values, target_pixel_values, source_keypoints=None) -> CorrespondenceOutput:
        """Dense fields both ways, confidence and keypoint transfer from the pixel stage (see
        :class:`CorrespondenceOutput`); the confidence of a cell is its best refined cosine, in ``[0, 1]``."""
        config = self.config
        with torch.no_grad():
            volume, source_grid, target_grid = self.final_volume(source_pixel_values, target_pixel_values)
            scores = volume.clamp_min(0)
            grid_src_to_trg = local_soft_argmax(scores, source_grid, target_grid, config.refine_radius, config.refine_beta)
            grid_trg_to_src = local_soft_argmax(scores.transpose(1, 2), target_grid, source_grid, config.refine_radius,
                                                config.refine_beta)
            confidence = scores.amax(dim=2).clamp(0, 1).view(-1, *source_grid)
            output = CorrespondenceOutput(grid_src_to_trg=grid_src_to_trg, grid_trg_to_src=grid_trg_to_src,
                                          confidence=confidence)
            if source_keypoints is not None:
                source_size, target_size = tuple(source_pixel_values.shape[-2:]), tuple(target_pixel_values.shape[-2:])
                points, keypoint_scores = transfer_keypoints(
                    pixels_to_grid(source_keypoints.to(grid_src_to_trg.dtype), source_size), grid_src_to_trg,
                    confidence, radius=config.transfer_radius)
                output.target_keypoints = grid_to_pixels(points, target_size)
                output.keypoint_scores = keypoint_scores
        return output

    def pseudo_label(self, source_pixel_values, target_pixel_values, num_pairs: int | None = None) -> dict:
        """The pseudo keypoint pairs of each image pair: PMPS on the pixel stage's volume.

        Returns:
            ``{"source_points", "target_points"}`` ``(B, k, 2)`` in model-input pixels, ``"scores"`` and
            ``"found"`` ``(B, k)``, with ``k = num_pairs`` (default ``config.num_pseudo_pairs``).
        """
        with torch.no_grad():
            volume, source_grid, target_grid = self.final_volume(source_pixel_values, target_pixel_values)
            return self.select_pairs(volume, source_pixel_values, target_pixel_values, source_grid, target_grid,
                                     num_pairs or self.config.num_pseudo_pairs, refine=True)


    def cascade(self, source_pixel_values, target_pixel_values) -> dict:
        """What each enabled stage hands on, for one look at the cascade (no losses, no gradients).

        Returns:
            ``{"image": the suspects PMPS picks on the image stage's volume, "region": the pairs the
            region stage keeps, "pixel": the pseudo labels}`` (the enabled stages only), each
            ``{"source_points", "target_points"}`` ``(B, k, 2)`` in model-input pixels with ``"scores"``
            and ``"found"`` ``(B, k)``.
        """
        config = self.config
        with torch.no_grad():
            source, target = self.encode(source_pixel_values), self.encode(target_pixel_values)
            volume = self.stage_volume("image", source, target)["refined"]
            stages = {"image": self.select_pairs(volume, source_pixel_values, target_pixel_values, source[2], target[2],
                                                 config.num_suspects)}
            if config.use_region_stage:
                _, stages["region"] = self.region_stage(source_pixel_values, target_pixel_values, stages["image"],
                                                        source[2], target[2])
            if config.use_pixel_stage:
                stages["pixel"] = self.pseudo_label(source_pixel_values, target_pixel_values)
        return stages

def _nearest_cell(points: torch.Tensor, image_size, grid) -> torch.Tensor:
    """Row-major index ``(B, m)`` of the cell of a ``grid = (h, w)`` map containing each pixel point ``(B, m, 2)``."""
    height, width = image_size
    column = (points[..., 0] * grid[1] / width).floor().long().clamp(0, grid[1] - 1)
    row = (points[..., 1] * grid[0] / height).floor().long().clamp(0, grid[0] - 1)
    return row * grid[1] + column


def _bilinear_cell_weights(points: torch.Tensor, image_size, grid) -> torch.Tensor:
    """``(B, m, h * w)``: each pixel point ``(B, m, 2)`` spread bilinearly over the centres of the four
    cells around it (clamped at the border; the weights sum to 1)."""
    height, width = image_size
    rows, cols = grid
    x = (points[..., 0] * cols / width - 0.5).clamp(0, cols - 1)  # continuous cell coordinates
    y = (points[..., 1] * rows / height - 0.5).clamp(0, rows - 1)
    x0, y0 = x.floor().long(), y.floor().long()
    fx, fy = x - x0, y - y0
    weights = points.new_zeros(*points.shape[:-1], rows * cols)
    for dy, dx, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        index = (y0 + dy).clamp(max=rows - 1) * cols + (x0 + dx).clamp(max=cols - 1)
        weights.scatter_add_(-1, index[..., None], weight[..., None])
    return weights

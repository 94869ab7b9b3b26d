"""PMD training losses: grid regression, smoothness, PSR weights, cycle mask and CAL.

The public PMD code ships no loss file; PSR and CAL below are reconstructed from its training
script, its noise module and the paper's figure (Li et al., CVPR 2021):

* PSR weight of hypothesis ``l`` at pixel ``p``: ``W_l(p) = exp(-|F_l(p) - F_s(p)|^2 / (2 Sigma(p)^2))``
  with a per-pair, per-pixel prior ``Sigma`` (initialised to 1) that moves once per epoch toward
  the empirical variance of ``F_l - F_s`` over hypotheses: ``Sigma <- Sigma + rate (var - Sigma)``.
* cycle mask ``m_l(p) = 1 - sigmoid(a (d_l(p) - b))``, ``d`` the forward-backward error of each
  hypothesis, min-max normalised over the hypotheses of the pair.
* CAL = ``lambda2 sum m W |F_l - F_s|^2 / sum(m W) + lambda3 smoothness + k KL(N(0, Sigma) || N(0, var))``.

Grids are ``(B, 2, h, w)`` in grid units; hypotheses are stacked first: ``(L, B, 2, h, w)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.geometry import identity_grid, sample_grid_at


def flow_smoothness(grid: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Mean absolute central difference of the flow ``grid - identity`` (SFNet's smoothness)."""
    flow = grid - identity_grid(1, *grid.shape[-2:], device=grid.device, dtype=grid.dtype, align_corners=align_corners)
    dx = (F.pad(flow, (1, 1, 0, 0))[..., :, 2:] - F.pad(flow, (1, 1, 0, 0))[..., :, :-2]) / 2
    dy = (F.pad(flow, (0, 0, 1, 1))[..., 2:, :] - F.pad(flow, (0, 0, 1, 1))[..., :-2, :]) / 2
    return (dx.abs().mean() + dy.abs().mean()) / 2


def masked_grid_loss(predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean end-point error ``|predicted - target|`` (grid units) over valid cells ``(B, h, w)``."""
    error = (predicted - target).norm(dim=1)
    if valid is None:
        return error.mean()
    valid = valid.to(error.dtype)
    return (error * valid).sum() / valid.sum().clamp_min(1.0)


def psr_weights(hypotheses: torch.Tensor, student: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``W_l(p)`` ``(L, B, h, w)`` from hypotheses ``(L, B, 2, h, w)``, student ``(B, 2, h, w)``
    and the prior ``Sigma`` ``(B, 2, h, w)`` (one value per flow component)."""
    squared = (hypotheses - student[None]) ** 2 / (2 * prior[None] ** 2)
    return torch.exp(-squared.sum(dim=2))


def empirical_variance(hypotheses: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Variance over hypotheses of ``F_l - F_s``: ``(B, 2, h, w)`` (biased, as a mean of squares)."""
    return ((hypotheses - student[None]) ** 2).mean(dim=0)


def update_prior(prior: torch.Tensor, variance: torch.Tensor, rate: float = 0.01) -> torch.Tensor:
    """One epoch's PSR prior update ``Sigma + rate (var - Sigma)``."""
    return prior + rate * (variance - prior)


def cycle_errors(hypotheses_src_to_trg: torch.Tensor, hypotheses_trg_to_src: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Forward-backward error ``(L, B, h, w)`` (grid units) of each hypothesis."""
    num, batch, _, height, width = hypotheses_src_to_trg.shape
    forward = hypotheses_src_to_trg.reshape(num * batch, 2, height, width)
    backward = hypotheses_trg_to_src.reshape(num * batch, 2, *hypotheses_trg_to_src.shape[-2:])
    points = forward.flatten(2).transpose(1, 2)  # (LB, hw, 2)
    returned = sample_grid_at(backward, points).transpose(1, 2).reshape(num * batch, 2, height, width)
    start = identity_grid(1, height, width, device=forward.device, dtype=forward.dtype, align_corners=align_corners)
    return (returned - start).norm(dim=1).reshape(num, batch, height, width)


def cycle_mask(errors: torch.Tensor, sharpness: float = 50.0, offset: float = 0.08) -> torch.Tensor:
    """``1 - sigmoid(a (d - b))`` with ``d`` min-max normalised over all hypotheses and pixels of each pair.

    Args:
        errors: ``(L, B, h, w)`` forward-backward errors.
    """
    per_pair = errors.transpose(0, 1).flatten(1)  # (B, L*h*w)
    low = per_pair.min(dim=1).values.view(1, -1, 1, 1)
    high = per_pair.max(dim=1).values.view(1, -1, 1, 1)
    normalised = (errors - low) / (high - low).clamp_min(1e-12)
    return 1.0 - torch.sigmoid(sharpness * (normalised - offset))


def variance_kl(prior: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(N(0, Sigma) || N(0, var))`` per element: ``0.5 (r - 1 - log r)``, ``r = Sigma / var``."""
    ratio = (prior + 1e-6) / (variance + 1e-6)
    return (0.5 * (ratio - 1.0 - torch.log(ratio))).mean()


def confidence_aware_loss(
    hypotheses: torch.Tensor,
    student: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    smoothness: torch.Tensor,
    prior: torch.Tensor,
    variance: torch.Tensor,
    distillation_weight: float = 16.0,
    smoothness_weight: float = 0.5,
    variance_kl_weight: float = 0.01,
) -> dict[str, torch.Tensor]:
    """CAL: the PSR- and cycle-weighted distillation term plus smoothness and the prior's KL.

    Args:
        hypotheses: ``(L, B, 2, h, w)`` teacher grids (no gradient needed).
        student: ``(B, 2, h, w)`` student grid (receives the gradient).
        weights, mask: ``(L, B, h, w)`` PSR weights and cycle mask (treated as constants).
        smoothness: scalar smoothness of the student's field.
        prior, variance: ``(B, 2, h, w)`` PSR prior and empirical variance.

    Returns:
        ``{"loss", "objective", "distillation", "smoothness", "variance_kl"}``; ``objective`` is the
        part with a gradient (the KL term is a constant for the student: prior and variance are
        not functions of its weights).
    """
    confidence = (weights * mask).detach()
    squared = ((hypotheses.detach() - student[None]) ** 2).sum(dim=2)
    distillation = (confidence * squared).sum() / confidence.sum().clamp_min(1e-6)
    kl = variance_kl(prior, variance.detach())
    objective = distillation_weight * distillation + smoothness_weight * smoothness
    return {"loss": objective + variance_kl_weight * kl, "objective": objective.detach(),
            "distillation": distillation, "smoothness": smoothness, "variance_kl": kl}


def keypoint_flow_loss(grid_trg_to_src: torch.Tensor, source_keypoints: torch.Tensor, target_keypoints: torch.Tensor,
                       keypoint_mask: torch.Tensor | None, source_size, target_size) -> torch.Tensor:
    """Sparse keypoint-flow loss: the field ``(B, 2, h_t, w_t)`` read at the target keypoints ``(B, N, 2)``
    (model pixels) should give the source keypoints; mean end-point error in grid units over ``keypoint_mask``."""
    from ..ops.geometry import pixels_to_grid

    target_points = pixels_to_grid(target_keypoints.to(grid_trg_to_src.dtype), target_size)
    predicted = sample_grid_at(grid_trg_to_src, target_points)
    truth = pixels_to_grid(source_keypoints.to(grid_trg_to_src.dtype), source_size)
    error = (predicted - truth).norm(dim=-1)
    if keypoint_mask is None:
        return error.mean()
    mask = keypoint_mask.to(error.dtype)
    return (error * mask).sum() / mask.sum().clamp_min(1.0)

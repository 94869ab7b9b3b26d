"""The measuring side of the pseudo-label checks: the truth of pairs of two warps (composed through the photo)."""

from __future__ import annotations

import math

import torch

from semcorr.evaluation.pseudo_labels import _compose_through_photo, spearman
from semcorr.modeling.ops.geometry import grid_axes
from semcorr.training.data.synthetic import affine_grid_trg_to_src


def _affine(angle: float, scale: float, shift: tuple[float, float]) -> torch.Tensor:
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return torch.tensor([[[c, -s, shift[0]], [s, c, shift[1]]]])


def test_two_warps_compose_through_the_photo_to_the_analytic_map():
    """Warp 1 samples the photo at ``A1 x`` (its grid_trg_to_src); warp 2 sends a photo point ``p`` to
    ``A2^-1 p``. A pixel ``x`` of warp 1 therefore lands at ``A2^-1 A1 x`` in warp 2."""
    size = (24, 32)
    first_theta, second_theta = _affine(0.2, 0.9, (0.05, -0.1)), _affine(-0.15, 1.1, (-0.08, 0.04))
    second_inverse = torch.linalg.inv(torch.cat([second_theta[0], torch.tensor([[0.0, 0.0, 1.0]])]))[:2][None]
    first = {"grid_trg_to_src": affine_grid_trg_to_src(first_theta, size), "valid_trg": torch.ones(1, *size, dtype=torch.bool)}
    second = {"grid_src_to_trg": affine_grid_trg_to_src(second_inverse, size), "valid_src": torch.ones(1, *size, dtype=torch.bool)}
    landed, valid = _compose_through_photo(first, second)

    xs, ys = grid_axes(*size)
    pixels = torch.stack([xs[None, :].expand(size[0], -1), ys[:, None].expand(-1, size[1]), torch.ones(size)], dim=0)
    a1 = torch.cat([first_theta[0], torch.tensor([[0.0, 0.0, 1.0]])])
    expected = (second_inverse[0] @ a1 @ pixels.flatten(1)).view(2, *size)
    inside = valid[0] & (first["grid_trg_to_src"][0].abs() < 1 - 2 / min(size)).all(0)  # bilinear reads stay inside
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(landed[0][:, inside], expected[:, inside], atol=1e-4, rtol=0)


def test_a_photo_point_outside_the_second_warp_is_not_counted():
    size = (16, 16)
    first = {"grid_trg_to_src": affine_grid_trg_to_src(_affine(0.0, 1.0, (0.0, 0.0)), size),
             "valid_trg": torch.ones(1, *size, dtype=torch.bool)}
    valid_src = torch.ones(1, *size, dtype=torch.bool)
    valid_src[:, :, :8] = False  # the left half of the photo leaves the second warp
    second = {"grid_src_to_trg": affine_grid_trg_to_src(_affine(0.0, 1.0, (0.0, 0.0)), size), "valid_src": valid_src}
    _, valid = _compose_through_photo(first, second)
    assert not valid[0, :, :7].any() and valid[0, :, 9:].all()


def test_spearman_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0

"""Cascaded MIL layers: 4D window attention over a matching volume and gated cross attention (MVAM).

Exact inverses for the 4D rearrangements, a hand-worked relative position index and gate, a
brute-force check of which tokens a (shifted) window block lets interact, the zero-initialised
identity of the untrained modules, gradients, odd shapes and a small learning check.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from semcorr.modeling.cascaded_mil.gated_attention import (
    GatedCrossAttention,
    MatchingVolumeAggregation,
    token_gates,
)
from semcorr.modeling.cascaded_mil.volume_attention import (
    MASK_VALUE,
    Swin4DBlock,
    VolumeAggregator,
    crop4d,
    cyclic_shift4d,
    fold4d,
    pad4d,
    relative_position_index4d,
    shifted_window_mask4d,
    unfold4d,
    window_partition4d,
    window_reverse4d,
)
from semcorr.modeling.ops import dense_cosine_correlation

TINY_AGGREGATOR = dict(embed_dim=16, depth=2, num_heads=2, window=2, fold=2)
TINY_MVAM = dict(embed_dim=16, depth=2, volume_heads=2, window=2, fold=2)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: one thread avoids thread contention on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturb_zero_init(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every all-zero parameter (the zero-initialised projections) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


# -- fold, windows, shift ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape, factor", [((2, 1, 4, 6, 2, 8), 2), ((1, 3, 6, 3, 9, 3), 3), ((2, 2, 3, 5, 4, 2), 1)])
def test_fold4d_and_unfold4d_are_exact_inverses(shape, factor):
    volume = torch.randn(shape)
    folded = fold4d(volume, factor)
    assert folded.shape == (shape[0], shape[1] * factor**4, *(d // factor for d in shape[2:]))
    assert torch.equal(unfold4d(folded, factor), volume)
    assert torch.equal(fold4d(unfold4d(folded, factor), factor), folded)


def test_fold4d_channel_layout():
    """Channel ``((((c f + o1) f + o2) f + o3) f + o4)`` holds the cell at block offset ``o``."""
    f = 2
    volume = torch.randn(2, 3, 4, 2, 6, 4)
    folded = fold4d(volume, f)
    for c, o1, o2, o3, o4 in itertools.product(range(3), range(f), range(f), range(f), range(f)):
        channel = (((c * f + o1) * f + o2) * f + o3) * f + o4
        assert torch.equal(folded[:, channel], volume[:, c, o1::f, o2::f, o3::f, o4::f])


def test_fold4d_rejects_indivisible_sides():
    with pytest.raises(ValueError, match="multiple of 2"):
        fold4d(torch.zeros(1, 1, 4, 3, 4, 4), 2)


def test_pad4d_pads_to_multiples_and_crop4d_undoes_it():
    volume = torch.randn(2, 1, 3, 5, 8, 1)
    padded = pad4d(volume, 4)
    assert padded.shape == (2, 1, 4, 8, 8, 4)
    assert torch.equal(crop4d(padded, (3, 5, 8, 1)), volume)
    expected = torch.zeros(2, 1, 4, 8, 8, 4)
    expected[..., :3, :5, :8, :1] = volume  # zeros at the end of each axis
    assert torch.equal(padded, expected)
    assert pad4d(padded, 4) is padded


@pytest.mark.parametrize("dims, window", [((4, 6, 2, 8), 2), ((3, 6, 9, 3), 3), ((4, 4, 4, 4), 4)])
def test_window_partition4d_and_reverse_are_exact_inverses(dims, window):
    x = torch.randn(2, *dims, 5)
    windows = window_partition4d(x, window)
    num_windows = torch.tensor(dims).div(window, rounding_mode="floor").prod().item()
    assert windows.shape == (2 * num_windows, window**4, 5)
    assert torch.equal(window_reverse4d(windows, window, dims), x)


def test_window_partition4d_layout():
    """Window ``k`` of image ``b`` is ``b * nW + k`` (row-major window grid), tokens row-major inside."""
    dims, w = (4, 2, 6, 4), 2
    x = torch.randn(2, *dims, 3)
    windows = window_partition4d(x, w)
    grid = [d // w for d in dims]
    num_windows = grid[0] * grid[1] * grid[2] * grid[3]
    for b, (k1, k2, k3, k4) in itertools.product(range(2), itertools.product(*map(range, grid))):
        k = ((k1 * grid[1] + k2) * grid[2] + k3) * grid[3] + k4
        expected = x[b, k1 * w:(k1 + 1) * w, k2 * w:(k2 + 1) * w, k3 * w:(k3 + 1) * w, k4 * w:(k4 + 1) * w]
        assert torch.equal(windows[b * num_windows + k], expected.reshape(w**4, 3))


@pytest.mark.parametrize("shift", [1, 2, (0, 1, 3, 2)])
def test_cyclic_shift4d_inverse_is_the_negative_shift(shift):
    x = torch.randn(2, 4, 6, 4, 8, 3)
    shifted = cyclic_shift4d(x, shift)
    s = (shift,) * 4 if isinstance(shift, int) else shift
    assert torch.equal(shifted[:, 0, 0, 0, 0], x[:, s[0], s[1], s[2], s[3]])  # index `shift` moves to 0
    negative = -shift if isinstance(shift, int) else tuple(-v for v in shift)
    assert torch.equal(cyclic_shift4d(shifted, negative), x)


# -- relative position index ------------------------------------------------------------------------
def test_relative_position_index4d_by_hand_for_a_2x2x2x2_window():
    """Digits ``query - key + 1`` in base 3, row-major: tokens ``0 = (0,0,0,0)``, ``5 = (0,1,0,1)``,
    ``10 = (1,0,1,0)``, ``15 = (1,1,1,1)``."""
    index = relative_position_index4d(2)
    assert index.shape == (16, 16) and index.dtype == torch.long
    assert index[0, 15] == 0  # offsets (-1,-1,-1,-1) -> digits (0,0,0,0)
    assert index[15, 0] == 80  # (1,1,1,1) -> (2,2,2,2) = 2*27 + 2*9 + 2*3 + 2
    assert index[5, 10] == 20  # (-1,1,-1,1) -> (0,2,0,2) = 2*9 + 2
    assert index[10, 5] == 60  # (1,-1,1,-1) -> (2,0,2,0) = 2*27 + 2*3
    assert index[1, 0] == 41  # (0,0,0,1) -> (1,1,1,2) = 27 + 9 + 3 + 2
    assert index[0, 8] == 13  # (-1,0,0,0) -> (0,1,1,1) = 9 + 3 + 1
    assert torch.equal(index.diagonal(), torch.full((16,), 40))  # (0,0,0,0) -> (1,1,1,1)
    assert index.min() >= 0 and index.max() < 3**4
    assert len(index.unique()) == 3**4  # every offset occurs


def test_relative_position_index4d_matches_brute_force_for_window_3():
    window = 3
    coords = list(itertools.product(range(window), repeat=4))
    expected = torch.tensor([
        [sum((q[a] - k[a] + window - 1) * (2 * window - 1) ** (3 - a) for a in range(4)) for k in coords]
        for q in coords
    ])
    assert torch.equal(relative_position_index4d(window), expected)


# -- shifted windows ---------------------------------------------------------------------------------
def test_shifted_window_mask4d_shape_and_values():
    mask = shifted_window_mask4d((4, 4, 6, 4), 2, 1)
    assert mask.shape == (2 * 2 * 3 * 2, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, MASK_VALUE}
    assert torch.equal(mask, mask.transpose(1, 2)) and not mask.diagonal(dim1=1, dim2=2).any()
    assert not mask[0].any()  # the first window has not wrapped round
    assert not shifted_window_mask4d((4, 4, 6, 4), 2, 0).any()


def _segment(position: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """The block a shifted-window layer confines a position to, in the unrolled map.

    Window boundaries sit at ``shift + k w``; the part before ``shift`` (segment -1) and the
    wrapped last window are separate, which is what the roll plus the mask must reproduce.
    """
    return torch.div(position - shift, window, rounding_mode="floor")


@pytest.mark.parametrize("dims, window, shift", [
    ((4, 4, 6, 4), 2, 0),
    ((4, 4, 6, 4), 2, 1),
    ((2, 4, 4, 6), 2, 1),  # the first axis is one window: not shifted
    ((6, 3, 6, 6), 3, 1),
])
def test_window_block_mixes_only_tokens_of_one_region(dims, window, shift):
    """Perturb one token at a time; an output changes iff it shares the brute-force region."""
    torch.manual_seed(0)
    block = Swin4DBlock(dim=8, window=window, num_heads=2, shift=shift).double()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()  # no near-uniform attention
    x = torch.randn(1, *dims, 8, dtype=torch.float64)
    positions = torch.stack(torch.meshgrid(*(torch.arange(d) for d in dims), indexing="ij"), -1).reshape(-1, 4)
    chosen = torch.randperm(len(positions))[:48]
    perturbed = x.repeat(len(chosen), 1, 1, 1, 1, 1)
    # a random direction: a constant one would vanish in the LayerNorm
    perturbed.view(len(chosen), -1, 8)[torch.arange(len(chosen)), chosen] += torch.randn(len(chosen), 8, dtype=x.dtype)
    with torch.no_grad():
        changed = (block(perturbed) != block(x)).any(-1).reshape(len(chosen), -1)  # (perturbations, tokens)

    axis_shifts = torch.tensor([shift if d > window else 0 for d in dims])
    segments = _segment(positions, window, axis_shifts)  # (tokens, 4)
    same_region = (segments[chosen][:, None] == segments[None]).all(-1)
    assert torch.equal(changed, same_region)


# -- aggregator --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 4, 4, 4), (1, 3, 5, 6, 2), (2, 1, 1, 1, 1), (1, 9, 4, 3, 7)])
def test_untrained_volume_aggregator_is_the_identity(shape):
    torch.manual_seed(0)
    aggregator = VolumeAggregator(**TINY_AGGREGATOR)
    volume = torch.randn(shape)
    assert torch.equal(aggregator(volume), volume)
    _perturb_zero_init(aggregator)
    refined = aggregator(volume)
    assert refined.shape == volume.shape and not torch.allclose(refined, volume)


def test_volume_aggregator_default_vat_window_on_a_small_volume():
    """Window 4 (256 tokens, VAT's) and fold 2 on sides smaller than ``f w = 8``."""
    torch.manual_seed(0)
    aggregator = VolumeAggregator(embed_dim=8, depth=2, num_heads=2, window=4, fold=2)
    _perturb_zero_init(aggregator)
    volume = torch.randn(1, 5, 3, 6, 4)
    assert aggregator(volume).shape == volume.shape


def test_volume_aggregator_gradients_reach_every_parameter():
    torch.manual_seed(0)
    aggregator = VolumeAggregator(**TINY_AGGREGATOR)
    volume = torch.randn(2, 3, 5, 4, 6, requires_grad=True)
    aggregator(volume).square().sum().backward()
    assert aggregator.project.weight.grad.abs().sum() > 0  # the zero layer itself learns at once
    aggregator.zero_grad()
    _perturb_zero_init(aggregator)
    aggregator(volume).square().sum().backward()
    for name, parameter in aggregator.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert volume.grad.abs().sum() > 0


def test_volume_aggregator_learns_to_sharpen_a_noisy_volume():
    """Target: the one-hot volume of a known assignment; input: that plus Gaussian noise (σ 0.3).

    The identity's loss is σ² ≈ 0.09; 100 Adam steps bring the mean loss of the last 10 steps
    below half of the first step's (about a third in practice).
    """
    torch.manual_seed(0)
    h_s, w_s, h_t, w_t = 6, 5, 4, 6  # h_s != h_t, sides not multiples of f w = 4
    assignment = torch.randint(h_t * w_t, (h_s * w_s,))  # the target cell of every source cell
    clean = F.one_hot(assignment, h_t * w_t).float().view(1, h_s, w_s, h_t, w_t).expand(2, -1, -1, -1, -1)
    aggregator = VolumeAggregator(**TINY_AGGREGATOR)
    optimizer = torch.optim.Adam(aggregator.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        noisy = clean + 0.3 * torch.randn(clean.shape, generator=generator)
        loss = F.mse_loss(aggregator(noisy), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], (losses[0], losses[-10:])


# -- gated cross attention and the MVAM -------------------------------------------------------------
def test_token_gates_by_hand():
    """tokens (1, 0) and (1, -2.5) against the other image's global token (2, 2), C = 2:
    inner products 2 and -3, scaled by 1/√2."""
    tokens = torch.tensor([[[1.0, 0.0], [1.0, -2.5]]])
    other_global = torch.tensor([[2.0, 2.0]])
    scaled = token_gates(tokens, other_global)
    assert scaled.shape == (1, 2)
    assert scaled[0].tolist() == pytest.approx([0.8044296825, 0.1070418015], abs=1e-6)  # σ(√2), σ(-3/√2)
    unscaled = token_gates(tokens, other_global, scale_by_sqrt_dim=False)
    assert unscaled[0].tolist() == pytest.approx([0.8807970780, 0.0474258732], abs=1e-6)  # σ(2), σ(-3)


def test_gated_cross_attention_untrained_is_the_gated_input():
    torch.manual_seed(0)
    attention = GatedCrossAttention(dim=8, num_heads=2)
    source, target = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    source_global, target_global = source.mean(1), target.mean(1)
    refined_source, refined_target, source_gates, target_gates = attention(source, target, source_global, target_global)
    assert torch.equal(source_gates, token_gates(source, target_global))
    assert torch.equal(target_gates, token_gates(target, source_global))
    assert torch.allclose(refined_source, source * source_gates[..., None], atol=1e-6)
    assert torch.allclose(refined_target, target * target_gates[..., None], atol=1e-6)


def _mvam_inputs(seed=0, batch=2, dim=16, source_shape=(3, 5), target_shape=(4, 3)):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, source_shape[0] * source_shape[1], dim, generator=generator)
    target = torch.randn(batch, target_shape[0] * target_shape[1], dim, generator=generator)
    return source, target, source.mean(1), target.mean(1), source_shape, target_shape


def _backbone_cosine(source, target, source_shape, target_shape):
    batch, _, dim = source.shape
    source_map = source.transpose(1, 2).reshape(batch, dim, *source_shape)
    return dense_cosine_correlation(source_map, target.transpose(1, 2).reshape(batch, dim, *target_shape))


def test_untrained_mvam_returns_the_backbone_cosine_volume():
    torch.manual_seed(0)
    mvam = MatchingVolumeAggregation(16, 4, **TINY_MVAM)
    inputs = _mvam_inputs()
    output = mvam(*inputs)
    assert output["raw"].shape == output["refined"].shape == (2, 15, 12)
    assert output["source_gates"].shape == (2, 15) and output["target_gates"].shape == (2, 12)
    assert torch.equal(output["refined"], output["raw"])
    # the query-side gate cancels in the cosine and the attention output starts at zero
    backbone = _backbone_cosine(inputs[0], inputs[1], inputs[4], inputs[5])
    assert torch.allclose(output["raw"], backbone, atol=1e-6)

    _perturb_zero_init(mvam)
    perturbed = mvam(*inputs)
    assert not torch.allclose(perturbed["refined"], perturbed["raw"])
    assert not torch.allclose(perturbed["raw"], backbone, atol=1e-3)


def test_mvam_gates_act_through_the_other_directions_keys():
    """Changing the target's global token changes only the source gates; through them (as keys
    and values of the target's attention) the volume changes once the attention is trained."""
    torch.manual_seed(0)
    mvam = MatchingVolumeAggregation(16, 4, **TINY_MVAM)
    _perturb_zero_init(mvam)
    source, target, source_global, target_global, source_shape, target_shape = _mvam_inputs()
    first = mvam(source, target, source_global, target_global, source_shape, target_shape)
    second = mvam(source, target, source_global, -target_global, source_shape, target_shape)
    assert torch.equal(first["target_gates"], second["target_gates"])
    assert not torch.allclose(first["source_gates"], second["source_gates"])
    assert not torch.allclose(first["raw"], second["raw"])


def test_mvam_gradients_reach_every_parameter_and_input():
    torch.manual_seed(0)
    mvam = MatchingVolumeAggregation(16, 4, **TINY_MVAM)
    _perturb_zero_init(mvam)
    source, target, source_global, target_global, source_shape, target_shape = _mvam_inputs(
        source_shape=(5, 3), target_shape=(2, 7)
    )
    tensors = [t.requires_grad_() for t in (source, target, source_global, target_global)]
    output = mvam(*tensors, source_shape, target_shape)
    assert output["refined"].shape == (2, 15, 14)
    output["refined"].square().sum().backward()
    for name, parameter in mvam.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for tensor in tensors:
        assert tensor.grad.abs().sum() > 0


def test_mvam_rejects_shapes_that_do_not_match_the_tokens():
    mvam = MatchingVolumeAggregation(16, 4, **TINY_MVAM)
    source, target, source_global, target_global, _, target_shape = _mvam_inputs()
    with pytest.raises(ValueError, match="do not match"):
        mvam(source, target, source_global, target_global, (4, 4), target_shape)

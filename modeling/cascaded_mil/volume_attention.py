"""4D shifted-window attention over a matching volume: the aggregation half of a MVAM.

Huang et al. (ICCV 2023) refine the cosine volume ``v_r (h_s x w_s x h_t x w_t)`` of every stage
with 4D window self-attention, following the volumetric aggregation transformer of VAT (Hong et
al., ECCV 2022), which carries Swin (Liu et al., ICCV 2021) from 2D to 4D:

1. **fold**: a 4D space-to-channel rearrangement by ``f`` on all four axes (``f⁴`` cells become
   the channels of one token), so attention runs at ``1/f⁴`` of the cells;
2. **embed**: a linear layer on the folded channels (a 4D convolution with kernel = stride = ``f``);
3. **Swin blocks** over non-overlapping 4D windows of ``w⁴`` tokens, every other block on windows
   shifted by ``w/2`` (a cyclic roll of the four axes plus a mask so a window never mixes tokens
   that were far apart before the roll), with a learned 4D relative position bias;
4. **project and unfold**: a linear layer back to ``f⁴`` channels and the exact inverse of the fold
   (channel redistribution), added to the input volume.

Shapes: 4D maps are channels-first ``(B, C, D1, D2, D3, D4)`` around the fold and channels-last
``(B, D1, D2, D3, D4, C)`` inside the blocks (where ``nn.Linear`` and ``nn.LayerNorm`` act on the
last axis). Windows and tokens are ordered row-major over ``(D1, D2, D3, D4)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

#: additive attention mask between tokens of different shifted-window regions: ``exp`` of it
#: underflows to exactly 0 in float32/float64 and it stays finite in float16/bfloat16.
MASK_VALUE = -1.0e4

Shift = int | tuple[int, int, int, int]


def _as_4tuple(value: Shift) -> tuple[int, int, int, int]:
    return (value,) * 4 if isinstance(value, int) else tuple(value)


def _check_divisible(dims, multiple: int, what: str) -> None:
    if any(d % multiple for d in dims):
        raise ValueError(f"{what}: every side of {tuple(dims)} must be a multiple of {multiple}")


# -- fold / unfold -----------------------------------------------------------------------------------
def fold4d(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """4D space-to-channel: every ``f⁴`` block of cells becomes the channels of one cell.

    Args:
        volume: ``(B, C, D1, D2, D3, D4)``, every ``D_i`` a multiple of ``factor``.
        factor: ``f``.

    Returns:
        ``(B, C·f⁴, D1/f, D2/f, D3/f, D4/f)``; channel ``((((c·f + o1)·f + o2)·f + o3)·f + o4)``
        holds the cell at offset ``(o1, o2, o3, o4)`` inside its block.
    """
    batch, channels, *dims = volume.shape
    _check_divisible(dims, factor, "fold4d")
    reduced = [d // factor for d in dims]
    blocks = volume.reshape(batch, channels, reduced[0], factor, reduced[1], factor,
                            reduced[2], factor, reduced[3], factor)
    # (B, C, o1, o2, o3, o4, n1, n2, n3, n4): the offsets join the channels
    return blocks.permute(0, 1, 3, 5, 7, 9, 2, 4, 6, 8).reshape(batch, channels * factor**4, *reduced)


def unfold4d(folded: torch.Tensor, factor: int) -> torch.Tensor:
    """Channel redistribution, the exact inverse of :func:`fold4d`.

    Args:
        folded: ``(B, C·f⁴, n1, n2, n3, n4)``.
        factor: ``f``.

    Returns:
        ``(B, C, n1·f, n2·f, n3·f, n4·f)``.
    """
    batch, folded_channels, *reduced = folded.shape
    if folded_channels % factor**4:
        raise ValueError(f"unfold4d: {folded_channels} channels is not a multiple of {factor}⁴")
    channels = folded_channels // factor**4
    blocks = folded.reshape(batch, channels, factor, factor, factor, factor, *reduced)
    # (B, C, n1, o1, n2, o2, n3, o3, n4, o4)
    blocks = blocks.permute(0, 1, 6, 2, 7, 3, 8, 4, 9, 5)
    return blocks.reshape(batch, channels, *(n * factor for n in reduced))


def pad4d(volume: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the end of each of the last four axes up to a multiple of ``multiple``.

    Used before folding by ``f`` and partitioning into windows of ``w``: ``multiple = f·w``. The
    padded cells are zero similarities; they take part in attention like any other token (as in
    Video Swin's padding, Liu et al., CVPR 2022, which does not mask them either) and are cut off
    again by :func:`crop4d`. A volume side smaller than ``f·w`` is padded to one whole window.

    Args:
        volume: ``(..., D1, D2, D3, D4)``.
        multiple: the side every axis is padded to a multiple of.

    Returns:
        ``(..., ⌈D1/m⌉·m, ⌈D2/m⌉·m, ⌈D3/m⌉·m, ⌈D4/m⌉·m)``.
    """
    pad = []
    for side in reversed(volume.shape[-4:]):  # F.pad lists the last axis first
        pad += [0, -side % multiple]
    return F.pad(volume, pad) if any(pad) else volume


def crop4d(volume: torch.Tensor, dims: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`pad4d`: ``(..., P1, P2, P3, P4) -> (..., D1, D2, D3, D4)``."""
    d1, d2, d3, d4 = dims
    return volume[..., :d1, :d2, :d3, :d4]


# -- windows ----------------------------------------------------------------------------------------
def window_partition4d(x: torch.Tensor, window: int) -> torch.Tensor:
    """Cut a channels-last 4D map into non-overlapping ``window⁴`` windows.

    Args:
        x: ``(B, D1, D2, D3, D4, C)``, every ``D_i`` a multiple of ``window``.
        window: ``w``.

    Returns:
        ``(B·nW, w⁴, C)`` with ``nW = ∏ D_i / w``; windows batch-major, then row-major over the
        window grid; tokens row-major inside a window.
    """
    batch, *dims, channels = x.shape
    _check_divisible(dims, window, "window_partition4d")
    n1, n2, n3, n4 = (d // window for d in dims)
    cells = x.reshape(batch, n1, window, n2, window, n3, window, n4, window, channels)
    # (B, n1, n2, n3, n4, w, w, w, w, C)
    return cells.permute(0, 1, 3, 5, 7, 2, 4, 6, 8, 9).reshape(-1, window**4, channels)


def window_reverse4d(windows: torch.Tensor, window: int, dims: tuple[int, int, int, int]) -> torch.Tensor:
    """Exact inverse of :func:`window_partition4d`.

    Args:
        windows: ``(B·nW, w⁴, C)``.
        window: ``w``.
        dims: ``(D1, D2, D3, D4)`` of the map the windows were cut from.

    Returns:
        ``(B, D1, D2, D3, D4, C)``.
    """
    channels = windows.shape[-1]
    n1, n2, n3, n4 = (d // window for d in dims)
    cells = windows.reshape(-1, n1, n2, n3, n4, window, window, window, window, channels)
    # (B, n1, w, n2, w, n3, w, n4, w, C)
    return cells.permute(0, 1, 5, 2, 6, 3, 7, 4, 8, 9).reshape(-1, *dims, channels)


def cyclic_shift4d(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    """Roll a channels-last 4D map so the cell at index ``shift`` moves to index 0 on every axis.

    Swin's direction (``torch.roll`` by ``-shift``); ``cyclic_shift4d(x, -shift)`` undoes it.

    Args:
        x: ``(B, D1, D2, D3, D4, C)``.
        shift: one shift for all four axes or one per axis.

    Returns:
        ``(B, D1, D2, D3, D4, C)``.
    """
    return torch.roll(x, shifts=tuple(-s for s in _as_4tuple(shift)), dims=(1, 2, 3, 4))


@functools.lru_cache(maxsize=16)
def _cached_relative_position_index(window: int, device: str) -> torch.Tensor:
    return relative_position_index4d(window).to(device)


def relative_position_index4d(window: int) -> torch.Tensor:
    """Index of every (query, key) token pair of a ``window⁴`` window into the bias table.

    The offset ``query - key`` along each axis lies in ``[-(w-1), w-1]``; shifted by ``w-1`` it is
    a digit in base ``2w-1``, and the four digits read row-major give the index.

    Args:
        window: ``w``.

    Returns:
        ``(w⁴, w⁴)`` long, values in ``[0, (2w-1)⁴)``.
    """
    axis = torch.arange(window)
    coords = torch.stack(torch.meshgrid(axis, axis, axis, axis, indexing="ij")).flatten(1)  # (4, w⁴)
    offsets = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (4, w⁴, w⁴) in [0, 2w-2]
    radix = 2 * window - 1
    place = torch.tensor([radix**3, radix**2, radix, 1])
    return (offsets * place[:, None, None]).sum(0)


def _region_labels(side: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Region of every index of one rolled axis: ``(side,)`` long in ``{0, 1, 2}``.

    After the roll the last window holds indices ``[side-w, side-shift)``, which came from the end
    of the map, and ``[side-shift, side)``, which wrapped round from its start: two regions that
    must not attend to each other. The other windows are region 0.
    """
    index = torch.arange(side, device=device)
    return (index >= side - window).long() + (index >= side - shift).long()


def shifted_window_mask4d(dims: tuple[int, int, int, int], window: int, shift: Shift,
                          dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Additive attention mask of the windows of a map rolled by :func:`cyclic_shift4d`.

    Two tokens of one window may attend to each other only when they come from the same region
    of the map before the roll: per axis three regions (Swin's slices), combined over the four
    axes into ``3⁴`` labels.

    Args:
        dims: ``(D1, D2, D3, D4)``, multiples of ``window``.
        window: ``w``.
        shift: one shift or one per axis, each in ``[0, w)``.
        dtype, device: of the mask.

    Returns:
        ``(nW, w⁴, w⁴)``: 0 within a region, :data:`MASK_VALUE` across regions.
    """
    shifts = _as_4tuple(shift)
    if not all(0 <= s < window for s in shifts):
        raise ValueError(f"shift {shifts} must lie in [0, {window})")
    labels = torch.zeros((), dtype=torch.long, device=device)
    for side, axis_shift in zip(dims, shifts):  # row-major base-3 label over the four axes
        labels = labels[..., None] * 3 + _region_labels(side, window, axis_shift, device)
    windows = window_partition4d(labels[None, ..., None], window)[..., 0]  # (nW, w⁴)
    different = windows[:, :, None] != windows[:, None, :]
    return torch.where(different, MASK_VALUE, 0.0).to(dtype)


# -- modules ---------------------------------------------------------------------------------------
class WindowAttention4D(nn.Module):
    """Multi-head self-attention inside 4D windows with a learned 4D relative position bias.

    The bias table has ``(2w-1)⁴`` rows (one per relative offset) and one column per head,
    initialised as Swin's (truncated normal, std 0.02).
    """

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.window = window
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 4, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """``(heads, w⁴, w⁴)`` bias added to the attention logits."""
        tokens = self.window**4
        # Derived from ``window``: computed (once per window and device), never a buffer -- a non-persistent
        # buffer would come back uninitialised from ``from_pretrained``, which builds on the meta device.
        index = _cached_relative_position_index(self.window, str(self.relative_position_bias_table.device))
        bias = self.relative_position_bias_table[index.view(-1)]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            windows: ``(B·nW, N, C)`` with ``N = w⁴``, batch-major as :func:`window_partition4d`.
            mask: ``(nW, N, N)`` additive mask (:func:`shifted_window_mask4d`) or None.

        Returns:
            ``(B·nW, N, C)``.
        """
        num_windows = 1 if mask is None else mask.shape[0]
        batch_windows, tokens, channels = windows.shape
        qkv = self.qkv(windows).view(-1, num_windows, tokens, 3, self.num_heads, channels // self.num_heads)
        query, key, value = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, C/heads)
        bias = self.relative_position_bias()  # (heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, heads, N, N), broadcast over the batch
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype))
        return self.proj(attended.transpose(-3, -2).reshape(batch_windows, tokens, channels))


class Swin4DBlock(nn.Module):
    """Pre-norm Swin block on a channels-last 4D map: ``x + W-MSA(LN(x))``, then ``x + MLP(LN(x))``.

    With ``shift > 0`` the windows are shifted by ``shift`` (cyclic roll and mask). An axis that
    holds a single window is not shifted (the roll would only split that window in two): Swin's
    rule for a map that fits in one window, applied per axis.
    """

    def __init__(self, dim: int, window: int, num_heads: int, shift: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must lie in [0, {window})")
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention4D(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def axis_shifts(self, dims: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """The shift along each axis of a map of ``dims``: 0 where the axis is one window."""
        return tuple(self.shift if side > self.window else 0 for side in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D1, D2, D3, D4, C) -> (B, D1, D2, D3, D4, C)``, every ``D_i`` a multiple of ``window``."""
        dims = tuple(x.shape[1:5])
        shifts = self.axis_shifts(dims)
        mask = None
        if any(shifts):
            mask = shifted_window_mask4d(dims, self.window, shifts, dtype=x.dtype, device=x.device)
        rolled = cyclic_shift4d(self.norm1(x), shifts)
        attended = self.attn(window_partition4d(rolled, self.window), mask)
        x = x + cyclic_shift4d(window_reverse4d(attended, self.window, dims), tuple(-s for s in shifts))
        return x + self.mlp(self.norm2(x))


class VolumeAggregator(nn.Module):
    """VAT-style aggregation of a 4D matching volume, added as a residual to the volume.

    ``forward(v) = v + crop(unfold4d(project(blocks(embed(fold4d(pad(v)))))))``; blocks alternate
    regular and shifted (``w/2``) windows.

    The last projection is zero-initialised, so an untrained aggregator returns its input volume
    exactly: each stage of the cascade then starts from the backbone's cosine volume and training
    learns a correction to it, instead of starting from a random volume that would first have to
    unlearn its noise (the same reasoning as zero-initialised residual branches, e.g. Goyal et al.
    2017's zero-γ or ReZero, Bachlechner et al. 2021). The projection still receives a gradient
    at initialisation, so the rest of the aggregator starts learning after the first step.

    Any ``h_s x w_s x h_t x w_t`` is accepted: sides that are not multiples of ``fold·window``
    (including sides smaller than one window) are zero-padded and cropped back (:func:`pad4d`).
    """

    def __init__(self, embed_dim: int = 32, depth: int = 2, num_heads: int = 4, window: int = 4,
                 fold: int = 2, mlp_ratio: float = 4.0):
        super().__init__()
        self.fold = fold
        self.window = window
        self.embed = nn.Linear(fold**4, embed_dim)
        self.blocks = nn.ModuleList(
            Swin4DBlock(embed_dim, window, num_heads, shift=0 if i % 2 == 0 else window // 2, mlp_ratio=mlp_ratio)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.project = nn.Linear(embed_dim, fold**4)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        self.project._semcorr_zero_init = True  # kept at zero by CascadedMILModel's post_init

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """Refine a matching volume.

        Args:
            volume: ``(B, h_s, w_s, h_t, w_t)``.

        Returns:
            ``(B, h_s, w_s, h_t, w_t)``: the volume plus the learned correction.
        """
        dims = tuple(volume.shape[1:])
        padded = pad4d(volume[:, None], self.fold * self.window)  # (B, 1, P1, P2, P3, P4)
        tokens = self.embed(fold4d(padded, self.fold).movedim(1, -1))  # (B, P1/f, ..., P4/f, E)
        for block in self.blocks:
            tokens = block(tokens)
        correction = self.project(self.norm(tokens)).movedim(-1, 1)  # (B, f⁴, P1/f, ..., P4/f)
        return volume + crop4d(unfold4d(correction, self.fold)[:, 0], dims)

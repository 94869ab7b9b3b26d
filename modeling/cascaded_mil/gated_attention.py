"""Gated cross attention and the matching volume aggregation module (MVAM).

Huang et al., *Weakly Supervised Learning of Semantic Correspondence through Cascaded Online
Correspondence Refinement*, ICCV 2023. Each stage of the cascade (image, region, pixel) has a MVAM
of its own:

* **gated cross attention** between the two images' tokens. Every token gets one scalar gate, the
  sigmoid of its inner product with the *other* image's global token (a ViT class token, or the
  global average pool of a CNN map), ``G_s = σ(F_s·T_t)``, ``G_t = σ(F_t·T_s)``: tokens that look
  like what the other image is about are kept, background is damped. Then
  ``F̃_s = MHA(F_s, F_t ⊙ G_t) ⊙ G_s`` and ``F̃_t = MHA(F_t, F_s ⊙ G_s) ⊙ G_t``;
* the **cosine 4D volume** of ``F̃_s`` and ``F̃_t`` (global tokens excluded);
* **4D window attention over the volume** (:class:`~.volume_attention.VolumeAggregator`).

The paper has no public code; three details here are this reconstruction's:

1. the gate logit is scaled by ``1/√C`` (:data:`SCALE_GATES_BY_SQRT_DIM`): the paper writes
   ``σ(F·T)``, but ViT features have norms in the tens, so unscaled inner products are in the
   hundreds and every gate would saturate at 0 or 1 with no gradient;
2. the attention is residual, ``F̃ = (F + MHA(...)) ⊙ G``, with the MHA output projection
   zero-initialised (transformer blocks are residual; the paper's equation omits it). With (3)
   an untrained MVAM returns the backbone's cosine volume;
3. one ``nn.MultiheadAttention`` serves both directions: the same attention applied symmetrically.

A per-token scalar gate cancels in a cosine: ``cos(g_i f_i, t_j) = cos(f_i, t_j)`` for ``g_i > 0``.
So ``⊙ G_s`` on ``F̃_s`` leaves the cosine volume unchanged; the gates act through the keys and
values of the other direction (``F_s ⊙ G_s`` is what ``F_t`` attends to). The gated features are
still returned for what else uses them (e.g. saliency).
"""

from __future__ import annotations

import math
import torch
from torch import nn

from ..ops import dense_cosine_correlation
from .volume_attention import VolumeAggregator

#: scale the gate logit ``F·T`` by ``1/√C`` (a reconstruction; the paper writes ``σ(F·T)``)
SCALE_GATES_BY_SQRT_DIM = True


def token_gates(tokens: torch.Tensor, other_global: torch.Tensor,
                scale_by_sqrt_dim: bool = SCALE_GATES_BY_SQRT_DIM) -> torch.Tensor:
    """One gate per token from its agreement with the other image's global token.

    Args:
        tokens: ``(B, N, C)`` tokens of one image.
        other_global: ``(B, C)`` global token of the other image.
        scale_by_sqrt_dim: divide the inner product by ``√C`` before the sigmoid (see the module
            docstring); False gives the paper's ``σ(F·T)`` literally.

    Returns:
        ``(B, N)`` gates in ``(0, 1)``: ``σ(tokens · other_global / √C)``.
    """
    logits = torch.einsum("bnc,bc->bn", tokens, other_global)
    if scale_by_sqrt_dim:
        logits = logits / math.sqrt(tokens.shape[-1])
    return torch.sigmoid(logits)


class GatedCrossAttention(nn.Module):
    """Gated cross attention in both directions, one attention module for both.

    ``F̃_s = (F_s + MHA(F_s, F_t ⊙ G_t)) ⊙ G_s`` and ``F̃_t = (F_t + MHA(F_t, F_s ⊙ G_s)) ⊙ G_t``
    (query the image's own tokens, keys and values the other image's gated tokens). The output
    projection of the MHA starts at zero, so the untrained module gives ``F ⊙ G`` (see the module
    docstring for which of this is the paper's and which is the reconstruction's).
    """

    def __init__(self, dim: int, num_heads: int, scale_gates: bool = SCALE_GATES_BY_SQRT_DIM):
        super().__init__()
        self.scale_gates = scale_gates
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)
        self.attention.out_proj._semcorr_zero_init = True  # kept at zero by CascadedMILModel's post_init

    def attend(self, query: torch.Tensor, other: torch.Tensor, other_gates: torch.Tensor) -> torch.Tensor:
        """``query + MHA(query, other ⊙ gates)``: ``(B, N_q, C)`` from ``other (B, N_o, C)``, ``gates (B, N_o)``."""
        gated = other * other_gates[..., None]
        attended, _ = self.attention(query, gated, gated, need_weights=False)
        return query + attended

    def forward(self, source_tokens: torch.Tensor, target_tokens: torch.Tensor,
                source_global: torch.Tensor, target_global: torch.Tensor):
        """Cross-attend the two images' tokens through each other's gates.

        Args:
            source_tokens: ``(B, N_s, C)`` patch tokens (global token excluded).
            target_tokens: ``(B, N_t, C)``.
            source_global: ``(B, C)`` the source's global token.
            target_global: ``(B, C)``.

        Returns:
            ``(refined_source (B, N_s, C), refined_target (B, N_t, C), source_gates (B, N_s),
            target_gates (B, N_t))``.
        """
        source_gates = token_gates(source_tokens, target_global, self.scale_gates)
        target_gates = token_gates(target_tokens, source_global, self.scale_gates)
        refined_source = self.attend(source_tokens, target_tokens, target_gates) * source_gates[..., None]
        refined_target = self.attend(target_tokens, source_tokens, source_gates) * target_gates[..., None]
        return refined_source, refined_target, source_gates, target_gates


class MatchingVolumeAggregation(nn.Module):
    """The MVAM of one stage: gated cross attention, cosine volume, 4D volume aggregation.

    Untrained, ``refined`` equals ``raw`` exactly (zero-initialised aggregator projection) and
    ``raw`` equals the backbone tokens' cosine volume up to float rounding (zero-initialised
    attention output, gates cancel in the cosine).

    Args:
        dim: token channels ``C``.
        num_heads: heads of the cross attention.
        embed_dim, depth, volume_heads, window, fold, mlp_ratio: of the
            :class:`~.volume_attention.VolumeAggregator` (``volume_heads`` is its ``num_heads``).
        scale_gates: see :func:`token_gates`.
    """

    def __init__(self, dim: int, num_heads: int, embed_dim: int = 32, depth: int = 2, volume_heads: int = 4,
                 window: int = 4, fold: int = 2, mlp_ratio: float = 4.0,
                 scale_gates: bool = SCALE_GATES_BY_SQRT_DIM):
        super().__init__()
        self.cross_attention = GatedCrossAttention(dim, num_heads, scale_gates)
        self.aggregator = VolumeAggregator(embed_dim, depth, volume_heads, window, fold, mlp_ratio)

    def forward(self, source_tokens: torch.Tensor, target_tokens: torch.Tensor,
                source_global: torch.Tensor, target_global: torch.Tensor,
                source_shape: tuple[int, int], target_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Build and refine the matching volume of one image pair batch.

        Args:
            source_tokens: ``(B, N_s, C)`` patch tokens, row-major over ``source_shape``.
            target_tokens: ``(B, N_t, C)``, row-major over ``target_shape``.
            source_global, target_global: ``(B, C)`` global tokens.
            source_shape: ``(h_s, w_s)`` with ``h_s·w_s = N_s``.
            target_shape: ``(h_t, w_t)`` with ``h_t·w_t = N_t``.

        Returns:
            ``raw`` ``(B, N_s, N_t)`` cosine volume of the cross-attended tokens, ``refined``
            ``(B, N_s, N_t)`` after the 4D aggregation, ``source_gates`` ``(B, N_s)``,
            ``target_gates`` ``(B, N_t)``.
        """
        (h_s, w_s), (h_t, w_t) = source_shape, target_shape
        if source_tokens.shape[1] != h_s * w_s or target_tokens.shape[1] != h_t * w_t:
            raise ValueError(
                f"tokens {tuple(source_tokens.shape)}, {tuple(target_tokens.shape)} do not match shapes "
                f"{tuple(source_shape)}, {tuple(target_shape)}"
            )
        source, target, source_gates, target_gates = self.cross_attention(
            source_tokens, target_tokens, source_global, target_global
        )
        batch = source.shape[0]
        raw = dense_cosine_correlation(
            source.transpose(1, 2).reshape(batch, -1, h_s, w_s), target.transpose(1, 2).reshape(batch, -1, h_t, w_t)
        )
        refined = self.aggregator(raw.view(batch, h_s, w_s, h_t, w_t)).view(batch, h_s * w_s, h_t * w_t)
        return {"raw": raw, "refined": refined, "source_gates": source_gates, "target_gates": target_gates}

"""Dense cosine correlation between two feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_cosine_correlation(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    normalize: bool = True,
    chunk_size: int | None = 4096,
) -> torch.Tensor:
    """Cosine similarity between every source cell and every target cell.

    Args:
        source_features: ``(B, C, h_s, w_s)``.
        target_features: ``(B, C, h_t, w_t)``.
        normalize: L2-normalise the channels first (set False when the features already are).
        chunk_size: source cells per matrix product; bounds the temporary memory of the product
            to ``chunk_size * h_t * w_t`` floats per image beside the output. ``None``: one product.

    Returns:
        ``(B, h_s * w_s, h_t * w_t)`` similarities in ``[-1, 1]``, source cells row-major.
    """
    if source_features.shape[:2] != target_features.shape[:2]:
        raise ValueError(
            f"source and target features must share batch and channels, got {tuple(source_features.shape)} "
            f"and {tuple(target_features.shape)}"
        )
    source = source_features.flatten(2).transpose(1, 2)  # (B, Ns, C)
    target = target_features.flatten(2)  # (B, C, Nt)
    if normalize:
        source = F.normalize(source, dim=-1)
        target = F.normalize(target, dim=1)
    num_source = source.shape[1]
    if chunk_size is None or num_source <= chunk_size:
        return torch.bmm(source, target)
    correlation = source.new_empty(source.shape[0], num_source, target.shape[-1])
    for start in range(0, num_source, chunk_size):
        torch.bmm(source[:, start : start + chunk_size], target, out=correlation[:, start : start + chunk_size])
    return correlation

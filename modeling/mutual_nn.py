"""Mutual nearest neighbours in a correlation matrix."""

from __future__ import annotations

import torch


def mutual_nearest_neighbours(correlation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source -> target best matches and which of them are mutual.

    Args:
        correlation: ``(B, N_s, N_t)`` scores, higher is better.

    Returns:
        ``(target_index, is_mutual)``, both ``(B, N_s)``: the arg-max target cell of every source
        cell, and whether that target cell's own arg-max is the same source cell.
    """
    target_index = correlation.argmax(dim=2)  # (B, Ns)
    source_index_of_target = correlation.argmax(dim=1)  # (B, Nt)
    round_trip = torch.gather(source_index_of_target, 1, target_index)
    source_ids = torch.arange(correlation.shape[1], device=correlation.device).expand_as(round_trip)
    return target_index, round_trip == source_ids

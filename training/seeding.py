"""Seeds and orders that do not depend on the number of processes, so runs resume bit-identically.

Every random choice of a run (the order of an epoch, the warps of a step, the gate noise of a pair)
draws from a generator seeded by :func:`derive_seed` of the run's seed and the coordinates of that
choice (epoch, step, pair index, rank, a purpose tag). Nothing depends on a global RNG state that a
restart or another process count would change.
"""

from __future__ import annotations

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers: a fixed mix, stable across runs, processes and platforms."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value


def epoch_order(num_items: int, repeats: int, seed: int, epoch: int) -> list[int]:
    """The items of epoch ``epoch``: ``repeats`` permutations drawn from a generator seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return [i for _ in range(repeats) for i in torch.randperm(num_items, generator=generator).tolist()]


def generator_for(*parts: int, device=None) -> torch.Generator:
    """A ``torch.Generator`` seeded by :func:`derive_seed` of ``parts``."""
    generator = torch.Generator(device=device) if device is not None else torch.Generator()
    return generator.manual_seed(derive_seed(*parts))

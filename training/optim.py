"""Optimiser and learning-rate schedule from the ``optim`` section of a config (never from code)."""

from __future__ import annotations

import torch

from .config import OptimConfig


def build_optimizer(parameters, optim: OptimConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum, optionally Nesterov) over ``parameters``."""
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    if optim.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                           nesterov=optim.nesterov)


def build_scheduler(optimizer, optim: OptimConfig, steps_per_epoch: int, total_steps: int):
    """The schedule, stepped once per optimizer step; epochs in the config become steps here.

    ``multistep``: x ``lr_gamma`` at each epoch of ``lr_milestones``; ``step``: x ``lr_gamma`` every
    ``lr_step_epochs`` epochs; ``cosine``: from ``lr`` to ``min_lr`` over the run; ``constant``.
    ``warmup_steps`` > 0 prepends a linear warm-up from ``lr / (warmup_steps + 1)``; the main
    schedule then counts its steps (and milestones) from the end of the warm-up.
    """
    after_warmup = max(1, total_steps - optim.warmup_steps)
    if optim.scheduler == "multistep":
        main = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[m * steps_per_epoch for m in optim.lr_milestones], gamma=optim.lr_gamma)
    elif optim.scheduler == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.lr_step_epochs * steps_per_epoch,
                                               gamma=optim.lr_gamma)
    elif optim.scheduler == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=after_warmup, eta_min=optim.min_lr)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not optim.warmup_steps:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (optim.warmup_steps + 1),
                                               end_factor=1.0, total_iters=optim.warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[optim.warmup_steps])

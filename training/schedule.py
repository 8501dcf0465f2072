"""Learning-rate warmup and gradient clipping of the training loop.

The warmup is a function of the optimizer steps already taken, the count every checkpoint records, so a
resumed run sets exactly the learning rate an uninterrupted run sets (a LambdaLR whose state is the step):
there is no scheduler state to save or to lose.
"""
from __future__ import annotations

import torch

from .config import TrainConfig


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The factor of the base learning rate for the optimizer step taken after ``step`` completed steps:
    ``(step + 1) / warmup_steps`` up to 1 (the first step uses lr / warmup_steps, step ``warmup_steps`` the
    full lr); 1 without warmup."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    """Sets every parameter group's learning rate for the next optimizer step; returns it."""
    lr = cfg.lr * warmup_factor(step, cfg.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clip_gradients(accelerator, parameters, max_grad_norm: float) -> float | None:
    """Clips the gradients' global norm to ``max_grad_norm`` when they are synced (the last micro-batch of an
    accumulated step; accelerate unscales fp16 gradients first); returns the norm before clipping, or None
    (clipping off, or a micro-batch whose gradients are still accumulating)."""
    if max_grad_norm <= 0 or not accelerator.sync_gradients:
        return None
    return float(accelerator.clip_grad_norm_(parameters, max_grad_norm))

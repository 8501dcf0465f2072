"""Training of the small world's scorers from renders in training contexts.

The scorers are the measuring instrument, not the model under test: their subjects come from both splits
(``held_out_subjects``), as DINO saw far more than DreamBench's subjects. Trained on training subjects only,
the subject classifier learns the training split's shape-texture and hue pairings and reads held-out subjects
badly (shape accuracy 0.43 vs 0.71 after 500 steps). Contexts stay in the training split: the context
classifier reads held-out combinations of attributes it learned one by one.

- appearance encoder: symmetric InfoNCE over a batch of subjects, each seen in two scenes (other
  context, other pose); every other subject of the batch is a negative;
- subject attributes: cross-entropy for shape and texture, plus the unordered-pair delta-E of the colours;
- context attributes: cross-entropy per attribute.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from .scorer_data import Pool, augment, context_labels, render_pool, subject_labels
from .scorer_models import NetConfig, Scorers, pair_delta_e, predicted_colors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerConfig:
    """How the scorers are trained and validated."""

    seed: int = 0
    subjects: int = 1500           # training subjects in the pool
    views: int = 4                 # scenes per training subject
    held_out_subjects: float = 0.5  # share of the subjects drawn from the held-out split (see the module docstring)
    appearance_steps: int = 600    # optimiser steps of each network
    subject_steps: int = 900
    context_steps: int = 300
    batch_size: int = 96
    lr: float = 2e-3
    warmup: int = 30
    temperature: float = 0.1       # InfoNCE temperature of the appearance encoder
    color_weight: float = 0.02     # weight of the mean delta-E (about 5-70) beside the cross-entropies
    val_subjects: int = 300        # held-out subjects (each in two held-out contexts) that validate
    net: NetConfig = field(default_factory=NetConfig)

    def __post_init__(self) -> None:
        if self.views < 2:
            raise ValueError(f"views must be >= 2 (the appearance encoder pairs two scenes), got {self.views}")
        if self.batch_size > self.subjects:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed subjects ({self.subjects}): a batch "
                             "holds distinct subjects")


QUICK = {"subjects": 256, "views": 2, "appearance_steps": 60, "subject_steps": 90, "context_steps": 70,
         "batch_size": 64, "val_subjects": 120}


def scorer_config(seed: int, quick: bool) -> ScorerConfig:
    """The full configuration, or the quick one the tests train."""
    return ScorerConfig(seed=seed, **(QUICK if quick else {}))


def _as_float(images: np.ndarray) -> Tensor:
    """Shapes: (B, S, S, 3) uint8 -> (B, 3, S, S) float in [0, 1]."""
    return rearrange(torch.from_numpy(images), "b h w c -> b c h w").float() / 255


def _fit(module: nn.Module, loss_of_step: Callable[[], Tensor], cfg: ScorerConfig, name: str) -> list[float]:
    """AdamW with warmup and cosine decay over ``cfg.<name>_steps``; returns the losses."""
    steps = getattr(cfg, f"{name}_steps")
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=1e-4)
    module.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = loss_of_step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log.info("%s scorer step %d: loss %.4f", name, step, float(np.mean(losses[-20:])))
    module.eval()
    return losses


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE: row i of ``a`` and row i of ``b`` are the same subject, every other row a negative.

    Shapes: a (B, D), b (B, D), unit length -> scalar.
    """
    logits = einsum(a, b, "i d, j d -> i j") / temperature
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_appearance(scorers: Scorers, pool: Pool, cfg: ScorerConfig) -> list[float]:
    rng, gen = np.random.default_rng([cfg.seed, 11]), torch.Generator().manual_seed(cfg.seed * 1000 + 11)
    n, v = pool.images.shape[:2]

    def loss() -> Tensor:
        index = rng.choice(n, cfg.batch_size, replace=False)
        first = rng.integers(0, v, cfg.batch_size)
        second = (first + rng.integers(1, v, cfg.batch_size)) % v          # another scene of the same subject
        x = augment(_as_float(pool.images[np.concatenate([index, index]), np.concatenate([first, second])]), gen)
        a, b = rearrange(scorers.appearance(x), "(two b) d -> two b d", two=2)
        return info_nce(a, b, cfg.temperature)

    return _fit(scorers.appearance, loss, cfg, "appearance")


def _flat_batches(pool: Pool, cfg: ScorerConfig, stream: int) -> Callable[[], tuple[Tensor, np.ndarray]]:
    """Single scenes drawn from the whole pool: -> (images (B, 3, S, S) augmented, flat indices (B,))."""
    rng, gen = np.random.default_rng([cfg.seed, stream]), torch.Generator().manual_seed(cfg.seed * 1000 + stream)
    flat = rearrange(pool.images, "n v h w c -> (n v) h w c")

    def batch() -> tuple[Tensor, np.ndarray]:
        index = rng.integers(0, len(flat), cfg.batch_size)
        return augment(_as_float(flat[index]), gen), index

    return batch


def train_subject(scorers: Scorers, pool: Pool, cfg: ScorerConfig) -> list[float]:
    labels = subject_labels(pool.subjects)
    views = pool.images.shape[1]
    batch = _flat_batches(pool, cfg, 12)

    def loss() -> Tensor:
        x, index = batch()
        who = torch.from_numpy(index // views)
        out = scorers.subject(x)
        colors = pair_delta_e(predicted_colors(out["colors"]), labels["colors"][who]).mean()
        return (F.cross_entropy(out["shape"], labels["shape"][who]) + F.cross_entropy(out["texture"],
                labels["texture"][who]) + cfg.color_weight * colors)

    return _fit(scorers.subject, loss, cfg, "subject")


def train_context(scorers: Scorers, pool: Pool, cfg: ScorerConfig) -> list[float]:
    labels = context_labels([c for views in pool.contexts for c in views])     # flat, in the pool's (n v) order
    batch = _flat_batches(pool, cfg, 13)

    def loss() -> Tensor:
        x, index = batch()
        out = scorers.context(x)
        return sum(F.cross_entropy(out[name], labels[name][torch.from_numpy(index)]) for name in labels)

    return _fit(scorers.context, loss, cfg, "context")


def train_all(cfg: ScorerConfig) -> tuple[Scorers, dict[str, float]]:
    """Renders the training pool and trains the three networks; returns them frozen and the seconds each took."""
    seconds, start = {}, time.perf_counter()
    pool = render_pool(cfg.subjects, cfg.views, cfg.net.image_size, np.random.default_rng([cfg.seed, 10]),
                       held_out_subjects=cfg.held_out_subjects, held_out_contexts=False)
    seconds["render"] = time.perf_counter() - start
    scorers = Scorers.build(cfg.net, cfg.seed)
    final = {}
    for name, train in (("appearance", train_appearance), ("subject", train_subject), ("context", train_context)):
        start = time.perf_counter()
        final[name] = float(np.mean(train(scorers, pool, cfg)[-20:]))
        seconds[name] = time.perf_counter() - start
    return scorers.freeze(), {"seconds": seconds, "final_loss": final}

"""Head layouts and no-op-free casts for the per-layer attention code.

These run for every patched layer at every model evaluation, where host time counts (a GPU step is bound by
launching kernels from Python): they use tensor methods directly, which dispatch the same view operators as
the einops patterns in their docstrings in about half the time, and dispatch nothing when there is nothing to do.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched", "cast", "merge_heads", "over_heads", "split_heads"]


def cast(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``x.to(device, dtype)``, without a dispatcher call when it is one already."""
    return x if x.dtype == dtype and x.device == device else x.to(device, dtype)


def batched(x: Tensor, batch: int) -> Tensor:
    """Expands the leading axis of (1, ...) to ``batch``; no dispatcher call when it has it already."""
    return x if x.shape[0] == batch else x.expand(batch, *x.shape[1:])


def split_heads(x: Tensor, heads: int) -> Tensor:
    """b n (h d) -> b h n d (a view; ``view`` dispatches faster than ``unflatten``, a Python-level wrapper)."""
    return x.view(*x.shape[:-1], heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """b h n d -> b n (h d)."""
    return x.transpose(1, 2).flatten(2)


def over_heads(bias: Tensor) -> Tensor:
    """A bias broadcast over heads: (B, N, T) -> (B, 1, N, T); already 4-D: as it is."""
    return bias if bias.ndim == 4 else bias[:, None]

"""The per-layer inputs and outputs of a patched cross-attention layer (Eq. 3, Sec. 3.4): one subject's branch
and the maps a capture layer returns for it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SubjectBranch", "SubjectMaps"]


@dataclass(frozen=True, eq=False)
class SubjectBranch:
    """One subject's inputs to a patched cross-attention layer (Eq. 3, Sec. 3.4)."""

    visual_k: Tensor                 # (B or 1, S, H*D) visual tokens already projected by W_k^v
    visual_v: Tensor                 # (B or 1, S, H*D) visual tokens already projected by W_v^v
    gamma: float = 1.0               # weight of the visual branch (paper: gamma), >= 0
    mask: Tensor | None = None       # (B or 1, N) subject location in [0, 1] from the previous step; None: M = 1
    columns: tuple[int, ...] = ()    # placeholder key positions in the text context (p, p + 77, ... when LCM-padded)
    text_rows: Tensor | None = None  # (B,) bool: rows whose text context holds the placeholder (cond chunks); None: all
    column_weights: Tensor | None = None   # (B, T) float, 1 at each row's own placeholder columns (rows differ);
                                           # used instead of `columns`
    visual_k_heads: Tensor | None = None   # (H, B, S, D) fp32 visual_k split into heads, head axis first, each head's
                                           # rows in one block: the visual map's matmul reads it without a copy

    def __post_init__(self) -> None:
        if not math.isfinite(self.gamma) or self.gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")
        if self.visual_k.ndim != 3 or self.visual_k.shape != self.visual_v.shape:
            raise ValueError(
                "visual_k and visual_v must both be (B, S, H*D) with equal shapes, "
                f"got {tuple(self.visual_k.shape)} and {tuple(self.visual_v.shape)}"
            )
        if self.mask is not None and self.mask.ndim != 2:
            raise ValueError(f"mask must be (B, N), got shape {tuple(self.mask.shape)}")
        if self.text_rows is not None and (self.text_rows.ndim != 1 or self.text_rows.dtype != torch.bool):
            raise ValueError(
                f"text_rows must be a 1-D bool tensor (B,), got {self.text_rows.dtype} {tuple(self.text_rows.shape)}"
            )
        columns = tuple(int(c) for c in self.columns)
        if any(c < 0 for c in columns) or len(set(columns)) != len(columns):
            raise ValueError(f"columns must be distinct non-negative key positions, got {columns}")
        object.__setattr__(self, "columns", columns)
        if self.column_weights is not None and (columns or self.column_weights.ndim != 2):
            raise ValueError("column_weights (B, T) replaces columns: give one of them, got columns "
                             f"{columns} and column_weights of shape {tuple(self.column_weights.shape)}")
        split = self.visual_k_heads
        if split is not None and (split.ndim != 4 or split.shape[0] * split.shape[3] != self.visual_k.shape[2]
                                  or tuple(split.shape[1:3]) != tuple(self.visual_k.shape[:2])):
            raise ValueError(f"visual_k_heads must be (H, {self.visual_k.shape[0]}, {self.visual_k.shape[1]}, D) with "
                             f"H * D = {self.visual_k.shape[2]}, got {tuple(split.shape)}")

    @classmethod
    def unchecked(cls, visual_k: Tensor, visual_v: Tensor, gamma: float, mask: Tensor | None,
                  columns: tuple[int, ...], text_rows: Tensor | None,
                  visual_k_heads: Tensor | None = None) -> "SubjectBranch":
        """The same branch without the checks of ``__post_init__``, for a caller that built and validated these
        values once (the per-layer hot path of sampling: ``columns`` a tuple of distinct ints, ``gamma`` >= 0)."""
        branch = object.__new__(cls)
        branch.__dict__.update(visual_k=visual_k, visual_v=visual_v, gamma=gamma, mask=mask, columns=columns,
                               text_rows=text_rows, column_weights=None, visual_k_heads=visual_k_heads)
        return branch

    @property
    def has_columns(self) -> bool:
        return bool(self.columns) or self.column_weights is not None


@dataclass(frozen=True, eq=False)
class SubjectMaps:
    """Attention maps of one subject in one layer, fp32, mean over heads (Sec. 3.4 mask extraction)."""

    text: Tensor            # (B, N) placeholder probability from the biased text softmax; 0 outside text_rows
    visual: Tensor | None   # (B, N) visual attention normalised over space, mean over visual tokens; sums to 1
                            # over N (None when not asked for: training's text-only L_loc, loc_maps="text")

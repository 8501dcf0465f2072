"""Every layer's visual K/V weights stacked into one matrix, kept once per loaded checkpoint.

All patched layers read the same visual tokens, so one matmul per model evaluation projects them for
every layer (each layer takes slices). The stacked copy costs memory: it is kept only for checkpoints
whose visual K/V weights fit ``FUSED_WEIGHT_BYTES``; larger ones (SDXL) project per layer.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from customcontrast_core.visual_kv import VisualKV

FUSED_WEIGHT_BYTES = 128 * 2**20   # largest stacked copy of the visual K/V weights kept for one-matmul projection

_STACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # VisualKV -> (identity, W or None, slices)


def stacked_visual_kv(visual_kv: VisualKV) -> tuple[Tensor, dict[str, tuple[int, int]]] | None:
    """Every layer's visual K/V weights stacked (``VisualKV.fused``), one copy per loaded checkpoint however
    many Apply nodes use it, rebuilt when ComfyUI moves or casts the weights; None when the copy would
    exceed FUSED_WEIGHT_BYTES (SDXL: ~680 MB in fp16, never duplicated)."""
    first = next(iter(visual_kv.values())).to_k.weight
    identity = (first.device, first.dtype, first.data_ptr(), FUSED_WEIGHT_BYTES)
    cached = _STACKED.get(visual_kv)
    if cached is None or cached[0] != identity:
        weight, slices = None, {}
        if sum(p.numel() * p.element_size() for p in visual_kv.parameters()) <= FUSED_WEIGHT_BYTES:
            with torch.no_grad():
                weight, slices = visual_kv.fused()
        cached = _STACKED[visual_kv] = (identity, weight, slices)
    return None if cached[1] is None else (cached[1], cached[2])

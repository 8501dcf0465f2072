"""Every layer's visual K/V weights in one matrix: one matmul per model evaluation projects all layers.

All patched layers read the same visual tokens, so ``tokens @ W.T`` with every layer's ``W_k^v`` and
``W_v^v`` stacked gives each layer's K and V as slices. The Loader node converts a checkpoint's
per-layer projections into :class:`StackedVisualKV` (one parameter, which ComfyUI's ModelPatcher moves
and offloads as one tensor; no second copy of the weights). A model built elsewhere keeps its
``VisualKV``: a stacked copy is kept for it when small (``FUSED_WEIGHT_BYTES``), else each layer
projects its own K/V.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from customcontrast_core.visual_kv import CustomContrastModel, KVProjection, VisualKV

FUSED_WEIGHT_BYTES = 128 * 2**20   # largest stacked copy kept for a per-layer VisualKV (not converted by the Loader)

_STACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # VisualKV -> (identity, W or None, slices)


class LayerKV:
    """One layer's ``W_k^v``, ``W_v^v`` as slices of the stacked weight, taken when asked (the stacked weight
    may have been moved since): what ``KVProjection`` offers the sampling patch."""

    def __init__(self, stacked: "StackedVisualKV", name: str) -> None:
        self.stacked, self.name = stacked, name

    @property
    def weights(self) -> tuple[Tensor, Tensor]:
        """Shapes: -> W_k, W_v (inner, context_dim), views of the stacked weight."""
        offset, inner = self.stacked.slices[self.name]
        return self.stacked.weight.narrow(0, offset, inner), self.stacked.weight.narrow(0, offset + inner, inner)

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Shapes: tokens (B, m, context_dim) -> key (B, m, inner), value (B, m, inner)."""
        weight_k, weight_v = self.weights
        return F.linear(tokens, weight_k), F.linear(tokens, weight_v)


class StackedVisualKV(nn.Module):
    """The visual K/V of every layer as one (sum over layers of 2 * inner, context_dim) parameter.

    Layer ``name`` has K in rows ``[o, o + inner)`` and V in ``[o + inner, o + 2 inner)`` (``slices[name] =
    (o, inner)``, the order of ``VisualKV.fused``). Sampling only: the checkpoint format and training keep
    per-layer ``VisualKV``.
    """

    def __init__(self, weight: Tensor, slices: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        rows = sum(2 * inner for _, inner in slices.values())
        if weight.ndim != 2 or weight.shape[0] != rows:
            raise ValueError(f"stacked visual K/V weight must be ({rows}, context_dim) for {len(slices)} layers, "
                             f"got {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.slices = dict(slices)
        self.layers = {name: LayerKV(self, name) for name in self.slices}

    @classmethod
    def from_visual_kv(cls, visual_kv: VisualKV) -> "StackedVisualKV":
        with torch.no_grad():
            weight, slices = visual_kv.fused()
        return cls(weight, slices)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, name: str) -> LayerKV:
        return self.layers[name]

    def keys(self):
        return self.slices.keys()

    def items(self):
        return self.layers.items()


def weight_of(projection: KVProjection | LayerKV) -> Tensor:
    """A weight tensor of the projection with its device and dtype (no operator dispatched)."""
    return projection.stacked.weight if isinstance(projection, LayerKV) else projection.to_k.weight


def weight_signature(projection: KVProjection | LayerKV) -> tuple:
    """What changes when the projection's weights move or change dtype (no operator dispatched)."""
    if isinstance(projection, LayerKV):
        weight = projection.stacked.weight
        return weight.dtype, weight.device, weight.data_ptr(), projection.stacked.slices[projection.name]
    weight_k, weight_v = projection.to_k.weight, projection.to_v.weight
    return weight_k.dtype, weight_k.device, weight_k.data_ptr(), weight_v.data_ptr()


def stack_for_sampling(model: CustomContrastModel) -> CustomContrastModel:
    """Replaces the model's per-layer visual K/V by :class:`StackedVisualKV` (in place; returns the model): the
    per-layer weights are released once nothing else holds them, so the stacked matrix costs no extra memory."""
    if not isinstance(model.visual_kv, StackedVisualKV):
        model.visual_kv = StackedVisualKV.from_visual_kv(model.visual_kv)
    return model


def stacked_visual_kv(visual_kv: VisualKV | StackedVisualKV) -> tuple[Tensor, dict[str, tuple[int, int]]] | None:
    """Every layer's visual K/V weights stacked, and each layer's slice. A ``StackedVisualKV`` gives its own
    parameter; a per-layer ``VisualKV`` gets one copy (``VisualKV.fused``) per checkpoint however many Apply
    nodes use it, rebuilt when its weights move or change dtype, or None when that copy would exceed
    FUSED_WEIGHT_BYTES (then each layer projects its own K/V)."""
    if isinstance(visual_kv, StackedVisualKV):
        return visual_kv.weight, visual_kv.slices
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

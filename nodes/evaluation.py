"""What every patched layer of one model evaluation shares, computed by its first layer (no per-layer syncs)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from customcontrast_core.attention import SubjectMaps
from customcontrast_core.visual_kv import VisualKV

from .encodings import Encodings
from .stacked_kv import stacked_visual_kv

__all__ = ["Evaluation", "per_latent"]


@dataclass
class Evaluation:
    """What every layer of one model evaluation shares, computed by its first layer (no per-layer syncs)."""

    sigmas: Tensor                   # extra_options["sigmas"] of this evaluation (held: identity is the key)
    sigma: float
    context: Tensor | None = None    # the context whose cond rows were checked
    chunks: tuple[int, ...] = ()
    swap: Tensor | None = None       # (B,) bool: rows whose context is the Apply node's prompt
    swap_rows: Tensor | None = None  # (B, 1, 1) view of swap
    swapped_chunks: tuple[int, ...] = ()
    kinds: Tensor | None = None      # (B,) long: 0 for cond rows, 1 for uncond rows
    masks: dict = field(default_factory=dict)   # (subject, grid, dtype) -> (B or 1, N) layer mask
    biases: dict = field(default_factory=dict)  # (grid, keys, dtype) -> (B, N, T) placeholder log-bias
    probes: dict = field(default_factory=dict)  # keys -> (B, 1, T, P) probe channels of the capture layers (kept
                                                # with the rows: the same in every evaluation of a run)
    encodings: Encodings | None = None
    visual_kv: dict = field(default_factory=dict)   # dtype -> per subject (B, m, sum 2*inner): every layer's K|V
    visual_rows: dict = field(default_factory=dict)  # weight dtype -> per subject (B, m, C): each row's visual tokens
    stacked: tuple | None = None                     # (stacked_visual_kv result,) once looked up
    visual_heads: dict = field(default_factory=dict)  # (dtype, head width) -> per subject (sum/D, B, m, D) head-first K|V
    swapped: dict = field(default_factory=dict)     # (length, dtype) -> G swapped contexts (B, L, C), one tensor
    map_sums: dict = field(default_factory=dict)    # graph mode: (subject, grid) -> text, visual map sums (B, N)
    map_layers: dict = field(default_factory=dict)  # graph mode: (subject, grid) -> layers summed
    step_masks: list[Tensor] | None = None          # per subject, the previous step's mask it applies (or None)
    columns: dict = field(default_factory=dict)     # key length -> per subject, its placeholder columns

    def visual_kv_of(self, visual_kv: VisualKV, enc: Encodings, name: str, subject: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor]:
        """One layer's visual K and V for this evaluation's rows (cond rows: the subject, uncond rows: the blank
        reference). With the stacked weights, every layer is projected in one matmul per evaluation and each
        layer takes slices. Shapes: -> (B, m, inner) twice."""
        if self.stacked is None:   # looked up once per evaluation (weights may move between evaluations)
            self.stacked = (stacked_visual_kv(visual_kv),)
        fused = self.stacked[0]
        if fused is not None:
            weight, slices = fused
            if dtype not in self.visual_kv:
                done = next(iter(self.visual_kv.values()), None)
                if done is not None:   # the other dtype's rows, cast (the projection ran in the weights' dtype)
                    self.visual_kv[dtype] = [kv.to(dtype) for kv in done]
                else:
                    self.visual_kv[dtype] = []
                    for tokens in enc.tokens_for(weight.device, weight.dtype):               # (2, m, C)
                        with torch.no_grad():
                            projected = F.linear(tokens, weight)                            # (2, m, sum 2*inner)
                        self.visual_kv[dtype].append(projected.to(device, dtype).index_select(0, self.kinds))
            offset, inner = slices[name]
            kv = self.visual_kv[dtype][subject]
            return kv.narrow(-1, offset, inner), kv.narrow(-1, offset + inner, inner)
        projection = visual_kv[name]
        weight = projection.to_k.weight   # a per-layer VisualKV's KVProjection
        rows = self.visual_rows.get(weight.dtype)
        if rows is None:   # each row's tokens (subject or blank) once per evaluation: a layer projects them directly
            kinds = self.kinds.to(weight.device)
            rows = self.visual_rows[weight.dtype] = [t.index_select(0, kinds)
                                                     for t in enc.tokens_for(weight.device, weight.dtype)]
        with torch.no_grad():
            k, v = projection(rows[subject])                                              # (B, m, inner) each
        return k.to(device, dtype), v.to(device, dtype)


    def visual_k_heads_of(self, name: str, subject: int, dtype: torch.dtype, heads: int) -> Tensor | None:
        """One layer's visual K split into heads, head axis first, for the visual map's matmul (no copy per layer):
        a view of one head-first copy of every layer's projection per evaluation, dtype and head width. Only with
        the stacked projection, after :meth:`visual_kv_of` of this dtype; None otherwise. Shapes: -> (H, B, m, D)."""
        if not self.stacked or self.stacked[0] is None or dtype not in self.visual_kv:
            return None
        offset, inner = self.stacked[0][1][name]
        dims = inner // heads
        split = self.visual_heads.get((dtype, dims))
        if split is None:   # b m (l d) -> l b m d over every layer's K and V at once
            split = self.visual_heads[(dtype, dims)] = [
                None if kv.shape[-1] % dims else kv.view(*kv.shape[:2], -1, dims).permute(2, 0, 1, 3).contiguous()
                for kv in self.visual_kv[dtype]]
        keys = split[subject]
        return None if keys is None or offset % dims else keys.narrow(0, offset // dims, heads)


def per_latent(maps: SubjectMaps, chunks: tuple[int, ...], b: int) -> SubjectMaps:
    """Averages the maps of the swapped (cond) chunks into one map per latent. Shapes: (B_total, N) -> (B, N)."""
    if len(chunks) == 1:
        rows = slice(chunks[0] * b, (chunks[0] + 1) * b)
        return SubjectMaps(text=maps.text[rows], visual=maps.visual[rows])
    text = torch.stack([maps.text[i * b:(i + 1) * b] for i in chunks]).mean(0)
    visual = torch.stack([maps.visual[i * b:(i + 1) * b] for i in chunks]).mean(0)
    return SubjectMaps(text=text, visual=visual)

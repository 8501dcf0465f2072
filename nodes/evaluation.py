"""What every patched layer of one model evaluation shares, computed by its first layer (no per-layer syncs)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from customcontrast_core.attention import SubjectMaps
from customcontrast_core.masks import intersect_user_mask, resize_mask
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
    batch: int = 0                   # B: rows of the batch
    swap_rows: Tensor | None = None  # (B, 1, 1) bool: rows whose context is the Apply node's prompt
    # the rows the node patches (B' of the B, ``rows.py``): its prompt's cond rows and the uncond rows
    select: tuple[Tensor, Tensor] | None = None   # (B',), (B - B',) long: patched rows, the others; None: all
    swap: Tensor | None = None       # (B',) bool: patched rows whose context is the Apply node's prompt
    swapped_chunks: tuple[int, ...] = ()   # the swapped chunks, numbered among the patched chunks
    kinds: Tensor | None = None      # (B',) long: 0 for cond rows, 1 for uncond rows; None: no row patched
    patched: int = 0                 # patched chunks
    per_chunk: int = 0               # rows per chunk (the latent batch)
    masks: dict = field(default_factory=dict)   # (subject, grid, dtype) -> (B' or 1, N) layer mask
    biases: dict = field(default_factory=dict)  # (grid, keys, dtype) -> (B', N, T) placeholder log-bias
    probes: dict = field(default_factory=dict)  # keys -> (B', 1, T, P) probe channels of the capture layers (kept
                                                # with the rows: the same in every evaluation of a run)
    encodings: Encodings | None = None
    visual_kv: dict = field(default_factory=dict)   # dtype -> per subject (B', m, sum 2*inner): every layer's K|V
    visual_rows: dict = field(default_factory=dict)  # weight dtype -> per subject (B', m, C): each row's visual tokens
    stacked: tuple | None = None                     # (stacked_visual_kv result,) once looked up
    visual_heads: dict = field(default_factory=dict)  # (dtype, head width) -> per subject (sum/D, B', m, D): head-first
    swapped: dict = field(default_factory=dict)     # (length, dtype) -> G swapped contexts (B, L, C), one tensor
    step_masks: list[Tensor] | None = None          # per subject, the previous step's mask it applies (or None)
    columns: dict = field(default_factory=dict)     # key length -> per subject, its placeholder columns

    def visual_kv_of(self, visual_kv: VisualKV, enc: Encodings, name: str, subject: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor]:
        """One layer's visual K and V for this evaluation's patched rows (cond rows: the subject, uncond rows: the
        blank reference). With the stacked weights, every layer is projected in one matmul per evaluation and each
        layer takes slices. Shapes: -> (B', m, inner) twice."""
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

    def layer_mask(self, subject: int, mask: Tensor | None, user: Tensor | None, grid: tuple[int, int],
                   device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """The subject's mask (the previous step's ``mask``, intersected with the ``user`` mask) on a layer grid
        for the patched rows, in ``dtype``, once per evaluation. Shapes: mask (b, H, W), user (1 or b, H', W') -> (B' or 1, N)."""
        if mask is None and user is None:
            return None
        if (subject, grid, dtype) in self.masks:
            return self.masks[(subject, grid, dtype)]
        if dtype != torch.float32:
            flat = self.masks[(subject, grid, dtype)] = self.layer_mask(subject, mask, user, grid, device,
                                                                        torch.float32).to(dtype)
            return flat
        if mask is None:   # no propagated mask (the first step, or use_mask off): M = 1, one per user mask
            mask = torch.ones(user.shape[0], *grid, device=device)
        mask = mask.to(device)
        if user is not None:
            mask = intersect_user_mask(mask, user.to(device))
        single = mask.shape[0] == 1                             # (1, N) broadcasts over every row
        flat = resize_mask(mask, grid)
        if not single:                                          # one mask per latent, the same in every chunk
            flat = flat[:self.per_chunk].repeat(self.patched, 1)
        self.masks[(subject, grid, dtype)] = flat
        return flat


def per_latent(maps: SubjectMaps, chunks: tuple[int, ...], b: int) -> SubjectMaps:
    """Averages the maps of the swapped (cond) chunks into one map per latent. Shapes: (B_total, N) -> (B, N)."""
    if len(chunks) == 1:
        rows = slice(chunks[0] * b, (chunks[0] + 1) * b)
        return SubjectMaps(text=maps.text[rows], visual=maps.visual[rows])
    text = torch.stack([maps.text[i * b:(i + 1) * b] for i in chunks]).mean(0)
    visual = torch.stack([maps.visual[i * b:(i + 1) * b] for i in chunks]).mean(0)
    return SubjectMaps(text=text, visual=visual)

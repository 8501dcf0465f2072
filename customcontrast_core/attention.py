"""Patched cross-attention of CustomContrast (Eq. 3, Sec. 3.4), shared by the ComfyUI patch and training.

For one cross-attention layer with queries Q from the latent,

    out = softmax(Q K_t^T * scale + log max(M, eps) on the placeholder columns) V_t
        + sum_s gamma_s * M_s ⊙ softmax(Q K_s^T * scale) V_s

where K_t, V_t come from the prompt encoded with this layer's S+ token and K_s, V_s are subject s's visual
tokens projected by W_k^v, W_v^v. The log-bias is the same as multiplying the placeholder's probability by M
and renormalising each row. Layers that capture the subject maps (Sec. 3.4) need the text attention's
probabilities, so they compute it explicitly in fp32; the other layers use fused attention (SDPA) in the
inputs' dtype. Both give the same output (tested).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce
from torch import Tensor

__all__ = ["SubjectBranch", "SubjectMaps", "customcontrast_attention", "placeholder_bias", "placeholder_columns",
           "plain_attention"]


@dataclass(frozen=True, eq=False)
class SubjectBranch:
    """One subject's inputs to a patched cross-attention layer (Eq. 3, Sec. 3.4)."""

    visual_k: Tensor                   # (B or 1, S, H*D) visual tokens projected by W_k^v
    visual_v: Tensor                   # (B or 1, S, H*D) visual tokens projected by W_v^v
    gamma: float = 1.0                 # weight of the visual branch, >= 0
    mask: Tensor | None = None         # (B or 1, N) subject location in [0, 1] from the previous step; None: M = 1
    placeholder: Tensor | None = None  # (B or 1, T) 1 on the subject's placeholder columns of each row whose text
                                       # holds it, 0 elsewhere; None: no placeholder (no bias, no text map)

    def __post_init__(self) -> None:
        if not math.isfinite(self.gamma) or self.gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")
        if self.visual_k.ndim != 3 or self.visual_k.shape != self.visual_v.shape:
            raise ValueError("visual_k and visual_v must both be (B, S, H*D) with equal shapes, "
                             f"got {tuple(self.visual_k.shape)} and {tuple(self.visual_v.shape)}")
        for name in ("mask", "placeholder"):
            value = getattr(self, name)
            if value is not None and value.ndim != 2:
                raise ValueError(f"{name} must be 2-D, (B, N) or (B, T), got shape {tuple(value.shape)}")


@dataclass(frozen=True, eq=False)
class SubjectMaps:
    """Attention maps of one subject in one layer, fp32, mean over heads (Sec. 3.4 mask extraction)."""

    text: Tensor            # (B, N) the placeholder's probability in the biased text softmax; 0 in rows without it
    visual: Tensor | None   # (B, N) visual attention normalised over space, mean over visual tokens (sums to 1
                            # over N); None when not asked for (training's text-only L_loc)


def placeholder_columns(rows: Sequence[Sequence[int]], keys: int, device: torch.device | None = None) -> Tensor:
    """A :attr:`SubjectBranch.placeholder` from each row's placeholder positions (empty: the row has none).
    Shapes: -> (B, keys) fp32."""
    columns = torch.zeros(len(rows), keys)
    for row, positions in enumerate(rows):
        if positions and max(positions) >= keys:
            raise ValueError(f"row {row}: placeholder column {max(positions)} is outside a text context of {keys} "
                             f"tokens")
        columns[row, list(positions)] = 1.0
    return columns.to(device)


def placeholder_bias(subjects: Sequence[SubjectBranch], queries: int, eps: float) -> Tensor | None:
    """The additive text bias of Eq. 3: log max(M, eps) on each subject's placeholder columns, summed over subjects
    (subjects sharing a column multiply their masks). Shapes: -> (B or 1, N, T) fp32, or None when no subject has
    both a mask and a placeholder."""
    bias = None
    for subject in subjects:
        if subject.mask is None or subject.placeholder is None:
            continue
        log_mask = rearrange(subject.mask.float().clamp_min(eps).log(), "b n -> b n 1")
        term = log_mask * rearrange(subject.placeholder.to(log_mask.device, torch.float32), "b t -> b 1 t")
        bias = term if bias is None else bias + term
    return bias


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, heads: int, subjects: Sequence[SubjectBranch], eps: float) -> None:
    """Raises ValueError on inconsistent shapes, naming what was expected and what was found."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v must be (B, L, H*D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, queries, inner = q.shape
    if heads <= 0 or inner % heads:
        raise ValueError(f"inner dim {inner} must be divisible by heads={heads}")
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != inner:
        raise ValueError(f"k and v must be ({batch}, T, {inner}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    for index, subject in enumerate(subjects):
        rows, _, width = subject.visual_k.shape
        if rows not in (1, batch) or width != inner:
            raise ValueError(f"subject {index}: visual_k/visual_v must be ({batch} or 1, S, {inner}), "
                             f"got {tuple(subject.visual_k.shape)}")
        for name, length in (("mask", queries), ("placeholder", k.shape[1])):
            value = getattr(subject, name)
            if value is not None and (value.shape[0] not in (1, batch) or value.shape[1] != length):
                raise ValueError(f"subject {index}: {name} must be ({batch} or 1, {length}), "
                                 f"got {tuple(value.shape)}")


def customcontrast_attention(q: Tensor, k: Tensor, v: Tensor, *, heads: int, subjects: Sequence[SubjectBranch] = (),
                             eps: float = 1e-6, capture: bool = False, visual_maps: bool = True,
                             scale: float | None = None) -> tuple[Tensor, list[SubjectMaps] | None]:
    """Masked text cross-attention plus each subject's masked visual branch (Eq. 3); with ``capture`` also each
    subject's maps (Sec. 3.4), the visual ones unless ``visual_maps`` is off.

    Shapes: q (B, N, H*D), k/v (B, T, H*D) -> (B, N, H*D) in q's dtype, and with capture one SubjectMaps
    (text (B, N), visual (B, N), fp32) per subject, in the order of ``subjects``. ``scale`` defaults to D ** -0.5.
    """
    _check_inputs(q, k, v, heads, subjects, eps)
    batch, queries, inner = q.shape
    scale = (inner // heads) ** -0.5 if scale is None else scale
    dtype = torch.float32 if capture else q.dtype
    qh, kh, vh = (rearrange(x.to(dtype), "b l (h d) -> b h l d", h=heads) for x in (q, k, v))
    bias = placeholder_bias(subjects, queries, eps)
    bias = None if bias is None else rearrange(bias.to(q.device, dtype), "b n t -> b 1 n t")

    # text attention: explicit where its probabilities are read, fused elsewhere
    if capture:
        logits = einsum(qh, kh, "b h n d, b h t d -> b h n t") * scale
        probs = (logits if bias is None else logits + bias).softmax(dim=-1)
        out = einsum(probs, vh, "b h n t, b h t d -> b h n d")
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale)

    maps = [] if capture else None
    for subject in subjects:
        visual_k, visual_v = (rearrange(x.to(q.device, dtype), "b s (h d) -> b h s d", h=heads).expand(batch, -1, -1, -1)
                              for x in (subject.visual_k, subject.visual_v))
        if capture:
            placeholder = torch.zeros(1, k.shape[1], device=q.device) if subject.placeholder is None \
                else subject.placeholder.to(q.device, torch.float32)
            text = reduce(einsum(probs, placeholder.expand(batch, -1), "b h n t, b t -> b h n"), "b h n -> b n", "mean")
            visual = None
            if visual_maps:   # the visual logits normalised over space (not over the visual tokens)
                spatial = (einsum(qh, visual_k, "b h n d, b h s d -> b h n s") * scale).softmax(dim=2)
                visual = reduce(spatial, "b h n s -> b n", "mean")
            maps.append(SubjectMaps(text=text, visual=visual))
        if subject.gamma != 0:
            branch = F.scaled_dot_product_attention(qh, visual_k, visual_v, scale=scale)      # (B, H, N, D)
            if subject.mask is not None:
                branch = branch * rearrange(subject.mask.to(q.device, dtype), "b n -> b 1 n 1")
            out = out + subject.gamma * branch
    return rearrange(out, "b h n d -> b n (h d)").to(q.dtype), maps


def plain_attention(q: Tensor, k: Tensor, v: Tensor, *, heads: int, scale: float | None = None) -> Tensor:
    """Unmodified multi-head cross-attention, the reference for the patched layer.

    Shapes: q (B, N, H*D), k/v (B, T, H*D) -> (B, N, H*D).
    """
    qh, kh, vh = (rearrange(x, "b l (h d) -> b h l d", h=heads) for x in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(qh, kh, vh, scale=scale), "b h n d -> b n (h d)")

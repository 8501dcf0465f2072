"""Patched cross-attention of CustomContrast (Eq. 3, Sec. 3.4), shared by the ComfyUI patch and training.

For one cross-attention layer with queries Q from the latent,

    out = softmax(Q K_t^T * scale + log max(M, eps) on the placeholder columns) V_t
        + sum_s gamma_s * M_s ⊙ softmax(Q K_s^T * scale) V_s

where K_t, V_t come from the prompt encoded with this layer's S+ token and K_s, V_s are the subject's
visual tokens projected by W_k^v, W_v^v. The log-bias is the same as multiplying the placeholder's
probability by M and renormalising each row. Layers whose maps are captured compute both branches
explicitly in fp32 (77 + m keys: cheap) to read the probabilities; the others run fused SDPA per
branch with the bias as a float attention mask (same function, the inputs' precision).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SubjectBranch", "SubjectMaps", "customcontrast_attention", "placeholder_bias", "plain_attention"]


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

    @property
    def has_columns(self) -> bool:
        return bool(self.columns) or self.column_weights is not None


@dataclass(frozen=True, eq=False)
class SubjectMaps:
    """Attention maps of one subject in one layer, fp32, mean over heads (Sec. 3.4 mask extraction)."""

    text: Tensor            # (B, N) placeholder probability from the biased text softmax; 0 outside text_rows
    visual: Tensor | None   # (B, N) visual attention normalised over space, mean over visual tokens; sums to 1
                            # over N (None when not asked for: training's L_loc reads only the text map)


# Helpers

def _check_inputs(q: Tensor, k: Tensor, v: Tensor, heads: int, subjects: Sequence[SubjectBranch]) -> None:
    """Raises ValueError on inconsistent shapes, naming what was expected and what was found."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v must be (B, L, H*D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, tokens, inner = q.shape
    if heads <= 0 or inner % heads:
        raise ValueError(f"inner dim {inner} must be divisible by heads={heads}")
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != inner:
        raise ValueError(f"k and v must be ({batch}, T, {inner}), got {tuple(k.shape)} and {tuple(v.shape)}")
    for index, subject in enumerate(subjects):
        sb, _, sd = subject.visual_k.shape
        if sb not in (1, batch) or sd != inner:
            raise ValueError(
                f"subject {index}: visual_k/visual_v must be ({batch} or 1, S, {inner}), "
                f"got {tuple(subject.visual_k.shape)}"
            )
        if subject.mask is not None and (subject.mask.shape[0] not in (1, batch) or subject.mask.shape[1] != tokens):
            raise ValueError(
                f"subject {index}: mask must be ({batch} or 1, {tokens}), got {tuple(subject.mask.shape)}"
            )
        if subject.text_rows is not None and subject.text_rows.shape[0] != batch:
            raise ValueError(f"subject {index}: text_rows must have {batch} rows, got {subject.text_rows.shape[0]}")
        weights = subject.column_weights
        if weights is not None and (weights.shape[0] not in (1, batch) or weights.shape[1] != k.shape[1]):
            raise ValueError(f"subject {index}: column_weights must be ({batch} or 1, {k.shape[1]}), "
                             f"got {tuple(weights.shape)}")
        if subject.columns and max(subject.columns) >= k.shape[1]:
            raise ValueError(
                f"subject {index}: placeholder column {max(subject.columns)} is outside a text context "
                f"of {k.shape[1]} tokens"
            )


def _row_weights(subject: SubjectBranch, batch: int, device: torch.device) -> Tensor:
    """Returns 1 for rows whose context holds the placeholder and 0 elsewhere.  Shapes: -> (B, 1)."""
    if subject.text_rows is None:
        return torch.ones(batch, 1, device=device)
    return subject.text_rows.to(device=device, dtype=torch.float32)[:, None]          # b -> b 1


def placeholder_bias(
    subjects: Sequence[SubjectBranch], batch: int, queries: int, keys: int, eps: float, device: torch.device
) -> Tensor | None:
    """Builds the additive log max(M, eps) bias on every subject's placeholder columns (Eq. 3).

    Shapes: -> (B, N, T) fp32, or None when no subject has both a mask and columns. Columns are
    written one integer index at a time: no index tensor is copied to the device. The result depends
    only on the masks, columns and text rows, so a caller may compute it once for several layers of
    the same grid and pass it to :func:`customcontrast_attention` as ``bias``.
    """
    bias = None
    for subject in subjects:
        if subject.mask is None or not subject.has_columns:
            continue
        if bias is None:
            bias = torch.zeros(batch, queries, keys, device=device)
        log_mask = torch.log(subject.mask.to(device=device, dtype=torch.float32).clamp_min(eps))
        log_mask = log_mask.expand(batch, queries) * _row_weights(subject, batch, device)   # (B, N)
        if subject.column_weights is not None:   # each row its own columns: b n, b t -> b n t
            bias = bias + log_mask[:, :, None] * subject.column_weights.to(device, torch.float32)[:, None, :]
        for column in subject.columns:
            bias[:, :, column] += log_mask
    return bias


# The per-layer helpers below run for every patched layer at every model evaluation, where host time
# counts (a GPU step is bound by launching kernels from Python): they use tensor methods directly,
# which dispatch the same view operators as the einops patterns in their comments in about half the time.

def _heads(x: Tensor, heads: int) -> Tensor:
    """b n (h d) -> b h n d (a view)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """b h n d -> b n (h d)."""
    return x.transpose(1, 2).flatten(2)


def _text_branch(qh: Tensor, kh: Tensor, vh: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Text cross-attention with the additive placeholder bias, fused SDPA in the inputs' dtype.

    Shapes: qh (B, H, N, D), kh/vh (B, H, T, D), bias (B, N, T) fp32 or None -> (B, N, H*D).
    """
    mask = None if bias is None else bias[:, None].to(qh.dtype)                  # b i j -> b 1 i j
    return _merge(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale))


def _visual_branch(qh: Tensor, subject: SubjectBranch, heads: int, scale: float) -> Tensor:
    """One subject's visual attention (Eq. 3, second term), fused SDPA. Shapes: qh (B, H, N, D) -> (B, N, H*D)."""
    batch = qh.shape[0]
    vk = _heads(subject.visual_k.to(qh.device, qh.dtype), heads).expand(batch, -1, -1, -1)
    vv = _heads(subject.visual_v.to(qh.device, qh.dtype), heads).expand(batch, -1, -1, -1)
    return _merge(F.scaled_dot_product_attention(qh, vk, vv, scale=scale))


def _placeholder_map(probs: Tensor, subject: SubjectBranch) -> Tensor:
    """The placeholder's text-attention probability, mean over heads. Shapes: probs (B, H, N, T) -> (B, N)."""
    batch, _, queries, _ = probs.shape
    if subject.column_weights is not None:   # each row its own columns: b h n t, b t -> b h n
        weights = subject.column_weights.to(probs.device, probs.dtype)[:, None, :, None]   # b t -> b 1 t 1
        placeholder = torch.matmul(probs, weights).squeeze(-1)
    elif not subject.columns:
        return torch.zeros(batch, queries, device=probs.device)
    else:
        placeholder = probs[..., subject.columns[0]]                              # (B, H, N), integer index
    for column in subject.columns[1:]:
        placeholder = placeholder + probs[..., column]
    text = placeholder.mean(1)                                                    # b h n -> b n
    if subject.text_rows is None:
        return text
    return torch.where(subject.text_rows.to(probs.device)[:, None], text, 0.0)   # 0 outside the text rows


def _captured(q: Tensor, k: Tensor, v: Tensor, heads: int, subjects: Sequence[SubjectBranch], bias: Tensor | None,
              scale: float, visual_maps: bool = True) -> tuple[Tensor, list[SubjectMaps]]:
    """Text and visual branches of one layer in two matmuls, explicit fp32, with the maps (Sec. 3.4).

    Logits of the queries against [K_t; K_v1; ...] are computed at once; the text part gets the bias
    and its own softmax, each subject's part its own softmax (over its tokens for the output, over
    space for the map), weighted by gamma * M; then one matmul with [V_t; V_v1; ...] sums the branches.
    The fp32 casts ride on operators that run anyway: q is cast in the copy that makes its heads
    contiguous, the key and value concatenations promote to fp32, the scale is the matmul's alpha, and
    the output is merged and cast back in one copy.
    Shapes: q (B, N, H*D), k/v (B, T, H*D), any float dtype -> (B, N, H*D) in q's dtype, one SubjectMaps
    (fp32) per subject.
    """
    batch, text_keys = q.shape[0], k.shape[1]
    qh = _heads(q, heads).to(torch.float32, memory_format=torch.contiguous_format)        # (B, H, N, D), one copy
    visual_k = [_heads(s.visual_k.to(q.device), heads).expand(batch, -1, -1, -1) for s in subjects]
    visual_v = [_heads(s.visual_v.to(q.device), heads).expand(batch, -1, -1, -1) for s in subjects]
    # concatenated per head (contiguous for the matmuls), promoted to fp32 by cat: the casts are no-ops
    # unless every input is in a lower precision
    keys = torch.cat([_heads(k, heads), *visual_k], dim=2).to(torch.float32)              # (B, H, T + S..., D)
    values = torch.cat([_heads(v, heads), *visual_v], dim=2).to(torch.float32)
    # the softmax scale is applied in fp32 inside the matmul (alpha); beta = 0 ignores the empty input
    sim = torch.baddbmm(qh.new_empty(()), qh.flatten(0, 1), keys.flatten(0, 1).transpose(1, 2), beta=0,
                        alpha=scale).unflatten(0, (batch, heads))                           # (B, H, N, T + S...)
    # one split, not a slice per branch: its gradient is one concatenation instead of a zero-filled copy each
    text, *parts = sim.split([text_keys, *(vk.shape[2] for vk in visual_k)], dim=-1)   # (B, H, N, T), (B, H, N, S)...
    if bias is not None:
        text = text + bias[:, None]                                               # b i j -> b 1 i j
    probs = [text.softmax(dim=-1)]
    maps = []
    for subject, part in zip(subjects, parts):
        weight = subject.gamma if subject.mask is None else \
            subject.mask.to(q.device, torch.float32)[:, None, :, None] * subject.gamma   # b n -> b 1 n 1
        probs.append(part.softmax(dim=-1) * weight)
        maps.append(SubjectMaps(text=_placeholder_map(probs[0], subject),
                                visual=part.softmax(dim=2).mean((1, 3)) if visual_maps else None))   # b h i j -> b i
    out = torch.matmul(torch.cat(probs, dim=-1), values)                                 # (B, H, N, D)
    merged = out.transpose(1, 2).to(q.dtype, memory_format=torch.contiguous_format)       # b n h d, one copy
    return merged.flatten(2), maps


# Public API

def customcontrast_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    heads: int,
    subjects: Sequence[SubjectBranch] = (),
    eps: float = 1e-6,
    capture: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    visual_maps: bool = True,
) -> tuple[Tensor, list[SubjectMaps] | None]:
    """Computes masked text cross-attention plus each subject's masked visual branch (Eq. 3, Sec. 3.4).

    Shapes: q (B, N, H*D), k/v (B, T, H*D) -> (B, N, H*D) in q's dtype, and with capture one
    SubjectMaps (text (B, N), visual (B, N), fp32) per subject, in the order of `subjects`.

    The text softmax gets log max(M, eps) added on each subject's placeholder columns (only in its
    text_rows); a subject's visual output is weighted by gamma * M (M broadcast over heads and
    channels). Subjects sharing a column multiply their masks. A branch with gamma = 0 is skipped
    unless maps are captured; ``visual_maps=False`` leaves the visual maps out (None). `scale` defaults
    to D ** -0.5. `bias` (B, N, T) fp32 is
    :func:`placeholder_bias` of the same subjects, when the caller already has it.

    Layers that capture maps compute every branch explicitly in fp32 in two matmuls; the others
    stay in q's dtype (fused SDPA per branch, the visual output added with one fused multiply-add).
    """
    _check_inputs(q, k, v, heads, subjects)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    batch, queries, inner = q.shape
    scale = (inner // heads) ** -0.5 if scale is None else scale
    if bias is None:
        bias = placeholder_bias(subjects, batch, queries, k.shape[1], eps, q.device)
    elif tuple(bias.shape) != (batch, queries, k.shape[1]):
        raise ValueError(f"bias must be ({batch}, {queries}, {k.shape[1]}), got {tuple(bias.shape)}")

    if capture:
        return _captured(q, k, v, heads, subjects, bias, scale, visual_maps)
    qh = _heads(q, heads)
    out = _text_branch(qh, _heads(k, heads), _heads(v, heads), bias, scale)
    for subject in subjects:
        if subject.gamma == 0:
            continue
        visual = _visual_branch(qh, subject, heads, scale)
        if subject.mask is None:
            out = torch.add(out, visual, alpha=subject.gamma)
        else:
            weight = subject.mask.to(q.device, out.dtype)[..., None]             # b n -> b n 1
            out = torch.addcmul(out, weight, visual, value=subject.gamma)
    return out, None


def plain_attention(q: Tensor, k: Tensor, v: Tensor, *, heads: int, scale: float | None = None) -> Tensor:
    """Computes unmodified multi-head cross-attention with SDPA, the reference for the patched layer.

    Shapes: q (B, N, H*D), k/v (B, T, H*D) -> (B, N, H*D).
    """
    return _merge(F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale=scale))

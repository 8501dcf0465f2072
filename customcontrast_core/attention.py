"""Patched cross-attention of CustomContrast (Eq. 3, Sec. 3.4), shared by the ComfyUI patch and training.

For one cross-attention layer with queries Q from the latent,

    out = softmax(Q K_t^T * scale + log max(M, eps) on the placeholder columns) V_t
        + sum_s gamma_s * M_s ⊙ softmax(Q K_s^T * scale) V_s

where K_t, V_t come from the prompt encoded with this layer's S+ token and K_s, V_s are the subject's
visual tokens projected by W_k^v, W_v^v. The log-bias is the same as multiplying the placeholder's
probability by M and renormalising each row. Every branch is fused attention (SDPA) with the bias as
a float attention mask. Layers whose maps are captured run in fp32 and read the placeholder's
probability from extra value channels of the text attention (one per subject, 1 on its columns);
the others run in the inputs' precision (capture layers: :mod:`customcontrast_core.capture`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .branches import SubjectBranch, SubjectMaps
from .capture import captured_attention
from .layout import batched, cast, merge_heads, over_heads, split_heads

__all__ = ["SubjectBranch", "SubjectMaps", "customcontrast_attention", "placeholder_bias", "placeholder_probe",
           "plain_attention"]


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


BIAS_ALIGNMENT = 16   # the key axis of a bias is allocated in multiples of this: fused attention kernels that
                      # need aligned rows of an additive mask (CUDA memory-efficient SDPA) read it without a padded copy
PROBE_WIDTH = 8       # value channels added per 8 subjects in capture layers (fused kernels want widths in multiples of 8)


def placeholder_bias(
    subjects: Sequence[SubjectBranch], batch: int, queries: int, keys: int, eps: float, device: torch.device,
    dtype: torch.dtype = torch.float32, columns: Tensor | None = None,
) -> Tensor | None:
    """Builds the additive log max(M, eps) bias on every subject's placeholder columns (Eq. 3).

    Per subject the bias is the outer product of its log-mask over the queries and its columns over the keys
    (1 on its placeholder columns in its text rows: :func:`placeholder_probe`'s channel, which ``columns``
    may pass in, (B, T, >= S), when the caller keeps it). Shapes: -> (B, N, T) in ``dtype`` (its rows padded
    to a multiple of BIAS_ALIGNMENT in memory: a view), or None when no subject has both a mask and columns.
    The result depends only on the masks, columns and text rows, so a caller may compute it once for several
    layers of the same grid and pass it to :func:`customcontrast_attention` as ``bias``.
    """
    masked = [index for index, subject in enumerate(subjects) if subject.mask is not None and subject.has_columns]
    if not masked:
        return None
    if columns is None:
        columns = placeholder_probe(subjects, batch, keys, device)[:, 0]                   # (B, T, P)
    padded = -(-keys // BIAS_ALIGNMENT) * BIAS_ALIGNMENT
    bias = torch.empty(batch, queries, padded, device=device, dtype=dtype)[..., :keys]
    for order, index in enumerate(masked):
        log_mask = torch.log(cast(subjects[index].mask, device, torch.float32).clamp_min(eps))   # (B or 1, N)
        outer = (log_mask[:, :, None], columns[:, None, :, index])                          # b n 1, b 1 t
        if order == 0:
            torch.mul(*outer, out=bias)
        else:   # subjects sharing a column multiply their masks
            bias.addcmul_(*outer)
    return bias


def placeholder_probe(subjects: Sequence[SubjectBranch], batch: int, keys: int, device: torch.device) -> Tensor:
    """Value channels that make the text attention of a capture layer return each subject's map (Sec. 3.4).

    Channel s is 1 on subject s's placeholder columns (its per-row ``column_weights`` as given) in its
    text rows and 0 elsewhere: appended to V_t, the attention output's channel D + s is the placeholder's
    probability (summed over its columns) at every query, from the same biased softmax as the output.
    Like the bias it depends only on the columns and rows: compute it once for many layers.
    Shapes: -> (B, 1, T, P) fp32 with P = PROBE_WIDTH * ceil(S / PROBE_WIDTH).
    """
    width = PROBE_WIDTH * max(1, -(-len(subjects) // PROBE_WIDTH))
    probe = torch.zeros(batch, keys, width, device=device)
    for index, subject in enumerate(subjects):
        rows = None if subject.text_rows is None else _row_weights(subject, batch, device)      # (B, 1)
        if subject.column_weights is not None:
            weights = subject.column_weights.to(device, torch.float32).expand(batch, keys)
            probe[:, :, index] = weights if rows is None else weights * rows
        for column in subject.columns:
            probe[:, column, index] = 1.0 if rows is None else rows[:, 0]
    return probe[:, None]


def _text_branch(qh: Tensor, kh: Tensor, vh: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Text cross-attention with the additive placeholder bias, fused SDPA in the inputs' dtype.

    Shapes: qh (B, H, N, D), kh/vh (B, H, T, D), bias (B, N, T) or (B, 1, N, T), or None -> (B, N, H*D).
    """
    mask = None if bias is None else cast(over_heads(bias), qh.device, qh.dtype)     # b i j -> b 1 i j
    return merge_heads(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale))


def _visual_branch(qh: Tensor, subject: SubjectBranch, heads: int, scale: float) -> Tensor:
    """One subject's visual attention (Eq. 3, second term), fused SDPA. Shapes: qh (B, H, N, D) -> (B, N, H*D)."""
    batch = qh.shape[0]
    vk = batched(split_heads(cast(subject.visual_k, qh.device, qh.dtype), heads), batch)
    vv = batched(split_heads(cast(subject.visual_v, qh.device, qh.dtype), heads), batch)
    return merge_heads(F.scaled_dot_product_attention(qh, vk, vv, scale=scale))


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
    probe: Tensor | None = None,
    visual_maps: bool = True,
    validate: bool = True,
) -> tuple[Tensor, list[SubjectMaps] | None]:
    """Computes masked text cross-attention plus each subject's masked visual branch (Eq. 3, Sec. 3.4).

    Shapes: q (B, N, H*D), k/v (B, T, H*D) -> (B, N, H*D) in q's dtype, and with capture one
    SubjectMaps (text (B, N), visual (B, N), fp32) per subject, in the order of `subjects`.

    The text softmax gets log max(M, eps) added on each subject's placeholder columns (only in its
    text_rows); a subject's visual output is weighted by gamma * M (M broadcast over heads and
    channels). Subjects sharing a column multiply their masks. A branch with gamma = 0 is skipped
    unless maps are captured; ``visual_maps=False`` leaves the visual maps out (None). `scale` defaults
    to D ** -0.5. `bias` (B, N, T), or its (B, 1, N, T) view, is :func:`placeholder_bias` of the same
    subjects and `probe` :func:`placeholder_probe` (or its expansion over heads), when the caller already
    has them (one per grid and evaluation). ``validate=False`` skips the shape checks, for a caller that
    checked these shapes before (every layer of every sampling step calls this).

    Every branch is fused attention with the bias as a float mask. Layers that capture maps run in fp32
    and read the text map from probe channels of the text attention (:func:`~customcontrast_core.capture.captured_attention`); the others
    stay in q's dtype (the visual output added with one fused multiply-add).
    """
    batch, queries, inner = q.shape
    if validate:
        _check_inputs(q, k, v, heads, subjects)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if bias is not None and tuple(bias.shape) not in ((batch, queries, k.shape[1]), (batch, 1, queries, k.shape[1])):
            raise ValueError(f"bias must be ({batch}, {queries}, {k.shape[1]}) or ({batch}, 1, {queries}, "
                             f"{k.shape[1]}), got {tuple(bias.shape)}")
        if capture and probe is not None and (
                probe.ndim != 4 or probe.shape[0] not in (1, batch) or probe.shape[1] not in (1, heads)
                or probe.shape[2] != k.shape[1] or probe.shape[3] < len(subjects)):
            raise ValueError(f"probe must be ({batch} or 1, 1 or {heads}, {k.shape[1]}, >= {len(subjects)}), "
                             f"got {tuple(probe.shape)}")
    scale = (inner // heads) ** -0.5 if scale is None else scale
    if bias is None:
        bias = placeholder_bias(subjects, batch, queries, k.shape[1], eps, q.device,
                                torch.float32 if capture else q.dtype)
    if capture:
        if probe is None:
            probe = placeholder_probe(subjects, batch, k.shape[1], q.device)
        return captured_attention(q, k, v, heads, subjects, bias, probe, scale, visual_maps)
    qh = split_heads(q, heads)
    out = _text_branch(qh, split_heads(k, heads), split_heads(v, heads), bias, scale)
    for subject in subjects:
        if subject.gamma == 0:
            continue
        visual = _visual_branch(qh, subject, heads, scale)
        if subject.mask is None:
            out = torch.add(out, visual, alpha=subject.gamma)
        else:
            weight = cast(subject.mask, q.device, out.dtype)[..., None]                 # b n -> b n 1
            out = torch.addcmul(out, weight, visual, value=subject.gamma)
    return out, None


def plain_attention(q: Tensor, k: Tensor, v: Tensor, *, heads: int, scale: float | None = None) -> Tensor:
    """Computes unmodified multi-head cross-attention with SDPA, the reference for the patched layer.

    Shapes: q (B, N, H*D), k/v (B, T, H*D) -> (B, N, H*D).
    """
    return merge_heads(F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), scale=scale))

"""Patched cross-attention of CustomContrast (Eq. 3, Sec. 3.4), shared by the ComfyUI patch and training.

For one cross-attention layer with queries Q from the latent,

    out = softmax(Q K_t^T * scale + log max(M, eps) on the placeholder columns) V_t
        + sum_s gamma_s * M_s ⊙ softmax(Q K_s^T * scale) V_s

where K_t, V_t come from the prompt encoded with this layer's S+ token and K_s, V_s are the subject's
visual tokens projected by W_k^v, W_v^v. The log-bias is the same as multiplying the placeholder's
probability by M and renormalising each row. Every branch is fused attention (SDPA) with the bias as
a float attention mask. Layers whose maps are captured run in fp32 and read the placeholder's
probability from extra value channels of the text attention (one per subject, 1 on its columns);
the others run in the inputs' precision.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SubjectBranch", "SubjectMaps", "customcontrast_attention", "placeholder_bias", "placeholder_probe",
           "plain_attention"]


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
        log_mask = torch.log(_as(subjects[index].mask, device, torch.float32).clamp_min(eps))   # (B or 1, N)
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


# The per-layer helpers below run for every patched layer at every model evaluation, where host time
# counts (a GPU step is bound by launching kernels from Python): they use tensor methods directly,
# which dispatch the same view operators as the einops patterns in their comments in about half the time.

def _as(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``x.to(device, dtype)``, without a dispatcher call when it is one already."""
    return x if x.dtype == dtype and x.device == device else x.to(device, dtype)


def _batched(x: Tensor, batch: int) -> Tensor:
    """Expands the leading axis of (1, ...) to ``batch``; no dispatcher call when it has it already."""
    return x if x.shape[0] == batch else x.expand(batch, *x.shape[1:])


def _heads(x: Tensor, heads: int) -> Tensor:
    """b n (h d) -> b h n d (a view; ``view`` dispatches faster than ``unflatten``, a Python-level wrapper)."""
    return x.view(*x.shape[:-1], heads, -1).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """b h n d -> b n (h d)."""
    return x.transpose(1, 2).flatten(2)


def _over_heads(bias: Tensor) -> Tensor:
    """A bias broadcast over heads: (B, N, T) -> (B, 1, N, T); already 4-D: as it is."""
    return bias if bias.ndim == 4 else bias[:, None]


def _text_branch(qh: Tensor, kh: Tensor, vh: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Text cross-attention with the additive placeholder bias, fused SDPA in the inputs' dtype.

    Shapes: qh (B, H, N, D), kh/vh (B, H, T, D), bias (B, N, T) or (B, 1, N, T), or None -> (B, N, H*D).
    """
    mask = None if bias is None else _as(_over_heads(bias), qh.device, qh.dtype)     # b i j -> b 1 i j
    return _merge(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale))


def _visual_branch(qh: Tensor, subject: SubjectBranch, heads: int, scale: float) -> Tensor:
    """One subject's visual attention (Eq. 3, second term), fused SDPA. Shapes: qh (B, H, N, D) -> (B, N, H*D)."""
    batch = qh.shape[0]
    vk = _batched(_heads(_as(subject.visual_k, qh.device, qh.dtype), heads), batch)
    vv = _batched(_heads(_as(subject.visual_v, qh.device, qh.dtype), heads), batch)
    return _merge(F.scaled_dot_product_attention(qh, vk, vv, scale=scale))


def _probed_text(qh: Tensor, kh: Tensor, values: Tensor, mask: Tensor | None, scale: float,
                 equal_widths: bool) -> Tensor:
    """Text attention over values wider than the keys (V_t and the probe channels), fused.

    CUDA's memory-efficient kernel takes value widths other than the key width; the CPU's fused kernel
    does not (it would fall back to the unfused math), so there ``equal_widths`` pads queries and keys with
    zero channels, which add 0 to every logit. Shapes: qh (B, H, N, D), kh (B, H, T, D), values
    (B, H, T, D + P), mask (B, 1, N, T) or None -> (B, H, N, D + P).
    """
    if equal_widths:
        qh, kh = _widened(qh, kh, values.shape[-1])
    return F.scaled_dot_product_attention(qh, kh, values, attn_mask=mask, scale=scale)


def _widened(qh: Tensor, kh: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Queries and keys zero-padded to ``width`` channels (CPU only: its fused kernel needs equal widths)."""
    extra = width - qh.shape[-1]
    return F.pad(qh, (0, extra)), F.pad(kh, (0, extra))


def _captured(q: Tensor, k: Tensor, v: Tensor, heads: int, subjects: Sequence[SubjectBranch], bias: Tensor | None,
              probe: Tensor, scale: float, visual_maps: bool = True) -> tuple[Tensor, list[SubjectMaps]]:
    """Both branches of one layer in fp32 fused attention, with the maps (Sec. 3.4).

    The text attention runs over V_t with the probe channels appended (:func:`placeholder_probe`), so its
    output carries each subject's placeholder probability next to the attended values: the text map costs
    one mean over heads. The visual map needs the visual logits normalised over space (not over the visual
    tokens, as the output does): one matmul with the queries and a softmax over them. The fp32 casts ride on
    copies that run anyway (q's heads made contiguous for that matmul, the keys' and values' concatenation); without
    autograd the last branch is added straight into the merged output in q's dtype (no copy to merge and cast).
    Shapes: q (B, N, H*D), k/v (B, T, H*D), any float dtype, probe (B or 1, 1 or H, T, P),
    bias (B, N, T) or (B, 1, N, T) -> (B, N, H*D) in q's dtype, one SubjectMaps (fp32) per subject.
    """
    batch, queries, dims, device = q.shape[0], q.shape[1], q.shape[-1] // heads, q.device
    f32 = torch.float32
    # with every subject's keys split head-first, q's copy is head-first too: the map's matmul flattens both
    first = visual_maps and all(s.visual_k_heads is not None and s.visual_k_heads.shape[:2] == (heads, batch)
                                for s in subjects)
    if first:
        qf = q.view(batch, queries, heads, dims).permute(2, 0, 1, 3).to(f32, memory_format=torch.contiguous_format)
        qh = qf.transpose(0, 1)                                                           # (B, H, N, D) view
    else:
        qh = qf = _heads(q, heads).to(f32, memory_format=torch.contiguous_format)        # (B, H, N, D), one copy
    if probe.shape[0] != batch or probe.shape[1] != heads:
        probe = probe.expand(batch, heads, -1, -1)
    # the concatenation promotes to fp32 (its cast is a no-op unless the inputs are float64); without autograd
    # K_t joins it (keys and values are views of one copy), with autograd its gradient stays whole
    grad = torch.is_grad_enabled()
    parts = [_heads(v, heads), probe] if grad else [_heads(k, heads), _heads(v, heads), probe]
    kv = torch.cat(parts, dim=-1).to(f32)                                                # (B, H, T, [D +] D + P)
    kh, values = (_heads(k, heads).to(f32), kv) if grad else (kv[..., :dims], kv[..., dims:])
    mask = None if bias is None else _as(_over_heads(bias), device, f32)                 # b i j -> b 1 i j
    text = _probed_text(qh, kh, values, mask, scale, equal_widths=device.type == "cpu")   # (B, H, N, D + P)
    out, maps, added = text[..., :dims], [], []
    for index, subject in enumerate(subjects):
        visual_k = _batched(_heads(_as(subject.visual_k, device, f32), heads), batch)
        visual = None
        if visual_maps:   # softmax over space of the visual logits, mean over heads and visual tokens
            keys = _as(subject.visual_k_heads, device, f32) if first else visual_k         # (H, B, S, D) or (B, H, S, D)
            logits = torch.baddbmm(qf.new_empty(()), qf.flatten(0, 1), keys.flatten(0, 1).transpose(1, 2),
                                   beta=0, alpha=scale)                                     # (H*B or B*H, N, S)
            visual = logits.unflatten(0, qf.shape[:2]).softmax(dim=2).mean((0, 3) if first else (1, 3))   # -> b i
        maps.append(SubjectMaps(text=text[..., dims + index].mean(1), visual=visual))     # b h n -> b n
        if subject.gamma != 0:
            visual_v = _batched(_heads(_as(subject.visual_v, device, f32), heads), batch)
            branch = F.scaled_dot_product_attention(qh, visual_k, visual_v, scale=scale)   # (B, H, N, D)
            weight = None if subject.mask is None else _as(subject.mask, device, f32).reshape(
                subject.mask.shape[0], 1, queries, 1)                                     # b n -> b 1 n 1
            added.append((branch, weight, subject.gamma))
    if grad:   # autograd: out= operators record no graph
        out = _added(out, added)
        return out.transpose(1, 2).to(q.dtype, memory_format=torch.contiguous_format).flatten(2), maps
    merged = torch.empty(batch, queries, heads, dims, device=device, dtype=q.dtype)       # b n h d
    target = merged.transpose(1, 2)
    if added:
        _added(out, added[:-1], last=added[-1], into=target)
    else:
        target.copy_(out)
    return merged.flatten(2), maps


def _added(out: Tensor, branches: list, last: tuple | None = None, into: Tensor | None = None) -> Tensor:
    """out + sum of gamma * weight * branch (weight None: 1); the ``last`` term written ``into`` that tensor."""
    for branch, weight, gamma in branches:
        out = torch.add(out, branch, alpha=gamma) if weight is None else torch.addcmul(out, weight, branch, value=gamma)
    if last is None:
        return out
    branch, weight, gamma = last
    if weight is None:
        return torch.add(out, branch, alpha=gamma, out=into)
    return torch.addcmul(out, weight, branch, value=gamma, out=into)


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
    and read the text map from probe channels of the text attention (:func:`_captured`); the others
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
        return _captured(q, k, v, heads, subjects, bias, probe, scale, visual_maps)
    qh = _heads(q, heads)
    out = _text_branch(qh, _heads(k, heads), _heads(v, heads), bias, scale)
    for subject in subjects:
        if subject.gamma == 0:
            continue
        visual = _visual_branch(qh, subject, heads, scale)
        if subject.mask is None:
            out = torch.add(out, visual, alpha=subject.gamma)
        else:
            weight = _as(subject.mask, q.device, out.dtype)[..., None]                 # b n -> b n 1
            out = torch.addcmul(out, weight, visual, value=subject.gamma)
    return out, None


def plain_attention(q: Tensor, k: Tensor, v: Tensor, *, heads: int, scale: float | None = None) -> Tensor:
    """Computes unmodified multi-head cross-attention with SDPA, the reference for the patched layer.

    Shapes: q (B, N, H*D), k/v (B, T, H*D) -> (B, N, H*D).
    """
    return _merge(F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale=scale))

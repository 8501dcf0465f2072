"""Capture layers: the patched cross-attention that also returns the subject maps (Sec. 3.4).

Both branches run in fp32 fused attention. The text attention reads the placeholder's probability from extra
value channels (:func:`~customcontrast_core.attention.placeholder_probe`); the visual map is the visual logits
normalised over space. :func:`~customcontrast_core.attention.customcontrast_attention` calls this with
``capture=True``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .branches import SubjectBranch, SubjectMaps
from .layout import batched, cast, over_heads, split_heads

__all__ = ["captured_attention", "probed_text", "widened"]


def probed_text(qh: Tensor, kh: Tensor, values: Tensor, mask: Tensor | None, scale: float,
                 equal_widths: bool) -> Tensor:
    """Text attention over values wider than the keys (V_t and the probe channels), fused.

    CUDA's memory-efficient kernel takes value widths other than the key width; the CPU's fused kernel
    does not (it would fall back to the unfused math), so there ``equal_widths`` pads queries and keys with
    zero channels, which add 0 to every logit. Shapes: qh (B, H, N, D), kh (B, H, T, D), values
    (B, H, T, D + P), mask (B, 1, N, T) or None -> (B, H, N, D + P).
    """
    if equal_widths:
        qh, kh = widened(qh, kh, values.shape[-1])
    return F.scaled_dot_product_attention(qh, kh, values, attn_mask=mask, scale=scale)


def widened(qh: Tensor, kh: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Queries and keys zero-padded to ``width`` channels (CPU only: its fused kernel needs equal widths)."""
    extra = width - qh.shape[-1]
    return F.pad(qh, (0, extra)), F.pad(kh, (0, extra))


def captured_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, subjects: Sequence[SubjectBranch],
                       bias: Tensor | None, probe: Tensor, scale: float,
                       visual_maps: bool = True) -> tuple[Tensor, list[SubjectMaps]]:
    """Both branches of one layer in fp32 fused attention, with the maps (Sec. 3.4).

    The text attention runs over V_t with the probe channels appended (:func:`~customcontrast_core.attention.placeholder_probe`), so its
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
        qh = qf = split_heads(q, heads).to(f32, memory_format=torch.contiguous_format)        # (B, H, N, D), one copy
    if probe.shape[0] != batch or probe.shape[1] != heads:
        probe = probe.expand(batch, heads, -1, -1)
    # the concatenation promotes to fp32 (its cast is a no-op unless the inputs are float64); without autograd
    # K_t joins it (keys and values are views of one copy), with autograd its gradient stays whole
    grad = torch.is_grad_enabled()
    parts = [split_heads(v, heads), probe] if grad else [split_heads(k, heads), split_heads(v, heads), probe]
    kv = torch.cat(parts, dim=-1).to(f32)                                                # (B, H, T, [D +] D + P)
    kh, values = (split_heads(k, heads).to(f32), kv) if grad else (kv[..., :dims], kv[..., dims:])
    mask = None if bias is None else cast(over_heads(bias), device, f32)                 # b i j -> b 1 i j
    text = probed_text(qh, kh, values, mask, scale, equal_widths=device.type == "cpu")   # (B, H, N, D + P)
    out, maps, added = text[..., :dims], [], []
    for index, subject in enumerate(subjects):
        visual_k = batched(split_heads(cast(subject.visual_k, device, f32), heads), batch)
        visual = None
        if visual_maps:   # softmax over space of the visual logits, mean over heads and visual tokens
            keys = cast(subject.visual_k_heads, device, f32) if first else visual_k         # (H, B, S, D) or (B, H, S, D)
            logits = torch.baddbmm(qf.new_empty(()), qf.flatten(0, 1), keys.flatten(0, 1).transpose(1, 2),
                                   beta=0, alpha=scale)                                     # (H*B or B*H, N, S)
            visual = logits.unflatten(0, qf.shape[:2]).softmax(dim=2).mean((0, 3) if first else (1, 3))   # -> b i
        maps.append(SubjectMaps(text=text[..., dims + index].mean(1), visual=visual))     # b h n -> b n
        if subject.gamma != 0:
            visual_v = batched(split_heads(cast(subject.visual_v, device, f32), heads), batch)
            branch = F.scaled_dot_product_attention(qh, visual_k, visual_v, scale=scale)   # (B, H, N, D)
            weight = None if subject.mask is None else cast(subject.mask, device, f32).reshape(
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

"""CustomContrast's losses as pure functions (paper Sec. 3.3-3.4, Eq. 4, 7, 8, 9).

Where the printed paper is ambiguous or wrong, the docstring says what is implemented instead.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from customcontrast_core.masks import combine_maps
from customcontrast_core.propagation import subject_location

LOC_MAPS = ("combined", "text")   # Ā of L_loc: the inference masks' text + visual map, or the text map alone


def _check_pair(a: Tensor, b: Tensor, name: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two (B, D) tensors of equal shape, found {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"{name}: contrastive losses need at least 2 samples (in-batch negatives), found {a.shape[0]}")


def _decoupled_nce(logits: Tensor) -> Tensor:
    """-log(exp(a_ii) / sum_{j != i} exp(a_ij)) per row: the positive is left out of the denominator."""
    b = logits.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    negatives = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
    return negatives - logits.diagonal()


def cscl_loss(visual_cls: Tensor, text_cls: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Cross-modal semantic contrastive loss between visual and textual CLS tokens (Eq. 4).

    Shapes: visual_cls (B, D), text_cls (B, D) -> scalar. a_ij is the cosine similarity of visual i and
    text j. As printed, each direction's denominator sums over j != i (the positive is excluded,
    "decoupled" InfoNCE) and there is no temperature (``temperature=1.0``). The loss is the mean over
    i of the visual->text and text->visual terms, averaged.
    """
    _check_pair(visual_cls, text_cls, "cscl_loss")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, found {temperature}")
    v, t = F.normalize(visual_cls.float(), dim=-1), F.normalize(text_cls.float(), dim=-1)
    logits = einsum(v, t, "i d, j d -> i j") / temperature
    return (_decoupled_nce(logits).mean() + _decoupled_nce(logits.T).mean()) / 2


def macl_loss(anchor: Tensor, positive: Tensor, appearance_anchor: Tensor, appearance_positive: Tensor, *,
              temperature: float = 0.07, r_min: float = 0.05) -> Tensor:
    """Multiscale appearance contrastive loss on S+ tokens (Eq. 7).

    Shapes: anchor (B, L, D) S+ tokens of sample i per layer (group), positive (B, L, D) those of
    another view of the same subject at the same timestep, appearance_* (B, E) ψ_C features of the
    segmented subjects -> scalar.

    For layer a, logits_ik = α_ik cos(anchor_i^a, positive_k^a) / τ where α_ik = 1 / r_ik and
    r_ik = cos(ψ_C(anchor_i), ψ_C(positive_k)) is the appearance similarity: views that look less alike
    get a larger weight, so S+ must be invariant to appearance changes of the same subject and keep
    apart different subjects that merely look alike. r can be ≤ 0 or tiny, which would flip or explode
    α, so r is clamped to [r_min, 1]. The positive of anchor i is positive_i; the other samples'
    positives are its negatives. Cross-entropy per layer, summed over layers (Eq. 7), mean over anchors.
    With all r = 1 this is InfoNCE per layer, summed over layers.
    """
    if anchor.ndim != 3 or anchor.shape != positive.shape:
        raise ValueError(f"macl_loss: anchor and positive must both be (B, L, D), found "
                         f"{tuple(anchor.shape)} and {tuple(positive.shape)}")
    _check_pair(appearance_anchor, appearance_positive, "macl_loss appearance features")
    if appearance_anchor.shape[0] != anchor.shape[0]:
        raise ValueError(f"macl_loss: {anchor.shape[0]} anchors but {appearance_anchor.shape[0]} appearance features")
    if not 0 < r_min <= 1 or temperature <= 0:
        raise ValueError(f"need 0 < r_min <= 1 and temperature > 0, found r_min={r_min}, temperature={temperature}")
    a, p = F.normalize(anchor.float(), dim=-1), F.normalize(positive.float(), dim=-1)
    ea, ep = F.normalize(appearance_anchor.float(), dim=-1), F.normalize(appearance_positive.float(), dim=-1)
    r = einsum(ea, ep, "i e, k e -> i k").clamp(r_min, 1.0)                     # (B, B)
    cos = einsum(a, p, "i l d, k l d -> l i k")                                   # (L, B, B)
    logits = rearrange(cos / r, "l i k -> (l i) k") / temperature
    target = torch.arange(anchor.shape[0], device=anchor.device).repeat(anchor.shape[1])
    per_anchor = F.cross_entropy(logits, target, reduction="none")               # (L*B,)
    return rearrange(per_anchor, "(l i) -> l i", l=anchor.shape[1]).sum(0).mean()


def location_map(text_maps: Sequence[Tensor], visual_maps: Sequence[Tensor] | None,
                 grids: Sequence[tuple[int, int]]) -> Tensor:
    """Ā of Eq. 8 on the largest of the capture layers' grids.

    The paper averages "all visual cross-attention maps A_v and p-th text cross-attention maps". With
    ``visual_maps`` this is the map the inference masks are made from (``subject_location``, Sec. 3.4): the
    mean over layers (each resized to that grid) of the placeholder's text maps and of the visual maps, each
    min-max normalised over space per sample, averaged and normalised again, in [0, 1]. With
    ``visual_maps=None`` (the text-only form, ``loc_maps="text"``): the mean text map as it is, in units of
    attention probability. Shapes: text_maps[i], visual_maps[i] (B, h_i*w_i) with grids[i] = (h_i, w_i)
    -> (B, H, W) fp32.
    """
    if not grids:
        raise ValueError("location_map needs the maps of at least one capture layer, found none")
    grid = max(grids, key=lambda g: g[0] * g[1])
    text = combine_maps(text_maps, grids, grid)
    if visual_maps is None:
        return text
    if any(v is None for v in visual_maps):
        raise ValueError("location_map: the combined map needs every capture layer's visual map; the layers were "
                         "run without them (ProcessorState.visual_maps=False)")
    return subject_location(text, combine_maps(visual_maps, grids, grid))


def localization_loss(attn_map: Tensor, mask: Tensor) -> Tensor:
    """Balanced localization loss of FastComposer: mean over background minus mean over the subject.

    Shapes: attn_map (B, N) Ā (:func:`location_map`), mask (B, N) in {0, 1} -> scalar.
    The paper prints Eq. 8 as mean((1-M)⊙(1-Ā)) - mean(M⊙Ā), which, minimised, rewards attention on
    the background — a typo; the balanced form here pulls attention onto the subject. A map equal to
    the mask gives -1, its complement +1. An empty side contributes 0 for that sample.
    """
    if attn_map.shape != mask.shape or attn_map.ndim != 2:
        raise ValueError(f"localization_loss: attn_map and mask must both be (B, N), found "
                         f"{tuple(attn_map.shape)} and {tuple(mask.shape)}")
    m = mask.float()
    a = attn_map.float()
    fg = (a * m).sum(1) / m.sum(1).clamp_min(1)
    bg = (a * (1 - m)).sum(1) / (1 - m).sum(1).clamp_min(1)
    return (bg - fg).mean()


def total_loss(terms: Mapping[str, Tensor], *, lambda_contrast: float = 1e-2, lambda_loc: float = 1e-3) -> Tensor:
    """Eq. 9: L_LDM + λ1 (L_CSCL + L_MACL) + λ2 L_loc; absent contrastive/localization terms count as 0."""
    if "ldm" not in terms:
        raise ValueError(f"total_loss needs the 'ldm' term, found {sorted(terms)}")
    zero = terms["ldm"].new_zeros(())
    contrast = terms.get("cscl", zero) + terms.get("macl", zero)
    return terms["ldm"] + lambda_contrast * contrast + lambda_loc * terms.get("loc", zero)


def sample_condition_dropout(batch_size: int, *, generator: torch.Generator, p_image: float = 0.05,
                             p_text: float = 0.05, p_both: float = 0.05) -> tuple[Tensor, Tensor]:
    """IP-Adapter's condition dropout: one draw r per sample; r < p_image drops the image, the next p_text
    the text, the next p_both both. Shapes: -> drop_image (B,) bool, drop_text (B,) bool."""
    if min(p_image, p_text, p_both) < 0 or p_image + p_text + p_both > 1:
        raise ValueError(f"dropout rates must be >= 0 and sum to <= 1, found {p_image}, {p_text}, {p_both}")
    r = torch.rand(batch_size, generator=generator)
    image_only = r < p_image
    text_only = (r >= p_image) & (r < p_image + p_text)
    both = (r >= p_image + p_text) & (r < p_image + p_text + p_both)
    return image_only | both, text_only | both


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenates ``x`` from every process along dim 0; only this process's rows carry gradients.

    Shapes: x (b, ...) -> (world * b, ...); identity without a process group. Every process then
    computes the contrastive loss over the whole global batch (all negatives), and its backward reaches
    only its own rows. DDP averages gradients over the N processes, so the caller multiplies the
    contrastive terms by N (see ``training.step``): the result is exactly the gradient of one process
    with batch N*b, with no collective inside the backward pass (which could interleave with DDP's own).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)

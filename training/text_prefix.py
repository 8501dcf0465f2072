"""One prompt encoded once per S+ layer group, the part that cannot depend on S+ encoded once (Sec. 3.2).

CLIP's text transformer is causal: the hidden state at position t sees only positions <= t. G
copies of a prompt that differ only at the placeholder slot p therefore share every hidden state
before p, and a prompt without a placeholder gives G identical copies. ``encode_groups`` runs the
encoder's own modules (token and position embeddings, each layer's LayerNorms, projections and
MLP, the final LayerNorm) on

- positions [0, P) of the prompts with a slot once, P = their earliest slot (no gradient: nothing
  there depends on S+),
- positions [P, T) once per group, attending to the cached prefix keys and values,
- prompts without a slot once,

and assembles the same (G*B, T, D) hidden states as G full encodes, with the same gradient for
the S+ vectors (equal up to summation order). For the default caption "a photo of a S* dog" that
is 5 of 77 positions of every extra copy, and all of every copy of a text-dropped prompt.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TextParts", "encode_groups", "text_parts"]


@dataclass(frozen=True, eq=False)
class TextParts:
    """The modules of a transformers CLIP text model (4.x or 5.x) that a forward pass goes through."""

    embeddings: nn.Module          # CLIPTextEmbeddings: token_embedding, position_embedding
    layers: Sequence[nn.Module]    # CLIPEncoderLayer: layer_norm1, self_attn (q/k/v/out_proj), layer_norm2, mlp
    final_layer_norm: nn.Module


def text_parts(encoder: nn.Module) -> TextParts | None:
    """The encoder's parts, or None when it is not laid out as a transformers CLIP text model."""
    core = getattr(encoder, "text_model", encoder)      # 4.x CLIPTextModel and CLIPTextModelWithProjection
    embeddings, stack = getattr(core, "embeddings", None), getattr(core, "encoder", None)
    layers, final = getattr(stack, "layers", None), getattr(core, "final_layer_norm", None)
    if embeddings is None or layers is None or final is None or not hasattr(embeddings, "token_embedding"):
        return None
    needed = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
    if not all(hasattr(layer, name) for layer in layers for name in needed):
        return None
    if not all(hasattr(layer.self_attn, name) for layer in layers for name in ("q_proj", "k_proj", "v_proj",
                                                                                 "out_proj", "scale", "num_heads")):
        return None
    return TextParts(embeddings=embeddings, layers=list(layers), final_layer_norm=final)


# Helpers

def _heads(x: Tensor, heads: int) -> Tensor:
    """b n (h d) -> b h n d."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _layer(layer: nn.Module, x: Tensor, past: tuple[Tensor, Tensor] | None, offset: int,
           copies: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One CLIP encoder layer on positions [offset, offset + N) of ``copies`` copies of each cached row.

    ``past``: keys and values (R, H, offset, Dh) of positions [0, offset) of R rows, shared by the
    copies (x has copies*R rows, copy-major). Returns the layer output and this call's keys/values.
    Shapes: x (copies*R, N, D) -> (copies*R, N, D).
    """
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = (_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    own = (k, v)
    queries = x.shape[1]
    if past is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
    else:
        k = torch.cat([past[0].repeat(copies, 1, 1, 1), k], dim=2)           # (copies*R, H, offset + N, Dh)
        v = torch.cat([past[1].repeat(copies, 1, 1, 1), v], dim=2)
        keys = torch.arange(offset + queries, device=x.device)
        allowed = keys[None, :] <= (offset + torch.arange(queries, device=x.device))[:, None]   # causal, shifted
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=attn.scale)
    x = x + attn.out_proj(out.transpose(1, 2).flatten(2))
    return x + layer.mlp(layer.layer_norm2(x)), own


def _run(parts: TextParts, embeds: Tensor, offset: int, depth: int, past: list | None = None,
         copies: int = 1) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Positions [offset, offset + N) through the first ``depth`` layers. Shapes: embeds (R', N, D) -> same."""
    positions = torch.arange(offset, offset + embeds.shape[1], device=embeds.device)[None]
    x = parts.embeddings(inputs_embeds=embeds, position_ids=positions)
    cache = []
    for index, layer in enumerate(parts.layers[:depth]):
        x, own = _layer(layer, x, None if past is None else past[index], offset, copies)
        cache.append(own)
    return x, cache


# Public API

def encode_groups(parts: TextParts, ids: Tensor, slots: Sequence[Sequence[int]], vectors: Tensor, *,
                  penultimate: bool) -> Tensor:
    """Encodes each prompt once per group with that group's vector written at its slots.

    ``penultimate``: the input of the last layer without the final LayerNorm (SDXL), else the last
    layer's output with it (SD1.5). The encoder must be frozen (the prefix is computed without gradient).
    Shapes: ids (B, T) long, vectors (G, B, D) -> (G*B, T, D), group-major like ``(g b) t d``.
    """
    batch, length = ids.shape
    groups = vectors.shape[0]
    if vectors.ndim != 3 or vectors.shape[1] != batch or len(slots) != batch:
        raise ValueError(f"expected vectors (G, {batch}, D) and {batch} slot lists, "
                         f"got vectors {tuple(vectors.shape)} and {len(slots)} slot lists")
    depth = len(parts.layers) - 1 if penultimate else len(parts.layers)
    finish = (lambda x: x) if penultimate else parts.final_layer_norm
    token_embedding = parts.embeddings.token_embedding
    with_slot = [row for row in range(batch) if slots[row]]
    without = [row for row in range(batch) if not slots[row]]
    pieces, order = [], with_slot + without
    if with_slot:
        start = min(min(slots[row]) for row in with_slot)
        rows = torch.tensor(with_slot, device=ids.device)
        embeds = token_embedding(ids.index_select(0, rows))                              # (R, T, D)
        with torch.no_grad():
            prefix, cache = _run(parts, embeds[:, :start], 0, depth)                       # (R, P, D)
        suffix = embeds[:, start:].repeat(groups, 1, 1)                                  # (G*R, T-P, D)
        mask = torch.zeros(len(with_slot), length - start, 1, dtype=torch.bool, device=ids.device)
        for i, row in enumerate(with_slot):
            mask[i, [s - start for s in slots[row]]] = True
        written = vectors[:, rows].flatten(0, 1).to(suffix.dtype)[:, None]               # (G*R, 1, D)
        suffix = torch.where(mask.repeat(groups, 1, 1), written, suffix)
        suffix, _ = _run(parts, suffix, start, depth, cache, groups)
        both = torch.cat([prefix.repeat(groups, 1, 1), suffix], dim=1)                   # (G*R, T, D)
        pieces.append(finish(both).unflatten(0, (groups, len(with_slot))))
    if without:
        rows = torch.tensor(without, device=ids.device)
        with torch.no_grad():
            plain, _ = _run(parts, token_embedding(ids.index_select(0, rows)), 0, depth)
            plain = finish(plain)
        pieces.append(plain.expand(groups, -1, -1, -1))
    out = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]                     # (G, B, T, D), rows in order
    if order != list(range(batch)):
        out = out.index_select(1, torch.tensor(order, device=ids.device).argsort())
    return out.flatten(0, 1)

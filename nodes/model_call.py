"""What one call of the UNet hands the patched layers: which rows the Apply node acts on, and their inputs.

ComfyUI batches chunks (``cond_or_uncond``: 0 positive, 1 negative) of ``b`` rows (the latent batch). The node
acts on the cond chunks holding its own positive (S+ swap, placeholder bias, the subject's visual branch) and
the uncond chunks (the blank reference's visual branch, as training's image dropout); any other cond chunk
(another prompt, another Apply node's) is left to the unpatched attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..customcontrast_core.attention import SubjectMaps

__all__ = ["ModelCall", "matching_chunks", "patched_chunks", "per_latent", "row_indices"]


@dataclass(frozen=True, eq=False)
class ModelCall:
    """One UNet call as one Apply node treats it. B: rows of the batch, B': the rows the node patches."""

    sigma: float
    latent: tuple[int, int]            # (H, W) of the latent: each layer's token grid follows from it
    per_chunk: int                     # b: rows per chunk (the latent batch)
    chunks: int                        # patched chunks (B' = chunks * b)
    swapped: tuple[int, ...]           # the chunks holding the node's prompt, numbered among the patched chunks
    swap_rows: Tensor                  # (B, 1, 1) bool: rows whose context becomes the S+ prompt
    contexts: Tensor | None            # (G, L, C) fp32: the prompt encoded with each layer group's S+ token (None:
                                       # no row holds the node's prompt)
    select: Tensor | None                # (B',) long: the patched rows; None: all rows are patched
    visual_tokens: list[Tensor]        # per subject (B', m, C): the subject's tokens, or the blank's in uncond rows
    placeholders: list[Tensor]         # per subject (B', L) fp32: 1 on its placeholder columns in the swapped rows
    step_masks: list[Tensor] | None    # per subject (b, H, W): the previous step's mask; None: M = 1


def matching_chunks(context: Tensor, chunks: tuple[int, ...], base: Tensor) -> tuple[int, ...]:
    """The cond chunks whose context is the node's positive conditioning ``base`` (already repeated to the
    batch's context length). Shapes: context (B, L, C), base (1, L, C)."""
    b = context.shape[0] // len(chunks)
    base = base.to(context.device, context.dtype)
    return tuple(i for i, kind in enumerate(chunks) if kind == 0 and torch.allclose(
        context[i * b:(i + 1) * b], base.expand(b, -1, -1), atol=1e-2, rtol=1e-2))


def patched_chunks(chunks: tuple[int, ...], swapped: tuple[int, ...], matched: bool | None) -> tuple[int, ...]:
    """The chunks the node acts on: its swapped chunks and the uncond ones. Uncond chunks batched without any
    of the node's cond chunks (ComfyUI split the call, or batched the negative with another prompt) are
    patched once the run has shown the node's positive (``matched`` True), and also before any cond chunk was
    seen (None) when the batch holds no cond chunk; when the run's cond chunks so far were all foreign
    (``matched`` False), or nothing is known and the batch holds only foreign cond chunks, nothing is patched."""
    if not swapped and matched is not True and (0 in chunks or matched is False):
        return ()
    return tuple(i for i, kind in enumerate(chunks) if kind != 0 or i in swapped)


def row_indices(chunks: tuple[int, ...], b: int, device: torch.device) -> Tensor:
    """The rows of the given chunks, b per chunk. Shapes: -> (len(chunks) * b,) long."""
    return torch.tensor([i * b + r for i in chunks for r in range(b)], dtype=torch.long, device=device)


def per_latent(maps: SubjectMaps, swapped: tuple[int, ...], b: int) -> SubjectMaps:
    """Averages the maps of the swapped (cond) chunks into one map per latent. Shapes: (B', N) -> (b, N)."""
    text = torch.stack([maps.text[i * b:(i + 1) * b] for i in swapped]).mean(0)
    visual = torch.stack([maps.visual[i * b:(i + 1) * b] for i in swapped]).mean(0)
    return SubjectMaps(text=text, visual=visual)

"""Which rows of a model evaluation one Apply node acts on.

ComfyUI batches the chunks of one evaluation (``cond_or_uncond``: 0 for a positive conditioning, 1 for the
negative one), ``b`` rows each (the latent batch). An Apply node acts on the cond chunks whose context is its
own positive conditioning (the S+ swap, the placeholder bias and the visual branch with the subject's tokens)
and on the uncond chunks (the visual branch with the blank reference's tokens, as training's image dropout).
Every other cond chunk (a plain CLIPTextEncode, the other prompt of a ConditioningCombine, another Apply
node's prompt) is left to the unpatched attention. The selection is made once per batch layout and kept, so a
layer reads ready tensors: ``select`` is None in the usual batch (the node's positive and the negative).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Rows", "check_user_mask", "make_rows", "matching_chunks", "patched_chunks"]


@dataclass(frozen=True, eq=False)
class Rows:
    """One batch layout as one Apply node treats it. B: rows of the batch, B': the rows the node patches."""

    swap_rows: Tensor                 # (B, 1, 1) bool: rows whose context becomes the S+ prompt (swap_context)
    swap: Tensor                      # (B',) bool: patched rows whose text holds the placeholder
    kinds: Tensor                     # (B',) long: 0 (the subject's visual tokens) or 1 (the blank reference's)
    select: tuple[Tensor, Tensor] | None   # (B',) and (B - B',) long: patched rows, other rows; None: all patched
    swapped_chunks: tuple[int, ...]   # the swapped chunks, numbered among the patched chunks
    chunks: int                       # patched chunks (B' = chunks * per_chunk)
    per_chunk: int                    # rows per chunk: the latent batch
    probes: dict = field(default_factory=dict)   # the probe channels of these rows (per key length)


def matching_chunks(context: Tensor, chunks: tuple[int, ...], base: Tensor) -> tuple[int, ...]:
    """The cond chunks whose context is the node's positive conditioning ``base`` (already repeated to the
    batch's context length). Shapes: context (B, L, C), base (1, L, C)."""
    b = context.shape[0] // len(chunks)
    return tuple(i for i, kind in enumerate(chunks) if kind == 0 and torch.allclose(
        context[i * b:(i + 1) * b], base.expand(b, -1, -1), atol=1e-2, rtol=1e-2))


def patched_chunks(chunks: tuple[int, ...], swapped: tuple[int, ...], matched: bool | None) -> tuple[int, ...]:
    """The chunks the node acts on: its swapped chunks and the uncond ones. Uncond chunks batched without any
    of the node's cond chunks (ComfyUI split the evaluation, or batched the negative with another prompt) are
    patched once the run has shown the node's positive (``matched`` True), and also before any cond chunk was
    seen (None) when the batch holds no cond chunk; when the run's cond chunks so far were all foreign
    (``matched`` False), or nothing is known and the batch holds only foreign cond chunks, nothing is patched."""
    if not swapped and matched is not True and (0 in chunks or matched is False):
        return ()
    return tuple(i for i, kind in enumerate(chunks) if kind != 0 or i in swapped)


def make_rows(chunks: tuple[int, ...], swapped: tuple[int, ...], patched: tuple[int, ...], b: int,
              device: torch.device) -> Rows:
    """The row tensors of a layout (see :class:`Rows`), made once on ``device``."""
    swap_rows = torch.tensor([i in swapped for i in range(len(chunks)) for _ in range(b)], device=device)
    swap = torch.tensor([i in swapped for i in patched for _ in range(b)], device=device)
    kinds = torch.tensor([int(chunks[i] != 0) for i in patched for _ in range(b)], device=device)
    select = None
    if len(patched) != len(chunks):
        others = [i for i in range(len(chunks)) if i not in patched]
        select = tuple(torch.tensor([i * b + r for i in group for r in range(b)], device=device)
                       for group in (patched, others))
    return Rows(swap_rows=swap_rows[:, None, None], swap=swap, kinds=kinds, select=select,
                swapped_chunks=tuple(patched.index(i) for i in swapped), chunks=len(patched), per_chunk=b)


def check_user_mask(user: Tensor | None, b: int) -> None:
    """Refuses an ``attn_mask`` batch that is neither 1 nor the latent batch ``b``. Shapes: user (n, H, W)."""
    if user is not None and user.shape[0] not in (1, b):
        raise ValueError(f"attn_mask holds {user.shape[0]} masks and the latent batch is {b}: give 1 mask (used "
                         f"for every latent) or one per latent")

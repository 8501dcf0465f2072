"""Token processing of a batch of S+ prompts in a few kernels instead of a few per prompt.

The batched S+ encode sends ComfyUI's CLIP G copies of one prompt (S sections of 77 tokens each)
that differ only in the vector written at each placeholder slot. ComfyUI turns every row into
embeddings one at a time (``SDClipModel.process_tokens``: a Python loop over the tokens, an
embedding lookup, host-to-device copies and a ``torch.cat`` per row): host time and launches that
grow with G. ``stamped_rows`` lets ComfyUI process the first copy and the first two (to learn which
outputs have one entry per row, and to check that stamping reproduces ComfyUI's second copy
exactly), then builds all copies by writing each copy's vectors into the first copy's embeddings.
Everything after token processing (the transformer, clip-skip, pooled output, prompt weights) stays
ComfyUI's. A ComfyUI whose token processing does anything else gets its own per-row processing
(logged once).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

log = logging.getLogger("customcontrast")


class StampedRows:
    """A ``process_tokens`` for rows [copy 0 | copy 1 | ... | copy G-1 | extra rows], each copy S rows."""

    def __init__(self, original: Callable, copies: int, sections: int, slots: Sequence[Sequence[tuple[int, int]]],
                 vectors: Sequence[Tensor]) -> None:
        """slots[i]: (section, position) of subject i's slots; vectors[i]: (G, width) its vector per copy."""
        self.original, self.copies, self.sections = original, copies, sections
        self.slots, self.vectors = slots, vectors
        self.fallbacks = 0

    def __call__(self, tokens: list, device) -> tuple:
        copies, sections = self.copies, self.sections
        if copies < 2 or len(tokens) < copies * sections:
            return self.original(tokens, device)
        one = self.original(tokens[:sections], device)
        two = self.original(tokens[:2 * sections], device)
        kinds = _kinds(one, two)
        built = None if kinds is None else self._stamp(one, two, kinds)
        if built is None:
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("CustomContrast: this ComfyUI's token processing is not the expected one; "
                            "S+ prompts are processed one row at a time")
            return self.original(tokens, device)
        if len(tokens) == copies * sections:
            return built
        rest = self.original(tokens[copies * sections:], device)
        return tuple(_join(a, b) if kind == "rows" else b for a, b, kind in zip(built, rest, kinds))

    def _stamp(self, one: tuple, two: tuple, kinds: list[str]) -> tuple | None:
        """Every copy's outputs from the first copy's: the vectors written at the slots of the embeddings,
        per-row items repeated, the others kept; None unless stamping two copies gives ComfyUI's ``two``."""
        embeds = one[0]                                                        # (S, L, C)
        if embeds.ndim != 3 or embeds.shape[0] != self.sections:
            return None
        for where, vectors in zip(self.slots, self.vectors):
            if vectors.shape != (self.copies, embeds.shape[-1]) or \
                    any(position >= embeds.shape[1] or section >= self.sections for section, position in where):
                return None
        if not torch.equal(self._embeddings(embeds, 2), two[0]):
            return None
        return (self._embeddings(embeds, self.copies),
                *(_repeat(item, self.copies) if kind == "rows" else item for item, kind in zip(one[1:], kinds[1:])))

    def _embeddings(self, embeds: Tensor, copies: int) -> Tensor:
        """Shapes: (S, L, C) -> (copies * S, L, C), copy g with the vectors of copy g at the slots."""
        grid = embeds.repeat(copies, 1, 1).view(copies, *embeds.shape)
        for where, vectors in zip(self.slots, self.vectors):
            vectors = vectors[:copies].to(embeds.device, embeds.dtype)
            for section, position in where:
                grid[:, section, position] = vectors
        return grid.view(-1, *embeds.shape[1:])


def _kinds(one: tuple, two: tuple) -> list[str] | None:
    """How each output of token processing grows with the rows: "rows" (one entry per row) or "same"
    (e.g. ComfyUI's ``embeds_info``, which describes the last row); None when neither fits."""
    if not isinstance(one, tuple) or not isinstance(two, tuple) or len(one) != len(two) or not one \
            or not isinstance(one[0], Tensor) or not isinstance(two[0], Tensor):
        return None
    kinds = ["rows"]
    for a, b in zip(one[1:], two[1:]):
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            kind = "rows" if a.ndim and b.shape[0] == 2 * a.shape[0] and torch.equal(b, _repeat(a, 2)) else \
                "same" if torch.equal(a, b) else None
        elif isinstance(a, list) and isinstance(b, list):
            kind = "rows" if a and b == a + a else "same" if a == b else None
        else:
            kind = "same" if type(a) is type(b) and a == b else None
        if kind is None:
            return None
        kinds.append(kind)
    return kinds


def _repeat(item, copies: int):
    if isinstance(item, Tensor):
        return item.repeat(copies, *([1] * (item.ndim - 1)))
    return item * copies


def _join(a, b):
    return torch.cat([a, b]) if isinstance(a, Tensor) else a + b


@contextlib.contextmanager
def stamped_rows(clip, copies: int, sections: dict[str, int], slots: Sequence[Sequence[tuple[int, int]]],
                 vectors: dict[str, Sequence[Tensor]]) -> Iterator[None]:
    """Within the block, each encoder ``clip_<key>`` (key in ``vectors``) of ``clip`` that has ComfyUI's
    ``process_tokens`` processes the S+ batch with :class:`StampedRows`; a CLIP without them is left alone.
    ``sections[key]``: sections of one copy; ``vectors[key][i]``: (G, width) vectors of subject i."""
    model = getattr(clip, "cond_stage_model", None)
    patched = []
    try:
        for key in vectors:
            encoder = getattr(model, f"clip_{key}", None)
            if encoder is None or not callable(getattr(encoder, "process_tokens", None)):
                continue
            had = "process_tokens" in vars(encoder)
            previous = vars(encoder).get("process_tokens")
            encoder.process_tokens = StampedRows(encoder.process_tokens, copies, sections[key], slots, vectors[key])
            patched.append((encoder, had, previous))
        yield
    finally:
        for encoder, had, previous in patched:
            if had:
                encoder.process_tokens = previous
            else:
                del encoder.process_tokens

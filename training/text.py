"""Tokenizers and text encoders that encode a prompt once per S+ layer group (Sec. 3.2).

The S+ vector of a group is written into the placeholder's word-embedding slot *before* position
embeddings (textual-inversion semantics), so gradients reach the S+ tokens. Frozen transformers CLIP
text models (4.x or 5.x) go through ``text_prefix.encode_groups``, which encodes what all groups share
once; any other text model gets every copy through its own forward, the vector written by a forward
hook on the token embedding.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from customcontrast_core.prompt import collapse_placeholder, isolate_placeholders

from .text_prefix import encode_groups, text_parts

CONTEXT_LENGTH = 77


class PromptTokenizer(Protocol):
    """What the trainer needs of a CLIP BPE tokenizer."""

    pad_id: int

    def word_ids(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens."""

    def sequence(self, text: str) -> list[int]:
        """Start token, ids, end token (unpadded, untruncated)."""


class HFTokenizer:
    """A transformers ``CLIPTokenizer`` loaded from a local folder."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)

    def word_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def sequence(self, text: str) -> list[int]:
        return list(self.tokenizer(text, truncation=False)["input_ids"])


class OpenClipTokenizer:
    """open_clip's ``SimpleTokenizer``: the CLIP BPE shipped inside the package (no download)."""

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer
        self.tokenizer = SimpleTokenizer()
        self.pad_id = 0
        self.sot, self.eot = self.tokenizer.all_special_ids[:2]

    def word_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def sequence(self, text: str) -> list[int]:
        return [self.sot, *self.word_ids(text), self.eot]


@dataclass(frozen=True)
class TokenizedPrompts:
    """Prompts with the placeholder collapsed to one slot, for each text encoder."""

    ids: tuple[Tensor, ...]     # per encoder (B, 77) long
    slots: tuple[tuple[int, ...], ...]   # per prompt, the slot positions (empty: no placeholder)


def tokenize(tokenizers: Sequence[PromptTokenizer], prompts: Sequence[str], placeholder: str) -> TokenizedPrompts:
    """Tokenizes prompts for every encoder and collapses the placeholder to a single slot."""
    ids_per_encoder, slots = [], None
    for tok in tokenizers:
        rows, row_slots = [], []
        pattern = tok.word_ids(placeholder)
        for prompt in prompts:
            seq = tok.sequence(isolate_placeholders(prompt, [placeholder]))
            seq = seq + [tok.pad_id] * max(0, CONTEXT_LENGTH - len(seq))
            ids, where = collapse_placeholder(seq, pattern, pad_id=tok.pad_id, length=CONTEXT_LENGTH)
            rows.append(ids)
            row_slots.append(tuple(where))
        if slots is not None and slots != row_slots:
            raise ValueError("the text encoders' tokenizers put the placeholder at different positions")
        slots = row_slots
        ids_per_encoder.append(torch.tensor(rows, dtype=torch.long))
    return TokenizedPrompts(ids=tuple(ids_per_encoder), slots=tuple(slots or ()))


@contextlib.contextmanager
def substituted_embeddings(embedding: nn.Embedding, slot_mask: Tensor, vectors: Tensor) -> Iterator[None]:
    """Replaces the word embeddings at ``slot_mask`` by ``vectors`` inside the context.

    Shapes: slot_mask (N, T) bool, vectors (N, D).
    """
    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        new = rearrange(vectors.to(out.dtype), "n d -> n 1 d")
        return torch.where(rearrange(slot_mask, "n t -> n t 1"), new, out)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class TextEncoderStack(nn.Module):
    """One (SD1.5) or two (SDXL) frozen CLIP text encoders with the layer choice of each family."""

    def __init__(self, encoders: Sequence[nn.Module], tokenizers: Sequence[PromptTokenizer], *, base: str) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.tokenizers = list(tokenizers)
        self.base = base
        self.widths = tuple(int(e.config.hidden_size) for e in encoders)

    def tokenize(self, prompts: Sequence[str], placeholder: str) -> TokenizedPrompts:
        return tokenize(self.tokenizers, prompts, placeholder)

    def forward(self, tokens: TokenizedPrompts, splus: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Encodes prompts, once per S+ group when ``splus`` is given.

        With ``splus`` and frozen encoders, each prompt's positions before its slot and prompts without
        a slot are encoded once, not once per group (``text_prefix.encode_groups``: same values).
        Shapes: splus (B, G, sum(widths)) or None -> context (G*B or B, 77, sum(widths)) in group-major
        order; pooled (B, P) for SDXL without ``splus`` (projected CLIP-G pooled output; the added
        condition uses the plain prompt), else None.
        """
        if splus is not None and self.shares_prefix():
            vectors = rearrange(splus, "b g d -> g b d").split(list(self.widths), dim=-1)
            features = []
            for encoder, ids, width_vectors in zip(self.encoders, tokens.ids, vectors):
                device = next(encoder.parameters()).device
                features.append(encode_groups(text_parts(encoder), ids.to(device), tokens.slots, width_vectors,
                                              penultimate=self.base == "sdxl"))
            return torch.cat(features, dim=-1), None
        return self._forward_copies(tokens, splus)

    def shares_prefix(self) -> bool:
        """Whether every encoder is a frozen transformers CLIP text model (what ``encode_groups`` needs)."""
        return all(text_parts(e) is not None and not any(p.requires_grad for p in e.parameters())
                   for e in self.encoders)

    def _forward_copies(self, tokens: TokenizedPrompts, splus: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Every group's copy of every prompt through the whole encoder (the reference path)."""
        batch = tokens.ids[0].shape[0]
        groups = 1 if splus is None else splus.shape[1]
        slot_mask = torch.zeros(batch, CONTEXT_LENGTH, dtype=torch.bool)
        for row, where in enumerate(tokens.slots):
            slot_mask[row, list(where)] = True
        slot_mask = repeat(slot_mask, "b t -> (g b) t", g=groups)
        vectors = None if splus is None else rearrange(splus, "b g d -> (g b) d").split(list(self.widths), dim=-1)
        features, pooled = [], None
        for index, (encoder, ids) in enumerate(zip(self.encoders, tokens.ids)):
            device = next(encoder.parameters()).device
            ids = repeat(ids, "b t -> (g b) t", g=groups).to(device)
            embedding = encoder.get_input_embeddings()
            ctx = substituted_embeddings(embedding, slot_mask.to(device), vectors[index]) \
                if vectors is not None else contextlib.nullcontext()
            with ctx:
                out = encoder(input_ids=ids, output_hidden_states=True)
            if self.base == "sdxl":
                features.append(out.hidden_states[-2])          # penultimate, no final LayerNorm
                pooled = getattr(out, "text_embeds", None) if splus is None else None
            else:
                features.append(out.last_hidden_state)          # SD1.5: last layer with final LayerNorm
        return torch.cat(features, dim=-1), pooled

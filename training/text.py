"""Tokenizers and text encoders that encode a prompt once per S+ layer group (Sec. 3.2).

The S+ vector of a group is written into the placeholder's word-embedding slot *before* position
embeddings (textual-inversion semantics) through a forward hook on the token embedding, so any
CLIP text model of transformers 4 or 5 works unchanged and gradients reach the S+ tokens.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from customcontrast_core.prompt import collapse_placeholder, isolate_placeholders, pooled_prompt_ids

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
    patterns: tuple[tuple[int, ...], ...] = ()   # per encoder, the placeholder's token ids (no start/end)


def tokenize(tokenizers: Sequence[PromptTokenizer], prompts: Sequence[str], placeholder: str) -> TokenizedPrompts:
    """Tokenizes prompts for every encoder and collapses the placeholder to a single slot."""
    ids_per_encoder, slots, patterns = [], None, []
    for tok in tokenizers:
        rows, row_slots = [], []
        pattern = tok.word_ids(placeholder)
        patterns.append(tuple(pattern))
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
    return TokenizedPrompts(ids=tuple(ids_per_encoder), slots=tuple(slots or ()), patterns=tuple(patterns))


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

        A prompt without a placeholder (text dropout) is the same in every group: it is encoded once
        and its result repeated, in the same encoder call as the others (no extra calls or kernels).
        Shapes: splus (B, G, sum(widths)) or None -> context (G*B or B, 77, sum(widths)) in group-major
        order; pooled (B, P) for SDXL without ``splus`` (:meth:`pooled`), else None.
        """
        batch = tokens.ids[0].shape[0]
        groups = 1 if splus is None else splus.shape[1]
        slot_mask = torch.zeros(batch, CONTEXT_LENGTH, dtype=torch.bool)
        for row, where in enumerate(tokens.slots):
            slot_mask[row, list(where)] = True
        copies = _Copies(tokens.slots, groups)
        vectors = None if splus is None else copies.vectors(splus).split(list(self.widths), dim=-1)
        features = []
        for index, (encoder, ids) in enumerate(zip(self.encoders, tokens.ids)):
            device = next(encoder.parameters()).device
            embedding = encoder.get_input_embeddings()
            ctx = substituted_embeddings(embedding, copies.rows(slot_mask).to(device), vectors[index]) \
                if vectors is not None else contextlib.nullcontext()
            with ctx:
                out = encoder(input_ids=copies.rows(ids).to(device), output_hidden_states=True)
            if self.base == "sdxl":
                features.append(out.hidden_states[-2])          # penultimate, no final LayerNorm
            else:
                features.append(out.last_hidden_state)          # SD1.5: last layer with final LayerNorm
        pooled = self.pooled(tokens) if splus is None and self.base == "sdxl" else None
        return copies.expand(torch.cat(features, dim=-1)), pooled

    def pooled(self, tokens: TokenizedPrompts) -> Tensor:
        """SDXL's pooled text embedding (the added condition): CLIP-G's projected end-token output of each prompt
        with the placeholder's first BPE token in its slots and no S+ (``pooled_prompt_ids``, the rule the
        ComfyUI node follows too). Shapes: -> (B, P)."""
        if self.base != "sdxl":
            raise ValueError(f"only SDXL has a pooled text embedding condition, this text stack is {self.base}")
        if len(tokens.patterns) != len(self.encoders):
            raise ValueError(f"the tokenized prompts carry {len(tokens.patterns)} placeholder patterns, the stack has "
                             f"{len(self.encoders)} encoders: tokenize them with this stack's tokenize")
        encoder, pattern = self.encoders[-1], tokens.patterns[-1]
        rows = [pooled_prompt_ids(row, slots, pattern) for row, slots in zip(tokens.ids[-1].tolist(), tokens.slots)]
        ids = torch.tensor(rows, dtype=torch.long, device=next(encoder.parameters()).device)
        return encoder(input_ids=ids).text_embeds


class _Copies:
    """Which (group, row) copies of B prompts are encoded: every group of a row with a slot, group 0 of one without."""

    def __init__(self, slots: Sequence[Sequence[int]], groups: int) -> None:
        batch, self.groups = len(slots), groups
        has_slot = [bool(where) for where in slots]
        pairs = [(g, row) for g in range(groups) for row in range(batch) if g == 0 or has_slot[row]]
        self.skipped = len(pairs) < groups * batch
        if self.skipped:
            self.group_of = torch.tensor([g for g, _ in pairs])
            self.row_of = torch.tensor([row for _, row in pairs])
            encoded = {pair: i for i, pair in enumerate(pairs)}
            self.take = torch.tensor([encoded[(g if has_slot[row] else 0, row)]
                                      for g in range(groups) for row in range(batch)])

    def rows(self, x: Tensor) -> Tensor:
        """Per-prompt rows -> per-copy rows. Shapes: (B, ...) -> (copies, ...)."""
        if self.skipped:
            return x.index_select(0, self.row_of.to(x.device))
        return repeat(x, "b ... -> (g b) ...", g=self.groups)

    def vectors(self, splus: Tensor) -> Tensor:
        """Each copy's S+ vector. Shapes: (B, G, D) -> (copies, D)."""
        if self.skipped:
            return splus[self.row_of.to(splus.device), self.group_of.to(splus.device)]
        return rearrange(splus, "b g d -> (g b) d")

    def expand(self, encoded: Tensor) -> Tensor:
        """Encoded copies -> every group's copy of every prompt. Shapes: (copies, ...) -> (G*B, ...) group-major."""
        return encoded.index_select(0, self.take.to(encoded.device)) if self.skipped else encoded

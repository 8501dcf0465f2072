"""S+ prompt encoding through ComfyUI's own CLIP object (one batched call per timestep).

The prompt is tokenized once, each placeholder collapsed to one slot (the core's ``collapse_placeholders``); per
layer group the slot holds that group's S+ vector as a tensor token, which ComfyUI's ``process_tokens`` puts in
place of the word embedding before position embeddings (textual-inversion semantics). ``encode_from_tokens``
applies the CLIP object's clip-skip.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..customcontrast_core.prompt import (PlaceholderError, check_prompt, collapse_placeholders, isolate_placeholders,
                                          pooled_prompt_ids, split_splus)
from .comfy_glue import tokenizer_of, word_ids

# the ComfyUI token-dict keys of the text encoders, in the order of their slices of the S+ vector
ENCODER_KEYS = {"sd15": ("l",), "sdxl": ("l", "g")}


def _id(entry: tuple) -> int | None:
    """The token id of a (token, weight, ...) entry; None for a tensor token (a textual-inversion embedding)."""
    return entry[0] if isinstance(entry[0], int) else None


def _start_cut_placeholders(sections: list[list[tuple]], patterns: Sequence[Sequence[int]],
                            tokenizer) -> list[list[tuple]]:
    """Mends a placeholder that ComfyUI's tokenizer cut at a 77-token boundary (a long prompt fills each section
    and goes on in the next, word or not): the cut placeholder starts the next section, whole (collapsed to its
    slot afterwards), and the section before ends where it began (end token, then padding)."""
    start, end, pad = tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token
    sections = [list(section) for section in sections]
    for s in range(len(sections) - 1):
        first, second = sections[s], sections[s + 1]
        ids, head = [_id(entry) for entry in first], [_id(entry) for entry in second[1:]]
        if end not in ids[1:] or not second or _id(second[0]) != start:
            continue
        stop = ids.index(end, 1)                       # the end token that closes the section's text
        tail = ids[1:stop]
        for pattern in sorted(map(list, patterns), key=len, reverse=True):
            cut = next((k for k in range(len(pattern) - 1, 0, -1)
                        if tail[-k:] == pattern[:k] and head[:len(pattern) - k] == pattern[k:]), None)
            if cut is not None:
                closing = first[stop]
                sections[s] = first[:stop - cut] + [closing] + [(pad, 1.0, *closing[2:])] * cut + first[stop + 1:]
                sections[s + 1] = [second[0]] + [(t, *second[1][1:]) for t in pattern[:cut]] + second[1:]
                break
    return sections


@dataclass
class PlaceholderPrompt:
    """A tokenized prompt with every placeholder collapsed, ready to take S+ vectors."""

    tokens: dict[str, list[list[tuple]]]    # ComfyUI token dict with collapsed sections
    slots: list[list[tuple[int, int]]]      # per subject: (section, position) of each slot
    base: str                               # "sd15" or "sdxl"
    widths: tuple[int, ...]                 # S+ width of each encoder key, in ENCODER_KEYS order

    @property
    def length(self) -> int:
        """Tokens of the encoded context: 77 per section."""
        return 77 * len(next(iter(self.tokens.values())))

    def columns(self, subject: int) -> tuple[int, ...]:
        """Context positions of a subject's slots (before any LCM repetition)."""
        return tuple(section * 77 + pos for section, pos in self.slots[subject])


def tokenize_prompt(clip, prompt: str, words: Sequence[str], base: str, widths: Sequence[int]) -> PlaceholderPrompt:
    """Tokenizes a prompt with ComfyUI's tokenizer and locates each subject's placeholder."""
    counts = check_prompt(prompt, words)
    tokens = clip.tokenize(isolate_placeholders(prompt, words))
    keys = ENCODER_KEYS[base]
    if sorted(tokens) != sorted(keys):   # an SDXL CLIP (l and g) on an SD1.5 model would give 2048-wide contexts
        raise ValueError(f"the clip input gives token sets {sorted(tokens)}, the {base.upper()} model and checkpoint "
                         f"need {sorted(keys)}: connect the CLIP of the same {base.upper()} model")
    collapsed: dict[str, list[list[tuple]]] = {}
    slots: list[list[tuple[int, int]]] | None = None
    for key in tokens:   # the keys of ENCODER_KEYS[base] (checked above)
        patterns = [word_ids(clip, key, w) for w in words]
        sections, found = [], [[] for _ in words]
        mended = _start_cut_placeholders(tokens[key], patterns, tokenizer_of(clip, key))
        for s, (section, original) in enumerate(zip(mended, tokens[key])):   # each entry (token, weight, ...)
            new, where = collapse_placeholders(section, patterns, pad_id=section[-1], length=len(original), token=_id)
            sections.append(new)
            for subject, positions in enumerate(where):
                found[subject] += [(s, p) for p in positions]
        collapsed[key] = sections
        if slots is not None and slots != found:
            raise ValueError("CLIP-L and CLIP-G tokenizers place the placeholder differently; cannot encode S+")
        slots = found
    for word, where in zip(words, slots):
        if len(where) < counts[word]:
            raise PlaceholderError(f"placeholder {word!r} occurs {counts[word]} time(s) in the prompt, "
                                   f"{len(where)} of them were found among the prompt's tokens")
    return PlaceholderPrompt(tokens=collapsed, slots=slots, base=base, widths=tuple(widths))


def _with_vectors(prompt: PlaceholderPrompt, key: str, vectors: Sequence[Tensor]) -> list[list[tuple]]:
    """One copy of the key's sections with each subject's slot holding its vector."""
    sections = [list(section) for section in prompt.tokens[key]]
    for subject, vector in enumerate(vectors):
        for s, pos in prompt.slots[subject]:
            sections[s][pos] = (vector, *sections[s][pos][1:])
    return sections


def encode_splus(clip, prompt: PlaceholderPrompt, splus: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Encodes the prompt once per layer group in one text-encoder call.

    Shapes: splus[i] (G, sum(widths)) for subject i -> contexts (G, 77*S, C), pooled (1, P) (ComfyUI pools the
    first section: the first group's) or None.
    """
    groups, batched = splus[0].shape[0], {}
    for index, key in enumerate(ENCODER_KEYS[prompt.base]):   # each encoder reads its slice of the S+ vectors
        vectors = [split_splus(v.float().cpu(), prompt.widths)[index] for v in splus]
        batched[key] = [section for g in range(groups) for section in _with_vectors(prompt, key, [v[g] for v in vectors])]
    cond, pooled = clip.encode_from_tokens(batched, return_pooled=True)
    return cond.reshape(groups, prompt.length, cond.shape[-1]), pooled


def encode_pooled(clip, prompt: PlaceholderPrompt, words: Sequence[str]) -> Tensor:
    """SDXL's pooled text embedding exactly as training computes it: the prompt with each placeholder's first
    BPE token in its slots and no S+ (``pooled_prompt_ids``), prompt weights left out. ComfyUI pools the first
    77-token section, so only that section is encoded. Shapes: -> (1, P)."""
    tokens = {}
    for key, sections in prompt.tokens.items():
        ids = [entry[0] for entry in sections[0]]
        for subject, word in enumerate(words):
            first_section = [pos for s, pos in prompt.slots[subject] if s == 0]
            ids = pooled_prompt_ids(ids, first_section, word_ids(clip, key, word))
        tokens[key] = [[(token, 1.0, *entry[2:]) for token, entry in zip(ids, sections[0])]]
    _, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return pooled


def reorder_for(contexts: Tensor, length: int) -> Tensor:
    """Repeats a context to an LCM-padded batch length, as ComfyUI's CONDCrossAttn.concat does."""
    if length % contexts.shape[-2]:
        raise ValueError(f"batch context length {length} is not a multiple of the prompt's {contexts.shape[-2]}")
    return contexts.repeat(*([1] * (contexts.ndim - 2)), length // contexts.shape[-2], 1)



"""S+ prompt assembly (Sec. 3.2): find the placeholder in token ids and write one S+ vector per layer group.

Everything here works on plain token-id lists, so any tokenizer (ComfyUI's, Hugging Face's,
open_clip's) can be used by the caller. A placeholder word such as `<subject>` is several BPE tokens;
it is collapsed to a single slot whose word embedding is replaced by the S+ vector before position
embeddings are added (textual-inversion semantics).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from einops import rearrange, repeat
from torch import Tensor

__all__ = ["PlaceholderError", "assemble_splus", "check_prompt", "collapse_placeholder", "collapse_placeholders",
           "find_placeholders", "isolate_placeholders", "placeholder_words", "pooled_prompt_ids", "split_splus"]

# anything written like `<word>`; `<lora:name:1.0>`-style syntax (colons) is not a placeholder
_PLACEHOLDER = re.compile(r"<[A-Za-z_][\w-]*>")
T = TypeVar("T")


class PlaceholderError(ValueError):
    """A prompt's placeholder words do not match the subjects given."""


# Words in the prompt text

def placeholder_words(n_subjects: int, word: str = "<subject>") -> list[str]:
    """Names the placeholder of each subject: `<subject>` for one, `<subject1>`, `<subject2>`, ... for several."""
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    if not _PLACEHOLDER.fullmatch(word):
        raise ValueError(f"placeholder word must look like '<name>' (letters, digits, _ or -), got {word!r}")
    if n_subjects == 1:
        return [word]
    return [f"{word[:-1]}{index}>" for index in range(1, n_subjects + 1)]


def check_prompt(prompt: str, words: Sequence[str]) -> dict[str, int]:
    """Checks that every placeholder word occurs in the prompt and that no unknown `<word>` does.

    Returns the number of occurrences of each word. Matching is case-insensitive, as CLIP's
    tokenizer lowercases. Raises PlaceholderError naming the missing or unknown word.
    """
    expected = {word.lower(): word for word in words}
    found = [match.lower() for match in _PLACEHOLDER.findall(prompt)]
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise PlaceholderError(
            f"prompt uses unknown placeholder {unknown[0]!r}; this prompt has {len(expected)} subject(s), "
            f"expected one of {list(expected.values())}"
        )
    counts = {word: found.count(key) for key, word in expected.items()}
    for word, count in counts.items():
        if count == 0:
            raise PlaceholderError(
                f"prompt has no {word!r}; found words: {sorted(set(found)) or 'none'}. "
                f"Write {word!r} where the subject should appear, e.g. 'a photo of {word} on the beach'."
            )
    return counts


def isolate_placeholders(prompt: str, words: Sequence[str]) -> str:
    """Surrounds every placeholder word with spaces so that BPE tokenizes it the same way as alone.

    CLIP's pre-tokenizer merges runs of punctuation, so `<subject>,` would end in the token `>,`
    and the placeholder's id pattern would not be found; `<subject> ,` tokenizes as expected.
    """
    for word in sorted(words, key=len, reverse=True):
        prompt = re.sub(re.escape(word), f" {word} ", prompt, flags=re.IGNORECASE)
    return re.sub(r" {2,}", " ", prompt).strip()


# Token ids

def find_placeholders(ids: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Returns the start position of every non-overlapping occurrence of a token-id pattern, left to right."""
    pattern = list(pattern)
    if not pattern:
        raise ValueError("placeholder id pattern is empty; tokenize the word without start/end tokens")
    ids, width, starts, index = list(ids), len(pattern), [], 0
    while index <= len(ids) - width:
        if ids[index:index + width] == pattern:
            starts.append(index)
            index += width
        else:
            index += 1
    return starts


def collapse_placeholders(
    ids: Sequence[T],
    patterns: Sequence[Sequence[int]],
    *,
    pad_id: T,
    slot_ids: Sequence[int | None] | None = None,
    length: int | None = None,
    token: Callable[[T], int | None] | None = None,
) -> tuple[list[T], list[list[int]]]:
    """Reduces every occurrence of each placeholder pattern to one slot token, keeping the sequence length.

    Returns the new ids (right-padded with pad_id to `length`, default len(ids)) and, per pattern, its
    slot positions. A slot keeps the pattern's first token, or slot_ids[i] when given. Tokens beyond
    `length` may be dropped only if they are padding and the sequence still ends with the same token
    (so the end token survives); otherwise ValueError: the prompt does not fit. With ``token``, ``ids``
    holds entries (ComfyUI's (token, weight) tuples) whose id ``token(entry)`` gives; they are kept whole.
    """
    patterns = [list(pattern) for pattern in patterns]
    if not patterns or any(not pattern for pattern in patterns):
        raise ValueError("need at least one non-empty placeholder id pattern")
    slot_ids = list(slot_ids) if slot_ids is not None else [None] * len(patterns)
    if len(slot_ids) != len(patterns):
        raise ValueError(f"need one slot id per pattern, got {len(slot_ids)} for {len(patterns)} patterns")
    ids = list(ids)
    keys = ids if token is None else [token(entry) for entry in ids]
    length = len(ids) if length is None else length

    # longest pattern first, so a pattern that is a prefix of another cannot steal its match
    order = sorted(range(len(patterns)), key=lambda i: len(patterns[i]), reverse=True)
    out: list[int] = []
    slots: list[list[int]] = [[] for _ in patterns]
    index = 0
    while index < len(ids):
        hit = next((i for i in order if keys[index:index + len(patterns[i])] == patterns[i]), None)
        if hit is None:
            out.append(ids[index])
            index += 1
            continue
        slots[hit].append(len(out))
        out.append(ids[index] if slot_ids[hit] is None else slot_ids[hit])
        index += len(patterns[hit])

    if len(out) > length:
        dropped, kept = out[length:], out[:length]
        if any(token != pad_id for token in dropped) or kept[-1] != out[-1]:
            raise ValueError(
                f"prompt needs {len(out)} tokens after collapsing the placeholder, the context holds {length}; "
                "it would be truncated and lose its end token - shorten the prompt"
            )
        out = kept
    if any(slot >= length for group in slots for slot in group):
        raise ValueError(f"a placeholder lies beyond the {length}-token context; shorten the prompt")
    return out + [pad_id] * (length - len(out)), slots


def collapse_placeholder(
    ids: Sequence[int], pattern: Sequence[int], *, pad_id: int, slot_id: int | None = None, length: int | None = None
) -> tuple[list[int], list[int]]:
    """Reduces every occurrence of one placeholder pattern to a single slot token (see collapse_placeholders).

    Returns the new ids (same length, tail shifted left and right-padded with pad_id) and the slot positions.
    """
    out, slots = collapse_placeholders(ids, [pattern], pad_id=pad_id, slot_ids=[slot_id], length=length)
    return out, slots[0]


def pooled_prompt_ids(ids: Sequence[T], slots: Iterable[int], placeholder_ids: Sequence[int]) -> list[T | int]:
    """The tokens SDXL's pooled text embedding is computed from, in training and in ComfyUI alike.

    SDXL adds the projected CLIP-G output at the prompt's end token to its timestep embedding: one vector
    per image for the whole sampling run. S+ changes with the timestep and the layer group, that vector
    cannot (ComfyUI computes it once per run), so it is computed without S+: from the collapsed prompt
    with each of the placeholder's ``slots`` holding the placeholder's first BPE token
    (``placeholder_ids[0]``). ``ids``: one collapsed token sequence (ints, or whatever a tokenizer puts in
    its entries: only the slots change). Returns a new list of the same length.
    """
    if not placeholder_ids:
        raise ValueError("placeholder id pattern is empty; tokenize the word without start/end tokens")
    out = list(ids)
    for slot in slots:
        if not 0 <= slot < len(out):
            raise ValueError(f"placeholder slot {slot} lies outside the {len(out)}-token prompt")
        out[slot] = placeholder_ids[0]
    return out


# Embeddings

def assemble_splus(word_embeds: Tensor, slots: Sequence[int], splus: Tensor) -> Tensor:
    """Writes each layer group's S+ vector into the placeholder slots of the word embeddings (Sec. 3.2).

    Shapes: word_embeds (T, D) or (G, T, D), splus (G, D) -> (G, T, D) in word_embeds' dtype.
    Pass the output back in as word_embeds to add a second subject. Differentiable in splus; every
    row that is not a slot equals the input.
    """
    if splus.ndim != 2:
        raise ValueError(f"splus must be (G, D), got shape {tuple(splus.shape)}")
    groups, width = splus.shape
    if word_embeds.ndim == 2:
        word_embeds = repeat(word_embeds, "t d -> g t d", g=groups)
    if word_embeds.ndim != 3 or word_embeds.shape[0] != groups or word_embeds.shape[2] != width:
        raise ValueError(
            f"word_embeds must be (T, {width}) or ({groups}, T, {width}) to match splus, "
            f"got {tuple(word_embeds.shape)}"
        )
    tokens = word_embeds.shape[1]
    if not slots or any(not 0 <= slot < tokens for slot in slots):
        raise ValueError(f"slots must be non-empty positions in [0, {tokens}), got {list(slots)}")
    is_slot = torch.zeros(tokens, dtype=torch.bool, device=word_embeds.device)
    is_slot[list(slots)] = True
    vectors = rearrange(splus.to(word_embeds.device, word_embeds.dtype), "g d -> g 1 d")
    return torch.where(rearrange(is_slot, "t -> 1 t 1"), vectors, word_embeds)


def split_splus(splus: Tensor, widths: Sequence[int] = (768, 1280)) -> tuple[Tensor, ...]:
    """Splits concatenated S+ vectors into one slice per text encoder (SDXL: CLIP-L 768, CLIP-G 1280).

    Shapes: splus (..., sum(widths)) -> one (..., widths[i]) tensor per encoder.
    """
    if sum(widths) != splus.shape[-1]:
        raise ValueError(
            f"S+ width {splus.shape[-1]} does not match the text encoders' widths {list(widths)} "
            f"(sum {sum(widths)})"
        )
    return tuple(splus.split(list(widths), dim=-1))

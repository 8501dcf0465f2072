"""S+ prompt assembly on real CLIP BPE ids (open_clip's bundled vocabulary, no download)."""
from __future__ import annotations

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from customcontrast_core.prompt import (PlaceholderError, assemble_splus, check_prompt, collapse_placeholder,
                                        collapse_placeholders, find_placeholders, isolate_placeholders,
                                        placeholder_words, split_splus)

PAD = 0                                                                  # open_clip pads with 0 (like CLIP-G)


@pytest.fixture(scope="module")
def tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def _pattern(tokenizer: SimpleTokenizer, word: str) -> list[int]:
    return tokenizer.encode(word)


def _ids(tokenizer: SimpleTokenizer, text: str) -> list[int]:
    return tokenizer(text)[0].tolist()                                   # (77,) with start, end and padding


def test_collapse_keeps_77_tokens_and_shifts_the_tail(tokenizer):
    pattern = _pattern(tokenizer, "<subject>")
    assert len(pattern) == 3                                             # '<', 'subject', '>'
    ids = _ids(tokenizer, "a photo of <subject> on the beach")
    assert find_placeholders(ids, pattern) == [4]                        # after <start>, a, photo, of

    out, slots = collapse_placeholder(ids, pattern, pad_id=PAD, slot_id=999)
    assert len(out) == 77 and slots == [4]
    assert out[:4] == ids[:4] and out[4] == 999
    assert out[5:5 + 5] == ids[7:7 + 5]                                  # on the beach <end> moved left by 2
    assert out[5:9] == tokenizer.encode("on the beach") + [tokenizer.eot_token_id]
    assert out[-2:] == [PAD, PAD] and out.count(tokenizer.eot_token_id) == 1


def test_several_occurrences_and_first_token_slot(tokenizer):
    pattern = _pattern(tokenizer, "<subject>")
    ids = _ids(tokenizer, "<subject> next to another <subject>")
    assert find_placeholders(ids, pattern) == [1, 7]
    out, slots = collapse_placeholder(ids, pattern, pad_id=PAD)
    assert slots == [1, 5] and out[1] == out[5] == pattern[0]
    assert out[2:5] == tokenizer.encode("next to another") and out[6] == tokenizer.eot_token_id


def test_two_subjects_collapse_jointly(tokenizer):
    words = placeholder_words(2)
    assert words == ["<subject1>", "<subject2>"] and placeholder_words(1) == ["<subject>"]
    patterns = [_pattern(tokenizer, word) for word in words]
    assert len(patterns[0]) == 4 and patterns[0] != patterns[1]
    ids = _ids(tokenizer, "<subject2> chasing <subject1> in a park")
    out, slots = collapse_placeholders(ids, patterns, pad_id=PAD, slot_ids=[11, 22])
    assert slots == [[3], [1]] and out[1] == 22 and out[3] == 11
    assert out[2] == tokenizer.encode("chasing")[0] and out[4:8] == tokenizer.encode("in a park") + [
        tokenizer.eot_token_id]
    assert len(out) == 77


def test_punctuation_glued_to_the_placeholder_needs_isolation(tokenizer):
    pattern = _pattern(tokenizer, "<subject>")
    glued = "a photo of <subject>, on the beach"
    assert find_placeholders(_ids(tokenizer, glued), pattern) == []      # BPE merges '>,' differently
    isolated = isolate_placeholders(glued, ["<subject>"])
    assert isolated == "a photo of <subject> , on the beach"
    assert find_placeholders(_ids(tokenizer, isolated), pattern) == [4]


def test_prompt_that_does_not_fit_raises(tokenizer):
    pattern = _pattern(tokenizer, "<subject>")
    filler = " ".join(["red"] * 73)                                     # 1 + 73 + 3 + 1 = 78 raw tokens
    raw = [tokenizer.sot_token_id] + tokenizer.encode(f"{filler} <subject>") + [tokenizer.eot_token_id]
    assert len(raw) == 78
    out, slots = collapse_placeholder(raw, pattern, pad_id=PAD, length=77)   # 76 after collapsing: fits
    assert len(out) == 77 and slots == [74] and out[75] == tokenizer.eot_token_id and out[76] == PAD
    too_long = [tokenizer.sot_token_id] + tokenizer.encode(f"{filler} red red red <subject>") + [
        tokenizer.eot_token_id]
    with pytest.raises(ValueError, match="would be truncated"):
        collapse_placeholder(too_long, pattern, pad_id=PAD, length=77)
    # CLIP-L pads with its end token: dropping that single end token is still truncation
    clip_l_end = tokenizer.eot_token_id
    with pytest.raises(ValueError, match="would be truncated"):
        collapse_placeholder(raw[:-1] + [7, clip_l_end], pattern, pad_id=clip_l_end, length=76)


def test_check_prompt_errors_name_the_word():
    assert check_prompt("a <subject> and a <Subject>", ["<subject>"]) == {"<subject>": 2}
    with pytest.raises(PlaceholderError, match="prompt has no '<subject>'; found words: none"):
        check_prompt("a photo of a dog", ["<subject>"])
    with pytest.raises(PlaceholderError, match="prompt has no '<subject2>'; found words: \\['<subject1>'\\]"):
        check_prompt("<subject1> on a table", placeholder_words(2))
    with pytest.raises(PlaceholderError, match="unknown placeholder '<subject3>'"):
        check_prompt("<subject1> and <subject2> and <subject3>", placeholder_words(2))
    assert check_prompt("<subject> <lora:style:0.8>", ["<subject>"]) == {"<subject>": 1}
    assert issubclass(PlaceholderError, ValueError)


def test_assemble_splus_writes_only_the_slots():
    g = torch.Generator().manual_seed(0)
    embeds, splus = torch.randn(77, 16, generator=g), torch.randn(3, 16, generator=g)
    out = assemble_splus(embeds, [4, 9], splus)
    assert out.shape == (3, 77, 16)
    for group in range(3):
        assert out[group, 4].equal(splus[group]) and out[group, 9].equal(splus[group])
    other = [t for t in range(77) if t not in (4, 9)]
    assert out[:, other].equal(embeds[other].expand(3, -1, -1))
    # a second subject is written into the first one's output
    second = torch.randn(3, 16, generator=g)
    both = assemble_splus(out, [20], second)
    assert both[:, 20].equal(second) and both[:, 4].equal(splus) and both[:, 0].equal(out[:, 0])


def test_assemble_splus_is_differentiable_and_checks_widths():
    splus = torch.randn(2, 8, requires_grad=True)
    assemble_splus(torch.randn(10, 8), [3], splus).sum().backward()
    torch.testing.assert_close(splus.grad, torch.ones(2, 8))
    with pytest.raises(ValueError, match="must be \\(T, 8\\)"):
        assemble_splus(torch.randn(10, 6), [3], torch.randn(2, 8))
    with pytest.raises(ValueError, match="slots"):
        assemble_splus(torch.randn(10, 8), [10], torch.randn(2, 8))


def test_split_splus_for_sdxl_widths():
    splus = torch.randn(11, 768 + 1280)
    clip_l, clip_g = split_splus(splus)
    assert clip_l.shape == (11, 768) and clip_g.shape == (11, 1280)
    assert torch.cat([clip_l, clip_g], dim=-1).equal(splus)
    with pytest.raises(ValueError, match="width 2000 does not match"):
        split_splus(torch.randn(11, 2000))

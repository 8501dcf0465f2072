"""Bad input at the nodes' boundary, without ComfyUI: NaN, infinite and out-of-range numbers and masks are refused
naming the node, the input, what was expected and what was found; a placeholder that the tokenizer cuts at a
77-token boundary starts the next section; a batch whose context length is no multiple of the prompt's (a short
negative sampled apart from a long positive) is not compared with the positive."""
import math
import re

import pytest
import torch

from comfyui_customcontrast.nodes import apply as apply_module
from comfyui_customcontrast.nodes import checks, encodings, text_encode
from comfyui_customcontrast.nodes import patch as patch_module
from customcontrast_core import CustomContrastModel, get_preset

START, END = 49406, 49407
LT, GT, SUBJECT = 27, 29, 1000   # '<', '>', 'subject' ('subject1' is 'subject', '1')


class StandInTokenizer:
    """A CLIP tokenizer with ComfyUI's SDTokenizer fields: one token per word, a placeholder '<', 'subject', '>'."""

    start_token, end_token, pad_token, max_length = START, END, END, 77

    def tokenizer(self, text: str) -> dict:
        ids = []
        for word in text.split():
            if word.startswith("<") and word.endswith(">"):
                digits = word[len("<subject"):-1]
                ids += [LT, SUBJECT, *[2000 + int(d) for d in digits], GT]
            else:
                ids.append(100 + sum(map(ord, word)) % 800)
        return {"input_ids": [START, *ids, END]}

    def tokenize_with_weights(self, text: str) -> list[list[tuple]]:
        """ComfyUI's chunking of one long weighted segment: 75 tokens per section, cut anywhere, end and pad."""
        ids = self.tokenizer(text)["input_ids"][1:-1]
        sections = []
        for begin in range(0, max(len(ids), 1), self.max_length - 2):
            body = [(START, 1.0)] + [(t, 1.0) for t in ids[begin:begin + self.max_length - 2]] + [(END, 1.0)]
            sections.append(body + [(self.pad_token, 1.0)] * (self.max_length - len(body)))
        return sections


class StandInClip:
    def __init__(self) -> None:
        self.tokenizer = type("Tokenizers", (), {"clip_l": StandInTokenizer()})()

    def tokenize(self, text: str) -> dict:
        return {"l": self.tokenizer.clip_l.tokenize_with_weights(text)}


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# The placeholder at the 77-token boundary

@pytest.mark.parametrize("before, cut", [(73, 2), (74, 1)])
def test_a_placeholder_cut_at_the_section_boundary_starts_the_next_section(before, cut):
    """73 words leave '<' and 'subject' in section 0 and '>' in section 1 (74: '<' alone): the placeholder moves
    whole to the start of section 1 (its slot right after the start token), section 0 ends before it."""
    clip = StandInClip()
    text = f"{words(before)} <subject> on the beach"
    raw = clip.tokenize(text)["l"]
    assert [t for t, _ in raw[0][-1 - cut:-1]] == [LT, SUBJECT][:cut]   # the stand-in cuts it as ComfyUI does
    prompt = text_encode.tokenize_prompt(clip, text, ["<subject>"], "sd15", (768,))
    section0, section1 = ([t for t, _ in s] for s in prompt.tokens["l"])
    assert prompt.slots == [[(1, 1)]] and prompt.columns(0) == (78,)
    assert section0 == [t for t, _ in raw[0][:before + 1]] + [END] * (77 - before - 1)
    rest = [t for t, _ in raw[1][1 + 3 - cut:]]
    assert section1 == [START, LT] + rest + [END] * (77 - 2 - len(rest))
    assert all(len(s) == 77 for s in prompt.tokens["l"])


def test_a_placeholder_just_before_the_boundary_and_two_placeholders_are_found_where_they_are():
    clip = StandInClip()
    whole = text_encode.tokenize_prompt(clip, f"{words(72)} <subject> on the beach", ["<subject>"], "sd15", (768,))
    assert whole.slots == [[(0, 73)]]                  # not cut: collapsed in place, as before
    text = f"<subject1> {words(70)} <subject2> and <subject1> again"
    two = text_encode.tokenize_prompt(clip, text, ["<subject1>", "<subject2>"], "sd15", (768,))
    # <subject1> (4 tokens) at 1..4, 70 words at 5..74, '<' of <subject2> at 75: <subject2> starts section 1
    assert two.slots == [[(0, 1), (1, 3)], [(1, 1)]]


def test_every_occurrence_of_a_placeholder_must_be_found_among_the_tokens(monkeypatch):
    """A tokenizer that loses an occurrence (here: one that drops the second) is refused, counting them."""
    clip = StandInClip()
    original = clip.tokenizer.clip_l.tokenize_with_weights
    monkeypatch.setattr(clip.tokenizer.clip_l, "tokenize_with_weights",
                        lambda text: original(text.replace("<subject> again", "again")))
    with pytest.raises(text_encode.PlaceholderError, match=r"placeholder '<subject>' occurs 2 time\(s\) in the "
                                                           r"prompt, 1 of them were found among the prompt's tokens"):
        text_encode.tokenize_prompt(clip, "<subject> and <subject> again", ["<subject>"], "sd15", (768,))


def test_an_embedding_token_in_the_prompt_does_not_break_the_placeholder_search():
    """A textual-inversion embedding is a tensor token in ComfyUI's token lists: compared as no id."""
    clip = StandInClip()
    original = clip.tokenizer.clip_l.tokenize_with_weights

    def with_embedding(text):
        sections = original(text)
        sections[0][2] = (torch.ones(768), 1.0)
        return sections
    clip.tokenizer.clip_l.tokenize_with_weights = with_embedding
    prompt = text_encode.tokenize_prompt(clip, "a b <subject> c", ["<subject>"], "sd15", (768,))
    assert prompt.slots == [[(0, 3)]] and torch.is_tensor(prompt.tokens["l"][0][2][0])


# Contexts of another length than the positive's

def test_a_batch_whose_context_length_is_no_multiple_of_the_prompts_is_not_compared_with_it():
    """A 385-token positive and a 77-token negative: ComfyUI samples them apart (their LCM pads 5x). The negative's
    batch is patched as uncond rows (blank reference), never compared with the positive."""
    config = get_preset("tiny")
    model = CustomContrastModel(config).eval()
    sections = [[(i + 1, 1.0) for i in range(77)] for _ in range(5)]
    prompt = text_encode.PlaceholderPrompt(tokens={"l": sections}, slots=[[(2, 4)]], base="sd15",
                                           widths=config.token_widths)
    hidden = torch.randn(1, len(config.clip_layers), 5, config.clip_width)
    patch = patch_module.SubjectPatch(
        model=model, clip=None, subjects=[hidden], blank=torch.zeros_like(hidden), prompt=prompt,
        base_context=torch.randn(1, 385, config.context_dim),
        layers={layer.comfy_key: layer for layer in config.layers},
        settings=patch_module.ApplySettings(), timestep_of=lambda sigma: sigma * 100)
    visual = torch.randn(1, config.num_visual_tokens, config.context_dim)
    patch.cache[5.0] = encodings.Encodings(contexts=torch.randn(config.num_groups, 385, config.context_dim),
                                           visual=[visual], blank_visual=[visual * 0])
    negative = patch.model_call((2, 4, 8, 8), 5.0, torch.randn(2, 77, config.context_dim), (1,))
    assert negative.swapped == () and negative.chunks == 1 and not negative.swap_rows.any()
    assert negative.visual_tokens[0].abs().max() == 0                  # the blank reference's tokens
    ours = patch.model_call((2, 4, 8, 8), 5.0, patch.base_context.expand(2, -1, -1), (0,))
    assert ours.swapped == (0,) and ours.swap_rows.all()
    torch.testing.assert_close(ours.visual_tokens[0], visual.expand(2, -1, -1))


# Numbers and masks at the Apply node

def apply(**overrides):
    """apply_customcontrast with good values; the checks run before the (absent) MODEL is read."""
    args = {"model": None, "clip": None, "customcontrast": None, "subjects": [], "prompt": "<subject>", "weight": 1.0,
            "start_percent": 0.0, "end_percent": 1.0, "use_mask": True, "mask_mode": "soft", "mask_threshold": 0.2}
    return apply_module.apply_customcontrast(**{**args, **overrides})


@pytest.mark.parametrize("name, value, found", [
    ("weight", math.nan, "nan"), ("weight", math.inf, "inf"), ("weight", -0.5, "-0.5"), ("weight", 1e30, "1e+30"),
    ("weight", "1", "'1'"), ("start_percent", math.nan, "nan"), ("start_percent", -0.1, "-0.1"),
    ("end_percent", math.nan, "nan"), ("end_percent", 1.5, "1.5"),
])
def test_apply_numbers_must_be_finite_and_inside_their_widgets_range(name, value, found):
    high = {"weight": 3, "start_percent": 1, "end_percent": 1}[name]
    with pytest.raises(ValueError, match=rf"^Apply CustomContrast: {name} must be a finite number from 0 to {high}, "
                                         rf"found {re.escape(found)}$"):
        apply(**{name: value})


def test_splus_buckets_must_be_a_whole_number_and_start_must_not_be_after_end():
    with pytest.raises(ValueError, match=r"^Apply CustomContrast: splus_buckets must be a whole number from 0 to "
                                         r"1000, found 2.5$"):
        apply(splus_buckets=2.5)
    with pytest.raises(ValueError, match=r"^Apply CustomContrast: start_percent \(0.8\) must not be after "
                                         r"end_percent \(0.2\)$"):
        apply(start_percent=0.8, end_percent=0.2)
    with pytest.raises(AttributeError):   # equal ends and the widget's extremes pass the checks: the MODEL is read
        apply(start_percent=0.5, end_percent=0.5, weight=3.0, splus_buckets=1000)


@pytest.mark.parametrize("mask, found", [
    (torch.full((64, 64), math.nan), r"4096 NaN value\(s\) \(the first at mask 0, row 0, column 0\)"),
    (torch.ones(2, 8, 8).index_put_((torch.tensor([1]), torch.tensor([3]), torch.tensor([5])),
                                    torch.tensor(math.inf)),
     r"1 infinite value\(s\) \(the first at mask 1, row 3, column 5\)"),
])
def test_attn_mask_must_be_finite(mask, found):
    with pytest.raises(ValueError, match=rf"^Apply CustomContrast: attn_mask must hold finite values from 0 to 1, "
                                         rf"found {found}$"):
        apply_module.user_mask_of(mask)
    assert apply_module.user_mask_of(torch.nan_to_num(mask, nan=0.5, posinf=1.0)).isfinite().all()


def test_check_finite_counts_nan_and_infinite_values_and_names_the_first():
    values = torch.zeros(2, 3, 4, 3)
    values[1, 2, 0, 1], values[1, 2, 3, 0], values[0, 1, 1, 2] = math.nan, math.nan, -math.inf
    with pytest.raises(ValueError, match=r"^Node: image must hold finite pixels, found 2 NaN and 1 infinite "
                                         r"value\(s\) \(the first at image 0, row 1, column 1, channel 2\)$"):
        checks.check_finite("Node", "image", values, "hold finite pixels", ("image", "row", "column", "channel"))
    checks.check_finite("Node", "image", torch.zeros(1, 2, 2, 3), "hold finite pixels", ("image",))

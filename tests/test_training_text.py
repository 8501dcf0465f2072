"""S+ prompt encoding for training: slot substitution equals a hand-built embedding path, and the
shared-prefix encoding of frozen encoders equals every group's full encode (values, gradients, FLOPs)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training.text import OpenClipTokenizer, TextEncoderStack
from training.text_prefix import encode_groups, text_parts

TEXT = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


@pytest.fixture(scope="module")
def tokenizer():
    return OpenClipTokenizer()


def stack(base, tokenizer, widths=(32,), frozen=False, dtype=torch.float32):
    torch.manual_seed(0)
    encoders = [CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], **TEXT)).eval()]
    if base == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=widths[1], projection_dim=widths[1], **TEXT)).eval())
    for encoder in encoders:
        encoder.requires_grad_(not frozen).to(dtype)
    return TextEncoderStack(encoders, [tokenizer] * len(encoders), base=base)


def test_slots_are_found_for_every_prompt(tokenizer):
    text = stack("sd15", tokenizer)
    tokens = text.tokenize(["a photo of a <subject> dog", "<subject>, on the beach", ""], "<subject>")
    assert tokens.slots == ((5,), (1,), ())
    assert tokens.ids[0].shape == (3, 77)
    ids = tokens.ids[0][0].tolist()
    assert ids[:8] == [49406] + tokenizer.word_ids("a photo of a") + [ids[5]] + tokenizer.word_ids("dog") + [49407]


def test_substitution_equals_manual_embedding_path(tokenizer):
    text = stack("sd15", tokenizer)
    encoder = text.encoders[0]
    tokens = text.tokenize(["a photo of a <subject> dog"], "<subject>")
    splus = torch.randn(1, 3, 32)
    contexts, pooled = text(tokens, splus)
    assert contexts.shape == (3, 77, 32) and pooled is None
    for g in range(3):
        embeds = encoder.get_input_embeddings()(tokens.ids[0]).clone()
        embeds[0, 5] = splus[0, g]
        manual = {}
        hook = encoder.get_input_embeddings().register_forward_hook(lambda m, a, o: embeds)
        try:
            manual = encoder(input_ids=tokens.ids[0]).last_hidden_state
        finally:
            hook.remove()
        torch.testing.assert_close(contexts[g:g + 1], manual)
    # rows before the slot do not depend on S+ (causal encoder), rows after it do
    torch.testing.assert_close(contexts[0, :5], contexts[1, :5])
    assert (contexts[0, 5:] - contexts[1, 5:]).abs().max() > 1e-4


def test_prompt_without_placeholder_ignores_splus(tokenizer):
    text = stack("sd15", tokenizer)
    tokens = text.tokenize(["a plain prompt"], "<subject>")
    a, _ = text(tokens, torch.randn(1, 2, 32))
    b, _ = text(tokens)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[0])


def test_sdxl_two_encoders_widths_and_pooled(tokenizer):
    text = stack("sdxl", tokenizer, widths=(32, 48))
    tokens = text.tokenize(["<subject> in the snow", "a <subject>"], "<subject>")
    splus = torch.randn(2, 4, 80, requires_grad=True)
    contexts, pooled = text(tokens, splus)
    assert contexts.shape == (8, 77, 80) and pooled is None   # the added condition uses the plain prompt
    contexts.square().mean().backward()
    assert splus.grad.abs().sum() > 0 and torch.isfinite(splus.grad).all()
    _, pooled = text(tokens)
    assert pooled.shape == (2, 48)


PROMPTS = ["a photo of a <subject> dog", "", "<subject>, on the beach", "a <subject> and a <subject>"]


@pytest.mark.parametrize("base,widths", [("sd15", (32,)), ("sdxl", (32, 48))])
def test_shared_prefix_equals_every_groups_full_encode(tokenizer, base, widths):
    text = stack(base, tokenizer, widths, frozen=True, dtype=torch.float64)
    assert text.shares_prefix()
    tokens = text.tokenize(PROMPTS, "<subject>")
    assert tokens.slots == ((5,), (), (1,), (2, 5))   # mixed slot positions, a text-dropped row, two slots
    splus = torch.randn(4, 5, sum(widths), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(20, 77, sum(widths), dtype=torch.float64)
    shared, _ = text(tokens, splus)
    full, _ = text._forward_copies(tokens, splus)
    assert shared.shape == full.shape == (20, 77, sum(widths))
    torch.testing.assert_close(shared, full, rtol=1e-12, atol=1e-12)
    (grad_shared,) = torch.autograd.grad((shared * weights).sum(), splus)
    (grad_full,) = torch.autograd.grad((full * weights).sum(), splus)
    torch.testing.assert_close(grad_shared, grad_full, rtol=1e-10, atol=1e-12)
    assert grad_full[1].abs().max() == 0 and grad_full[0].abs().min() > 0   # no slot: S+ has no effect


def test_unfrozen_encoders_take_the_full_path(tokenizer):
    text = stack("sd15", tokenizer, frozen=True)
    assert text.shares_prefix()
    text.encoders[0].final_layer_norm.weight.requires_grad_(True)
    assert not text.shares_prefix()   # a trained encoder's prefix would need its gradient
    assert text_parts(torch.nn.Linear(2, 2)) is None


def test_shared_prefix_flops_are_the_closed_form(tokenizer):
    """Projection and MLP FLOPs scale with the positions encoded (5 groups of 4 prompts, forward)."""
    text = stack("sd15", tokenizer, frozen=True)
    tokens = text.tokenize(PROMPTS, "<subject>")
    groups, (d, inner, layers) = 5, (32, 64, 2)
    vectors = torch.randn(groups, 4, d)

    def linear_flops(fn):   # the attention products are left out: how SDPA is counted depends on the device
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        ops = counter.get_flop_counts()["Global"]
        return sum(ops.get(op, 0) for op in (torch.ops.aten.addmm, torch.ops.aten.mm))

    per_position = layers * 2 * (4 * d * d + 2 * d * inner)   # q, k, v, out projections + two MLP layers
    shared = linear_flops(lambda: encode_groups(text_parts(text.encoders[0]), tokens.ids[0], tokens.slots,
                                                vectors, penultimate=False))
    full = linear_flops(lambda: text._forward_copies(tokens, vectors.transpose(0, 1)))
    # three prompts with a slot (earliest at position 1): 1 prefix position once, 76 per group; one without: once
    assert shared == per_position * (3 * 1 + groups * 3 * 76 + 77)
    assert full == per_position * groups * 4 * 77

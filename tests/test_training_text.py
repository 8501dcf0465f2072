"""S+ prompt encoding for training: slot substitution equals a hand-built embedding path, and prompts
without a placeholder are encoded once for all groups (same values and gradients, fewer FLOPs)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training.text import OpenClipTokenizer, TextEncoderStack

TEXT = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


@pytest.fixture(scope="module")
def tokenizer():
    return OpenClipTokenizer()


def stack(base, tokenizer, widths=(32,), dtype=torch.float32):
    torch.manual_seed(0)
    encoders = [CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], **TEXT)).eval()]
    if base == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=widths[1], projection_dim=widths[1], **TEXT)).eval())
    for encoder in encoders:
        encoder.to(dtype)
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


def every_group(text, tokens, splus):
    """Reference: each group encoded on its own (G calls), group-major."""
    return torch.cat([text(tokens, splus[:, g:g + 1])[0] for g in range(splus.shape[1])])


@pytest.mark.parametrize("base,widths", [("sd15", (32,)), ("sdxl", (32, 48))])
def test_prompts_without_slot_encoded_once_equal_every_group(tokenizer, base, widths):
    text = stack(base, tokenizer, widths, dtype=torch.float64)
    tokens = text.tokenize(PROMPTS, "<subject>")
    assert tokens.slots == ((5,), (), (1,), (2, 5))   # mixed positions, a text-dropped row, two slots
    splus = torch.randn(4, 5, sum(widths), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(20, 77, sum(widths), dtype=torch.float64)
    once, _ = text(tokens, splus)
    reference = every_group(text, tokens, splus)
    assert once.shape == reference.shape == (20, 77, sum(widths))
    torch.testing.assert_close(once, reference, rtol=1e-12, atol=1e-12)
    (grad_once,) = torch.autograd.grad((once * weights).sum(), splus)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), splus)
    torch.testing.assert_close(grad_once, grad_reference, rtol=1e-10, atol=1e-12)
    assert grad_once[1].abs().max() == 0 and grad_once[0].abs().min() > 0   # no slot: S+ has no effect
    torch.testing.assert_close(once[1::4], once[1:2].expand(5, -1, -1))   # the dropped row in every group


def test_prompts_without_slot_cost_one_encode(tokenizer):
    """Projection and MLP FLOPs of the encoder call: 3 prompts with a slot x 5 groups + 1 prompt once."""
    text = stack("sd15", tokenizer)
    tokens = text.tokenize(PROMPTS, "<subject>")
    groups, (d, inner, layers) = 5, (32, 64, 2)

    def linear_flops(splus):   # the attention products are left out: how SDPA is counted depends on the device
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            text(tokens, splus)
        ops = counter.get_flop_counts()["Global"]
        return sum(ops.get(op, 0) for op in (torch.ops.aten.addmm, torch.ops.aten.mm))

    per_prompt = 77 * layers * 2 * (4 * d * d + 2 * d * inner)   # q, k, v, out projections + two MLP layers
    assert linear_flops(torch.randn(4, groups, d)) == per_prompt * (3 * groups + 1)
    all_slots = text.tokenize([PROMPTS[0]] * 4, "<subject>")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        text(all_slots, torch.randn(4, groups, d))
    assert counter.get_flop_counts()["Global"][torch.ops.aten.addmm] == per_prompt * 4 * groups

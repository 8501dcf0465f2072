"""S+ prompt encoding for training: slot substitution equals a hand-built embedding path."""
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training.text import OpenClipTokenizer, TextEncoderStack

TEXT = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


@pytest.fixture(scope="module")
def tokenizer():
    return OpenClipTokenizer()


def stack(base, tokenizer, widths=(32,)):
    torch.manual_seed(0)
    encoders = [CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], **TEXT)).eval()]
    if base == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=widths[1], projection_dim=widths[1], **TEXT)).eval())
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
    assert contexts.shape == (8, 77, 80) and pooled.shape == (8, 48)
    contexts.square().mean().backward()
    assert splus.grad.abs().sum() > 0 and torch.isfinite(splus.grad).all()

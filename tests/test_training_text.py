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


def stack(base, tokenizer, widths=(32,), dtype=torch.float32, layers=2):
    torch.manual_seed(0)
    text = {**TEXT, "num_hidden_layers": layers}
    encoders = [CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], **text)).eval()]
    if base == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=widths[1], projection_dim=widths[1],
                                                                   **text)).eval())
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


# SDXL's pooled text embedding (the added condition): one rule in training and in the ComfyUI node

POOLED_PROMPTS = ["a photo of <subject> on the beach", "", "<subject> and <subject>, at night"]


def plain_ids(tokenizer, words: list[list[int]]) -> torch.Tensor:
    """Start token, the given word ids, end token, zero padding to 77."""
    ids = [tokenizer.sot, *[i for part in words for i in part], tokenizer.eot]
    return torch.tensor(ids + [0] * (77 - len(ids)))


def test_sdxl_pooled_embedding_is_the_prompt_with_the_placeholders_first_token_and_no_splus(tokenizer):
    text = stack("sdxl", tokenizer, widths=(32, 48))
    tokens = text.tokenize(POOLED_PROMPTS, "<subject>")
    pooled = text.pooled(tokens)
    first = tokenizer.word_ids("<subject>")
    assert len(first) > 1                                # the placeholder is several BPE tokens
    words = tokenizer.word_ids
    rows = torch.stack([plain_ids(tokenizer, [words("a photo of"), first[:1], words("on the beach")]),
                        plain_ids(tokenizer, []),
                        plain_ids(tokenizer, [first[:1], words("and"), first[:1], words(", at night")])])
    with torch.no_grad():
        expected = text.encoders[1](input_ids=rows).text_embeds
    assert pooled.shape == (3, 48)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    _, same = text(tokens)                                # the forward without S+ returns the same vectors
    torch.testing.assert_close(same, pooled, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only SDXL has a pooled text embedding"):
        stack("sd15", tokenizer).pooled(tokens)


def tiny_comfy_sdxl_clip(text):
    """A ComfyUI SDXL CLIP (its own SDXLClipModel and tokenizer) whose two text models hold the weights of the
    training stack's tiny CLIP-L and CLIP-G."""
    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.sdxl_clip as sdxl

    def config(encoder):
        c = encoder.config
        return dict(num_hidden_layers=c.num_hidden_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_attention_heads=c.num_attention_heads, max_position_embeddings=77, vocab_size=c.vocab_size,
                    hidden_act=c.hidden_act, eos_token_id=49407, bos_token_id=0, pad_token_id=1, projection_dim=c.hidden_size)

    class TinySDXLClip(sdxl.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = sd1.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                          layer_norm_hidden_state=False, model_options=model_options,
                                          textmodel_json_config=config(text.encoders[0]))
            self.clip_g = sd1.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                          textmodel_json_config=config(text.encoders[1]),
                                          special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                          layer_norm_hidden_state=False, return_projected_pooled=True,
                                          model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    target = type("Target", (), {"clip": TinySDXLClip, "tokenizer": sdxl.SDXLTokenizer, "params": {}})
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    for comfy_model, encoder in ((clip.cond_stage_model.clip_l, text.encoders[0]),
                                 (clip.cond_stage_model.clip_g, text.encoders[1])):
        state = {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v
                 for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
        if "text_projection.weight" not in state:
            state["text_projection.weight"] = torch.eye(encoder.config.hidden_size)
        missing, unexpected = comfy_model.transformer.load_state_dict(state, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
    return clip


@pytest.mark.parametrize("prompt,subjects", [("a photo of <subject> on the beach", 1),
                                             ("a (red:1.2) <subject> at night", 1),
                                             ("<subject1> next to <subject2>", 2)])
def test_training_and_the_comfyui_node_pool_the_same_vector(tokenizer, prompt, subjects):
    """The pooled vector the Apply node puts in the CONDITIONING (``encode_pooled``) equals training's
    (``TextEncoderStack.pooled``) for the same prompt, whatever the subjects' S+ vectors (real ComfyUI).

    Fails when the node's slots hold another token of the placeholder than its first BPE token (its last, say).
    Prompt weights cannot change it: ComfyUI pools the unweighted encoder output."""
    import sys

    from comfy_env import comfyui
    from customcontrast_core.prompt import placeholder_words
    comfyui()
    text_encode = sys.modules[next(m for m in sys.modules if m.endswith("comfyui-customcontrast.nodes.text_encode"))]
    text = stack("sdxl", tokenizer, widths=(32, 48), layers=3)   # ComfyUI's penultimate layer needs 3 or more
    clip = tiny_comfy_sdxl_clip(text)
    words = placeholder_words(subjects)
    prompt_tokens = text_encode.tokenize_prompt(clip, prompt, words, "sdxl", (32, 48))
    node = text_encode.encode_pooled(clip, prompt_tokens, words)
    plain = prompt.replace("(red:1.2)", "red")             # training captions carry no prompt weights
    if subjects == 1:
        trained = text.pooled(text.tokenize([plain], "<subject>"))
    else:   # training has one placeholder word: write each subject's word as it
        trained = text.pooled(text.tokenize([plain.replace("<subject2>", "<subject1>")], "<subject1>"))
    assert node.shape == trained.shape == (1, 48)
    torch.testing.assert_close(node, trained, rtol=1e-5, atol=1e-5)
    # S+ never reaches it; the pooled vector of the S+ encoding (what the node used before) is another vector
    torch.manual_seed(0)
    splus = [torch.randn(1, 80) for _ in range(subjects)]
    _, with_splus = text_encode.encode_splus(clip, prompt_tokens, splus)
    assert (with_splus - trained).abs().max() > 1e-3


def test_the_apply_node_conditions_sdxl_on_trainings_pooled_vector(tokenizer, monkeypatch):
    """``apply_customcontrast`` on an SDXL model puts training's pooled vector in the positive CONDITIONING for two
    different subjects (real ComfyUI's CLIP; the UNet checks and the patch install are stubbed). Fails when the
    node keeps the pooled vector of its S+ encoding."""
    import sys
    from types import SimpleNamespace

    from comfy_env import comfyui
    from customcontrast_core import CustomContrastModel, get_preset
    comfyui()
    install = sys.modules[next(m for m in sys.modules if m.endswith("comfyui-customcontrast.nodes.apply"))]
    subject_cls = sys.modules[next(m for m in sys.modules if m.endswith("comfyui-customcontrast.nodes.subject"))].Subject
    text = stack("sdxl", tokenizer, widths=(32, 48), layers=3)
    clip = tiny_comfy_sdxl_clip(text)
    config = get_preset("tiny_sdxl")                        # S+ widths (32, 48): the tiny CLIP-L and CLIP-G
    customcontrast = SimpleNamespace(model=CustomContrastModel(config).eval(), patcher=None)
    sampling = SimpleNamespace(percent_to_sigma=lambda p: 14.6 * (1 - p), sigma_max=torch.tensor(14.6),
                               timestep=lambda sigma: sigma * 60)
    model = SimpleNamespace(get_model_object=lambda name: sampling)
    monkeypatch.setattr(install, "check_model", lambda m, c: {layer.comfy_key: layer for layer in config.layers})
    monkeypatch.setattr(install, "install", lambda m, patch, c: m)
    prompt = "a photo of <subject> on the beach"
    trained = text.pooled(text.tokenize([prompt], "<subject>"))
    pooled = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        hidden = torch.randn(1, len(config.clip_layers), 5, config.clip_width)
        subject = subject_cls(hidden=hidden, blank=torch.zeros_like(hidden), width=config.clip_width,
                              layers=config.clip_layers)
        _, conditioning = install.apply_customcontrast(model, clip, customcontrast, [subject], prompt, 1.0, 0.0, 1.0,
                                                       True, "soft", 0.2)
        pooled.append(conditioning[0][1]["pooled_output"])
    for vector in pooled:
        torch.testing.assert_close(vector, trained, rtol=1e-5, atol=1e-5)

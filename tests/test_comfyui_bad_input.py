"""Bad input and long prompts inside a real ComfyUI (COMFYUI_PATH): NaN, empty and non-finite inputs are refused by
the node that receives them, naming the input, and ComfyUI's executor runs the next good prompt; long prompts,
positive and negative of different lengths, and a placeholder at the 77-token boundary sample correctly."""
import math
import sys

import pytest
import test_comfyui_nodes as shared
import torch
from comfy_env import run_prompt
from test_comfyui_nodes import apply, encode, prompt_for, sample

env, files, loaded, photo = shared.env, shared.files, shared.loaded, shared.photo   # the same fixtures

TENSORS = {}   # what the injection node returns, by case


class InjectTensors:
    """A test node that hands the workflow an IMAGE and a MASK of the test's choosing."""

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"case": ("STRING", {"default": ""})}}

    def make(self, case):
        return TENSORS[case]


@pytest.fixture
def executor(env, files, monkeypatch):
    """Runs a workflow through ComfyUI's PromptExecutor; returns (success, outputs, execution errors)."""
    monkeypatch.setitem(env.nodes.NODE_CLASS_MAPPINGS, "CCTestInjectTensors", InjectTensors)

    def run(prompt):
        ok, outputs, messages = run_prompt(prompt)
        return ok, outputs, [m[1] for m in messages if m[0] == "execution_error"]
    return run


def workflow(files, seed=0, **apply_inputs):
    prompt = prompt_for(files, "sd15_single_subject")
    prompt["9"]["inputs"]["seed"] = seed
    prompt["6"]["inputs"].update(apply_inputs)
    return prompt


def injected(files, case, into):
    """The single-subject workflow with the injection node's IMAGE or MASK wired into ``into`` (node, input)."""
    prompt = workflow(files)
    prompt["20"] = {"class_type": "CCTestInjectTensors", "inputs": {"case": case}}
    for node, name, output in into:
        prompt[node]["inputs"][name] = ["20", output]
    return prompt


SEEDS = iter(range(100, 10_000))   # a new seed for every good run: the executor's cache cannot answer it


def assert_refused_then_good_run(executor, files, prompt, node_type, message):
    ok, _, errors = executor(prompt)
    assert not ok and len(errors) == 1, errors
    assert errors[0]["node_type"] == node_type
    assert message in errors[0]["exception_message"], errors[0]["exception_message"]
    ok, outputs, errors = executor(workflow(files, seed=next(SEEDS)))
    assert ok and not errors, errors
    assert outputs["11"]["images"][0]["type"] == "output"


ENCODE = ("5", "image", 0), ("5", "mask", 1)
IMAGE_CASES = {
    "nan pixels": (torch.rand(1, 64, 64, 3).index_fill_(1, torch.tensor([7]), math.nan), torch.ones(64, 64),
                   ("CustomContrast Encode Subject: image must hold finite pixel values (0 to 1), found 192 NaN "
                    "value(s) (the first at image 0, row 7, column 0, channel 0)")),
    "empty batch": (torch.zeros(0, 64, 64, 3), torch.ones(64, 64),
                    ("CustomContrast Encode Subject: image must be at least one IMAGE (B, H, W, C) with 1 "
                     "(grayscale), 3 (RGB) or 4 (RGBA) channels, found shape (0, 64, 64, 3)")),
    "nan mask rows": (torch.rand(1, 64, 64, 3), torch.ones(1, 64, 64).index_fill_(1, torch.tensor([3, 9]), math.nan),
                      ("CustomContrast Encode Subject: mask must hold finite values from 0 to 1, found 128 NaN "
                       "value(s) (the first at mask 0, row 3, column 0)")),
    "all-nan mask": (torch.rand(1, 64, 64, 3), torch.full((64, 64), math.nan),
                     ("CustomContrast Encode Subject: mask must hold finite values from 0 to 1, found 4096 NaN "
                      "value(s) (the first at mask 0, row 0, column 0)")),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_reference_tensors_are_refused_by_encode_subject_and_the_executor_goes_on(executor, files, case):
    image, mask, message = IMAGE_CASES[case]
    TENSORS[case] = (image, mask)
    assert_refused_then_good_run(executor, files, injected(files, case, ENCODE), "CustomContrastEncodeSubject",
                                 message)


def test_an_infinite_alpha_is_refused_by_encode_subject(env, loaded):
    alpha = torch.ones(1, 64, 64, 1).index_fill_(2, torch.tensor([5]), math.inf)
    with pytest.raises(ValueError, match=r"^CustomContrast Encode Subject: image must hold finite pixel values "
                                         r"\(0 to 1\), found 64 infinite value\(s\) \(the first at image 0, row 0, "
                                         r"column 5, channel 3\)$"):
        encode(env, loaded, torch.cat([torch.rand(1, 64, 64, 3), alpha], -1))


def test_a_nan_attn_mask_is_refused_by_apply_and_the_executor_goes_on(executor, files):
    TENSORS["nan attn_mask"] = (torch.rand(1, 64, 64, 3), torch.full((1, 64, 64), math.nan))
    prompt = injected(files, "nan attn_mask", [("6", "attn_mask", 1)])
    assert_refused_then_good_run(executor, files, prompt, "CustomContrastApply",
                                 "Apply CustomContrast: attn_mask must hold finite values from 0 to 1, found 4096 NaN "
                                 "value(s) (the first at mask 0, row 0, column 0)")


@pytest.mark.parametrize("name, value, high", [("weight", math.nan, 3), ("end_percent", math.nan, 1),
                                               ("start_percent", math.nan, 1)])
def test_non_finite_numbers_pass_comfyuis_widget_check_and_are_refused_by_apply(executor, files, name, value, high):
    """ComfyUI compares a widget value with its min and max (refusing inf itself), which NaN passes: Apply refuses
    it (NaN weight reached the sampler before, NaN end_percent raised an IndexError)."""
    assert_refused_then_good_run(executor, files, workflow(files, **{name: value}), "CustomContrastApply",
                                 f"Apply CustomContrast: {name} must be a finite number from 0 to {high}, found "
                                 f"{value!r}")


def test_nan_clip_vision_features_are_refused_by_encode_subject(env, files, loaded, photo):
    broken = env.nodes.CLIPVisionLoader().load_clip(files["clip_vision"])[0]   # a fresh model, one NaN weight
    with torch.no_grad():
        next(broken.model.parameters()).view(-1)[0] = math.nan
    with pytest.raises(ValueError, match=r"^CustomContrast Encode Subject: clip_vision must give finite features of "
                                         r"the image, found \d+ NaN value\(s\) \(the first at image 0, layer 0, token "
                                         r"\d+, channel \d+\)$"):
        encode(env, dict(loaded, clip_vision=broken), photo)


def test_pixel_values_outside_0_to_1_are_clipped_as_comfyui_saves_them(env, loaded, references):
    """An upscaler's overshoot or a huge value reaches CLIP vision clipped to 0..1 (unclipped, 1e30 gave NaN
    features and a NaN sample)."""
    image = torch.rand(1, 64, 64, 3)
    wild = image.clone()
    wild[0, :8] = 1e30
    wild[0, 8:16] = -3.0
    a, b = encode(env, loaded, wild), encode(env, loaded, image.clamp(0, 1).index_fill_(1, torch.arange(8), 1.0)
                                                         .index_fill_(1, torch.arange(8, 16), 0.0))
    torch.testing.assert_close(references[0], references[2], rtol=0, atol=0)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)
    assert torch.isfinite(a.hidden).all()


@pytest.fixture
def references(monkeypatch):
    """The images the Encode Subject node hands to CLIP vision (the reference, then the blank one)."""
    subject_module = sys.modules[next(m for m in sys.modules if m.endswith("comfyui-customcontrast.nodes.subject"))]
    seen, original = [], subject_module.clip_hidden
    monkeypatch.setattr(subject_module, "clip_hidden", lambda cv, image, *args: seen.append(image) or
                        original(cv, image, *args))
    return seen


def test_non_finite_subject_features_s_plus_and_prompt_embeddings_are_refused_by_apply(env, loaded, photo,
                                                                                      monkeypatch):
    """A SUBJECT from elsewhere with NaN features, a checkpoint whose encoder gives NaN S+ vectors and a CLIP that
    encodes the prompt to NaN: each refused naming the input, before anything is sampled."""
    import dataclasses

    subject = encode(env, loaded, photo)
    nan_subject = dataclasses.replace(subject, hidden=subject.hidden.clone().index_fill_(2, torch.tensor([4]),
                                                                                        math.nan))
    with pytest.raises(ValueError, match=r"^Apply CustomContrast: subject2 must hold finite CLIP-vision features, "
                                         r"found 3072 NaN value\(s\) \(the first at image 0, layer 0, token 4, "
                                         r"channel 0\)$"):
        apply(env, loaded, subject, subject2=nan_subject, prompt="<subject1> and <subject2>")
    weight = next(loaded["customcontrast"].model.encoder.parameters())
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.view(-1)[0] = math.nan
        with pytest.raises(ValueError, match=r"^Apply CustomContrast: customcontrast must give finite S\+ vectors "
                                             r"\(its encoder's weights hold NaN or infinite values\?\), found \d+ NaN"):
            apply(env, loaded, subject)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    install = sys.modules[env.nodes.NODE_CLASS_MAPPINGS["CustomContrastApply"].__module__.replace(".apply_node",
                                                                                                ".apply")]
    original = install.encode_splus
    monkeypatch.setattr(install, "encode_splus", lambda *a: (original(*a)[0] * math.nan, None))
    with pytest.raises(ValueError, match=r"^Apply CustomContrast: clip must encode the prompt to finite embeddings, "
                                         r"found 59136 NaN value\(s\) \(the first at prompt 0, token 0, channel 0\)$"):
        apply(env, loaded, subject)


# Long prompts

def long_prompt(sections: int) -> str:
    """'a photo of <subject>' and one-token words up to ``sections`` 77-token sections."""
    return "a photo of <subject> on the beach " + "a " * (75 * (sections - 1) - 5)


def test_a_long_positive_with_an_empty_negative_samples_with_the_node_acting_on_both(env, loaded, photo, caplog,
                                                                                    monkeypatch):
    """A 385-token positive and a 77-token negative: ComfyUI samples them in separate batches (padding 77 to 385
    is over its 4x limit). Cond rows are the node's (masks recorded every step, no warning) and the uncond rows get
    the blank reference's visual branch, as when the two are batched together (ComfyUI's limit lifted): the same
    samples."""
    import logging

    import comfy.conds

    subject = encode(env, loaded, photo)
    patched, positive = apply(env, loaded, subject, prompt=long_prompt(5))
    assert positive[0][0].shape == (1, 385, 768)
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0]
    with caplog.at_level(logging.WARNING, logger="customcontrast"):
        apart = sample(env, patched, positive, negative)
    patch = patched.model_options["transformer_options"]["customcontrast"][-1]
    assert len(patch.last_masks) == 2 and not [r for r in caplog.records if "not drawn" in r.getMessage()]
    assert torch.isfinite(apart).all()
    original = comfy.conds.CONDCrossAttn.can_concat
    monkeypatch.setattr(comfy.conds.CONDCrossAttn, "can_concat",
                        lambda self, other: original(self, other) or self.cond.shape[2] == other.cond.shape[2])
    together = sample(env, patched, positive, negative)
    # ComfyUI's CPU attention and the patch's round differently over 77 and 385 keys: |x| ~ 300
    torch.testing.assert_close(apart, together, rtol=1e-4, atol=1e-2)
    monkeypatch.setattr(sys.modules[type(patch).__module__], "patched_chunks",
                        lambda chunks, swapped, matched: tuple(swapped))   # the uncond rows left unpatched
    assert (sample(env, patched, positive, negative) - together).abs().max() > 0.1


def test_a_long_prompt_workflow_runs_after_a_failed_one(executor, files):
    ok, _, errors = executor(workflow(files, weight=math.nan))
    assert not ok
    prompt = workflow(files, seed=next(SEEDS), prompt=long_prompt(5))
    prompt["7"]["inputs"]["text"] = ""
    ok, outputs, errors = executor(prompt)
    assert ok and not errors, errors
    assert outputs["11"]["images"][0]["type"] == "output"


def text_encode_module():
    return sys.modules[next(m for m in sys.modules if m.endswith("comfyui-customcontrast.nodes.text_encode"))]


@pytest.mark.parametrize("before", [72, 73, 74])
def test_a_placeholder_at_the_77_token_boundary_is_found_and_its_s_plus_lands_on_its_slot(env, loaded, before):
    """With 73 or 74 one-token words before it, ComfyUI's tokenizer cuts <subject> ('<' 'subject' '>') at the
    section boundary: it starts section 1 (column 78), section 0 ends before it; 72 words leave it whole at column
    73. Two S+ vectors give the same context before the slot and different ones from the slot on (causal)."""
    text_encode = text_encode_module()
    clip = loaded["clip"]
    text = "a " * before + "<subject> wearing a red hat"
    raw = clip.tokenize(text)["l"]
    lt, subject_id, _ = text_encode.word_ids(clip, "l", "<subject>")
    if before > 72:
        assert [t for t, _ in raw[0][before + 1:76]] == [lt, subject_id][:76 - before - 1]   # cut by ComfyUI
    prompt = text_encode.tokenize_prompt(clip, text, ["<subject>"], "sd15", (768,))
    column = 73 if before == 72 else 78
    assert prompt.columns(0) == (column,)
    assert prompt.tokens["l"][column // 77][column % 77][0] == lt
    if before > 72:
        end = clip.tokenizer.clip_l.end_token
        assert [t for t, _ in prompt.tokens["l"][0][before + 1:]] == [end] * (76 - before)
    torch.manual_seed(0)
    contexts, _ = text_encode.encode_splus(clip, prompt, [torch.randn(2, 768)])
    change = (contexts[0] - contexts[1]).abs().amax(-1)                  # per context position
    section_end = (column // 77 + 1) * 77
    assert torch.cat([change[:column], change[section_end:]]).max() < 1e-5
    assert change[column:section_end].min() > 1e-3


@pytest.mark.parametrize("before", [73, 74])
def test_a_prompt_with_the_placeholder_at_the_boundary_applies_and_samples(env, loaded, photo, before):
    subject = encode(env, loaded, photo)
    patched, positive = apply(env, loaded, subject, prompt="a " * before + "<subject> wearing a red hat")
    negative = env.nodes.CLIPTextEncode().encode(loaded["clip"], "blurry")[0]
    out = sample(env, patched, positive, negative)
    patch = patched.model_options["transformer_options"]["customcontrast"][-1]
    assert torch.isfinite(out).all() and len(patch.last_masks) == 2


def test_sdxl_tokenizers_place_a_cut_placeholder_alike(env):
    """CLIP-L and CLIP-G chunk alike: the cut placeholder starts section 1 for both (SDXL's tokenizer alone)."""
    import types

    from comfy.sdxl_clip import SDXLTokenizer

    text_encode = text_encode_module()
    tokenizer = SDXLTokenizer()
    clip = types.SimpleNamespace(tokenizer=tokenizer, tokenize=tokenizer.tokenize_with_weights)
    prompt = text_encode.tokenize_prompt(clip, "a " * 73 + "<subject> on the beach", ["<subject>"], "sdxl",
                                         (768, 1280))
    assert prompt.slots == [[(1, 1)]]
    assert [t for t, *_ in prompt.tokens["g"][0][74:]] == [tokenizer.clip_g.end_token, 0, 0]

"""S+ prompt batches through ComfyUI's own CLIP (COMFYUI_PATH): one call for every layer group gives what one
call per group gives, for SD1.5 and SDXL, long and weighted prompts, two subjects."""
import sys

import pytest
import torch

from comfy_env import comfyui, randomize_, unet_config

PROMPTS = {
    "plain": ("a photo of <subject> on the beach", 1),
    "weighted": ("a photo of <subject> wearing a (red:1.3) hat", 1),
    "long": ("a photo of <subject> " + "on a sunny beach with palm trees and waves, " * 9 + "at dusk", 1),
    "two": ("<subject1> sitting next to <subject2> in a garden", 2),
}
WIDTHS = {"sd15": (768,), "sdxl": (768, 1280)}


@pytest.fixture(scope="module")
def env():
    return comfyui()


@pytest.fixture(scope="module")
def clips(env):
    import comfy.model_detection
    import comfy.sd

    made = {}
    for family in ("sd15", "sdxl"):
        config = comfy.model_detection.model_config_from_unet_config(unet_config(family, torch.float32))
        clip = comfy.sd.CLIP(target=config.clip_target())
        randomize_(clip.cond_stage_model, seed=7)
        made[family] = clip
    return made


def _module(name):
    return sys.modules[next(m for m in sys.modules if m.endswith(f"comfyui-customcontrast.nodes.{name}"))]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", list(PROMPTS))
def test_one_batched_encode_equals_one_encode_per_layer_group(env, clips, family, case):
    """The S+ prompts of G layer groups go through ComfyUI's CLIP in one call: each group's rows are what
    encoding that group's prompt alone gives (long, weighted and two-subject prompts too).

    Fails when the batch holds the first group's S+ in every group, holds the groups in reverse order, or
    interleaves a long prompt's sections (section-major instead of group-major: the "long" cases), and when the
    S+ vectors never reach the slots (the groups would not differ)."""
    text_encode = _module("text_encode")
    from customcontrast_core.prompt import placeholder_words

    clip, (prompt, subjects) = clips[family], PROMPTS[case]
    tokens = text_encode.tokenize_prompt(clip, prompt, placeholder_words(subjects), family, WIDTHS[family])
    torch.manual_seed(0)
    splus = [torch.randn(3, sum(WIDTHS[family])) for _ in range(subjects)]
    batched, _ = text_encode.encode_splus(clip, tokens, splus)
    sections = len(tokens.tokens["l"])
    assert batched.shape == (3, 77 * sections, 768 if family == "sd15" else 2048)
    for group in range(3):
        alone, _ = text_encode.encode_splus(clip, tokens, [s[group:group + 1] for s in splus])
        torch.testing.assert_close(batched[group], alone[0], rtol=1e-4, atol=1e-4)   # fp32 batch round-off
    assert (batched[0] - batched[1]).abs().max() > 1e-3                # the groups really differ


def test_a_clip_of_the_other_family_is_refused(env, clips):
    """An SDXL CLIP (token sets g and l) on an SD1.5 model would give 2048-wide contexts to a 768-wide UNet:
    Apply refuses it while tokenizing the prompt, and an SD1.5 CLIP on SDXL too."""
    text_encode = _module("text_encode")
    with pytest.raises(ValueError, match=r"the clip input gives token sets \['g', 'l'\], the SD15 model and "
                                         r"checkpoint need \['l'\]: connect the CLIP of the same SD15 model"):
        text_encode.tokenize_prompt(clips["sdxl"], PROMPTS["plain"][0], ["<subject>"], "sd15", WIDTHS["sd15"])
    with pytest.raises(ValueError, match=r"gives token sets \['l'\], the SDXL model and checkpoint need \['g', 'l'\]"):
        text_encode.tokenize_prompt(clips["sd15"], PROMPTS["plain"][0], ["<subject>"], "sdxl", WIDTHS["sdxl"])

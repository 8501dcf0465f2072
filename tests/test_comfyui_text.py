"""S+ prompt batches through ComfyUI's own CLIP (COMFYUI_PATH): the stamped token processing gives exactly
what ComfyUI's per-row processing gives, for SD1.5 and SDXL, long and weighted prompts, two subjects."""
import sys

import pytest
import torch

from benchmarks.common import randomize_
from benchmarks.comfy_runtime import _unet_config
from comfy_env import comfyui

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
        config = comfy.model_detection.model_config_from_unet_config(_unet_config(family, torch.float32))
        clip = comfy.sd.CLIP(target=config.clip_target())
        randomize_(clip.cond_stage_model, seed=7)
        made[family] = clip
    return made


def _module(name):
    return sys.modules[next(m for m in sys.modules if m.endswith(f"comfyui-customcontrast.nodes.{name}"))]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", list(PROMPTS))
def test_stamped_token_processing_equals_comfyuis_per_row_processing(env, clips, family, case, monkeypatch):
    text_encode, fast_tokens = _module("text_encode"), _module("fast_tokens")
    from customcontrast_core.prompt import placeholder_words

    clip, (prompt, subjects) = clips[family], PROMPTS[case]
    tokens = text_encode.tokenize_prompt(clip, prompt, placeholder_words(subjects), family, WIDTHS[family])
    torch.manual_seed(0)
    splus = [torch.randn(3, sum(WIDTHS[family])) for _ in range(subjects)]
    calls = []
    original = type(clip.cond_stage_model.clip_l).process_tokens

    def counting(self, rows, device):
        calls.append(len(rows))
        return original(self, rows, device)

    monkeypatch.setattr(type(clip.cond_stage_model.clip_l), "process_tokens", counting)
    fast = text_encode.encode_splus(clip, tokens, splus)
    fast_calls = list(calls)
    monkeypatch.setattr(text_encode, "stamped_rows", lambda *args: fast_tokens.contextlib.nullcontext())
    calls.clear()
    slow = text_encode.encode_splus(clip, tokens, splus)
    sections = len(tokens.tokens["l"])
    weighted = case == "weighted"
    encoders = len(WIDTHS[family])                                    # clip_l (and clip_g): one class
    assert calls == [3 * sections + weighted] * encoders              # ComfyUI's own: every row
    # stamped: the first copy and the first two (+ the empty row of weighted prompts)
    assert fast_calls == ([sections, 2 * sections] + ([1] if weighted else [])) * encoders
    assert fast[0].shape == (3, 77 * sections, 768 if family == "sd15" else 2048)
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=0)
    if family == "sdxl":
        torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=0)
    assert (fast[0][0] - fast[0][1]).abs().max() > 0                  # the copies really differ


def test_unexpected_token_processing_falls_back_to_comfyuis(env, clips, monkeypatch):
    """If the slot does not hold the vector after ComfyUI's processing (another ComfyUI), every row is
    processed by ComfyUI: same result as without the stamped path."""
    text_encode, fast_tokens = _module("text_encode"), _module("fast_tokens")
    clip = clips["sd15"]
    tokens = text_encode.tokenize_prompt(clip, PROMPTS["plain"][0], ["<subject>"], "sd15", WIDTHS["sd15"])
    splus = [torch.randn(3, 768)]
    original = type(clip.cond_stage_model.clip_l).process_tokens

    def shifted(self, rows, device):   # a ComfyUI that transforms embeddings (e.g. scales them)
        embeds, *rest = original(self, rows, device)
        return (embeds * 1.5, *rest)

    monkeypatch.setattr(type(clip.cond_stage_model.clip_l), "process_tokens", shifted)
    fast = text_encode.encode_splus(clip, tokens, splus)
    monkeypatch.setattr(text_encode, "stamped_rows", lambda *args: fast_tokens.contextlib.nullcontext())
    slow = text_encode.encode_splus(clip, tokens, splus)
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=0)
    assert "process_tokens" not in vars(clip.cond_stage_model.clip_l)   # the instance is restored


def test_a_clip_of_the_other_family_is_refused(env, clips):
    """An SDXL CLIP (token sets g and l) on an SD1.5 model would give 2048-wide contexts to a 768-wide UNet:
    Apply refuses it while tokenizing the prompt, and an SD1.5 CLIP on SDXL too."""
    text_encode = _module("text_encode")
    with pytest.raises(ValueError, match=r"the clip input gives token sets \['g', 'l'\], the SD15 model and "
                                         r"checkpoint need \['l'\]: connect the CLIP of the same SD15 model"):
        text_encode.tokenize_prompt(clips["sdxl"], PROMPTS["plain"][0], ["<subject>"], "sd15", WIDTHS["sd15"])
    with pytest.raises(ValueError, match=r"gives token sets \['l'\], the SDXL model and checkpoint need \['g', 'l'\]"):
        text_encode.tokenize_prompt(clips["sd15"], PROMPTS["plain"][0], ["<subject>"], "sdxl", WIDTHS["sdxl"])

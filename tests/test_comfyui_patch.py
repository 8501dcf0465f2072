"""The ComfyUI patch on tiny random UNets: exact firing counts, and parity with the training processors."""
import dataclasses

import pytest
import torch

from comfy_env import comfyui
from customcontrast_core import CustomContrastModel, get_preset
from customcontrast_core.layers import layer_grid
from training.processors import ProcessorState, install_processors
from training.tiny_models import tiny_unet

COMFY_DEPTHS = {
    "sd15": dict(transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, use_linear_in_transformer=False),
    "sdxl": dict(transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 transformer_depth_middle=10, use_linear_in_transformer=True),
}


def comfy_unet_config(config):
    channels = config.block_out_channels
    return dict(image_size=32, in_channels=4, out_channels=4, model_channels=channels[0],
                channel_mult=[c // channels[0] for c in channels], num_res_blocks=[2] * len(channels),
                num_head_channels=8, context_dim=config.context_dim, use_spatial_transformer=True, legacy=False,
                **COMFY_DEPTHS[config.base])


def comfy_twin(diffusers_unet, config):
    """A ComfyUI UNetModel with exactly the weights of a diffusers UNet."""
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = comfy_unet_config(config)
    unet = UNetModel(**cfg, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    mapping = comfy.utils.unet_to_diffusers(cfg)
    state = {mapping[k]: v for k, v in diffusers_unet.state_dict().items()}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return unet.eval()


def make_patch(model, config, context, sigma, *, gamma=1.0, slot=3, use_mask=False, more_sigmas=()):
    """A SubjectPatch whose per-sigma encodings are given (the same for ``more_sigmas``), so no CLIP is needed."""
    from comfyui_customcontrast.nodes.encodings import Encodings
    from comfyui_customcontrast.nodes.patch import ApplySettings, SubjectPatch
    from comfyui_customcontrast.nodes.text_encode import PlaceholderPrompt

    torch.manual_seed(3)
    contexts = torch.randn(config.num_groups, 77, config.context_dim)
    visual = torch.randn(1, config.num_visual_tokens, config.context_dim)
    prompt = PlaceholderPrompt(tokens={"l": [[(0, 1.0)] * 77]}, slots=[[(0, slot)]], base=config.base,
                               widths=config.token_widths)
    layers = {layer.comfy_key: layer for layer in config.layers}
    patch = SubjectPatch(model=model, clip=None, subjects=[torch.zeros(1)], blank=torch.zeros(1), prompt=prompt,
                         base_context=context, layers=layers, settings=ApplySettings(gamma=gamma, use_mask=use_mask),
                         timestep_of=lambda s: s)
    patch.cache[sigma] = encodings = Encodings(contexts=contexts, visual=[visual], blank_visual=[visual * 0])
    for other in more_sigmas:
        patch.cache[other] = encodings
    return patch, encodings


@pytest.fixture(scope="module")
def env():
    return comfyui()


def comfy_forward(unet, patch, x, t, context, sigma, chunks=(0,)):
    """One UNet call as ComfyUI makes it with the patch installed: the APPLY_MODEL wrapper's ModelCall in
    transformer_options, the context swap as attn2_patch, the replace on every patched block key."""
    from comfyui_customcontrast.nodes import comfy_glue

    replace = comfy_glue.Attn2Replace([patch])
    calls = []

    def counting(q, k, v, extra_options):
        calls.append(((*extra_options["block"], extra_options["block_index"]),
                      tuple(extra_options["activations_shape"][-2:])))
        return replace(q, k, v, extra_options)
    options = {"patches": {"attn2_patch": [comfy_glue.swap_context(patch)]},
               "patches_replace": {"attn2": {key: counting for key in patch.layers}},
               "cond_or_uncond": list(chunks), "sigmas": torch.tensor([sigma]),
               comfy_glue.call_key(patch): patch.model_call(tuple(x.shape), sigma, context, tuple(chunks))}
    with torch.no_grad():
        out = unet(x, timesteps=t, context=context, transformer_options=options)
    return out, calls


@pytest.mark.parametrize("preset,count", [("tiny", 16), ("tiny_sdxl", 70)])
def test_patch_fires_once_per_layer_with_expected_keys_and_grids(env, preset, count):
    config = get_preset(preset)
    torch.manual_seed(0)
    unet = comfy_twin(tiny_unet(config), config)
    model = CustomContrastModel(config).eval()
    context = torch.randn(1, 77, config.context_dim)
    patch, _ = make_patch(model, config, context, 5.0)
    out, calls = comfy_forward(unet, patch, torch.randn(1, 4, 16, 16), torch.tensor([500.0]), context, 5.0)
    assert len(calls) == count
    assert [key for key, _ in calls] == [layer.comfy_key for layer in config.layers]
    assert [grid for _, grid in calls] == [layer_grid((16, 16), layer.downsample) for layer in config.layers]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_training_processor_equals_comfyui_patch(env, preset):
    config = get_preset(preset)
    torch.manual_seed(0)
    d_unet = tiny_unet(config).eval()
    c_unet = comfy_twin(d_unet, config)
    torch.manual_seed(1)
    model = CustomContrastModel(config).eval()
    context = torch.randn(1, 77, config.context_dim)
    patch, enc = make_patch(model, config, context, 5.0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])

    state = ProcessorState()
    install_processors(d_unet, model, state, capture_downsample=())
    state.contexts = enc.contexts[:, None]             # (G, B=1, 77, C)
    state.visual_tokens, state.slots, state.latent_hw = enc.visual[0], ((3,),), (16, 16)
    with torch.no_grad():
        d_out = d_unet(x, t, encoder_hidden_states=context).sample
    c_out, _ = comfy_forward(c_unet, patch, x, t, context, 5.0)
    assert (d_out - c_out).abs().max().item() < 1e-4
    # and the patch really changes the prediction: plain UNets differ from both
    with torch.no_grad():
        plain = c_unet(x, timesteps=t, context=context)
    assert (plain - c_out).abs().max().item() > 1e-3


def test_uncond_rows_use_blank_visual_tokens_and_base_text(env):
    config = get_preset("tiny")
    torch.manual_seed(0)
    unet = comfy_twin(tiny_unet(config), config)
    model = CustomContrastModel(config).eval()
    context = torch.randn(1, 77, config.context_dim)
    negative = torch.randn(1, 77, config.context_dim)
    patch, _ = make_patch(model, config, context, 5.0)
    x = torch.randn(1, 4, 16, 16)
    both, _ = comfy_forward(unet, patch, x.repeat(2, 1, 1, 1), torch.tensor([500.0] * 2),
                            torch.cat([negative, context]), 5.0, chunks=(1, 0))
    cond, _ = comfy_forward(unet, patch, x, torch.tensor([500.0]), context, 5.0)
    torch.testing.assert_close(both[1:], cond, atol=1e-5, rtol=1e-5)   # batching with uncond changes nothing
    assert (both[0] - cond[0]).abs().max() > 1e-3
    # the uncond row keeps its text and gets the blank reference's tokens (zeros here: a visual branch of 0),
    # so it is the plain UNet's row on the negative
    with torch.no_grad():
        plain = unet(x, timesteps=torch.tensor([500.0]), context=negative)
    torch.testing.assert_close(both[:1], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet_matches_fp32(env, dtype):
    """q/k/v arrive in the UNet's dtype; the patch computes in fp32 and returns the UNet's dtype."""
    config = get_preset("tiny")
    torch.manual_seed(0)
    unet = comfy_twin(tiny_unet(config), config)
    model = CustomContrastModel(config).eval()
    context = torch.randn(1, 77, config.context_dim)
    patch, _ = make_patch(model, config, context, 5.0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    full, _ = comfy_forward(unet, patch, x, t, context, 5.0)
    patch.cache[5.0] = dataclasses.replace(patch.cache[5.0], contexts=patch.cache[5.0].contexts.to(dtype))
    half, calls = comfy_forward(unet.to(dtype), patch, x.to(dtype), t, context.to(dtype), 5.0)
    assert half.dtype == dtype and len(calls) == 16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_the_mask_made_at_one_step_acts_at_the_next_as_in_training(env, preset):
    """Masks are carried from step t to t-1: the maps captured at sigma 9 make the mask that the next call (sigma
    5) applies, and that call equals the training processors given the same mask (SD1.5 and SDXL structure)."""
    config = get_preset(preset)
    torch.manual_seed(0)
    d_unet = tiny_unet(config).eval()
    c_unet = comfy_twin(d_unet, config)
    torch.manual_seed(1)
    model = CustomContrastModel(config).eval()
    context = torch.randn(1, 77, config.context_dim)
    patch, enc = make_patch(model, config, context, 9.0, use_mask=True, more_sigmas=(5.0,))
    first, second = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    comfy_forward(c_unet, patch, first, torch.tensor([900.0]), context, 9.0)
    masked, _ = comfy_forward(c_unet, patch, second, torch.tensor([500.0]), context, 5.0)
    mask = patch.tracker.mask_for(5.0)[0]                               # made from the step at sigma 9
    assert 0 < float(mask.mean()) < 1

    state = ProcessorState()
    install_processors(d_unet, model, state, capture_downsample=())
    state.contexts, state.visual_tokens, state.slots = enc.contexts[:, None], enc.visual[0], ((3,),)
    state.mask, state.latent_hw = mask, (16, 16)
    with torch.no_grad():
        trained = d_unet(second, torch.tensor([500.0]), encoder_hidden_states=context).sample
    assert (trained - masked).abs().max().item() < 1e-4
    unmasked, _ = comfy_forward(c_unet, make_patch(model, config, context, 5.0)[0], second, torch.tensor([500.0]),
                                context, 5.0)
    assert (unmasked - masked).abs().max().item() > 1e-3

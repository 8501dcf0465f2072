"""The small world's trained weights (``assets/miniworld``) through ComfyUI's own UNetModel and the Apply
node's patch give the images of the diffusers path (the evaluation's sampler), mask propagation included.

Needs COMFYUI_PATH (skipped without it, as every real-ComfyUI test)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from einops import rearrange

from customcontrast_core import checkpoint
from customcontrast_core.config import get_preset
from test_comfyui_patch import comfy_twin
from training.eval.generate import PLACEHOLDER, SampleSettings, SubjectSampler, reference_view
from training.miniworld.base import load_base
from training.miniworld.data import WorldConfig, subject_caption, write_eval
from training.miniworld.pipeline import MiniworldConfig
from training.models import clip_hidden_states

# another run's release folder (python -m training.miniworld writes <out>/release) can be checked the same way
RELEASE = Path(os.environ.get("CUSTOMCONTRAST_MINIWORLD", Path(__file__).resolve().parents[1] / "assets" / "miniworld"))
if not (RELEASE / "customcontrast.safetensors").is_file():
    pytest.skip(f"no trained small-world release at {RELEASE}: `python -m training.miniworld` writes one to "
                "<out>/release (docs/miniworld.md)", allow_module_level=True)


@pytest.fixture(scope="module")
def env():
    from comfy_env import comfyui
    return comfyui()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = MiniworldConfig()
    config = get_preset(cfg.encoder_preset)
    size = cfg.world.image_size
    case = write_eval(tmp_path_factory.mktemp("eval"), WorldConfig(eval_subjects=1, eval_prompts=1, eval_renders=1))[0]
    reference = reference_view(case.reference, case.reference_mask, size, case.subject.shape)
    prompt = subject_caption(case.subject, case.contexts[0])
    return cfg, config, reference, prompt


@torch.no_grad()
def comfy_sample(env, frozen, model, config, reference, prompt, settings: SampleSettings, seed: int):
    """SubjectSampler's DDIM loop with ComfyUI's UNetModel and a SubjectPatch in place of the training processors."""
    from diffusers import DDIMScheduler
    from comfyui_customcontrast.nodes.encodings import Encodings
    from comfyui_customcontrast.nodes.patch import ApplySettings, SubjectPatch
    from comfyui_customcontrast.nodes.text_encode import PlaceholderPrompt
    from test_comfyui_patch import comfy_forward

    unet = comfy_twin(frozen.unet, config)
    text, encoder = frozen.text, model.encoder
    scheduler = DDIMScheduler.from_config(frozen.scheduler.config)
    scheduler.set_timesteps(settings.steps)
    size = settings.resolution // 4
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    latents = latents * scheduler.init_noise_sigma
    negative, _ = text(text.tokenize([settings.negative], PLACEHOLDER))
    tokens = text.tokenize([prompt], PLACEHOLDER)
    positive, _ = text(tokens)                                  # the positive CONDITIONING: no S+
    image = encoder.encode_image(clip_hidden_states(frozen.clip_vision, reference[None], config.clip_layers))
    blank = encoder.encode_image(clip_hidden_states(frozen.clip_vision, torch.zeros_like(reference[None]),
                                                    config.clip_layers))
    placeholder = PlaceholderPrompt(tokens={"l": [[(0, 1.0)] * 77]}, slots=[[(0, s) for s in tokens.slots[0]]],
                                    base=config.base, widths=config.token_widths)
    patch = SubjectPatch(model=model, clip=None, subjects=[torch.zeros(1)], blank=torch.zeros(1), prompt=placeholder,
                         base_context=positive, layers={layer.comfy_key: layer for layer in config.layers},
                         settings=ApplySettings(gamma=settings.gamma, use_mask=settings.use_mask, mask=settings.mask),
                         timestep_of=lambda s: s)
    for t in scheduler.timesteps:   # the encodings the node makes at each timestep (here without ComfyUI's CLIP)
        enc = encoder.encode_timestep(image, t.float().reshape(1))
        blank_enc = encoder.encode_timestep(blank, t.float().reshape(1))
        contexts, _ = text(tokens, enc.splus)
        patch.cache[float(t)] = Encodings(contexts=rearrange(contexts, "g 1 t c -> g t c") if contexts.dim() == 4
                                          else contexts, visual=[enc.visual_tokens],
                                          blank_visual=[blank_enc.visual_tokens])
    patch.start_run([])
    context = torch.cat([negative, positive])
    for t in scheduler.timesteps:
        pred, _ = comfy_forward(unet, patch, torch.cat([latents] * 2), t.float().reshape(1).expand(2), context,
                                float(t), chunks=(1, 0))
        uncond, cond = pred.chunk(2)
        latents = scheduler.step(uncond + settings.guidance * (cond - uncond), t, latents).prev_sample
    patch.end_run()
    decoded = frozen.vae.decode(latents / frozen.vae.config.scaling_factor).sample
    return ((decoded[0] + 1) / 2).clamp(0, 1), patch


@pytest.mark.parametrize("use_mask", [False, True])
def test_trained_weights_through_comfyuis_unet_give_the_diffusers_images(env, world, use_mask):
    cfg, config, reference, prompt = world
    size = cfg.world.image_size
    frozen = load_base(RELEASE / "base", config, size, size)
    model, _ = checkpoint.load(RELEASE / "customcontrast.safetensors")
    settings = SampleSettings(steps=cfg.sample_steps, guidance=cfg.guidance, resolution=size, use_mask=use_mask)
    ours, patch = comfy_sample(env, frozen, model, config, reference, prompt, settings, seed=0)
    theirs = SubjectSampler(frozen, model)(prompt, reference, settings, seed=0)
    assert (ours - theirs).abs().max().item() < 1e-4     # measured 2e-6 (with the masks one step apart: 1.2e-2)
    if use_mask:   # the masks were made and used: one per step after the first
        assert len(patch.last_masks) == cfg.sample_steps
    # the subject reached the image: without the reference the same seed draws the subject's pixels otherwise
    # (the subject covers a small part of the 32 px image: measured max difference 0.24, mean 0.008)
    plain = SubjectSampler(frozen, model)(prompt.replace(f"{PLACEHOLDER} ", ""), None, settings, seed=0)
    assert (plain - theirs).abs().max().item() > 0.1

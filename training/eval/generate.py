"""Image generation for evaluation with the training processors (same attention math as the nodes).

DDIM with classifier-free guidance; the uncond row uses the negative prompt and the blank-reference
visual tokens; S+ is re-encoded at every timestep; the subject mask made at one step is used at the
next (Sec. 3.4), as in the ComfyUI nodes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from customcontrast_core.attention import SubjectMaps
from customcontrast_core.encoder import ImageFeatures
from customcontrast_core.masks import MaskConfig
from customcontrast_core.propagation import MaskTracker
from customcontrast_core.visual_kv import CustomContrastModel

from ..data.dataset import DataConfig, SubjectDataset
from ..data.manifest import SubjectRecord
from ..models import FrozenModels, clip_hidden_states
from ..processors import ProcessorState, install_processors, project_visual_kv

PLACEHOLDER = "<subject>"


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 50
    guidance: float = 7.5
    resolution: int = 512
    gamma: float = 1.0
    use_mask: bool = True
    mask: MaskConfig = MaskConfig()
    negative: str = ""


def reference_view(image: str | Path, mask: str | Path | None, size: int, cls: str = "subject") -> Tensor:
    """The encoder's reference, built as in training without augmentation (``SubjectDataset``, ``augment=False``):
    the subject (``mask``; the whole photo when None) on a gray background, a square crop 1.2x its box, ``size`` px.

    Shapes: -> (3, size, size) in [0, 1].
    """
    record = SubjectRecord("reference", cls, (str(image),), None if mask is None else (str(mask),))
    dataset = SubjectDataset([record], DataConfig(reference_size=size, target_size=size, augment=False))
    return dataset[0]["reference"]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def generation_key(**parts) -> str:
    """A digest of everything one generated image depends on (JSON-serialisable parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class SubjectSampler:
    """Generates images of a reference subject (or plain text-to-image when no reference is given)."""

    def __init__(self, frozen: FrozenModels, model: CustomContrastModel, capture_downsample=(2, 4)) -> None:
        self.frozen, self.model = frozen, model.eval()
        self.state = ProcessorState()
        install_processors(frozen.unet, model, self.state, capture_downsample)
        self.capture_layers = {l.name for l in model.config.layers if l.downsample in capture_downsample}

    @torch.no_grad()
    def __call__(self, prompt: str, reference: Tensor | None, settings: SampleSettings, seed: int,
                 image: ImageFeatures | None = None) -> Tensor:
        """Shapes: reference (3, H, W) in [0, 1] or None -> image (3, R, R) in [0, 1].

        ``image``: the reference's encoder image features to use instead of encoding ``reference`` (features
        fitted to one subject, ``training.miniworld.oracles``); batch 1."""
        from diffusers import DDIMScheduler

        frozen, state, encoder = self.frozen, self.state, self.model.encoder
        device = next(frozen.unet.parameters()).device
        scheduler = DDIMScheduler.from_config(frozen.scheduler.config)
        scheduler.set_timesteps(settings.steps)
        size = settings.resolution // (2 ** (len(frozen.vae.config.block_out_channels) - 1))
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, frozen.unet.config.in_channels, size, size, generator=g).to(device)
        latents = latents * scheduler.init_noise_sigma
        text = frozen.text
        negative, _ = text(text.tokenize([settings.negative], PLACEHOLDER))
        if reference is not None:
            layers = self.model.config.clip_layers
            if image is None:
                image = encoder.encode_image(clip_hidden_states(frozen.clip_vision, reference[None].to(device), layers))
            blank = encoder.encode_image(clip_hidden_states(frozen.clip_vision, torch.zeros_like(reference[None]).to(device), layers))
            tokens = text.tokenize([prompt], PLACEHOLDER)
        else:
            tokens = text.tokenize([prompt], PLACEHOLDER)
            positive, _ = text(tokens)
        tracker = MaskTracker(settings.mask)
        for t in scheduler.timesteps:
            state.reset()
            if reference is None:
                state.contexts = state.visual_tokens = state.visual_kv = None
                context = torch.cat([negative, positive])
            else:
                enc = encoder.encode_timestep(image, t.float().reshape(1).to(device))
                blank_enc = encoder.encode_timestep(blank, t.float().reshape(1).to(device))
                cond, _ = text(tokens, enc.splus)                                   # (G, 77, C)
                uncond = negative.expand_as(cond)
                state.contexts = rearrange(torch.stack([uncond, cond]), "two g t c -> g two t c")
                state.visual_tokens = torch.cat([blank_enc.visual_tokens, enc.visual_tokens])
                state.visual_kv = project_visual_kv(self.model.visual_kv, state.visual_tokens)   # one matmul
                state.slots, state.gamma = ((), tokens.slots[0]), settings.gamma
                state.latent_hw = (size, size)
                masks = tracker.mask_for(float(t)) if settings.use_mask else None
                state.mask = None if masks is None else masks[0].expand(2, -1, -1)
                state.capture = settings.use_mask
                tracker.begin(float(t))
                context = state.contexts[0]
            pred = frozen.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            if reference is not None and settings.use_mask:
                for name, maps in state.maps.items():
                    tracker.add(0, SubjectMaps(text=maps.text[1:], visual=maps.visual[1:]), state.grids[name])
            uncond_pred, cond_pred = pred.chunk(2)
            latents = scheduler.step(uncond_pred + settings.guidance * (cond_pred - uncond_pred), t, latents).prev_sample
        state.contexts = state.visual_tokens = state.visual_kv = state.mask = None
        state.capture = False
        image = frozen.vae.decode(latents / frozen.vae.config.scaling_factor).sample
        return ((image[0].float() + 1) / 2).clamp(0, 1).cpu()

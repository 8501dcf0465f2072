"""What the Apply CustomContrast node does: checks its inputs, encodes the positive prompt, installs the patch.

Imports no ComfyUI module at import time (the glue imports ``comfy`` inside its functions), so the benchmarks
drive it with ComfyUI's sampler without loading the node API."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..customcontrast_core.layers import CrossAttentionLayer
from ..customcontrast_core.masks import MaskConfig
from ..customcontrast_core.prompt import placeholder_words
from .checks import APPLY, check_finite, check_number
from .comfy_glue import cross_attention_keys, install, model_family, progress_bar
from .patch import ApplySettings, SubjectPatch
from .text_encode import encode_pooled, encode_splus, tokenize_prompt

if TYPE_CHECKING:
    from .loader import LoadedCustomContrast
    from .subject import Subject

SUBJECT_INPUTS = ("subject", "subject2", "subject3")   # the Apply node's inputs, in placeholder order


def check_model(model, customcontrast: LoadedCustomContrast) -> dict[tuple, CrossAttentionLayer]:
    """Refuses a checkpoint of another family or a UNet whose cross-attention layers differ."""
    family = model_family(model)
    config = customcontrast.model.config
    if family != config.base:
        raise ValueError(f"this CustomContrast checkpoint is for {config.base.upper()}, the MODEL is "
                         f"{family.upper()}: load the {family} checkpoint")
    keys = cross_attention_keys(model)
    expected = [layer.comfy_key for layer in config.layers]
    if keys != expected:
        raise ValueError(f"the MODEL has {len(keys)} cross-attention layers, the checkpoint was trained for "
                         f"{len(expected)} ({config.base.upper()}); distilled variants are not supported")
    return {layer.comfy_key: layer for layer in config.layers}


def mask_config(mode: str, threshold: float) -> MaskConfig:
    """The node's ``mask_mode`` and ``mask_threshold`` (one slider: the soft mode's threshold or the top-k
    mode's kept fraction) as a MaskConfig; refuses a value outside the mode's range, naming the input."""
    if mode == "soft" and not 0.0 <= threshold < 1.0:
        raise ValueError(f"mask_threshold must be at least 0 and below 1 with mask_mode 'soft' (values below it "
                         f"are cut; 1 would cut the whole mask), got {threshold}")
    if mode == "topk" and not 0.0 < threshold <= 1.0:
        raise ValueError(f"mask_threshold must be above 0 and at most 1 with mask_mode 'topk' (the fraction of the "
                         f"image kept), got {threshold}")
    if mode == "topk":
        return MaskConfig(mode=mode, topk_ratio=threshold)
    return MaskConfig(mode=mode, threshold=threshold)


def user_mask_of(attn_mask) -> torch.Tensor | None:
    """The ``attn_mask`` input as (n, H, W) fp32; refuses a mask that is empty (the latent batch is checked
    when sampling starts: n must be 1 or the batch). Shapes: (H, W) or (n, H, W) -> (n, H, W)."""
    if attn_mask is None:
        return None
    user = (attn_mask[None] if attn_mask.ndim == 2 else attn_mask).float()
    if user.ndim != 3 or 0 in user.shape:
        raise ValueError(f"attn_mask must be a MASK of shape (H, W) or (B, H, W), got {tuple(attn_mask.shape)}")
    check_finite(APPLY, "attn_mask", user, "hold finite values from 0 to 1", ("mask", "row", "column"))
    empty = [i for i, peak in enumerate(user.flatten(1).amax(1).tolist()) if peak <= 0]
    if empty:
        which = "" if user.shape[0] == 1 else f" {empty[0]} (of {user.shape[0]})"
        raise ValueError(f"attn_mask{which} is empty (all zero): the subject would be masked out everywhere")
    return user


def apply_customcontrast(model, clip, customcontrast, subjects: list[Subject], prompt: str, weight: float,
                         start_percent: float, end_percent: float, use_mask: bool, mask_mode: str,
                         mask_threshold: float, attn_mask=None, splus_buckets: int = 0):
    """Builds the patch of one Apply node; returns the patched MODEL and the positive CONDITIONING."""
    weight = check_number(APPLY, "weight", weight, 0.0, 3.0)
    start_percent = check_number(APPLY, "start_percent", start_percent, 0.0, 1.0)
    end_percent = check_number(APPLY, "end_percent", end_percent, 0.0, 1.0)
    splus_buckets = int(check_number(APPLY, "splus_buckets", splus_buckets, 0, 1000, whole=True))
    if start_percent > end_percent:
        raise ValueError(f"{APPLY}: start_percent ({start_percent}) must not be after end_percent ({end_percent})")
    layers = check_model(model, customcontrast)
    config = customcontrast.model.config
    for name, s in zip(SUBJECT_INPUTS, subjects):
        if s.width != config.clip_width or s.layers != config.clip_layers:
            raise ValueError(f"a SUBJECT was encoded for CLIP width {s.width} / layers {s.layers}, this checkpoint "
                             f"expects {config.clip_width} / {config.clip_layers}: re-encode it with this checkpoint")
        check_finite(APPLY, name, s.hidden, "hold finite CLIP-vision features", ("image", "layer", "token", "channel"))
    words = placeholder_words(len(subjects))
    tokens = tokenize_prompt(clip, prompt, words, config.base, config.token_widths)
    sampling = model.get_model_object("model_sampling")
    settings = ApplySettings(
        gamma=weight, sigma_start=float(sampling.percent_to_sigma(start_percent)),
        sigma_end=float(sampling.percent_to_sigma(end_percent)), use_mask=use_mask,
        mask=mask_config(mask_mode, mask_threshold), user_mask=user_mask_of(attn_mask), splus_buckets=splus_buckets)
    encoder = customcontrast.model.encoder
    with torch.no_grad():
        first = sampling.timestep(sampling.sigma_max.reshape(1)).float()
        splus = [encoder(s.hidden.to(next(encoder.parameters())), first).splus[0] for s in subjects]
    check_finite(APPLY, "customcontrast", torch.stack(splus), "give finite S+ vectors (its encoder's weights hold "
                 "NaN or infinite values?)", ("subject", "layer group", "channel"))
    base_context, pooled = encode_splus(clip, tokens, [v[:1] for v in splus])   # the first layer group's S+
    if config.base == "sdxl":   # SDXL's added condition as in training: the prompt without S+ (pooled_prompt_ids)
        pooled = encode_pooled(clip, tokens, words)
    check_finite(APPLY, "clip", base_context, "encode the prompt to finite embeddings",
                 ("prompt", "token", "channel"))
    patch = SubjectPatch(model=customcontrast.model, clip=clip, subjects=[s.hidden for s in subjects],
                         blank=subjects[0].blank, prompt=tokens, base_context=base_context, layers=layers,
                         settings=settings, timestep_of=lambda sigma: sampling.timestep(sigma).float(),
                         progress=progress_bar)
    conditioning = [[base_context, {"pooled_output": pooled} if pooled is not None else {}]]
    return install(model, patch, [customcontrast.patcher, clip.patcher]), conditioning

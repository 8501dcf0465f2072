"""Apply CustomContrast: patches a cloned SD1.5/SDXL MODEL and encodes the positive prompt."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from customcontrast_core.layers import CrossAttentionLayer
from customcontrast_core.masks import MASK_MODES, MaskConfig
from customcontrast_core.prompt import placeholder_words

from .loader import CUSTOMCONTRAST, LoadedCustomContrast
from .patch import ApplySettings, Attn2Replace, SubjectPatch
from .subject import SUBJECT, Subject
from .text_encode import encode_base, tokenize_prompt

STATE_KEY = "customcontrast"


def model_family(model) -> str:
    """'sd15' or 'sdxl' from the loaded UNet's context width (768 / 2048)."""
    context = model.model.model_config.unet_config.get("context_dim")
    family = {768: "sd15", 2048: "sdxl"}.get(context)
    if family is None:
        raise ValueError(f"CustomContrast supports SD1.5 (context 768) and SDXL (context 2048) models; "
                         f"this MODEL has context width {context}")
    return family


def unet_cross_attention_keys(model) -> list[tuple[str, int, int]]:
    """Every ``attn2`` block key of the loaded UNet, in execution order (middle block id 0)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = model.model.diffusion_model
    keys = []
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    keys += [(name, 0 if name == "middle" else number, i) for i in range(len(module.transformer_blocks))]
    return keys


def check_model(model, customcontrast: LoadedCustomContrast) -> dict[tuple, CrossAttentionLayer]:
    """Refuses a checkpoint of another family or a UNet whose cross-attention layers differ."""
    family = model_family(model)
    config = customcontrast.model.config
    if family != config.base:
        raise ValueError(f"this CustomContrast checkpoint is for {config.base.upper()}, the MODEL is "
                         f"{family.upper()}: load the {family} checkpoint")
    keys = unet_cross_attention_keys(model)
    expected = [layer.comfy_key for layer in config.layers]
    if keys != expected:
        raise ValueError(f"the MODEL has {len(keys)} cross-attention layers, the checkpoint was trained for "
                         f"{len(expected)} ({config.base.upper()}); distilled variants are not supported")
    return {layer.comfy_key: layer for layer in config.layers}


def install(model, patch: SubjectPatch, customcontrast: LoadedCustomContrast):
    """Clones the MODEL and installs the context swap, one attn2 replace per layer and the run wrapper."""
    import comfy.patcher_extension as ext

    patched = model.clone()
    patched.set_model_attn2_patch(patch.swap_context)
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key in patch.layers:
        current = existing.get(key)
        if isinstance(current, Attn2Replace):
            replace = current.with_patch(patch)
        elif current is not None and hasattr(current, "callback") and hasattr(current, "kwargs"):
            replace = Attn2Replace([patch], current.callback, current.kwargs)   # IPAdapter_plus chained before us
        else:
            replace = Attn2Replace([patch])
        patched.set_model_attn2_replace(replace, *key)

    def outer_sample(executor, *args, **kwargs):
        patch.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            patch.finish()

    tag = f"{STATE_KEY}_{id(patch)}"
    patched.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, tag, outer_sample)
    patched.set_additional_models(tag, [customcontrast.patcher, patch.clip.patcher])
    options = patched.model_options.setdefault("transformer_options", {})
    options[STATE_KEY] = [*options.get(STATE_KEY, []), patch]
    return patched


def apply_customcontrast(model, clip, customcontrast, subjects: list[Subject], prompt: str, weight: float,
                         start_percent: float, end_percent: float, use_mask: bool, mask_mode: str,
                         mask_threshold: float, attn_mask=None, splus_buckets: int = 0):
    """Builds the patch of one Apply node; returns the patched MODEL and the positive CONDITIONING."""
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) must not be after end_percent ({end_percent})")
    layers = check_model(model, customcontrast)
    config = customcontrast.model.config
    for s in subjects:
        if s.width != config.clip_width or s.layers != config.clip_layers:
            raise ValueError(f"a SUBJECT was encoded for CLIP width {s.width} / layers {s.layers}, this checkpoint "
                             f"expects {config.clip_width} / {config.clip_layers}: re-encode it with this checkpoint")
    words = placeholder_words(len(subjects))
    tokens = tokenize_prompt(clip, prompt, words, config.base, config.token_widths)
    sampling = model.get_model_object("model_sampling")
    user_mask = None if attn_mask is None else (attn_mask[None] if attn_mask.ndim == 2 else attn_mask).float()
    if user_mask is not None and user_mask.max() <= 0:
        raise ValueError("attn_mask is empty (all zero): the subject would be masked out everywhere")
    settings = ApplySettings(
        gamma=weight, sigma_start=float(sampling.percent_to_sigma(start_percent)),
        sigma_end=float(sampling.percent_to_sigma(end_percent)), use_mask=use_mask,
        mask=MaskConfig(mode=mask_mode, threshold=mask_threshold, topk_ratio=mask_threshold),
        user_mask=user_mask, splus_buckets=splus_buckets)
    encoder = customcontrast.model.encoder
    with torch.no_grad():
        first = sampling.timestep(sampling.sigma_max.reshape(1)).float()
        splus = [encoder(s.hidden.to(next(encoder.parameters())), first).splus[0] for s in subjects]
    base_context, pooled = encode_base(clip, tokens, splus)
    patch = SubjectPatch(model=customcontrast.model, clip=clip, subjects=[s.hidden for s in subjects],
                         blank=subjects[0].blank, prompt=tokens, base_context=base_context, layers=layers,
                         settings=settings, timestep_of=lambda sigma: sampling.timestep(sigma).float())
    conditioning = [[base_context, {"pooled_output": pooled} if pooled is not None else {}]]
    return install(model, patch, customcontrast), conditioning


class CustomContrastApply(io.ComfyNode):
    """Patches a MODEL so that the prompt's placeholder renders the reference subject."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomContrastApply",
            display_name="Apply CustomContrast",
            category="CustomContrast",
            description="Draws the SUBJECT where the prompt says <subject> (<subject1>, <subject2>, ... for several).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 or SDXL model matching the checkpoint."),
                io.Clip.Input("clip", tooltip="The CLIP of the same model (encodes the S+ prompts)."),
                CUSTOMCONTRAST.Input("customcontrast", tooltip="From Load CustomContrast Model."),
                SUBJECT.Input("subject", tooltip="The subject for <subject> (or <subject1> with several)."),
                io.String.Input("prompt", multiline=True, default="a photo of <subject> on the beach",
                                tooltip="Prompt with the placeholder where the subject goes."),
                io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="γ: strength of the visual cross-attention branch."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule the subject starts to act."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule the subject stops acting."),
                io.Boolean.Input("use_mask", default=True,
                                 tooltip="Carry the subject-location mask from each step to the next (Sec. 3.4)."),
                io.Combo.Input("mask_mode", options=list(MASK_MODES), default="soft",
                               tooltip="soft: keep values above the threshold; topk: keep the top fraction."),
                io.Float.Input("mask_threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="soft: values below are set to 0; topk: the fraction of the image kept."),
                io.Int.Input("splus_buckets", default=0, min=0, max=1000, optional=True,
                             tooltip="0: re-encode S+ at every step (paper). N > 0: encode S+ once per each of "
                                     "N timestep ranges and reuse it (faster, approximate)."),
                SUBJECT.Input("subject2", optional=True, tooltip="A second subject, for <subject2>."),
                SUBJECT.Input("subject3", optional=True, tooltip="A third subject, for <subject3>."),
                io.Mask.Input("attn_mask", optional=True, tooltip="Where the subject may appear; intersected "
                              "with the propagated mask."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched clone of the input MODEL."),
                     io.Conditioning.Output(display_name="positive", tooltip="Feed this to the sampler's positive.")],
        )

    @classmethod
    def execute(cls, model, clip, customcontrast, subject, prompt, weight, start_percent, end_percent, use_mask,
                mask_mode, mask_threshold, subject2=None, subject3=None, attn_mask=None,
                splus_buckets=0) -> io.NodeOutput:
        subjects = [s for s in (subject, subject2, subject3) if s is not None]
        patched, positive = apply_customcontrast(model, clip, customcontrast, subjects, prompt, weight,
                                                 start_percent, end_percent, use_mask, mask_mode,
                                                 mask_threshold, attn_mask, splus_buckets)
        return io.NodeOutput(patched, positive)

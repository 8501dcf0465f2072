"""Everything that knows how ComfyUI calls a patch: the one module that touches ComfyUI's model internals.

``install`` puts one :class:`~.patch.SubjectPatch` on a clone of the MODEL through ModelPatcher's patch API:

- an ``OUTER_SAMPLE`` wrapper around each sampling run (its argument ``sigmas`` is the run's schedule);
- an ``APPLY_MODEL`` wrapper around each UNet call: it builds the patch's
  :class:`~.model_call.ModelCall` from what ComfyUI passes (the latent, sigma, the batched context and
  ``cond_or_uncond``) and hands it to every layer of the call in ``transformer_options``;
- an ``attn2_patch`` (before the K/V projections) that swaps in the layer group's S+ prompt;
- one ``attn2`` replace per cross-attention block (after the projections) that runs Eq. 3, under the key
  IPAdapter_plus uses for that block (`replace_key`), so the two chain in either order.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .patch import SubjectPatch

STATE_KEY = "customcontrast"   # transformer_options[STATE_KEY]: the patches on a MODEL, for the preview node
SIGMA_KEY = "customcontrast_sigma"   # the UNet call's sigma as a float, for adopted IPAdapter callbacks


def model_family(model) -> str:
    """'sd15' or 'sdxl' from the loaded UNet's context width (768 / 2048)."""
    context = model.model.model_config.unet_config.get("context_dim")
    family = {768: "sd15", 2048: "sdxl"}.get(context)
    if family is None:
        raise ValueError(f"CustomContrast supports SD1.5 (context 768) and SDXL (context 2048) models; "
                         f"this MODEL has context width {context}")
    return family


def cross_attention_keys(model) -> list[tuple[str, int, int]]:
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


def clip_hidden(clip_vision, image: Tensor, layers: tuple[int, ...], crop: bool, width: int) -> Tensor:
    """Hugging Face ``hidden_states[j]`` for each j in ``layers`` from ComfyUI's CLIP-vision model.

    ComfyUI's ``intermediate_output="all"`` returns block outputs: its index j-1 is HF index j;
    HF index 0 (patch embeddings) is not available. Shapes: (B, H, W, 3) -> (B, K, T, D).
    """
    import comfy.model_management as mm
    from comfy.clip_vision import clip_preprocess

    if min(layers) < 1:
        raise ValueError(f"this checkpoint uses CLIP hidden state {min(layers)} (patch embeddings), "
                         "which ComfyUI's CLIP-vision model does not expose")
    mm.load_model_gpu(clip_vision.patcher)
    pixels = clip_preprocess(image.to(clip_vision.load_device), size=clip_vision.image_size,
                             mean=clip_vision.image_mean, std=clip_vision.image_std, crop=crop).float()
    with torch.no_grad():
        out = clip_vision.model(pixel_values=pixels, intermediate_output="all")
    hidden = out[1]                                                    # (B, L, T, D)
    if hidden.shape[-1] != width:
        raise ValueError(f"the CLIP-vision model has width {hidden.shape[-1]}, the CustomContrast checkpoint "
                         f"expects {width}: load the CLIP-vision model it was trained with")
    if max(layers) > hidden.shape[1]:
        raise ValueError(f"the checkpoint reads CLIP-vision layer {max(layers)}, this model has {hidden.shape[1]}")
    return torch.stack([hidden[:, j - 1] for j in layers], dim=1).float().to(mm.intermediate_device())


def tokenizer_of(clip, key: str):
    """ComfyUI's SDTokenizer of CLIP encoder ``key`` ('l' or 'g'): start, end and pad ids, the HF tokenizer."""
    return getattr(clip.tokenizer, f"clip_{key}")


def word_ids(clip, key: str, word: str) -> list[int]:
    """The BPE ids of ``word`` in that tokenizer, without start/end tokens."""
    return list(tokenizer_of(clip, key).tokenizer(word)["input_ids"][1:-1])


def plain_attention(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
    """ComfyUI's own cross-attention of the layer (what the replace would run without a patch)."""
    from comfy.ldm.modules.attention import optimized_attention
    return optimized_attention(q, k, v, extra_options["n_heads"], transformer_options=extra_options)


def progress_bar(total: int):
    """ComfyUI's progress bar (shown on the node that is running: the sampler)."""
    import comfy.utils
    return comfy.utils.ProgressBar(total)


def block_key(extra_options: dict) -> tuple[str, int, int]:
    return (*extra_options["block"], extra_options["block_index"])


class Attn2Replace:
    """The ``attn2`` replace of one block key: every chained CustomContrast patch, plus IPAdapter callbacks.

    Duck-type compatible with ComfyUI_IPAdapter_plus' ``Attn2Replace`` (``callback``/``kwargs`` lists and
    ``add``), so IPAdapter applied after CustomContrast chains its callbacks here instead of failing.
    """

    def __init__(self, patches: Sequence[SubjectPatch] = (), callback: Sequence = (), kwargs: Sequence = ()) -> None:
        self.patches, self.callback, self.kwargs = list(patches), list(callback), list(kwargs)

    def __deepcopy__(self, memo) -> "Attn2Replace":   # ModelPatcher.clone: share the patches, copy the lists
        return Attn2Replace(self.patches, self.callback, self.kwargs)

    def add(self, callback, **kwargs) -> None:
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        key, plain = block_key(extra_options), partial(plain_attention, extra_options=extra_options)
        outs = [p.attention(extra_options[call_key(p)], key, q, k, v, extra_options["n_heads"], plain)
                for p in self.patches if key in p.layers and extra_options.get(call_key(p)) is not None]
        out = outs[0] if len(outs) == 1 else plain(q, k, v)
        if len(outs) > 1:   # several Apply nodes on one MODEL: each adds what it changes
            out = out + sum(o - out for o in outs)
        out = out.to(q.dtype)
        if self.callback:   # the sigma as read once per UNet call by the APPLY_MODEL wrapper (no per-layer sync)
            sigma = extra_options.get(SIGMA_KEY)
            sigma = float(extra_options["sigmas"].detach().flatten()[0]) if sigma is None else sigma
            for callback, kwargs in zip(self.callback, self.kwargs):
                if kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", float("inf")):
                    out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def call_key(patch: SubjectPatch) -> str:
    """The transformer_options key under which a patch's ModelCall reaches the layers."""
    return f"{STATE_KEY}_{id(patch)}"


def swap_context(patch: SubjectPatch):
    """The ``attn2_patch`` of a patch: the S+ prompt of the layer's group in the node's cond rows."""
    def swap(n: Tensor, context: Tensor, value: Tensor | None, extra_options: dict):
        call, key = extra_options.get(call_key(patch)), block_key(extra_options)
        if call is None or call.contexts is None or key not in patch.layers:
            return n, context, value
        return (n, *patch.swap_context(call, key, context, value))
    return swap


def replace_key(key: tuple[str, int, int], existing: dict, layers: dict) -> tuple:
    """The ``attn2`` replace key a layer's patch is registered under.

    ComfyUI looks a layer up under ``(block, id, index)`` first, then ``(block, id)``; IPAdapter_plus registers
    SD1.5 layers under the two-part key and SDXL layers under the three-part one. Registering where an entry
    already is, else under the two-part key when the block holds one transformer, lets each adapter find the
    other's entry whichever is applied first.
    """
    if key in existing:
        return key
    single = sum(other[:2] == key[:2] for other in layers) == 1
    return key[:2] if key[:2] in existing or single else key


def install(model, patch: SubjectPatch, extra_models: Sequence):
    """Clones the MODEL and installs the patch (module docstring); ``extra_models`` (ModelPatchers: the
    CustomContrast weights, the CLIP) are loaded with the UNet."""
    import comfy.patcher_extension as ext

    patched, tag = model.clone(), call_key(patch)
    patched.set_model_attn2_patch(swap_context(patch))
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key in dict.fromkeys(replace_key(key, existing, patch.layers) for key in patch.layers):
        current = existing.get(key)   # ours (chain this patch) or IPAdapter_plus' (adopt its callbacks), or None
        chained = current.patches if isinstance(current, Attn2Replace) else []
        has_callbacks = hasattr(current, "callback") and hasattr(current, "kwargs")
        adopted = (current.callback, current.kwargs) if has_callbacks else ()
        patched.set_model_attn2_replace(Attn2Replace([*chained, patch], *adopted), *key)

    def outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        patch.start_run([float(s) for s in sigmas.detach().flatten().cpu()])
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            patch.end_run()

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if c_crossattn is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        sigma = float(t.detach().flatten()[0])
        call = patch.model_call(tuple(x.shape), sigma, c_crossattn.to(x.device),
                                tuple(transformer_options["cond_or_uncond"]))
        options = {**transformer_options, tag: call, SIGMA_KEY: sigma}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    patched.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, tag, outer_sample)
    patched.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, tag, apply_model)
    patched.set_additional_models(tag, list(extra_models))
    options = patched.model_options.setdefault("transformer_options", {})
    options[STATE_KEY] = [*options.get(STATE_KEY, []), patch]
    return patched

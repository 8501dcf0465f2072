"""diffusers attention processors that run CustomContrast's cross-attention (Eq. 3) in training.

The math is the core's ``customcontrast_attention`` — the same function the ComfyUI patch calls —
so training and inference cannot drift. Per-forward inputs (per-group S+ contexts, visual tokens,
placeholder slots) live in one ``ProcessorState`` shared by all processors of a UNet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from customcontrast_core.attention import SubjectBranch, SubjectMaps, customcontrast_attention, placeholder_columns
from customcontrast_core.layers import CrossAttentionLayer, layer_grid
from customcontrast_core.masks import resize_mask
from customcontrast_core.visual_kv import CustomContrastModel, KVProjection, VisualKV


@dataclass
class ProcessorState:
    """What every patched layer of one UNet forward reads, and the maps they capture."""

    contexts: Tensor | tuple | None = None  # (G, B, T, C) prompt encoded with each group's S+ token, or its
                                            # G (B, T, C) slices unbound once (one gradient op, not one per layer)
    visual_tokens: Tensor | None = None     # (B, m, C) TV-fused visual tokens (blank reference where dropped)
    visual_kv: dict[str, tuple[Tensor, Tensor]] | None = None   # project_visual_kv of visual_tokens; None: per layer
    slots: tuple[tuple[int, ...], ...] = ()  # per row, placeholder positions in the context (empty: none)
    gamma: float = 1.0
    mask: Tensor | None = None               # (B, H, W) subject mask from the previous step (inference); None: M = 1
    latent_hw: tuple[int, int] = (0, 0)
    capture: bool = False
    visual_maps: bool = True                 # with capture, also the visual maps (mask propagation; L_loc unless
                                             # its text-only form is trained)
    maps: dict[str, SubjectMaps] = field(default_factory=dict)   # layer name -> maps of the last forward
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)

    _rows: dict = field(default_factory=dict)     # (slots, what, ...) -> row tensors, built once per forward

    def reset(self) -> None:
        self.maps.clear()
        self.grids.clear()
        self._rows.clear()

    def placeholder(self, slots: tuple, keys: int, device: torch.device) -> Tensor:
        """(B, keys) fp32: 1 at each row's placeholder positions (``placeholder_columns``, built once per
        forward)."""
        key = (slots, keys, device)
        if key not in self._rows:
            self._rows[key] = placeholder_columns(slots, keys, device)
        return self._rows[key]


class CustomContrastProcessor:
    """Processor of one ``attn2`` module; a plain object so it adds no parameters to the UNet."""

    def __init__(self, layer: CrossAttentionLayer, group: int, kv: KVProjection, state: ProcessorState,
                 capture: bool) -> None:
        self.layer, self.group, self.kv, self.state, self.capture = layer, group, kv, state, capture

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        st = self.state
        context = encoder_hidden_states if st.contexts is None else st.contexts[self.group]
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(context), attn.to_v(context)
        capture = st.capture and self.capture
        if st.visual_tokens is None:
            out, maps = customcontrast_attention(q, k, v, heads=attn.heads, capture=False)
        else:
            out, maps = self._with_subject(q, k, v, attn.heads, capture)
        if maps is not None:
            st.maps[self.layer.name] = maps
            st.grids[self.layer.name] = layer_grid(st.latent_hw, self.layer.downsample)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def _with_subject(self, q: Tensor, k: Tensor, v: Tensor, heads: int, capture: bool):
        st = self.state
        if st.visual_kv is not None:
            visual_k, visual_v = (x.to(q.dtype) for x in st.visual_kv[self.layer.name])
        else:
            visual_k, visual_v = self.kv(st.visual_tokens.to(q.dtype))
        slots = st.slots or ((),) * q.shape[0]
        mask = None if st.mask is None else resize_mask(st.mask.to(q.device), layer_grid(st.latent_hw, self.layer.downsample))
        # rows without a placeholder (text dropout, the uncond row when evaluating): no bias, zero text map
        placeholder = st.placeholder(slots, k.shape[1], q.device) if any(slots) else None
        branch = SubjectBranch(visual_k, visual_v, gamma=st.gamma, mask=mask, placeholder=placeholder)
        out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[branch], capture=capture,
                                             visual_maps=st.visual_maps)
        return out, (maps[0] if maps else None)


def project_visual_kv(visual_kv: VisualKV, tokens: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Every layer's visual K and V in one matmul with the stacked weights (``VisualKV.fused``), differentiable.

    The same values as each layer's own ``KVProjection``; in a training step that is 1 matmul instead of
    2 per layer forward, and 2 instead of 4 per layer (plus the accumulation into the tokens' gradient)
    backward. Compute it outside gradient-checkpointed blocks (the training step does, before the UNet).
    Shapes: tokens (B, m, C) -> layer name -> (key (B, m, inner), value (B, m, inner)).
    """
    weight, slices = visual_kv.fused()
    parts = F.linear(tokens, weight).split([slices[name][1] for name in visual_kv for _ in "kv"], dim=-1)
    return {name: (parts[2 * i], parts[2 * i + 1]) for i, name in enumerate(visual_kv)}


def install_processors(unet, model: CustomContrastModel, state: ProcessorState,
                       capture_downsample: tuple[int, ...]) -> dict[str, CustomContrastProcessor]:
    """Replaces every ``attn2`` processor of a diffusers UNet; self-attention keeps its own."""
    config = model.config
    processors = dict(unet.attn_processors)
    installed = {}
    for layer, group in zip(config.layers, config.layer_groups):
        key = f"{layer.diffusers_name}.processor"
        if key not in processors:
            raise ValueError(f"the UNet has no cross-attention layer {layer.diffusers_name}; "
                             f"is it a {config.base.upper()} UNet?")
        installed[key] = CustomContrastProcessor(layer, group, model.visual_kv[layer.name], state,
                                                 capture=layer.downsample in capture_downsample)
    processors.update(installed)
    unet.set_attn_processor(processors)
    return installed


def unet_kv_weights(unet, model: CustomContrastModel) -> dict[str, tuple[Tensor, Tensor]]:
    """Each layer's frozen ``to_k``/``to_v`` weights, to initialise the visual K/V (IP-Adapter practice)."""
    modules = dict(unet.named_modules())
    return {layer.name: (modules[layer.diffusers_name].to_k.weight, modules[layer.diffusers_name].to_v.weight)
            for layer in model.config.layers}

"""Cross-attention layer tables of SD1.5- and SDXL-structured UNets, in execution order.

Each layer has one canonical name (``input_4_1``), its ComfyUI ``attn2`` replace key
(``("input", 4, 1)``) and its diffusers module name
(``down_blocks.1.attentions.0.transformer_blocks.1.attn2``). Execution order is
input blocks → middle → output blocks; diffusers lists attention processors down → up → mid,
so layers are always addressed by name, never by dict position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetStructure:
    """The block structure that decides where cross-attention layers sit."""

    block_out_channels: tuple[int, ...]   # channels per resolution level, e.g. (320, 640, 1280, 1280)
    transformer_depth: tuple[int, ...]    # transformer blocks per attention stack at each level (0 = none)
    mid_depth: int                        # transformer blocks in the middle stack
    layers_per_block: int = 2             # resnets per down level (up levels have one more)

    def __post_init__(self) -> None:
        if len(self.block_out_channels) != len(self.transformer_depth):
            raise ValueError(
                f"block_out_channels has {len(self.block_out_channels)} levels but "
                f"transformer_depth has {len(self.transformer_depth)}; expected one depth per level"
            )
        if self.layers_per_block < 1 or self.mid_depth < 0 or min(self.transformer_depth) < 0:
            raise ValueError(f"invalid UNet structure {self}")


SD15_DEPTHS = dict(transformer_depth=(1, 1, 1, 0), mid_depth=1)
SDXL_DEPTHS = dict(transformer_depth=(0, 2, 10), mid_depth=10)
BASE_DEPTHS = {"sd15": SD15_DEPTHS, "sdxl": SDXL_DEPTHS}
BASE_CHANNELS = {"sd15": (320, 640, 1280, 1280), "sdxl": (320, 640, 1280)}
BASE_LAYER_COUNT = {"sd15": 16, "sdxl": 70}


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention (``attn2``) layer of a UNet."""

    name: str                          # canonical name, e.g. "middle_0_3"
    comfy_key: tuple[str, int, int]    # ComfyUI patches_replace["attn2"] key
    diffusers_name: str                # diffusers module path of the attn2 module
    inner_dim: int                     # query/key/value width of the layer (heads * dim_head)
    downsample: int                    # token grid = latent grid / downsample
    stack: int                         # index of the SpatialTransformer it belongs to (execution order)


def structure_for(base: str, block_out_channels: tuple[int, ...] | None = None) -> UNetStructure:
    """Builds the UNet structure of a base family, optionally with other (e.g. tiny) widths."""
    if base not in BASE_DEPTHS:
        raise ValueError(f"unknown base family {base!r}; expected one of {sorted(BASE_DEPTHS)}")
    channels = tuple(block_out_channels or BASE_CHANNELS[base])
    return UNetStructure(block_out_channels=channels, **BASE_DEPTHS[base])


def cross_attention_layers(structure: UNetStructure) -> tuple[CrossAttentionLayer, ...]:
    """Lists every cross-attention layer of a UNet in forward execution order."""
    layers: list[CrossAttentionLayer] = []
    stack = 0
    levels = len(structure.block_out_channels)

    def add_stack(block: str, number: int, depth: int, prefix: str, channels: int, down: int) -> None:
        nonlocal stack
        for i in range(depth):
            layers.append(CrossAttentionLayer(
                name=f"{block}_{number}_{i}",
                comfy_key=(block, number, i),
                diffusers_name=f"{prefix}.transformer_blocks.{i}.attn2",
                inner_dim=channels,
                downsample=down,
                stack=stack,
            ))
        stack += depth > 0

    # input blocks: id 0 is conv_in, then layers_per_block resnets (+attention) and a downsample per level
    block_id = 0
    for level, (channels, depth) in enumerate(zip(structure.block_out_channels, structure.transformer_depth)):
        for j in range(structure.layers_per_block):
            block_id += 1
            add_stack("input", block_id, depth, f"down_blocks.{level}.attentions.{j}", channels, 2**level)
        if level < levels - 1:
            block_id += 1
    add_stack("middle", 0, structure.mid_depth, "mid_block.attentions.0",
              structure.block_out_channels[-1], 2 ** (levels - 1))
    # output blocks: levels in reverse, layers_per_block + 1 resnets each
    block_id = -1
    for up, level in enumerate(reversed(range(levels))):
        channels, depth = structure.block_out_channels[level], structure.transformer_depth[level]
        for j in range(structure.layers_per_block + 1):
            block_id += 1
            add_stack("output", block_id, depth, f"up_blocks.{up}.attentions.{j}", channels, 2**level)
    return tuple(layers)


def layer_table(base: str, block_out_channels: tuple[int, ...] | None = None) -> tuple[CrossAttentionLayer, ...]:
    """The cross-attention layers of an SD1.5 (16) or SDXL (70) structured UNet."""
    return cross_attention_layers(structure_for(base, block_out_channels))


def default_layer_groups(base: str, layers: tuple[CrossAttentionLayer, ...]) -> tuple[int, ...]:
    """Maps each layer to its S+ token group: one per layer for SD1.5, one per stack for SDXL."""
    if base == "sd15":
        return tuple(range(len(layers)))
    return tuple(layer.stack for layer in layers)


def by_comfy_key(layers: tuple[CrossAttentionLayer, ...]) -> dict[tuple[str, int, int], CrossAttentionLayer]:
    """Indexes layers by their ComfyUI replace key."""
    return {layer.comfy_key: layer for layer in layers}


def by_diffusers_name(layers: tuple[CrossAttentionLayer, ...]) -> dict[str, CrossAttentionLayer]:
    """Indexes layers by their diffusers attn2 module path."""
    return {layer.diffusers_name: layer for layer in layers}


def layer_grid(latent_hw: tuple[int, int], downsample: int) -> tuple[int, int]:
    """Token grid of a layer: the latent grid divided by ``downsample`` (stride-2 convs round up)."""
    h, w = latent_hw
    for _ in range(int(math.log2(downsample))):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w

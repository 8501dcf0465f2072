"""Random-initialised diffusers/transformers models with SD1.5 or SDXL structure and small widths.

Nothing is downloaded: every model is built from a config. Used by the ``tiny`` training preset
and by the tests.
"""
from __future__ import annotations

from diffusers import UNet2DConditionModel

from customcontrast_core.config import EncoderConfig
from customcontrast_core.layers import BASE_DEPTHS


def tiny_unet(config: EncoderConfig, *, sample_size: int = 16, head_dim: int = 8) -> UNet2DConditionModel:
    """Builds a UNet with the block structure of ``config.base`` and the widths of ``config``."""
    depths = BASE_DEPTHS[config.base]["transformer_depth"]
    mid = BASE_DEPTHS[config.base]["mid_depth"]
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths)
    up = tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths))
    channels = config.block_out_channels
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=2,
        transformer_layers_per_block=tuple(max(d, 1) for d in depths[:-1]) + (mid,),
        cross_attention_dim=config.context_dim,
        attention_head_dim=tuple(c // head_dim for c in channels),
        norm_num_groups=32 if all(c % 32 == 0 for c in channels) else 8,   # ComfyUI UNets use 32 groups
        use_linear_projection=config.base == "sdxl",
    )

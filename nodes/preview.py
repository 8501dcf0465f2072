"""Mask Preview node: the subject masks of the last sampling run, one per step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from .comfy_glue import STATE_KEY


def last_run_masks(model, subject: int, size: tuple[int, int]) -> torch.Tensor:
    """Masks of subject ``subject`` (from 0) of the newest patch on ``model``, noisiest step first (of the run's
    first latent). Shapes: -> (S, H, W)."""
    patches = model.model_options.get("transformer_options", {}).get(STATE_KEY, [])
    if not patches:
        raise ValueError("this MODEL carries no CustomContrast patch: connect the MODEL output of Apply CustomContrast")
    count = len(patches[-1].subjects)
    if not 0 <= subject < count:
        raise ValueError(f"subject is {subject + 1} but the MODEL's Apply CustomContrast node has {count} "
                         f"subject(s): choose {1 if count == 1 else f'1 to {count}'}")
    history = patches[-1].last_masks
    if not history:
        raise ValueError("no masks recorded yet: run a sampler with this MODEL first (and keep use_mask on)")
    stacked = torch.stack([masks[subject][0].float().cpu() for _, masks in history])[:, None]
    return F.interpolate(stacked, size=size, mode="nearest")[:, 0]


class CustomContrastMaskPreview(io.ComfyNode):
    """Shows where the subject was placed at each step of the last run."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomContrastMaskPreview",
            display_name="CustomContrast Mask Preview",
            category="CustomContrast",
            description="The timestep subject masks of the last sampling run, one image per step.",
            inputs=[io.Model.Input("model", tooltip="The MODEL output of Apply CustomContrast."),
                    io.Latent.Input("samples", tooltip="The sampler's output (makes this run after sampling)."),
                    io.Int.Input("subject", default=1, min=1, max=3, tooltip="Which subject's masks to show.")],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Masks as grayscale images."),
                     io.Mask.Output(display_name="MASK", tooltip="Masks, one per step.")],
        )

    @classmethod
    def execute(cls, model, samples, subject) -> io.NodeOutput:
        h, w = samples["samples"].shape[-2:]
        masks = last_run_masks(model, subject - 1, (h * 8, w * 8))
        return io.NodeOutput(masks[..., None].expand(-1, -1, -1, 3).contiguous(), masks)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")   # always re-read the masks of the newest run

"""The Apply CustomContrast node (its inputs; the work is ``apply.apply_customcontrast``)."""
from __future__ import annotations

from comfy_api.latest import io

from ..customcontrast_core.masks import MASK_MODES
from .apply import apply_customcontrast
from .loader import CUSTOMCONTRAST, for_model
from .subject import SUBJECT


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
                             tooltip="0: paper-exact S+ at every timestep (encoded in batches over the schedule, "
                                     "kept for the next runs: a new seed encodes nothing). "
                                     "N > 0: encode S+ once per each of N timestep ranges and reuse it (approximate)."),
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
        if subject3 is not None and subject2 is None:
            raise ValueError("subject3 is connected but subject2 is not: placeholders are numbered by input "
                             "(<subject1>, <subject2>, <subject3>), so connect the second subject to subject2")
        subjects = [s for s in (subject, subject2, subject3) if s is not None]
        customcontrast = for_model(customcontrast, model)   # the weights in the dtype the MODEL runs in
        patched, positive = apply_customcontrast(model, clip, customcontrast, subjects, prompt, weight,
                                                 start_percent, end_percent, use_mask, mask_mode,
                                                 mask_threshold, attn_mask, splus_buckets)
        return io.NodeOutput(patched, positive)

"""Encode Subject node: CLIP-vision multi-layer hidden states of a reference photo (optionally segmented)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from comfy_api.latest import io
from einops import rearrange
from torch import Tensor

from ..customcontrast_core.checkpoint import VisionTower
from ..customcontrast_core.config import preset_of
from ..customcontrast_core.reference import reference_crop
from ..customcontrast_core.subjects import image_weights as parse_image_weights
from ..customcontrast_core.subjects import weighted_mean
from .checks import ENCODE, check_finite
from .comfy_glue import clip_hidden
from .loader import CUSTOMCONTRAST, LoadedCustomContrast

SUBJECT = io.Custom("CUSTOMCONTRAST_SUBJECT")
MIN_SIDE = 16


@dataclass(frozen=True, eq=False)
class Subject:
    """A reference subject as the MFI-Encoder sees it."""

    hidden: Tensor   # (1, K, T, D) CLIP-vision hidden states at the checkpoint's layers (CPU, fp32)
    blank: Tensor    # (1, K, T, D) the same for a blank reference (used by uncond rows)
    width: int
    layers: tuple[int, ...]
    clip_vision: VisionTower | None = None   # the CLIP-vision model of the checkpoint it was encoded for
    preset: str = "custom"                   # that checkpoint's preset name
    base: str = "sd15"
    images: int = 1                          # references averaged into ``hidden``
    image_weights: tuple[float, ...] = ()    # their weights (empty: equal, or one image)


def to_rgb(image: Tensor) -> tuple[Tensor, Tensor | None]:
    """IMAGE (B, H, W, C) with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels -> RGB (B, H, W, 3) and the alpha
    channel when there is one."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or image.shape[0] == 0:
        raise ValueError(f"{ENCODE}: image must be at least one IMAGE (B, H, W, C) with 1 (grayscale), 3 (RGB) or 4 "
                         f"(RGBA) channels, found shape {tuple(image.shape)}")
    return image[..., :3].expand(-1, -1, -1, 3), (image[..., 3] if image.shape[-1] == 4 else None)


def prepare_mask(mask: Tensor, size: tuple[int, int], images: int = 1) -> Tensor:
    """MASK (H, W) or (n, H, W) -> (n, H, W) at the image size, n = 1 (for every image) or ``images``;
    refuses another count, a differently shaped mask and a mask that is empty for one of the images."""
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.ndim != 3:
        raise ValueError(f"expected a mask of shape (H, W) or (B, H, W), found {tuple(mask.shape)}")
    if mask.shape[0] not in (1, images):
        raise ValueError(f"the mask input holds {mask.shape[0]} masks for {images} image(s): give 1 mask (used for "
                         f"every image) or one per image")
    h, w = mask.shape[-2:]
    if (h, w) != size:
        if min(h, w) == 0 or abs(h / w - size[0] / size[1]) > 0.01:
            raise ValueError(f"the mask is {w}x{h} but the image is {size[1]}x{size[0]}: "
                             "give a mask of the same size or aspect ratio")
        mask = F.interpolate(mask[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    mask = mask.clamp(0, 1)
    for i, peak in enumerate(mask.flatten(1).amax(1).tolist()):
        if peak <= 0:
            which = "the mask" if mask.shape[0] == 1 else f"mask {i} (for image {i})"
            raise ValueError(f"{which} is empty (all zero) at the image's size {size[1]}x{size[0]}: it selects no "
                             f"pixel of the subject")
    return mask


def segment(image: Tensor, mask: Tensor) -> Tensor:
    """Each image's subject on gray in a square crop 1.2x its box, as in training (``reference_crop``), at the
    image's height. Shapes: image (B, H, W, 3), mask (1 or B, H, W) -> (B, H, H, 3)."""
    out = []
    for i in range(image.shape[0]):
        crop, _ = reference_crop(rearrange(image[i], "h w c -> c h w"), mask[min(i, mask.shape[0] - 1)][None])
        out.append(F.interpolate(crop[None], size=(image.shape[1], image.shape[1]), mode="bilinear",
                                 align_corners=False)[0])
    return rearrange(torch.stack(out), "b c h w -> b h w c")


def tower_of(clip_vision) -> VisionTower | None:
    """The structure of a ComfyUI CLIP_VISION (a ``comfy.clip_vision.ClipVisionModel``) read from its modules:
    patch embedding (width, patch size), transformer layers and input size; None for another kind of model."""
    try:
        vision = clip_vision.model.vision_model
        patch = vision.embeddings.patch_embedding.weight.shape
        return VisionTower(hidden_size=int(patch[0]), num_layers=len(vision.encoder.layers),
                           image_size=int(clip_vision.image_size), patch_size=int(patch[-1]))
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def check_clip_vision(customcontrast: LoadedCustomContrast, clip_vision) -> None:
    """Refuses a CLIP-vision model whose structure differs from the one the checkpoint was trained with, naming
    both (checkpoints without the record: the width and layer count of their config)."""
    trained = customcontrast.info.clip_vision or VisionTower.of_config(customcontrast.model.config)
    given = tower_of(clip_vision)
    differences = trained.differences(given) if given is not None else []
    if differences:
        raise ValueError(f"{ENCODE}: clip_vision is a CLIP-vision model of {given.structure()}; this CustomContrast "
                         f"checkpoint was trained with {trained.describe()} ({'; '.join(differences)}, trained vs "
                         f"given): load the CLIP-vision model it was trained with")


def weights_of(text: str, average: bool, images: int) -> list[float] | None:
    """The ``image_weights`` input checked against ``average`` and the image count (None: equal weights)."""
    if (text or "").strip() and not average:
        raise ValueError(f"{ENCODE}: image_weights is set ({text!r}) but average is off, so only the first image is "
                         "used: turn average on or clear image_weights")
    try:
        return parse_image_weights(text, images) if average else None
    except ValueError as err:
        raise ValueError(f"{ENCODE}: {err}") from None


def encode_subject(customcontrast: LoadedCustomContrast, clip_vision, image: Tensor, mask: Tensor | None,
                   average: bool, crop: bool, invert_mask: bool = False, image_weights: str = "") -> Subject:
    """Checks the inputs against the checkpoint and encodes one subject; ``invert_mask`` takes 1 - mask (a
    LoadImage MASK, 1 where the image is transparent); ``image_weights`` ("1.0, 0.5": one per image) weighs the
    average of several images. Shapes: image (B, H, W, C), mask (H, W) or (1 or B, H, W)."""
    config = customcontrast.model.config
    check_clip_vision(customcontrast, clip_vision)
    rgb, alpha = to_rgb(image.float())
    weights = weights_of(image_weights, average, rgb.shape[0])
    h, w = rgb.shape[1:3]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"the reference image is {w}x{h} px; expected at least {MIN_SIDE}x{MIN_SIDE}")
    check_finite(ENCODE, "image", image, "hold finite pixel values (0 to 1)", ("image", "row", "column", "channel"))
    rgb = rgb.clamp(0, 1)   # an upscaler's overshoot (or 1e30) would reach CLIP vision as is
    if mask is not None:   # invert_mask applies to the MASK input only, never to an RGBA image's alpha
        check_finite(ENCODE, "mask", mask if mask.ndim != 2 else mask[None], "hold finite values from 0 to 1",
                     ("mask", "row", "column"))
        mask = 1 - mask.float() if invert_mask else mask.float()
    elif alpha is not None and alpha.min() < 1:
        mask = alpha
    if mask is not None:
        rgb = segment(rgb, prepare_mask(mask, (h, w), rgb.shape[0]))
    hidden = clip_hidden(clip_vision, rgb, config.clip_layers, crop, config.clip_width)
    images = rgb.shape[0] if average else 1
    hidden = weighted_mean(hidden, weights) if average else hidden[:1]
    blank = clip_hidden(clip_vision, torch.zeros(1, 224, 224, 3), config.clip_layers, crop, config.clip_width)
    for features in (hidden, blank):   # a CLIP-vision model with broken weights, or one overflowing in fp16
        check_finite(ENCODE, "clip_vision", features, "give finite features of the image",
                     ("image", "layer", "token", "channel"))
    return Subject(hidden=hidden, blank=blank, width=config.clip_width, layers=config.clip_layers,
                   clip_vision=customcontrast.info.clip_vision or VisionTower.of_config(config),
                   preset=preset_of(config) or "custom", base=config.base, images=images,
                   image_weights=tuple(weights or ()))


class CustomContrastEncodeSubject(io.ComfyNode):
    """Turns a reference photo into a SUBJECT for Apply CustomContrast."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomContrastEncodeSubject",
            display_name="CustomContrast Encode Subject",
            category="CustomContrast",
            description="Encodes a reference photo of the subject with CLIP vision (multi-layer features).",
            inputs=[
                CUSTOMCONTRAST.Input("customcontrast", tooltip="From Load CustomContrast Model."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP-vision model the checkpoint was trained with."),
                io.Image.Input("image", tooltip="One or more photos of the same subject (RGBA alpha is used as mask)."),
                io.Mask.Input("mask", optional=True, tooltip="Subject mask (1 on the subject): the background is "
                              "replaced by gray and the subject cropped 1.2x its box, as in training. One mask, or "
                              "one per image."),
                io.Boolean.Input("average", default=True, tooltip="Average the features of several images of the "
                                 "subject (weighted by image_weights when given); off uses the first image only."),
                io.Boolean.Input("center_crop", default=True, tooltip="Center-crop non-square images (off squashes)."),
                # last: the widgets of saved UI workflows keep their order
                io.Boolean.Input("invert_mask", default=False, optional=True,
                                 tooltip="Use 1 - mask. Turn on for Load Image's MASK output: it is 1 where the image "
                                         "is transparent (1 - alpha), 0 on an opaque subject."),
                io.String.Input("image_weights", default="", optional=True,
                                tooltip="With several images and average on: one weight per image, comma-separated "
                                        "(e.g. '1.0, 0.5'); empty averages them equally."),
            ],
            outputs=[SUBJECT.Output(display_name="SUBJECT", tooltip="The encoded reference subject.")],
        )

    @classmethod
    def execute(cls, customcontrast, clip_vision, image, average, center_crop, mask=None,
                invert_mask=False, image_weights="") -> io.NodeOutput:
        return io.NodeOutput(encode_subject(customcontrast, clip_vision, image, mask, average, center_crop,
                                            invert_mask, image_weights))

"""The reference view the MFI-Encoder reads: the subject cut out on a plain background, in a square crop.

One crop for training (``training.data``), evaluation (``training.eval.generate.reference_view``) and the
Encode Subject node: the trained weights saw references cropped this way, the square's side 1.2x the longer
side of the subject's box (training draws 1.1x to 1.5x and a shift when it augments).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GRAY", "REFERENCE_MARGIN", "reference_crop", "subject_box"]

REFERENCE_MARGIN = 1.2   # the crop's side over the longer side of the subject's box
GRAY = 0.5               # the background the subject is composited on


def subject_box(mask: Tensor) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), bottom and right exclusive, of the mask's pixels above 0.5 (of any non-zero
    pixel when none is; the whole image when the mask is empty). Shapes: mask (1, H, W)."""
    for inside in (mask[0] > 0.5, mask[0] > 0):
        ys, xs = torch.nonzero(inside, as_tuple=True)
        if len(ys):
            return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    return 0, 0, mask.shape[1], mask.shape[2]


def reference_crop(image: Tensor, mask: Tensor, *, margin: float = REFERENCE_MARGIN,
                   shift: tuple[float, float] = (0.0, 0.0),
                   background: Callable[[tuple[int, ...]], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The subject composited on ``background`` (gray by default; called with each shape it fills), in a square
    crop whose side is ``margin`` times the longer side of its box, centred on the box moved by ``shift`` times
    that side; what falls outside the image is background. Returns the crop and its mask.

    Shapes: image (C, H, W), mask (1, H, W) in [0, 1] -> (C, S, S), (1, S, S).
    """
    if image.ndim != 3 or mask.shape != (1, *image.shape[1:]):
        raise ValueError(f"expected an image (C, H, W) and a mask (1, H, W) of the same size, found "
                         f"{tuple(image.shape)} and {tuple(mask.shape)}")
    fill = background or (lambda shape: torch.full(shape, GRAY, dtype=image.dtype, device=image.device))
    segmented = image * mask + fill(tuple(image.shape)) * (1 - mask)
    y0, x0, y1, x1 = subject_box(mask)
    longer = max(y1 - y0, x1 - x0)
    half = longer * margin / 2
    cy, cx = (y0 + y1) / 2 + shift[0] * longer, (x0 + x1) / 2 + shift[1] * longer
    side = max(2, int(round(2 * half)))
    crop, crop_mask = fill((image.shape[0], side, side)), torch.zeros(1, side, side, dtype=mask.dtype,
                                                                       device=mask.device)
    top, left = int(round(cy - half)), int(round(cx - half))
    sy0, sx0 = max(0, top), max(0, left)
    sy1, sx1 = min(image.shape[1], top + side), min(image.shape[2], left + side)
    if sy1 > sy0 and sx1 > sx0:
        crop[:, sy0 - top:sy1 - top, sx0 - left:sx1 - left] = segmented[:, sy0:sy1, sx0:sx1]
        crop_mask[:, sy0 - top:sy1 - top, sx0 - left:sx1 - left] = mask[:, sy0:sy1, sx0:sx1]
    return crop, crop_mask

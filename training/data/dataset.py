"""Training samples: reference, target and positive views of one subject (DESIGN.md section 6).

A sample of subject i: a *reference* view (segmented, augmented) for the encoder, a *target* view
(another frame, full image) for the diffusion loss — reference != target is what stops
copy-paste — and a *positive* view (another frame, segmented, random scale and position) for MACL.

A view that cannot be used — a file that does not decode (PIL's decompression-bomb refusal included), an
image over ``MAX_PIXELS``, or a mask without a single foreground pixel — is an ``UnreadableView``: the
subject is skipped for that sample with a warning naming the file, and another one stands in for it.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from customcontrast_core.reference import REFERENCE_MARGIN, reference_crop, subject_box

from .manifest import SubjectRecord

log = logging.getLogger(__name__)
BACKGROUNDS = ("gray", "white", "noise")
MAX_PIXELS = 89_478_485   # PIL's own limit (about 9459 x 9459): above it a view would take gigabytes as floats


class UnreadableView(ValueError):
    """One view (image or mask file) that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class DataConfig:
    """How samples are cut from the subjects' views."""

    reference_size: int = 224
    target_size: int = 512
    positive_scale: tuple[float, float] = (0.5, 1.0)   # subject size / canvas size for the positive view
    hflip: bool = True
    augment: bool = True
    reference_jitter: float = 0.0   # with augment: the reference's brightness and contrast each x (1 ± up to this)
    background: str = "gray"
    placeholder: str = "<subject>"
    caption_template: str = "a photo of a {placeholder} {cls}"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, found {self.background!r}")
        lo, hi = self.positive_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"positive_scale must satisfy 0 < low <= high <= 1, found {self.positive_scale}")
        if "{placeholder}" not in self.caption_template:
            raise ValueError("caption_template must contain {placeholder}")
        if not 0 <= self.reference_jitter < 1:
            raise ValueError(f"reference_jitter must be in [0, 1), found {self.reference_jitter}")


def _decode(path: str, mode: str) -> np.ndarray:
    """The pixels of an image file in PIL ``mode``. Shapes: -> (H, W, C) or (H, W) uint8."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise UnreadableView(f"{path}: {img.width} x {img.height} pixels, more than the {MAX_PIXELS} a "
                                     "training view may have; downscale it")
            return np.asarray(img.convert(mode))
    except UnreadableView:
        raise
    except Exception as err:   # PIL raises many types for broken files (DecompressionBombError is no OSError)
        raise UnreadableView(f"{path} cannot be decoded as an image ({type(err).__name__}: {err})") from None


def load_view(image_path: str, mask_path: str | None) -> tuple[Tensor, Tensor]:
    """An RGB view in [0, 1] and its mask; UnreadableView naming the file when it cannot be used (a mask
    without foreground included: the segmented reference would be flat background).

    Shapes: -> (3, H, W), (1, H, W).
    """
    image = torch.from_numpy(_decode(image_path, "RGB").astype(np.float32) / 255).permute(2, 0, 1)
    if mask_path is None:
        return image, torch.ones(1, *image.shape[1:])
    mask = torch.from_numpy((_decode(mask_path, "L") > 127).astype(np.float32))[None]
    if not mask.any():
        raise UnreadableView(f"mask {mask_path} has no foreground pixel (all values <= 127): the segmented "
                             "reference and positive views would be flat background; remake it (training.prepare "
                             "--sam) or drop the view")
    if mask.shape[1:] != image.shape[1:]:
        mask = F.interpolate(mask[None], size=image.shape[1:], mode="nearest")[0]
    return image, mask


def _resize(x: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=(size, size), mode=mode, **kwargs)[0]


class SubjectDataset(Dataset):
    """One item per subject; randomness seeded by (seed, epoch, index) so runs are reproducible."""

    def __init__(self, records: Sequence[SubjectRecord], cfg: DataConfig) -> None:
        if not records:
            raise ValueError("SubjectDataset needs at least one subject")
        for record in records:   # checked here, not at a sample: a caption without it would skip its subject
            for caption in (record.caption, *(record.captions or ())):
                if caption and cfg.placeholder not in caption:
                    raise ValueError(f"subject {record.subject!r}: its caption {caption!r} has no "
                                     f"{cfg.placeholder!r}; expected a caption naming the subject by the placeholder")
        self.records, self.cfg, self.epoch = list(records), cfg, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        """Subject ``index`` at the current epoch; when unreadable, the next readable subject (which may be in
        the same batch: training draws replacements through ``sample`` with subjects outside the batch)."""
        n = len(self.records)
        return self.sample(index, self.epoch, ((index + offset) % n for offset in range(1, n)))

    def sample(self, index: int, epoch: int, replacements: Iterable[int] = ()) -> dict:
        """Subject ``index`` at ``epoch``; an unreadable or corrupt subject is skipped with a warning and the
        first readable one of ``replacements`` (iterated only after a failure) is taken instead (its
        ``subject_index`` says which)."""
        tried, error = 0, None
        for i in itertools.chain((index,), replacements):
            tried += 1
            try:
                return self._sample(i, epoch)
            except (OSError, ValueError) as err:   # unreadable or corrupt file (named in err): skip, never fatal
                log.warning("skipping subject %r (item %d): %s", self.records[i].subject, i, err)
                error = err
        raise RuntimeError(f"subject {index} and its {tried - 1} replacement candidates are all unreadable "
                           f"(of {len(self.records)} subjects; the last: {error}); check the manifest")

    def _background(self, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
        if self.cfg.background == "white":
            return torch.ones(shape)
        if self.cfg.background == "noise":
            return torch.rand(shape, generator=g)
        return torch.full(shape, 0.5)

    def _sample(self, i: int, epoch: int) -> dict:
        cfg, record = self.cfg, self.records[i]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + i)
        n = len(record.images)
        order = torch.randperm(n, generator=g).tolist() if cfg.augment else list(range(n))
        ref_i, tgt_i = order[0], order[1 % n]
        pos_i = order[2] if n > 2 else tgt_i
        masks = record.masks or (None,) * n
        ref, ref_m = load_view(record.images[ref_i], masks[ref_i])
        tgt, tgt_m = load_view(record.images[tgt_i], masks[tgt_i])
        pos, pos_m = load_view(record.images[pos_i], masks[pos_i])
        reference, reference_mask = self._reference(ref, ref_m, g)
        target, target_mask = self._target(tgt, tgt_m, g)
        positive, positive_mask = self._positive(pos, pos_m, g)
        caption = (record.captions[tgt_i] if record.captions else record.caption) or \
            cfg.caption_template.format(placeholder=cfg.placeholder, cls=record.cls)    # the target view's scene
        return {"reference": reference, "reference_mask": reference_mask, "target": target * 2 - 1,
                "target_mask": target_mask, "positive": positive, "positive_mask": positive_mask,
                "caption": caption, "subject_index": i,
                "reference_path": record.images[ref_i], "target_path": record.images[tgt_i]}

    def _flip(self, g: torch.Generator, *xs: Tensor) -> tuple[Tensor, ...]:
        if self.cfg.augment and self.cfg.hflip and torch.rand(1, generator=g).item() < 0.5:
            return tuple(x.flip(-1) for x in xs)
        return xs

    def _reference(self, image: Tensor, mask: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Segmented subject, square crop around it (``reference_crop``: 1.2x its box, or with augmentation a
        random margin and shift), flipped, colour-jittered (``reference_jitter``), resized."""
        margin, shift = REFERENCE_MARGIN, (0.0, 0.0)
        if self.cfg.augment:
            margin = 1.1 + 0.4 * torch.rand(1, generator=g).item()
            shift = tuple(float(t) for t in (torch.rand(2, generator=g) - 0.5) * 0.2)
        crop, crop_m = reference_crop(image, mask, margin=margin, shift=shift,
                                      background=lambda shape: self._background(shape, g))
        crop, crop_m = self._flip(g, crop, crop_m)
        size = self.cfg.reference_size
        if self.cfg.augment and self.cfg.reference_jitter > 0:   # light colour jitter: brightness and contrast
            b, c = 1 + (torch.rand(2, generator=g) - 0.5) * (2 * self.cfg.reference_jitter)
            crop = ((crop - 0.5) * c + 0.5) * b
        return _resize(crop, size).clamp(0, 1), (_resize(crop_m, size, "nearest") > 0.5).float()

    def _target(self, image: Tensor, mask: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """The full view, centre square crop, flipped, resized."""
        h, w = image.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img, m = image[:, top:top + side, left:left + side], mask[:, top:top + side, left:left + side]
        img, m = self._flip(g, img, m)
        size = self.cfg.target_size
        return _resize(img, size).clamp(0, 1), (_resize(m, size, "nearest") > 0.5).float()

    def _positive(self, image: Tensor, mask: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """The segmented subject at a random scale and position on a background canvas."""
        size = self.cfg.reference_size
        y0, x0, y1, x1 = subject_box(mask)
        subject, subject_m = image[:, y0:y1, x0:x1], mask[:, y0:y1, x0:x1]
        lo, hi = self.cfg.positive_scale
        scale = lo + (hi - lo) * torch.rand(1, generator=g).item() if self.cfg.augment else hi
        longest = max(subject.shape[1:])
        th = max(1, int(subject.shape[1] / longest * scale * size))
        tw = max(1, int(subject.shape[2] / longest * scale * size))
        subject = F.interpolate(subject[None], size=(th, tw), mode="bilinear", align_corners=False, antialias=True)[0]
        subject_m = F.interpolate(subject_m[None], size=(th, tw), mode="nearest")[0]
        top = int(torch.randint(0, size - th + 1, (1,), generator=g)) if self.cfg.augment else (size - th) // 2
        left = int(torch.randint(0, size - tw + 1, (1,), generator=g)) if self.cfg.augment else (size - tw) // 2
        canvas = self._background((3, size, size), g)
        canvas_m = torch.zeros(1, size, size)
        region = canvas[:, top:top + th, left:left + tw]
        canvas[:, top:top + th, left:left + tw] = subject * subject_m + region * (1 - subject_m)
        canvas_m[:, top:top + th, left:left + tw] = subject_m
        canvas, canvas_m = self._flip(g, canvas, canvas_m)
        return canvas.clamp(0, 1), canvas_m

"""Timestep-specific subject-location masks (Sec. 3.4): attention maps at step t become the mask of step t-1.

Per subject, the captured maps of several layers (fp32, mean over heads, one token grid each) are
resized to one grid and averaged, min-max normalised per sample, and turned into a soft mask (values
under a threshold set to 0) or a top-k mask (the highest fraction set to 1). The mask is then resized
to each layer's token grid when it is injected into Eq. 3.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor

__all__ = ["MASK_MODES", "MaskConfig", "combine_maps", "intersect_user_mask", "layer_mask", "make_mask",
           "minmax_normalize", "resize_grid", "resize_mask"]

MASK_MODES = ("soft", "topk")


@dataclass(frozen=True)
class MaskConfig:
    """How captured attention maps become a subject mask (Sec. 3.4)."""

    mode: str = "soft"         # "soft": keep normalised values >= threshold; "topk": highest fraction -> 1, rest -> 0
    threshold: float = 0.2     # soft mode: normalised values below this are set to 0
    topk_ratio: float = 0.25   # topk mode: fraction of the grid kept
    eps: float = 1e-6          # floor of M inside the text bias log max(M, eps) (Eq. 3)

    def __post_init__(self) -> None:
        if self.mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {self.mode!r}; expected one of {list(MASK_MODES)}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")


def _check_grid(grid: Sequence[int], name: str) -> tuple[int, int]:
    """Returns a validated (height, width) grid."""
    if len(grid) != 2 or min(grid) <= 0:
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def resize_grid(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resizes maps or masks between token grids: shrinking averages each output token's area (plain bilinear
    would sample 2 of every 4 rows at a factor 4 and drop what lies between), growing is bilinear. Both are
    linear in the input. Shapes: image (B, C, h, w) -> (B, C, *size)."""
    h, w = image.shape[-2:]
    if size[0] <= h and size[1] <= w:
        return F.adaptive_avg_pool2d(image, size)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def combine_maps(maps: Sequence[Tensor], grids: Sequence[tuple[int, int]], out_grid: tuple[int, int]) -> Tensor:
    """Averages attention maps of several layers after resizing them to one grid (:func:`resize_grid`, Sec. 3.4).

    Shapes: maps[i] (B, h_i*w_i) with grids[i] = (h_i, w_i) -> (B, H, W) fp32 with out_grid = (H, W).
    """
    if not maps or len(maps) != len(grids):
        raise ValueError(f"need one grid per map and at least one map, got {len(maps)} maps and {len(grids)} grids")
    out_grid = _check_grid(out_grid, "out_grid")
    resized = []
    for index, (flat, grid) in enumerate(zip(maps, grids)):
        h, w = _check_grid(grid, f"grids[{index}]")
        if flat.ndim != 2 or flat.shape[1] != h * w:
            raise ValueError(f"maps[{index}] must be (B, {h * w}) for grid {(h, w)}, got {tuple(flat.shape)}")
        image = rearrange(flat.float(), "b (h w) -> b 1 h w", h=h, w=w)
        if (h, w) != out_grid:
            image = resize_grid(image, out_grid)
        resized.append(rearrange(image, "b 1 h w -> b h w"))
    return torch.stack(resized).mean(dim=0)


def minmax_normalize(x: Tensor, *, rtol: float = 1e-6) -> Tensor:
    """Rescales each sample to [0, 1] over all non-batch axes; a constant sample becomes zeros.

    Shapes: x (B, ...) -> same shape, fp32. A sample counts as constant when its range is at most
    `rtol` times its largest magnitude (fp32 round-off of an averaged map), which avoids NaN and
    avoids blowing rounding noise up into a mask (its range is taken as infinite: (x - low) / inf = 0).
    """
    x = x.float()
    low, high = torch.aminmax(x.flatten(1), dim=1, keepdim=True)     # (B, 1) each, one reduction
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    low, span = low.view(shape), (high - low).view(shape)
    constant = span <= torch.maximum(high, -low.view_as(high)).view(shape) * rtol   # range vs largest |x|
    return (x - low) / span.masked_fill(constant, float("inf"))


def make_mask(maps: Tensor, cfg: MaskConfig, *, normalized: bool = False) -> Tensor:
    """Turns averaged attention maps into a soft or top-k subject mask (Sec. 3.4).

    Shapes: maps (B, H, W) -> (B, H, W) fp32 in [0, 1]. A constant map carries no location and
    gives an all-zero mask in both modes. ``normalized``: the maps are already the output of
    :func:`minmax_normalize` (normalising again would change nothing).
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    normalised = maps.float() if normalized else minmax_normalize(maps)
    if cfg.mode == "soft":
        return normalised.masked_fill(normalised < cfg.threshold, 0.0)
    flat = rearrange(normalised, "b h w -> b (h w)")
    keep = max(1, round(cfg.topk_ratio * flat.shape[1]))
    top = flat.topk(keep, dim=1).indices
    hard = torch.zeros_like(flat).scatter_(1, top, 1.0)
    hard = hard * (reduce(flat, "b n -> b 1", "max") > 0)    # constant maps (all zeros) stay empty
    return rearrange(hard, "b (h w) -> b h w", h=maps.shape[1])


def resize_mask(mask: Tensor, grid: tuple[int, int], *, out: Tensor | None = None) -> Tensor:
    """Resizes a mask to a layer's token grid (:func:`resize_grid`) and flattens it for Eq. 3 (into ``out`` when given).

    Shapes: mask (B, H, W) -> (B, h*w) fp32 in [0, 1] with grid = (h, w).
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
    grid = _check_grid(grid, "grid")
    image = rearrange(mask.float(), "b h w -> b 1 h w")
    if tuple(mask.shape[1:]) != grid:
        image = resize_grid(image, grid)
    return torch.clamp(rearrange(image, "b 1 h w -> b (h w)"), 0.0, 1.0, out=out)


def intersect_user_mask(mask: Tensor, user: Tensor) -> Tensor:
    """Multiplies the propagated mask by a user MASK resized (antialiased bilinear) to the mask grid.

    Shapes: mask (B, H, W), user (B or 1, H', W') -> (B, H, W) fp32.
    """
    if mask.ndim != 3 or user.ndim != 3:
        raise ValueError(f"mask and user must be (B, H, W), got {tuple(mask.shape)} and {tuple(user.shape)}")
    if user.shape[0] not in (1, mask.shape[0]):
        raise ValueError(f"user mask must have 1 or {mask.shape[0]} samples, got {user.shape[0]}")
    image = rearrange(user.to(mask.device, torch.float32), "b h w -> b 1 h w")
    if tuple(user.shape[1:]) != tuple(mask.shape[1:]):
        image = F.interpolate(image, size=tuple(mask.shape[1:]), mode="bilinear", align_corners=False, antialias=True)
    return mask.float() * rearrange(image, "b 1 h w -> b h w").clamp(0.0, 1.0)


def layer_mask(mask: Tensor | None, user: Tensor | None, grid: tuple[int, int]) -> Tensor | None:
    """The mask a layer applies (Eq. 3): the previous step's ``mask`` (None: M = 1) times the ``user`` mask, on the
    layer's token grid. Shapes: mask (b, H, W), user (1 or b, H', W') -> (b or 1, h*w), or None without either."""
    if mask is None and user is None:
        return None
    if mask is None:
        mask = torch.ones(user.shape[0], *grid, device=user.device)
    return resize_mask(mask if user is None else intersect_user_mask(mask, user.to(mask.device)), grid)

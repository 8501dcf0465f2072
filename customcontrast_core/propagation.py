"""Timestep-specific subject masks carried from one model evaluation to the next (Sec. 3.4).

Maps captured while the model is evaluated at sigma_t become the mask used at the next, smaller
sigma. State is keyed on sigma rather than on a call counter, so samplers that evaluate the model
several times per step (Heun, DPM++ 2S) or at intermediate sigmas get the mask of the closest
earlier (noisier) evaluation. The first evaluation uses M = 1 (no mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import SubjectMaps
from .masks import MaskConfig, combine_maps, make_mask, minmax_normalize


@dataclass
class _Pending:
    sigma: float
    sums: list[dict[tuple[int, int], list]]   # per subject: grid -> [text sum (B, N), visual sum (B, N), layers]


def subject_location(text: Tensor, visual: Tensor) -> Tensor:
    """Averages the min-max normalised text and visual maps into one location map.

    Shapes: text (B, H, W), visual (B, H, W) -> (B, H, W) in [0, 1]. The two maps live on very
    different scales (a probability per pixel vs a distribution over space), so each is
    normalised before averaging (both in one call: the normalisation is per sample).
    """
    both = minmax_normalize(torch.cat([text, visual]))                # (2B, H, W)
    text, visual = both.chunk(2)
    return minmax_normalize((text + visual) / 2)


@dataclass
class MaskTracker:
    """Collects per-layer maps of one evaluation and serves masks to later evaluations."""

    config: MaskConfig
    num_subjects: int = 1
    masks: dict[float, list[Tensor]] = field(default_factory=dict)   # sigma -> per subject (B, H, W)
    pending: _Pending | None = None

    def reset(self) -> None:
        """Forgets everything: called at the start of each sampling run."""
        self.masks.clear()
        self.pending = None

    def begin(self, sigma: float) -> None:
        """Marks the start of a model evaluation at ``sigma``; finalises the previous one's maps."""
        sigma = float(sigma)
        if self.pending is not None and self.pending.sigma != sigma:
            self._finalise()
        if self.pending is None:
            self.pending = _Pending(sigma, [{} for _ in range(self.num_subjects)])

    def add(self, subject: int, maps: SubjectMaps, grid: tuple[int, int], layers: int = 1) -> None:
        """Records the maps of one subject for the current evaluation: one layer's, or with ``layers`` > 1
        the sum of that many layers' maps at ``grid``. Shapes: maps (B, h*w)."""
        if self.pending is None:
            raise RuntimeError("MaskTracker.add called before begin(sigma)")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        grid = (int(grid[0]), int(grid[1]))
        entry = self.pending.sums[subject].get(grid)
        text, visual = maps.text.detach().float(), maps.visual.detach().float()
        if entry is None:   # a copy: the caller may reuse its buffers (CUDA-graph outputs)
            self.pending.sums[subject][grid] = [text.clone(), visual.clone(), layers]
        else:
            entry[0], entry[1], entry[2] = entry[0] + text, entry[1] + visual, entry[2] + layers

    def _finalise(self) -> None:
        """Mean over layers of each map type (bilinear resize to the largest grid is linear, so the sums of
        each grid are resized once), then the location map and the mask."""
        pending, self.pending = self.pending, None
        if pending is None or not any(pending.sums):
            return
        result = []
        for sums in pending.sums:
            if not sums:
                return
            grids = list(sums)
            grid = max(grids, key=lambda g: g[0] * g[1])
            # the mean over layers is these maps times len(grids) / (layers summed): a positive constant
            # per subject, which the min-max normalisation of subject_location removes
            text = combine_maps([sums[g][0] for g in grids], grids, grid)
            visual = combine_maps([sums[g][1] for g in grids], grids, grid)
            result.append(make_mask(subject_location(text, visual), self.config, normalized=True))
        self.masks[pending.sigma] = result

    def mask_for(self, sigma: float) -> list[Tensor] | None:
        """The masks of the closest earlier evaluation (smallest recorded sigma greater than ``sigma``)."""
        earlier = [s for s in self.masks if s > float(sigma)]
        return self.masks[min(earlier)] if earlier else None

    def history(self) -> list[tuple[float, list[Tensor]]]:
        """Every finalised mask, noisiest first (for the preview node)."""
        if self.pending is not None:
            self._finalise()
        return sorted(self.masks.items(), key=lambda item: -item[0])


def empty_like_batch(batch: int, grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """A mask of ones (M = 1). Shapes: -> (B, H, W)."""
    return torch.ones(batch, *grid, device=device)

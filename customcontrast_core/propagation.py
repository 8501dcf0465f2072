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
from .masks import MaskConfig, make_mask, minmax_normalize, resize_grid


@dataclass
class _Pending:
    sigma: float
    maps: list[dict[tuple[int, int], list]]   # per subject: grid -> [text maps, visual maps, layers] (each (B, N))


def subject_location(text: Tensor, visual: Tensor) -> Tensor:
    """Averages the min-max normalised text and visual maps into one location map.

    Shapes: text (B, H, W), visual (B, H, W) -> (B, H, W) in [0, 1]. The two maps live on very
    different scales (a probability per pixel vs a distribution over space), so each is
    normalised before averaging (both in one call: the normalisation is per sample).
    """
    return _location(torch.cat([text, visual]))


def _location(both: Tensor) -> Tensor:
    """:func:`subject_location` of the text maps stacked over the visual maps. Shapes: (2B, H, W) -> (B, H, W).
    The mean of the two normalised maps is normalised again: their sum gives the same result (scale-free)."""
    text, visual = minmax_normalize(both).chunk(2)
    return minmax_normalize(text + visual)


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
        the sum of that many layers' maps at ``grid``. The tensors are kept, not copied (they are summed
        when the evaluation is finalised): a caller that reuses its buffers passes copies. Shapes: maps (B, h*w)."""
        if self.pending is None:
            raise RuntimeError("MaskTracker.add called before begin(sigma)")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        grid = (int(grid[0]), int(grid[1]))
        entry = self.pending.maps[subject].setdefault(grid, [[], [], 0])
        entry[0].append(maps.text.detach() if maps.text.requires_grad else maps.text)
        entry[1].append(maps.visual.detach() if maps.visual.requires_grad else maps.visual)
        entry[2] += layers

    def _finalise(self) -> None:
        """Mean over layers of each map type, then the location map and the mask (:meth:`_mask_of`), per subject:
        each grid's maps in one stack."""
        pending, self.pending = self.pending, None
        if pending is None or not any(pending.maps):
            return
        result = []
        for per_grid in pending.maps:
            if not per_grid:
                return
            grids, maps = tuple(per_grid), [text + visual for text, visual, _ in per_grid.values()]
            result.append(self._mask_of(grids, [torch.stack(m) for m in maps]))
        self.masks[pending.sigma] = result

    def _mask_of(self, grids: tuple[tuple[int, int], ...], stacks: list[Tensor]) -> Tensor:
        """The mask from each grid's stacked maps (the layers' text maps, then their visual maps). Resizing to the
        largest grid is linear, so each grid's sums are resized once, text and visual together;
        the mean's factor (grids / layers summed) is a positive constant per subject, which the min-max
        normalisation of the location removes. Shapes: stacks[i] (2 L_i, B, h_i*w_i) -> (B, H, W)."""
        grid = max(grids, key=lambda g: g[0] * g[1])
        total = None
        for (h, w), stack in zip(grids, stacks):
            sums = stack.float().unflatten(0, (2, -1)).sum(1)                                  # (2, B, h*w)
            image = sums.flatten(0, 1).unflatten(1, (1, h, w))                                # (2B, 1, h, w)
            if (h, w) != grid:
                image = resize_grid(image, grid)
            total = image if total is None else total + image
        return make_mask(_location(total.squeeze(1)), self.config, normalized=True)

    def mask_for(self, sigma: float) -> list[Tensor] | None:
        """The masks of the closest earlier evaluation (smallest recorded sigma greater than ``sigma``), the one
        still being recorded included: asking before or after ``begin(sigma)`` gives the same masks."""
        if self.pending is not None and self.pending.sigma > float(sigma):
            self._finalise()
        earlier = [s for s in self.masks if s > float(sigma)]
        return self.masks[min(earlier)] if earlier else None

    def history(self) -> list[tuple[float, list[Tensor]]]:
        """Every finalised mask, noisiest first (for the preview node)."""
        if self.pending is not None:
            self._finalise()
        return sorted(self.masks.items(), key=lambda item: -item[0])

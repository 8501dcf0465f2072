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
    text: list[list[tuple[Tensor, tuple[int, int]]]]     # per subject: (map (B, N), grid)
    visual: list[list[tuple[Tensor, tuple[int, int]]]]


def subject_location(text: Tensor, visual: Tensor) -> Tensor:
    """Averages the min-max normalised text and visual maps into one location map.

    Shapes: text (B, H, W), visual (B, H, W) -> (B, H, W) in [0, 1]. The two maps live on very
    different scales (a probability per pixel vs a distribution over space), so each is
    normalised before averaging.
    """
    return minmax_normalize((minmax_normalize(text) + minmax_normalize(visual)) / 2)


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
            self.pending = _Pending(sigma, [[] for _ in range(self.num_subjects)],
                                    [[] for _ in range(self.num_subjects)])

    def add(self, subject: int, maps: SubjectMaps, grid: tuple[int, int]) -> None:
        """Records one layer's maps of one subject for the current evaluation. Shapes: maps (B, h*w)."""
        if self.pending is None:
            raise RuntimeError("MaskTracker.add called before begin(sigma)")
        self.pending.text[subject].append((maps.text.detach().float(), grid))
        self.pending.visual[subject].append((maps.visual.detach().float(), grid))

    def _finalise(self) -> None:
        pending, self.pending = self.pending, None
        if pending is None or not any(pending.text):
            return
        result = []
        for text, visual in zip(pending.text, pending.visual):
            if not text:
                return
            grid = max((g for _, g in text), key=lambda g: g[0] * g[1])
            location = subject_location(combine_maps([m for m, _ in text], [g for _, g in text], grid),
                                        combine_maps([m for m, _ in visual], [g for _, g in visual], grid))
            result.append(make_mask(location, self.config))
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

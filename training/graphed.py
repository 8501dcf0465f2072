"""Frozen forward passes of the training step replayed as CUDA graphs (``TrainConfig.cuda_graphs``).

The step runs three frozen encoders forward only, with the same shapes every step: CLIP vision on the
reference and positive views, the appearance encoder ψ_C, and the VAE's encoder on the target view.
Each launches hundreds of small kernels (ViT-H/14: 454 per step at batch 2); as a CUDA graph each is
one replay. One graph per (call, input shape, dtype, device, autocast state): the last, smaller batch
of an epoch gets its own. A call that cannot be captured (it reads a device value on the host, or CUDA
refuses the capture) runs eagerly from then on, logged once. Outputs are copied out of the graph's
static buffers, which its next replay rewrites. Preprocessing that builds tensors from host values
(normalisation constants) stays outside the graphs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from customcontrast_core.graphs import StaticCall, replay

__all__ = ["FrozenGraphs", "run_frozen"]


class FrozenGraphs:
    """The graphs of one training run's frozen forward calls; ``emulate`` runs them as replays would on the
    CPU (tests), raising on host reads as a capture would."""

    def __init__(self, emulate: bool = False) -> None:
        self.emulate = emulate
        self.calls: dict[tuple, StaticCall | None] = {}   # None: the call runs eagerly

    def run(self, name: tuple, fn: Callable[[Tensor], Sequence[Tensor]], x: Tensor) -> tuple[Tensor, ...]:
        """``fn(x)`` through its graph (captured at the first call of a new key); eager on a CPU tensor unless
        emulating. ``name`` identifies ``fn`` (the same name must always mean the same function of ``x``).
        Shapes: as ``fn``'s."""
        if not (self.emulate or x.is_cuda):
            return tuple(fn(x))
        kind = x.device.type   # a graph captured under autocast holds its casts: the autocast state is in the key
        key = (name, tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

        def make() -> StaticCall:
            static = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
            return StaticCall(lambda: tuple(fn(static)), (static,), emulate=self.emulate)

        outputs = replay(self.calls, key, make, lambda call: (x,), f"training's {name}")
        if outputs is None:
            return tuple(fn(x))
        return tuple(t.clone() for t in outputs)


def run_frozen(graphs: FrozenGraphs | None, name: tuple, fn: Callable[[Tensor], Sequence[Tensor]],
               x: Tensor) -> tuple[Tensor, ...]:
    """``fn(x)``, through ``graphs`` when given."""
    return tuple(fn(x)) if graphs is None else graphs.run(name, fn, x)

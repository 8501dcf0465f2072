"""Per-layer visual key/value projections and the container that the checkpoint format stores."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .config import EncoderConfig
from .encoder import MFIEncoder


class KVProjection(nn.Module):
    """The trainable ``W_k^v``, ``W_v^v`` of one cross-attention layer (Eq. 3)."""

    def __init__(self, context_dim: int, inner_dim: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False, dtype=dtype, device=device)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False, dtype=dtype, device=device)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Shapes: tokens (B, m, context_dim) -> key (B, m, inner), value (B, m, inner)."""
        return self.to_k(tokens), self.to_v(tokens)


class VisualKV(nn.ModuleDict):
    """One :class:`KVProjection` per cross-attention layer, keyed by canonical layer name."""

    def __init__(self, config: EncoderConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__({
            layer.name: KVProjection(config.context_dim, layer.inner_dim, dtype=dtype, device=device)
            for layer in config.layers
        })

    @torch.no_grad()
    def load_from_unet(self, weights: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Initialises every layer from that layer's frozen ``to_k``/``to_v`` weights (IP-Adapter practice).

        ``weights`` maps canonical layer name -> (to_k weight, to_v weight), each (inner, context_dim).
        """
        missing = sorted(set(self.keys()) - set(weights))
        if missing:
            raise ValueError(f"UNet weights are missing {len(missing)} cross-attention layers, e.g. {missing[:3]}")
        for name, proj in self.items():
            for target, source in ((proj.to_k, weights[name][0]), (proj.to_v, weights[name][1])):
                if tuple(source.shape) != tuple(target.weight.shape):
                    raise ValueError(f"layer {name}: expected to_k/to_v weight of shape "
                                     f"{tuple(target.weight.shape)}, found {tuple(source.shape)}")
                target.weight.copy_(source)

    def fused(self) -> tuple[Tensor, dict[str, tuple[int, int]]]:
        """Every layer's ``W_k^v`` and ``W_v^v`` stacked into one matrix, for one projection of all layers.

        All layers read the same visual tokens, so ``tokens @ W.T`` gives each layer's K and V as slices
        of the last axis: layer ``name`` has K at ``[o, o + inner)`` and V at ``[o + inner, o + 2 inner)``.
        Shapes: -> W (sum over layers of 2 * inner, context_dim), name -> (o, inner).
        """
        weights, slices, offset = [], {}, 0
        for name, proj in self.items():
            inner = proj.to_k.weight.shape[0]
            weights += [proj.to_k.weight, proj.to_v.weight]
            slices[name] = (offset, inner)
            offset += 2 * inner
        return torch.cat(weights), slices


class CustomContrastModel(nn.Module):
    """The MFI-Encoder plus the visual K/V of every layer: exactly what one checkpoint file holds."""

    def __init__(self, config: EncoderConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = MFIEncoder(config, dtype=dtype, device=device)
        self.visual_kv = VisualKV(config, dtype=dtype, device=device)

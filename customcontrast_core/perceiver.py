"""Perceiver attention and Q-Former blocks of the MFI-Encoder (Sec. 3.2, Eq. 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class PerceiverAttention(nn.Module):
    """Queries attend to the concatenation of features and queries, ``[f; q]`` (Eq. 2).

    LayerNorm on both inputs, no biases (IP-Adapter's resampler layout); the attention itself is one
    fused SDPA call (softmax statistics in fp32 for half-precision inputs).
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, feature_dim: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        feature_dim = feature_dim or dim
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm_features = nn.LayerNorm(feature_dim, dtype=dtype, device=device)
        self.norm_queries = nn.LayerNorm(dim, dtype=dtype, device=device)
        self.to_q = nn.Linear(dim, inner, bias=False, dtype=dtype, device=device)
        self.to_kv_features = nn.Linear(feature_dim, inner * 2, bias=False, dtype=dtype, device=device)
        self.to_kv_queries = nn.Linear(dim, inner * 2, bias=False, dtype=dtype, device=device)
        self.to_out = nn.Linear(inner, dim, bias=False, dtype=dtype, device=device)

    def forward(self, features: Tensor, queries: Tensor) -> Tensor:
        """Shapes: features (B, F, feature_dim), queries (B, Q, dim) -> (B, Q, dim)."""
        f = self.norm_features(features)
        x = self.norm_queries(queries)
        q = rearrange(self.to_q(x), "b i (h d) -> b h i d", h=self.heads)
        kv = torch.cat([self.to_kv_features(f), self.to_kv_queries(x)], dim=1)  # (B, F + Q, 2 * inner)
        k, v = rearrange(kv, "b j (two h d) -> two b h j d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.dim_head**-0.5)  # (B, H, Q, D)
        return self.to_out(rearrange(out, "b h i d -> b i (h d)"))


class FeedForward(nn.Sequential):
    """LayerNorm → Linear → GELU → Linear, no biases."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(
            nn.LayerNorm(dim, dtype=dtype, device=device),
            nn.Linear(dim, dim * mult, bias=False, dtype=dtype, device=device),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False, dtype=dtype, device=device),
        )


class QFormerBlock(nn.Module):
    """PerceiverAttention + FeedForward, each residual."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, ff_mult: int, feature_dim: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, heads=heads, dim_head=dim_head, feature_dim=feature_dim,
                                       dtype=dtype, device=device)
        self.ff = FeedForward(dim, mult=ff_mult, dtype=dtype, device=device)

    def forward(self, features: Tensor, queries: Tensor) -> Tensor:
        """Shapes: features (B, F, feature_dim), queries (B, Q, dim) -> (B, Q, dim)."""
        queries = queries + self.attn(features, queries)
        return queries + self.ff(queries)


class QFormer(nn.Module):
    """A stack of Q-Former blocks sharing the same features."""

    def __init__(self, dim: int, *, depth: int, heads: int, dim_head: int, ff_mult: int,
                 feature_dim: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            QFormerBlock(dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, feature_dim=feature_dim,
                         dtype=dtype, device=device)
            for _ in range(depth)
        )

    def forward(self, features: Tensor, queries: Tensor) -> Tensor:
        """Shapes: features (B, F, feature_dim), queries (B, Q, dim) -> (B, Q, dim)."""
        for block in self.blocks:
            queries = block(features, queries)
        return queries

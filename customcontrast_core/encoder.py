"""The MFI-Encoder: multi-layer CLIP features → visual tokens, S+ tokens and CLS tokens (Sec. 3.2)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from .config import EncoderConfig
from .perceiver import QFormer, QFormerBlock


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """Timestep-independent part of an encoding, computed once per reference image."""

    features: Tensor     # (B, K*T, width) multi-layer CLIP features f_I, projected
    visual: Tensor       # (B, m, width) visual tokens f_v
    visual_cls: Tensor   # (B, width) visual CLS token

    def expand(self, n: int) -> "ImageFeatures":
        """The features of one image as n rows (views, no copy), e.g. to encode n timesteps at once.

        Shapes: (1, ...) -> (n, ...).
        """
        if self.features.shape[0] != 1:
            raise ValueError(f"expand needs the features of one image (batch 1), found batch {self.features.shape[0]}")
        return ImageFeatures(features=self.features.expand(n, -1, -1), visual=self.visual.expand(n, -1, -1),
                             visual_cls=self.visual_cls.expand(n, -1))


@dataclass(frozen=True, eq=False)
class SubjectEncoding:
    """Everything the MFI-Encoder produces for one timestep."""

    splus: Tensor              # (B, G, token_dim) one S+ token per layer group, word-embedding space
    text_cls: Tensor           # (B, token_dim) textual CLS token
    visual_tokens: Tensor      # (B, m, context_dim) TV-fused visual tokens for the visual K/V
    visual_cls: Tensor         # (B, width) visual CLS token
    visual_cls_embed: Tensor   # (B, cls_dim) visual CLS projected to the shared CSCL width
    text_cls_embed: Tensor     # (B, cls_dim) textual CLS projected to the shared CSCL width


def timestep_fourier_features(timesteps: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal Fourier features of the (continuous) diffusion timestep.

    Shapes: timesteps (B,) -> (B, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]          # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MFIEncoder(nn.Module):
    """Multilevel Feature Interaction encoder: Visual Q-Former, Textual Q-Former and TV-Fusion."""

    def __init__(self, config: EncoderConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.config = c = config
        kw = dict(dtype=dtype, device=device)
        block = dict(heads=c.heads, dim_head=c.dim_head, ff_mult=c.ff_mult)
        # multi-layer CLIP input: K layers concatenated along tokens, each with a learned layer embedding
        self.layer_embed = nn.Parameter(torch.randn(len(c.clip_layers), c.clip_width, **kw) * 0.02)
        self.proj_in = nn.Linear(c.clip_width, c.width, **kw)
        # visual Q-Former: m visual queries + 1 CLS query
        self.visual_queries = nn.Parameter(torch.randn(c.num_visual_tokens + 1, c.width, **kw) / c.width**0.5)
        self.visual_qformer = QFormer(c.width, depth=c.depth, **block, **kw)
        # textual Q-Former: spatiotemporal queries = timestep Fourier features + layer-group embeddings
        self.group_queries = nn.Parameter(torch.randn(c.num_groups + 1, c.width, **kw) / c.width**0.5)
        self.time_mlp = nn.Sequential(nn.Linear(c.fourier_dim, c.width, **kw), nn.SiLU(),
                                      nn.Linear(c.width, c.width, **kw))
        self.text_qformer = QFormer(c.width, depth=c.depth, **block, **kw)
        self.text_out = nn.Sequential(nn.LayerNorm(c.width, **kw), nn.Linear(c.width, c.token_dim, **kw))
        # TV-Fusion: visual tokens query [f_t; f_v] (PerceiverAttention(f_t, f_v) in Eq. 2's argument order)
        self.text_to_width = nn.Linear(c.token_dim, c.width, **kw)
        self.tv_fusion = QFormerBlock(c.width, **block, **kw)
        self.visual_out = nn.Sequential(nn.Linear(c.width, c.context_dim, **kw), nn.LayerNorm(c.context_dim, **kw))
        # CSCL heads: both CLS tokens into one shared width
        self.visual_cls_proj = nn.Linear(c.width, c.cls_dim, **kw)
        self.text_cls_proj = nn.Linear(c.token_dim, c.cls_dim, **kw)

    def check_clip_hidden(self, clip_hidden: Tensor) -> None:
        """Raises ValueError unless the CLIP features have the layer count and width of the config."""
        c = self.config
        if clip_hidden.ndim != 4 or clip_hidden.shape[1] != len(c.clip_layers) or clip_hidden.shape[3] != c.clip_width:
            raise ValueError(
                f"expected CLIP-vision hidden states of shape (B, {len(c.clip_layers)}, T, {c.clip_width}) "
                f"(layers {c.clip_layers} of a {c.clip_width}-wide model), found {tuple(clip_hidden.shape)}"
            )

    def encode_image(self, clip_hidden: Tensor) -> ImageFeatures:
        """Runs the Visual Q-Former on stacked CLIP hidden states.

        Shapes: clip_hidden (B, K, T, clip_width) -> ImageFeatures.
        """
        self.check_clip_hidden(clip_hidden)
        x = clip_hidden.to(self.proj_in.weight.dtype) + self.layer_embed[None, :, None, :]
        features = self.proj_in(rearrange(x, "b k t d -> b (k t) d"))          # (B, K*T, width)
        queries = repeat(self.visual_queries, "q d -> b q d", b=features.shape[0])
        f_v = self.visual_qformer(features, queries)                            # (B, m+1, width)
        return ImageFeatures(features=features, visual=f_v[:, :-1], visual_cls=f_v[:, -1])

    def encode_timestep(self, image: ImageFeatures, timesteps: Tensor) -> SubjectEncoding:
        """Runs the Textual Q-Former and TV-Fusion for one timestep per sample.

        Shapes: image (B, ...), timesteps (B,) or scalar -> SubjectEncoding.
        """
        b = image.features.shape[0]
        timesteps = torch.as_tensor(timesteps, device=image.features.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"expected one timestep per sample, shape ({b},), found {tuple(timesteps.shape)}")
        dtype = image.features.dtype
        t_emb = self.time_mlp(timestep_fourier_features(timesteps, self.config.fourier_dim).to(dtype))  # (B, width)
        queries = self.group_queries[None] + t_emb[:, None]                    # (B, G+1, width)
        f_t = self.text_out(self.text_qformer(image.features, queries))        # (B, G+1, token_dim)
        fused = self.tv_fusion(self.text_to_width(f_t), image.visual)          # (B, m, width)
        text_cls = f_t[:, -1]
        return SubjectEncoding(
            splus=f_t[:, :-1],
            text_cls=text_cls,
            visual_tokens=self.visual_out(fused),
            visual_cls=image.visual_cls,
            visual_cls_embed=self.visual_cls_proj(image.visual_cls),
            text_cls_embed=self.text_cls_proj(text_cls),
        )

    def forward(self, clip_hidden: Tensor, timesteps: Tensor) -> SubjectEncoding:
        """Shapes: clip_hidden (B, K, T, clip_width), timesteps (B,) -> SubjectEncoding."""
        return self.encode_timestep(self.encode_image(clip_hidden), timesteps)

    def layer_tokens(self, splus: Tensor) -> Tensor:
        """Expands per-group S+ tokens to one token per cross-attention layer.

        Shapes: splus (B, G, token_dim) -> (B, L, token_dim).
        """
        index = torch.tensor(self.config.layer_groups, device=splus.device)
        return splus.index_select(1, index)

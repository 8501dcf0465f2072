"""The small world's scorer networks and their weight file: an appearance encoder and attribute classifiers.

All three networks are the same small CNN trunk (each with its own weights) under different heads; the subject's pool
their features over positions (a subject is itself anywhere), the context's flattens them (where things are is asked):
- ``AppearanceEncoder``: the DINO-I analogue, an L2-normalised embedding of a subject's identity;
- ``AttributeNet`` with ``SUBJECT_HEADS``: the subject's shape, texture and two colours;
- ``AttributeNet`` with ``CONTEXT_HEADS``: what a caption asks of a scene (background, pattern, position,
  size, companion), the CLIP-T analogue.
Colours are compared in CIELAB (CIE76 delta-E) as an unordered pair.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .world import BACKGROUNDS, COMPANIONS, PATTERNS, POSITIONS, SHAPES, SIZES, TEXTURES

FORMAT, FORMAT_VERSION = "miniworld-scorers", 1
FILE = "scorers.safetensors"
SUBJECT_HEADS = {"shape": len(SHAPES), "texture": len(TEXTURES), "colors": 6}      # colours: 2 x RGB
CONTEXT_HEADS = {"background": len(BACKGROUNDS), "pattern": len(PATTERNS), "position": len(POSITIONS),
                 "size": len(SIZES), "companion": 1 + len(COMPANIONS)}              # companion 0: none
CONTEXT_VALUES = {"background": tuple(BACKGROUNDS), "pattern": PATTERNS, "position": tuple(POSITIONS),
                  "size": tuple(SIZES), "companion": (None, *COMPANIONS)}


@dataclass(frozen=True)
class NetConfig:
    """The scorer CNN's size."""

    image_size: int = 32       # scorers read images of exactly this side
    width: int = 16            # channels of the first conv; doubled twice on the way down
    hidden: int = 128          # the trunk's feature size
    embed_dim: int = 64        # the appearance embedding's size


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(4, c_out), nn.SiLU())


class Trunk(nn.Module):
    """Image -> features: three stride-2 convs, then either flattened (positions stay apart: what a caption says
    about a scene) or pooled over positions (the same subject anywhere gives the same features).

    Shapes: (B, 3, S, S) in [0, 1] -> (B, hidden).
    """

    def __init__(self, cfg: NetConfig, keep_position: bool):
        super().__init__()
        w, self.keep_position = cfg.width, keep_position
        self.convs = nn.Sequential(_block(3, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
                                   _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 2))
        self.proj = nn.Linear(4 * w * ((cfg.image_size // 8) ** 2 if keep_position else 2), cfg.hidden)

    def forward(self, images: Tensor) -> Tensor:
        x = self.convs(images * 2 - 1)                                        # (B, 4w, S/8, S/8)
        if self.keep_position:
            x = rearrange(x, "b c h w -> b (c h w)")
        else:
            x = torch.cat([reduce(x, "b c h w -> b c", "mean"), reduce(x, "b c h w -> b c", "max")], 1)
        return F.silu(self.proj(x))                                           # (B, hidden)


class AppearanceEncoder(nn.Module):
    """A subject's identity embedding. Shapes: (B, 3, S, S) in [0, 1] -> (B, embed_dim), unit length."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.trunk = Trunk(cfg, keep_position=False)
        self.head = nn.Linear(cfg.hidden, cfg.embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.head(self.trunk(images)), dim=-1)


class AttributeNet(nn.Module):
    """One trunk, one linear head per attribute. Shapes: (B, 3, S, S) -> {name: (B, heads[name])}."""

    def __init__(self, cfg: NetConfig, heads: dict[str, int], keep_position: bool):
        super().__init__()
        self.trunk = Trunk(cfg, keep_position)
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.hidden, n) for name, n in heads.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.trunk(images)
        return {name: head(features) for name, head in self.heads.items()}


def predicted_colors(logits: Tensor) -> Tensor:
    """The colours head's output as two RGB colours. Shapes: (B, 6) -> (B, 2, 3) in [0, 1]."""
    return rearrange(torch.sigmoid(logits), "b (k c) -> b k c", k=2)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] (D65) -> CIELAB, differentiable. Shapes: (..., 3) -> (..., 3)."""
    linear = torch.where(rgb > 0.04045, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]], dtype=rgb.dtype)
    xyz = linear @ matrix.T / torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype)
    eps = 216 / 24389
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1 / 3), (24389 / 27 * xyz + 16) / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def pair_delta_e(pred: Tensor, target: Tensor) -> Tensor:
    """CIE76 delta-E between two unordered colour pairs: the better of the two orderings, averaged over the pair.

    Shapes: pred (B, 2, 3), target (B, 2, 3) RGB in [0, 1] -> (B,).
    """
    a, b = rgb_to_lab(pred), rgb_to_lab(target)
    straight = (a - b).norm(dim=-1).mean(-1)
    swapped = (a - b.flip(1)).norm(dim=-1).mean(-1)
    return torch.minimum(straight, swapped)


@dataclass
class Scorers:
    """The three trained scorer networks (eval mode, no gradients) and what they were trained and validated with."""

    net: NetConfig
    appearance: AppearanceEncoder
    subject: AttributeNet
    context: AttributeNet
    meta: dict = field(default_factory=dict)      # training config, validation report, seconds

    @classmethod
    def build(cls, net: NetConfig, seed: int) -> Scorers:
        """Random-initialised networks, the same for a seed (torch's global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(net, AppearanceEncoder(net), AttributeNet(net, SUBJECT_HEADS, keep_position=False),
                       AttributeNet(net, CONTEXT_HEADS, keep_position=True))

    def modules(self) -> dict[str, nn.Module]:
        return {"appearance": self.appearance, "subject": self.subject, "context": self.context}

    def score(self, images, reference, subject, context) -> dict[str, float]:
        """Mean scores of a batch of images of one subject in one context (``scorers.score_images``).

        images: (B, 3, S, S) float in [0, 1] or (B, S, S, 3) uint8; reference: one image, (3, S, S) float or
        (S, S, 3) uint8, or None (then the subject is rendered in the reference context).
        """
        from .scorers import score_images  # scoring lives beside validation; this is its one-scene shortcut
        n = len(images)
        if reference is not None:
            reference = (reference[None].expand(n, *reference.shape) if isinstance(reference, Tensor)
                         else np.broadcast_to(np.asarray(reference)[None], (n, *np.shape(reference))))
        return score_images(self, images, [context] * n, subjects=[subject] * n, references=reference)

    def freeze(self) -> Scorers:
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self


def save_scorers(path: str | Path, scorers: Scorers) -> None:
    """Writes all three networks to one safetensors file whose metadata carries the configs and validation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{key}": value.detach().contiguous()
               for name, module in scorers.modules().items() for key, value in module.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "net": json.dumps(asdict(scorers.net)),
            **{key: json.dumps(value) for key, value in scorers.meta.items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict:
    """A scorer file's metadata, JSON-decoded; raises ValueError for a file of another format."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT or raw.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: not a scorer file (expected format {FORMAT!r} version {FORMAT_VERSION}, found "
                         f"{raw.get('format')!r} version {raw.get('format_version')!r})")
    return {key: json.loads(value) for key, value in raw.items() if key not in ("format", "format_version")}


def load_scorers(path: str | Path) -> Scorers:
    """The scorers of a file written by ``save_scorers`` (or of ``folder/scorers.safetensors``), frozen."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise FileNotFoundError(f"no scorer file at {path}: train it with train_scorers(folder, seed, quick)")
    meta = read_metadata(path)
    scorers = Scorers.build(NetConfig(**meta.pop("net")), seed=0)
    scorers.meta = meta
    tensors = load_file(str(path))
    for name, module in scorers.modules().items():
        own = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(f"{name}.")}
        missing, unexpected = module.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: the {name} scorer does not fit its architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    return scorers.freeze()

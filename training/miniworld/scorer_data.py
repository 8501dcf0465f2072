"""Renders of the small world for the scorers: pools of subjects in several scenes, their labels, and the
checks that turn images given to a scorer into tensors."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .data import REFERENCE_CONTEXT
from .scorer_models import CONTEXT_VALUES
from .world import SHAPES, TEXTURES, Context, Subject, make_context, make_subject, render


@dataclass(frozen=True)
class Pool:
    """N subjects, each rendered in V scenes (independent contexts and poses)."""

    images: np.ndarray                          # (N, V, S, S, 3) uint8
    subjects: tuple[Subject, ...]               # N
    contexts: tuple[tuple[Context, ...], ...]   # N x V


def render_pool(n_subjects: int, views: int, size: int, rng: np.random.Generator, *, held_out_subjects: float,
                held_out_contexts: bool) -> Pool:
    """Subjects of the held-out split with probability ``held_out_subjects`` (else of the training split), each in
    ``views`` contexts of the held-out split or of the training split."""
    subjects, contexts, images = [], [], np.zeros((n_subjects, views, size, size, 3), np.uint8)
    for i in range(n_subjects):
        subjects.append(make_subject(rng, held_out=bool(rng.uniform() < held_out_subjects)))
        contexts.append(tuple(make_context(rng, held_out_contexts) for _ in range(views)))
        for v, ctx in enumerate(contexts[-1]):
            images[i, v] = render(subjects[-1], ctx, size, rng)[0]
    return Pool(images, tuple(subjects), tuple(contexts))


def visible_colors(subject: Subject) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The subject's colours as an image can show them: a plain subject shows only its first colour (twice)."""
    first, second = subject.colors
    return (first, first) if subject.texture == "plain" else (first, second)


def subject_labels(subjects: Sequence[Subject]) -> dict[str, Tensor]:
    """Shapes: -> shape (N,), texture (N,) class indices; colors (N, 2, 3) visible RGB in [0, 1]."""
    return {"shape": torch.tensor([SHAPES.index(s.shape) for s in subjects]),
            "texture": torch.tensor([TEXTURES.index(s.texture) for s in subjects]),
            "colors": torch.tensor([visible_colors(s) for s in subjects], dtype=torch.float32).reshape(-1, 2, 3)}


def context_labels(contexts: Sequence[Context]) -> dict[str, Tensor]:
    """Shapes: -> {attribute: (N,) class indices into CONTEXT_VALUES[attribute]}."""
    return {name: torch.tensor([values.index(getattr(c, name)) for c in contexts])
            for name, values in CONTEXT_VALUES.items()}


def reference_render(subject: Subject, size: int) -> np.ndarray:
    """The subject alone, large, in the centre of a plain gray scene, in a fixed pose. Shapes: -> (S, S, 3) uint8."""
    return render(subject, REFERENCE_CONTEXT, size, np.random.default_rng(0))[0]


def as_images(images: np.ndarray | Tensor, name: str, size: int) -> Tensor:
    """Images given to a scorer as a float batch; raises ValueError naming ``name`` for anything else.

    Accepts uint8 (B, S, S, 3) arrays/tensors (renders) or float (B, 3, S, S) tensors/arrays in [0, 1]
    (decoded generations). Shapes: -> (B, 3, S, S) float32 in [0, 1].
    """
    x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor of images, found {type(images).__name__}")
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name}: uint8 images must be (B, H, W, 3), found shape {tuple(x.shape)}")
        x = rearrange(x, "b h w c -> b c h w").float() / 255
    elif x.is_floating_point():
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name}: float images must be (B, 3, H, W) in [0, 1], found shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: {int((~torch.isfinite(x)).sum())} values are NaN or infinite")
        if x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise ValueError(f"{name}: float images must lie in [0, 1], found [{x.min():.3f}, {x.max():.3f}] "
                             "(decode with (x + 1) / 2 first if they are in [-1, 1])")
        x = x.float().clamp(0, 1)
    else:
        raise ValueError(f"{name}: expected uint8 or float images, found dtype {x.dtype}")
    if tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"{name}: the scorers read {size}x{size} images, found {x.shape[-2]}x{x.shape[-1]}")
    if len(x) == 0:
        raise ValueError(f"{name}: an empty batch")
    return x


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mild blur and noise, so the scorers also read imperfect (generated) images.

    Shapes: (B, 3, S, S) in [0, 1] -> same.
    """
    b = len(images)
    blurred = F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    amount = torch.rand(b, 1, 1, 1, generator=generator) * 0.6
    noise = torch.randn(images.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.04
    return (torch.lerp(images, blurred, amount) + noise).clamp(0, 1)

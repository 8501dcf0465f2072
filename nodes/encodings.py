"""The S+ contexts and visual tokens of each timestep, encoded a window of the schedule at a time.

The S+ prompts (G per timestep: 16 for SD1.5, 11 for SDXL) depend only on the timestep, so the first model call
that misses ``SubjectPatch.cache`` encodes its own timestep and the next ones of the run's schedule in one call
of the MFI-Encoder and one of the text encoder: the paper's computation, only the batch differs. Sigmas outside
the schedule (Heun's intermediate calls) are encoded on demand. With ``buckets = N`` the timesteps are rounded to
the centres of N equal ranges (an approximation). Why they are kept across runs: docs/sampling-patch.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from ..customcontrast_core.encoder import ImageFeatures
from .text_encode import PlaceholderPrompt, encode_splus

PROMPTS_PER_CALL = 256   # text-encoder rows per batched call (G prompts per timestep)
MAX_CACHED = 64          # timesteps kept (SD1.5: 1.9 MB, SDXL: 3.5 MB each): two 30-step schedules fit


@dataclass(frozen=True, eq=False)
class Encodings:
    """Everything one timestep needs."""

    contexts: Tensor             # (G, L, C) the prompt with each group's S+ tokens (all subjects), as encoded
    visual: list[Tensor]         # per subject (1, m, C) TV-fused visual tokens
    blank_visual: list[Tensor]   # per subject (1, m, C) for uncond rows (the blank reference's)


def encoding_key(sigma: float, timestep_of: Callable[[Tensor], Tensor], buckets: int) -> tuple[float, float]:
    """The cache key of a sigma and the model timestep to encode: its own, or its bucket's centre.

    Bucket keys are negative, so they never collide with a real sigma.
    """
    t = float(timestep_of(torch.tensor([sigma], dtype=torch.float32)).reshape(-1)[0])
    if buckets <= 0:
        return sigma, t
    width = 1000.0 / buckets
    bucket = min(max(int(t // width), 0), buckets - 1)
    return float(-1 - bucket), (bucket + 0.5) * width


def window(sigma: float, schedule: Sequence[float], wanted: Callable[[float], bool], size: int) -> list[float]:
    """``sigma`` followed by the next smaller sigmas of the schedule that ``wanted`` accepts, ``size`` at most."""
    later = [s for s in schedule if 0 < s < sigma and wanted(s)]
    return [sigma, *sorted(set(later), reverse=True)][:max(1, size)]


def encode_timesteps(encoder, clip, prompt: PlaceholderPrompt, images: Sequence[ImageFeatures], blank: ImageFeatures,
                     timesteps: Sequence[float], device: torch.device) -> list[Encodings]:
    """Encodes several timesteps in one MFI-Encoder call and one text-encoder call.

    Shapes: images[i] / blank with batch 1 -> one Encodings per timestep, in order.
    """
    n = len(timesteps)
    t = torch.tensor(list(timesteps), dtype=torch.float32).to(device)   # fp32 whatever the encoder's dtype
    with torch.no_grad():
        subject = [encoder.encode_timestep(image.expand(n), t) for image in images]
        empty = encoder.encode_timestep(blank.expand(n), t)
        splus = [rearrange(s.splus, "n g d -> (n g) d") for s in subject]
        contexts, _ = encode_splus(clip, prompt, splus)                          # (n*G, L, C)
    contexts = rearrange(contexts, "(n g) l c -> n g l c", n=n)
    return [Encodings(contexts=contexts[i], visual=[s.visual_tokens[i:i + 1] for s in subject],
                      blank_visual=[empty.visual_tokens[i:i + 1]] * len(subject)) for i in range(n)]

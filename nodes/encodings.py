"""Per-timestep subject encodings for one sampling run, computed a window of timesteps at a time.

The paper re-encodes the S+ prompts at every timestep: G prompts (16 for SD1.5, 11 for SDXL) through
the text encoder(s) per model evaluation, 15 % of an SD1.5 CFG step in FLOPs and many more small
kernel launches. The encodings depend only on the timestep, and ComfyUI hands every patch the
run's schedule (``transformer_options["sample_sigmas"]``), so the first evaluation that misses the
cache encodes its own timestep *and the next ones of the schedule* in one batched call of the
MFI-Encoder and one of the text encoder. The result is the paper-exact computation (same inputs,
same weights; only the batch size differs), with ~2 text-encoder calls per run instead of one per
step. Sigmas outside the schedule (the intermediate evaluations of Heun or DPM++ 2S) are encoded
on demand. With ``buckets = N`` the timesteps are instead rounded to the centres of N equal ranges
(N encodings per run at most, an approximation the model was not trained with).

The encodings of a sigma never change for one Apply node (same subject, prompt, CLIP and weights),
so the patch keeps the ones its last runs used for the next runs of the same patched MODEL (a new
seed, CFG or sampler on the same schedule encodes nothing; ``KEEP_RUNS``). The contexts stay
where the CLIP returned them (ComfyUI's intermediate device, normally the CPU); each window is
copied to the UNet's device and dtype in one transfer, and only that copy lives on the GPU.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from customcontrast_core.encoder import ImageFeatures

from .text_encode import encode_splus, reorder_for

PROMPTS_PER_CALL = 256   # text-encoder rows per batched call (G prompts per timestep)

# encodings are kept while one of the last KEEP_RUNS sampling runs used them: two samplers that share a
# patched MODEL with different schedules (a second, partial-denoise pass) both find theirs
KEEP_RUNS = 2
# at most this many timesteps stay cached (SD1.5: 1.9 MB, SDXL: 3.5 MB each on the GPU); longer schedules
# evict the least recently used ones and re-encode them in the next run
MAX_CACHED = 64


@dataclass
class Encodings:
    """Everything one timestep needs, on the sampling device."""

    contexts: Tensor                 # (G, L, C) prompt with each group's S+ tokens (all subjects), as encoded
    visual: list[Tensor]             # per subject (1, m, C) TV-fused visual tokens
    blank_visual: list[Tensor]       # per subject (1, m, C) for uncond rows (blank reference)
    prepared: dict = field(default_factory=dict)   # (device, length, dtype) -> (G, length, C) contexts
    tokens: dict = field(default_factory=dict)     # (device, dtype) -> per subject (2, m, C): visual; blank

    def contexts_for(self, device: torch.device, length: int, dtype: torch.dtype,
                     ready: Tensor | None = None) -> Tensor:
        """The G contexts on the UNet's device, LCM-repeated to ``length`` and in its dtype (made once, or
        ``ready``: the same, copied with other timesteps). Shapes: -> (G, length, C)."""
        key = (torch.device(device), length, dtype)
        if ready is not None:
            self.prepared[key] = ready
        elif key not in self.prepared:
            self.prepared[key] = reorder_for(self.contexts, length).to(device, dtype)
        return self.prepared[key]

    def tokens_for(self, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """Per subject its visual tokens over the blank reference's, as the visual K/V projection reads them
        (made once). Shapes: -> (2, m, C) per subject."""
        key = (torch.device(device), dtype)
        if key not in self.tokens:
            self.tokens[key] = [torch.cat([v, b]).to(device, dtype) for v, b in zip(self.visual, self.blank_visual)]
        return self.tokens[key]


@dataclass
class RecentUse:
    """Which cached encodings the recent sampling runs looked up; the others go when a run starts."""

    runs: int = 0                                   # runs started
    used: dict = field(default_factory=dict)        # cache key -> (run, lookup) of its last lookup
    lookups: int = 0

    def mark(self, key) -> None:
        self.lookups += 1
        self.used[key] = (self.runs, self.lookups)

    def start_run(self, cache: dict, keys: dict) -> None:
        """Drops from ``cache`` (key -> Encodings) and ``keys`` (sigma -> (key, timestep)) what none of the
        last ``KEEP_RUNS`` runs used."""
        self.runs += 1
        self._drop(cache, keys, [k for k in cache if self.used.get(k, (0, 0))[0] <= self.runs - 1 - KEEP_RUNS])

    def added(self, cache: dict, keys: dict, fresh) -> None:
        """Counts the ``fresh`` entries (just encoded, about to be used) as used, then evicts the least
        recently used others beyond ``MAX_CACHED``."""
        for key in fresh:
            self.mark(key)
        excess = len(cache) - MAX_CACHED
        if excess > 0:
            older = sorted((k for k in cache if k not in fresh), key=lambda k: self.used.get(k, (0, 0)))
            self._drop(cache, keys, older[:excess])

    def _drop(self, cache: dict, keys: dict, dropped: list) -> None:
        for key in dropped:
            del cache[key]
        self.used = {k: use for k, use in self.used.items() if k in cache}
        for sigma in [s for s, (key, _) in keys.items() if key not in cache]:
            del keys[sigma]


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


def encode_timesteps(encoder, clip, prompt, images: Sequence[ImageFeatures], blank: ImageFeatures,
                     timesteps: Sequence[float], device: torch.device,
                     prepare: tuple[int, torch.dtype] | None = None) -> list[Encodings]:
    """Encodes several timesteps in one MFI-Encoder call and one text-encoder call; with ``prepare =
    (length, dtype)`` the contexts of all of them are also copied to ``device`` in one transfer.

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
    out = [Encodings(contexts=contexts[i], visual=[s.visual_tokens[i:i + 1] for s in subject],
                     blank_visual=[empty.visual_tokens[i:i + 1]] * len(subject)) for i in range(n)]
    if prepare is not None:
        length, dtype = prepare
        ready = reorder_for(contexts, length).to(device, dtype)                   # (n, G, length, C), one copy
        for enc, rows in zip(out, ready):
            enc.contexts_for(device, length, dtype, ready=rows)
    return out

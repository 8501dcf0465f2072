"""The sampling-time side of one Apply node, called by ``comfy_glue.py`` in this order: ``start_run`` (a
sampling run starts), ``model_call`` (once per UNet call: the ModelCall every layer reads), per cross-attention
layer ``swap_context`` (before the K/V projections) then ``attention`` (Eq. 3 through the core), ``end_run``.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..customcontrast_core.attention import SubjectBranch, customcontrast_attention, placeholder_columns
from ..customcontrast_core.encoder import ImageFeatures
from ..customcontrast_core.layers import CrossAttentionLayer, layer_grid
from ..customcontrast_core.masks import MaskConfig, layer_mask
from ..customcontrast_core.propagation import MaskTracker
from ..customcontrast_core.visual_kv import CustomContrastModel
from . import encodings as cache
from .encodings import Encodings, encode_timesteps, encoding_key, window
from .model_call import ModelCall, matching_chunks, patched_chunks, per_latent, row_indices
from .text_encode import PlaceholderPrompt, reorder_for

log = logging.getLogger("customcontrast")


@dataclass(frozen=True)
class ApplySettings:
    """User controls of one Apply node."""

    gamma: float = 1.0                    # weight of the visual branch
    sigma_start: float = float("inf")     # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    use_mask: bool = True                 # timestep masks carried from step t to t-1
    mask: MaskConfig = MaskConfig()
    capture_downsample: tuple[int, ...] = (2, 4)   # 16x16 and 32x32 layers at 512 px
    user_mask: Tensor | None = None       # (1 or b, H, W) intersected with the propagated mask
    splus_buckets: int = 0                # 0: S+ encoded at every sigma (paper); N: once per N timestep buckets


@dataclass(eq=False)
class SubjectPatch:
    """What one Apply node installs; shared by every clone of the patched MODEL (weights are immutable)."""

    model: CustomContrastModel
    clip: object                             # ComfyUI CLIP that encodes the S+ prompts
    subjects: list[Tensor]                   # per subject (1, K, T, D) CLIP-vision hidden states
    blank: Tensor                            # (1, K, T, D) hidden states of a blank reference
    prompt: PlaceholderPrompt
    base_context: Tensor                     # (1, L, C) the positive CONDITIONING's context
    layers: dict[tuple, CrossAttentionLayer]  # ComfyUI block key -> layer
    settings: ApplySettings
    timestep_of: Callable[[Tensor], Tensor]  # sigma -> model timestep (model_sampling.timestep)
    cache: OrderedDict = field(default_factory=OrderedDict)   # cache key -> Encodings, least recently used first
    encode_calls: int = 0                    # batched encoder calls since the run started
    last_masks: list[tuple[float, list[Tensor]]] = field(default_factory=list)   # the last run's, for the preview
    schedule: list[float] = field(default_factory=list)   # the sigmas of the current run
    matched: bool | None = None              # whether a cond chunk of this run was this node's (None: none seen)
    images: tuple[list[ImageFeatures], ImageFeatures] | None = None   # the subjects' and the blank's features
    progress: Callable[[int], object] | None = None   # total -> a bar with update(n) (ComfyUI's ProgressBar)
    bar: object = None                       # this run's bar over the timesteps it encodes (made at its first miss)

    def __post_init__(self) -> None:
        self.tracker = MaskTracker(self.settings.mask, num_subjects=len(self.subjects))
        config = self.model.config
        group_of = {layer.name: group for layer, group in zip(config.layers, config.layer_groups)}
        self.groups = {key: group_of[layer.name] for key, layer in self.layers.items()}

    def __deepcopy__(self, memo) -> "SubjectPatch":
        return self   # ModelPatcher.clone deep-copies model_options: share weights and state

    def start_run(self, schedule: list[float]) -> None:
        """Forgets the previous run's masks; the encodings stay (the same for every run of this patch)."""
        self.schedule, self.matched, self.encode_calls, self.bar = list(schedule), None, 0, None
        self.tracker.reset()

    def end_run(self) -> None:
        self.last_masks = self.tracker.history()
        if self.matched is False:
            log.warning("CustomContrast: no positive conditioning of this run is the 'positive' output of the Apply "
                        "CustomContrast node that patched the MODEL: its subject was not drawn (the sampler's "
                        "positive must be that output, alone or combined with others)")

    def active(self, sigma: float) -> bool:
        return self.settings.sigma_end <= sigma <= self.settings.sigma_start

    def model_call(self, latent: tuple[int, ...], sigma: float, context: Tensor,
                   chunks: tuple[int, ...]) -> ModelCall | None:
        """What every patched layer of this UNet call reads; None where the node leaves the call alone (outside
        its sigma range, or no row is its). Shapes: latent (B, C, H, W) shape, context (B, L, C)."""
        if self.settings.use_mask:
            self.tracker.begin(sigma)
        if not self.active(sigma):
            return None
        b, device = context.shape[0] // len(chunks), context.device
        base = None if context.shape[1] % self.prompt.length else reorder_for(self.base_context, context.shape[1])
        swapped = () if base is None else matching_chunks(context, chunks, base)
        if swapped:
            self.matched = True
        elif 0 in chunks and self.matched is None:
            self.matched = False   # so far no cond chunk of the run is this node's (warned at the run's end)
        patched = patched_chunks(chunks, swapped, self.matched)
        if not patched:
            return None
        user = self.settings.user_mask
        if user is not None and user.shape[0] not in (1, b):
            raise ValueError(f"attn_mask holds {user.shape[0]} masks and the latent batch is {b}: give 1 mask (used "
                             f"for every latent) or one per latent")
        enc = self.encodings(sigma, device)
        kinds = torch.tensor([int(chunks[i] != 0) for i in patched for _ in range(b)], device=device)
        swap = [i in swapped for i in patched for _ in range(b)]
        repeats = context.shape[1] // self.prompt.length
        columns = [[c + self.prompt.length * j for j in range(repeats) for c in self.prompt.columns(s)]
                   for s in range(len(self.subjects))]
        select = row_indices(patched, b, device) if len(patched) < len(chunks) else None
        return ModelCall(
            sigma=sigma, latent=tuple(latent[-2:]), per_chunk=b, chunks=len(patched),
            swapped=tuple(patched.index(i) for i in swapped),
            swap_rows=torch.tensor([i in swapped for i in range(len(chunks)) for _ in range(b)], device=device)[:, None, None],
            contexts=reorder_for(enc.contexts, context.shape[1]).to(device) if swapped else None, select=select,
            visual_tokens=[torch.cat([v, blank]).to(device).index_select(0, kinds)
                           for v, blank in zip(enc.visual, enc.blank_visual)],
            placeholders=[placeholder_columns([c if row else () for row in swap], context.shape[1], device)
                          for c in columns],
            step_masks=self.tracker.mask_for(sigma) if self.settings.use_mask else None)

    def encodings(self, sigma: float, device: torch.device) -> Encodings:
        """S+ contexts and visual tokens of one sigma (or its bucket); encoded with the next sigmas of the run's
        schedule in one batched call when not cached yet."""
        key, _ = encoding_key(sigma, self.timestep_of, self.settings.splus_buckets)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        encoder = self.model.encoder
        dtype = next(encoder.parameters()).dtype
        if self.images is None or self.images[1].features.device != device:
            self.cache.clear()   # encoded for another device
            with torch.no_grad():
                self.images = ([encoder.encode_image(h.to(device, dtype)) for h in self.subjects],
                               encoder.encode_image(self.blank.to(device, dtype)))
        schedule = self.schedule if self.settings.splus_buckets <= 0 else []
        wanted = {}
        for s in window(sigma, schedule, self.active, max(1, cache.PROMPTS_PER_CALL // self.model.config.num_groups)):
            k, t = encoding_key(s, self.timestep_of, self.settings.splus_buckets)
            if k not in self.cache:
                wanted.setdefault(k, t)
        if self.progress is not None and self.bar is None:   # the run's first miss: every timestep it will encode
            todo = {encoding_key(s, self.timestep_of, self.settings.splus_buckets)[0] for s in self.schedule
                    if s > 0 and self.active(s)}
            self.bar = self.progress(len((todo - self.cache.keys()) | wanted.keys()))
        fresh = encode_timesteps(encoder, self.clip, self.prompt, *self.images, list(wanted.values()), device)
        self.encode_calls += 1
        if self.bar is not None:
            self.bar.update(len(wanted))
        self.cache.update(zip(wanted, fresh))
        while len(self.cache) > max(cache.MAX_CACHED, len(wanted)):
            self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]

    def swap_context(self, call: ModelCall, key: tuple, context: Tensor, value: Tensor | None):
        """This layer group's S+ prompt in the rows of the node's prompt. Shapes: context/value (B, L, C)."""
        ours = call.contexts[self.groups[key]].to(context.dtype)                      # (L, C)
        swapped = torch.where(call.swap_rows, ours, context)
        if value is not None and value is not context and value.shape == context.shape:
            return swapped, torch.where(call.swap_rows, ours, value)
        return swapped, swapped   # ComfyUI passes value = context: V comes from the S+ prompt too

    def attention(self, call: ModelCall, key: tuple, q: Tensor, k: Tensor, v: Tensor, heads: int,
                  plain: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """Eq. 3 on the rows the node patches, ``plain`` (ComfyUI's own attention) on the others.
        Shapes: q (B, N, H*D), k/v (B, T, H*D) -> (B, N, H*D)."""
        if call.select is None:
            return self._layer(call, key, q, k, v, heads)
        ours = call.select   # ComfyUI's attention over the whole batch, as unpatched: other rows to the last bit
        out = plain(q, k, v).to(q.dtype)
        return out.index_copy_(0, ours, self._layer(call, key, *(x.index_select(0, ours) for x in (q, k, v)), heads))

    def _layer(self, call: ModelCall, key: tuple, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
        layer, settings = self.layers[key], self.settings
        grid = layer_grid(call.latent, layer.downsample)
        capture = settings.use_mask and layer.downsample in settings.capture_downsample and bool(call.swapped)
        projection = self.model.visual_kv[layer.name]
        branches = []
        for s, tokens in enumerate(call.visual_tokens):
            with torch.no_grad():
                visual_k, visual_v = projection(tokens)                                  # (B', m, H*D) each
            mask = layer_mask(call.step_masks[s] if call.step_masks else None, settings.user_mask, grid)
            if mask is not None and mask.shape[0] > 1:                                # one per latent, in each chunk
                mask = mask[:call.per_chunk].repeat(call.chunks, 1)
            branches.append(SubjectBranch(visual_k, visual_v, gamma=settings.gamma, mask=mask,
                                          placeholder=call.placeholders[s]))
        out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=branches, eps=settings.mask.eps,
                                             capture=capture)
        for s, m in enumerate(maps or ()):
            self.tracker.add(s, per_latent(m, call.swapped, call.per_chunk), grid)
        return out

"""The sampling-time side of CustomContrast: per-layer S+ context swap, patched attention, masks.

One ``SubjectPatch`` holds what an Apply node computed (subjects' CLIP features, the tokenized
prompt) and the per-run state (S+ encodings cached per sigma, the mask tracker). ComfyUI calls
``swap_context`` (an ``attn2_patch``, before the K/V projections) and an ``Attn2Replace`` per block
key (after them), which runs the core's ``customcontrast_attention``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from customcontrast_core.attention import SubjectBranch, SubjectMaps, customcontrast_attention
from customcontrast_core.encoder import ImageFeatures
from customcontrast_core.layers import CrossAttentionLayer
from customcontrast_core.masks import MaskConfig, intersect_user_mask, resize_mask
from customcontrast_core.propagation import MaskTracker
from customcontrast_core.visual_kv import CustomContrastModel

from .text_encode import PlaceholderPrompt, encode_splus, reorder_for


@dataclass(frozen=True)
class ApplySettings:
    """User controls of one Apply node."""

    gamma: float = 1.0                    # weight of the visual branch
    sigma_start: float = float("inf")     # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    use_mask: bool = True                 # timestep masks carried from step t to t-1
    mask: MaskConfig = MaskConfig()
    capture_downsample: tuple[int, ...] = (2, 4)   # 16x16 and 32x32 layers at 512 px
    user_mask: Tensor | None = None       # (1 or B, H, W) intersected with the propagated mask
    splus_buckets: int = 0                # 0: S+ re-encoded at every new sigma (paper); N: N timestep buckets

    def __post_init__(self) -> None:
        if self.sigma_end > self.sigma_start:
            raise ValueError(f"start must come before end: got start sigma {self.sigma_start} < end sigma {self.sigma_end}")


@dataclass
class Encodings:
    """Everything one sigma needs, on the sampling device."""

    contexts: Tensor                 # (G, L, C) prompt with each group's S+ tokens (all subjects)
    visual: list[Tensor]             # per subject (1, m, C) TV-fused visual tokens
    blank_visual: list[Tensor]       # per subject (1, m, C) for uncond rows (blank reference)


@dataclass
class SubjectPatch:
    """What one Apply node installs; shared by every clone of the patched MODEL (weights are immutable)."""

    model: CustomContrastModel
    clip: object                             # ComfyUI CLIP used to encode the S+ prompts
    subjects: list[Tensor]                   # per subject (1, K, T, D) CLIP-vision hidden states
    blank: Tensor                            # (1, K, T, D) hidden states of a blank reference
    prompt: PlaceholderPrompt
    base_context: Tensor                     # (1, L, C) the positive CONDITIONING's context
    layers: dict[tuple, CrossAttentionLayer]
    settings: ApplySettings
    timestep_of: Callable[[Tensor], Tensor]  # sigma -> model timestep (model_sampling.timestep)
    cache: dict[float, Encodings] = field(default_factory=dict)
    tracker: MaskTracker | None = None
    last_masks: list[tuple[float, list[Tensor]]] = field(default_factory=list)
    _images: list[ImageFeatures] | None = None
    _blank: ImageFeatures | None = None
    _swapped: Tensor | None = None
    _sigma: float | None = None

    def __post_init__(self) -> None:
        self.tracker = MaskTracker(self.settings.mask, num_subjects=len(self.subjects))

    def __deepcopy__(self, memo) -> "SubjectPatch":
        return self   # ModelPatcher.clone deep-copies model_options: share weights and state

    # per-run state

    def reset(self) -> None:
        """Starts a sampling run: forgets cached encodings and masks of the previous run."""
        if self.tracker is not None and self.tracker.masks:
            self.last_masks = self.tracker.history()
        self.cache.clear()
        self.tracker.reset()
        self._sigma = None

    def finish(self) -> None:
        self.last_masks = self.tracker.history()

    def active(self, sigma: float) -> bool:
        return self.settings.sigma_end <= sigma <= self.settings.sigma_start

    def _cache_key(self, sigma: float) -> tuple[float, Tensor]:
        """The cache key and the timestep to encode: the sigma's own, or the centre of its bucket."""
        t = self.timestep_of(torch.tensor([sigma])).float()
        n = self.settings.splus_buckets
        if n <= 0:
            return sigma, t
        width = 1000.0 / n
        bucket = min(int(t.item() // width), n - 1)
        return float(-1 - bucket), torch.tensor([(bucket + 0.5) * width])   # negative keys: never a real sigma

    def encodings(self, sigma: float, device: torch.device) -> Encodings:
        """S+ contexts and visual tokens for one sigma (or its bucket), computed once per sampling run."""
        key, timestep = self._cache_key(sigma)
        if key in self.cache:
            return self.cache[key]
        encoder = self.model.encoder
        dtype = next(encoder.parameters()).dtype
        with torch.no_grad():
            if self._images is None or self._images[0].features.device != device:
                self._images = [encoder.encode_image(h.to(device, dtype)) for h in self.subjects]
                self._blank = encoder.encode_image(self.blank.to(device, dtype))
            t = timestep.to(device, dtype)
            subject = [encoder.encode_timestep(image, t) for image in self._images]
            blank = encoder.encode_timestep(self._blank, t)
            contexts, _ = encode_splus(self.clip, self.prompt, [s.splus[0] for s in subject])
        enc = Encodings(contexts=contexts.to(device), visual=[s.visual_tokens for s in subject],
                        blank_visual=[blank.visual_tokens] * len(subject))
        self.cache[key] = enc
        return enc

    def _begin(self, extra_options: dict) -> float:
        sigma = float(extra_options["sigmas"].detach().flatten()[0])
        if sigma != self._sigma:
            self._sigma = sigma
            if self.settings.use_mask:
                self.tracker.begin(sigma)
        return sigma

    # attn2_patch: swap the cond context for this layer's S+ prompt

    def swap_context(self, n: Tensor, context: Tensor, value: Tensor | None, extra_options: dict):
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        self._swapped = None
        layer = self.layers.get(key)
        if layer is None:
            return n, context, value
        sigma = self._begin(extra_options)
        if not self.active(sigma):
            return n, context, value
        chunks = extra_options["cond_or_uncond"]
        b = context.shape[0] // len(chunks)
        base = reorder_for(self.base_context.to(context.device, context.dtype), context.shape[1])[0]
        swap = torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
        for i, kind in enumerate(chunks):
            rows = slice(i * b, (i + 1) * b)
            if kind == 0 and torch.allclose(context[rows], base.expand(b, -1, -1), atol=1e-2, rtol=1e-2):
                swap[rows] = True
        if not swap.any():
            return n, context, value
        enc = self.encodings(sigma, context.device)
        group = self.model.config.layer_groups[[l.name for l in self.model.config.layers].index(layer.name)]
        ours = reorder_for(enc.contexts[group:group + 1], context.shape[1]).to(context.dtype)
        swapped = torch.where(swap[:, None, None], ours.expand_as(context), context)
        if value is not None and value is not context and value.shape == context.shape:
            value = torch.where(swap[:, None, None], ours.expand_as(value), value)
        else:
            value = swapped   # ComfyUI passes value = context: V must come from the S+ prompt too
        self._swapped = swap
        return n, swapped, value

    # attn2 replace: text attention with placeholder bias + masked visual branches

    def attention(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor | None:
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        layer = self.layers.get(key)
        if layer is None or self._sigma is None or not self.active(self._sigma):
            return None
        enc = self.encodings(self._sigma, q.device)
        chunks = extra_options["cond_or_uncond"]
        b = q.shape[0] // len(chunks)
        cond_rows = torch.tensor([kind == 0 for kind in chunks for _ in range(b)], device=q.device)
        text_rows = self._swapped if self._swapped is not None else torch.zeros_like(cond_rows)
        h, w = extra_options["activations_shape"][-2:]
        masks = self.tracker.mask_for(self._sigma) if self.settings.use_mask else None
        repeats = k.shape[1] // self.prompt.length
        branches = []
        for s in range(len(self.subjects)):
            tokens = torch.cat([(enc.visual[s] if kind == 0 else enc.blank_visual[s]).expand(b, -1, -1)
                                for kind in chunks]).to(q.dtype)
            visual_k, visual_v = self.model.visual_kv[layer.name](tokens.to(self.model.encoder.proj_in.weight.dtype))
            mask = self._layer_mask(masks[s] if masks else None, (h, w), b, len(chunks), q.device)
            columns = tuple(c + self.prompt.length * j for j in range(repeats) for c in self.prompt.columns(s))
            branches.append(SubjectBranch(visual_k.to(q.dtype), visual_v.to(q.dtype), gamma=self.settings.gamma,
                                          mask=mask, columns=columns, text_rows=text_rows))
        capture = self.settings.use_mask and layer.downsample in self.settings.capture_downsample and bool(text_rows.any())
        out, maps = customcontrast_attention(q, k, v, heads=extra_options["n_heads"], subjects=branches,
                                             eps=self.settings.mask.eps, capture=capture)
        if maps:
            for s, m in enumerate(maps):
                self.tracker.add(s, _per_latent(m, text_rows, b), (h, w))
        return out

    def _layer_mask(self, mask: Tensor | None, grid: tuple[int, int], b: int, n_chunks: int,
                    device: torch.device) -> Tensor | None:
        user = self.settings.user_mask
        if mask is None and user is None:
            return None
        if mask is None:
            mask = torch.ones(1, *grid, device=device)
        mask = mask.to(device)
        if user is not None:
            mask = intersect_user_mask(mask, user.to(device))
        flat = resize_mask(mask, grid)                          # (B or 1, N)
        flat = flat.expand(b, -1) if flat.shape[0] == 1 else flat[:b]
        return flat.repeat(n_chunks, 1)


def _per_latent(maps: SubjectMaps, text_rows: Tensor, b: int) -> SubjectMaps:
    """Averages the maps of the swapped (cond) chunks into one map per latent. Shapes: (B_total, N) -> (B, N)."""
    rows = text_rows.view(-1, b)[:, 0]
    text = maps.text.view(-1, b, maps.text.shape[-1])[rows].mean(0)
    visual = maps.visual.view(-1, b, maps.visual.shape[-1])[rows].mean(0)
    return SubjectMaps(text=text, visual=visual)


class Attn2Replace:
    """The ``attn2`` replace of one block key: every chained CustomContrast patch, plus IPAdapter callbacks.

    Duck-type compatible with ComfyUI_IPAdapter_plus' ``Attn2Replace`` (``callback``/``kwargs`` lists and
    ``add``), so IPAdapter applied after CustomContrast chains its callbacks here instead of failing.
    """

    def __init__(self, patches: Sequence[SubjectPatch] = (), callback: Sequence = (), kwargs: Sequence = ()) -> None:
        self.patches = list(patches)
        self.callback = list(callback)
        self.kwargs = list(kwargs)

    def __deepcopy__(self, memo) -> "Attn2Replace":
        return Attn2Replace(self.patches, self.callback, self.kwargs)

    def add(self, callback, **kwargs) -> None:
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def with_patch(self, patch: SubjectPatch) -> "Attn2Replace":
        return Attn2Replace([*self.patches, patch], self.callback, self.kwargs)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        out = None
        for patch in self.patches:
            result = patch.attention(q, k, v, extra_options)
            if result is not None:
                out = result if out is None else out + (result - _plain(q, k, v, extra_options))
        if out is None:
            out = _plain(q, k, v, extra_options)
        out = out.to(q.dtype)
        if self.callback:
            sigma = float(extra_options["sigmas"].detach().flatten()[0])
            for callback, kwargs in zip(self.callback, self.kwargs):
                if kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", float("inf")):
                    out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def _plain(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
    from comfy.ldm.modules.attention import optimized_attention
    return optimized_attention(q, k, v, extra_options["n_heads"], transformer_options=extra_options)

"""The sampling-time side of CustomContrast: per-layer S+ context swap, patched attention, masks.

One ``SubjectPatch`` holds what an Apply node computed (subjects' CLIP features, the tokenized
prompt), the S+ encodings cached per sigma (kept for the next run when it used them), and the
per-run state (the mask tracker). ComfyUI calls
``swap_context`` (an ``attn2_patch``, before the K/V projections) and an ``Attn2Replace`` per block
key (after them), which runs the core's ``customcontrast_attention``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from customcontrast_core.attention import (
    SubjectBranch,
    SubjectMaps,
    customcontrast_attention,
    placeholder_bias,
    placeholder_probe,
)
from customcontrast_core.encoder import ImageFeatures
from customcontrast_core.layers import CrossAttentionLayer
from customcontrast_core.masks import MaskConfig
from customcontrast_core.propagation import MaskTracker
from customcontrast_core.visual_kv import CustomContrastModel

from .encodings import PROMPTS_PER_CALL, Encodings, RecentUse, encode_timesteps, encoding_key, window
from .evaluation import Evaluation as _Evaluation
from .evaluation import per_latent as _per_latent
from .replace import Attn2Replace, sigma_of, unpatched_attention
from .rows import check_user_mask, make_rows, matching_chunks, patched_chunks
from .text_encode import PlaceholderPrompt, reorder_for

log = logging.getLogger("customcontrast")

__all__ = ["ApplySettings", "Attn2Replace", "Encodings", "PlaceholderPrompt", "SubjectPatch", "sigma_of"]


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
    encode_calls: int = 0                    # batched text-encoder calls since the last reset
    recent: RecentUse = field(default_factory=RecentUse)   # which cached encodings the last runs used
    _images: list[ImageFeatures] | None = None
    _blank: ImageFeatures | None = None
    _eval: _Evaluation | None = None
    _schedule: tuple[Tensor | None, list[float]] = (None, [])
    _base: dict = field(default_factory=dict)
    _keys: dict = field(default_factory=dict)   # sigma -> (cache key, timestep): timestep_of reads the device
    _rows: dict = field(default_factory=dict)   # (chunks, swapped, rows per chunk, device) -> swap, its view, kinds
    _swapped: dict = field(default_factory=dict)   # (uuids, chunks, rows per chunk, length) -> swapped chunks
    _checked: set = field(default_factory=set)  # (layer key, q shape, k shape, capture, no mask) checked once
    _matched: bool | None = None                # whether a cond chunk of this run was this node's (None: none seen)

    def __post_init__(self) -> None:
        self.tracker = MaskTracker(self.settings.mask, num_subjects=len(self.subjects))
        config = self.model.config
        group_of = {layer.name: group for layer, group in zip(config.layers, config.layer_groups)}
        self.groups = {key: group_of[layer.name] for key, layer in self.layers.items()}
        self._projections = dict(self.model.visual_kv.items())   # a dict lookup per layer (ModuleDict's is slower)

    def __deepcopy__(self, memo) -> "SubjectPatch":
        return self   # ModelPatcher.clone deep-copies model_options: share weights and state

    # per-run state

    def reset(self) -> None:
        """Starts a sampling run: forgets the masks of the previous run and the encodings that the last
        runs did not use (a sigma's encodings are the same in every run of this patch: ``RecentUse``)."""
        if self.tracker is not None and self.tracker.masks:
            self.last_masks = self.tracker.history()
        self.recent.start_run(self.cache, self._keys)
        self._swapped.clear()   # ComfyUI names the conditionings anew in every run
        self._matched = None
        self.tracker.reset()
        self.encode_calls = 0
        self._eval = None
        self._schedule = (None, [])

    def finish(self) -> None:
        self.last_masks = self.tracker.history()
        if self._matched is False:
            log.warning("CustomContrast: no positive conditioning of this run is the 'positive' output of the Apply "
                        "CustomContrast node that patched the MODEL: its subject was not drawn (the sampler's "
                        "positive must be that output, alone or combined with others)")

    def active(self, sigma: float) -> bool:
        return self.settings.sigma_end <= sigma <= self.settings.sigma_start

    def _schedule_of(self, extra_options: dict) -> list[float]:
        """The run's sigmas as floats (one device read per run), or [] when ComfyUI gives none."""
        sigmas = extra_options.get("sample_sigmas")
        if sigmas is None:
            return []
        if sigmas is not self._schedule[0]:
            self._schedule = (sigmas, [float(s) for s in sigmas.detach().flatten().cpu()])
        return self._schedule[1]

    def encodings(self, sigma: float, device: torch.device, extra_options: dict | None = None,
                  prepare: tuple[int, torch.dtype] | None = None) -> Encodings:
        """S+ contexts and visual tokens of one sigma (or its bucket); encoded with the next sigmas of the
        schedule in one batched call when the sigma is not cached yet (see ``encodings.py``), their
        contexts copied to ``device`` as ``prepare = (length, dtype)`` in one transfer when given."""
        buckets = self.settings.splus_buckets
        key, _ = self._key(sigma)
        self.recent.mark(key)
        if key in self.cache:
            return self.cache[key]
        encoder = self.model.encoder
        dtype = next(encoder.parameters()).dtype
        if self._images is None or self._images[0].features.device != device:
            self.cache.clear()   # encoded for another device
            with torch.no_grad():
                self._images = [encoder.encode_image(h.to(device, dtype)) for h in self.subjects]
                self._blank = encoder.encode_image(self.blank.to(device, dtype))
        schedule = self._schedule_of(extra_options or {}) if buckets <= 0 else []
        per_call = max(1, PROMPTS_PER_CALL // self.model.config.num_groups)
        sigmas = window(sigma, schedule, self.active, per_call)
        keys = {}
        for s in sigmas:
            k, t = self._key(s)
            if k not in self.cache:
                keys.setdefault(k, t)
        fresh = encode_timesteps(encoder, self.clip, self.prompt, self._images, self._blank,
                                 list(keys.values()), device, prepare)
        self.encode_calls += 1
        self.cache.update(zip(keys, fresh))
        self.recent.added(self.cache, self._keys, keys)
        return self.cache[key]

    def _key(self, sigma: float) -> tuple[float, float]:
        if sigma not in self._keys:
            self._keys[sigma] = encoding_key(sigma, self.timestep_of, self.settings.splus_buckets)
        return self._keys[sigma]

    def _encodings_of(self, ev: _Evaluation, device: torch.device, extra_options: dict,
                      prepare: tuple[int, torch.dtype] | None = None) -> Encodings:
        """The evaluation's encodings, looked up once by its first layer."""
        if ev.encodings is None:
            ev.encodings = self.encodings(ev.sigma, device, extra_options, prepare)
        return ev.encodings

    def _evaluation(self, extra_options: dict) -> _Evaluation:
        """This evaluation's shared state; starts a new one (and the mask tracker's step) when sigmas change."""
        sigmas = extra_options["sigmas"]
        if self._eval is None or sigmas is not self._eval.sigmas:
            sigma = sigma_of(extra_options)
            previous = self._eval.sigma if self._eval is not None else None
            self._eval = _Evaluation(sigmas=sigmas, sigma=sigma)
            if sigma != previous and self.settings.use_mask:
                self.tracker.begin(sigma)
            if self.settings.use_mask:
                self._eval.step_masks = self.tracker.mask_for(sigma)
        return self._eval

    def _base_for(self, context: Tensor) -> Tensor | None:
        """The positive conditioning at the batch's context length; None if that is no multiple of the prompt's."""
        if context.shape[1] % self.base_context.shape[1]:
            return None
        key = (context.device, context.dtype, context.shape[1])
        if key not in self._base:
            self._base[key] = reorder_for(self.base_context.to(context.device, context.dtype), context.shape[1])[0]
        return self._base[key]

    def _check_rows(self, ev: _Evaluation, context: Tensor, chunks: tuple[int, ...], uuids: tuple = ()) -> _Evaluation:
        """Finds the cond chunks that carry this Apply node's prompt: compared with the positive conditioning
        once per evaluation, or once per run for the conditionings ComfyUI names (``uuids``, one per chunk), and
        the rows the node patches (``rows.py``). Returns the evaluation's state for these rows: a fresh one (same
        sigma and encodings) when they change."""
        if ev.context is context and ev.chunks == chunks:
            return ev
        b = context.shape[0] // len(chunks)
        named = (uuids, chunks, b, context.shape[1]) if len(uuids) == len(chunks) else None
        swapped = self._swapped.get(named) if named is not None else None
        if swapped is None:
            base = self._base_for(context)
            swapped = () if base is None else matching_chunks(context, chunks, base)
            if named is not None:
                self._swapped[named] = swapped
        if swapped:
            self._matched = True
        elif 0 in chunks and self._matched is None:
            self._matched = False   # so far no cond chunk of the run is this node's (warned at the run's end)
        patched = patched_chunks(chunks, swapped, self._matched)
        key = (chunks, swapped, patched, b, context.device)
        if key not in self._rows:   # the same every step of a run: built (and copied to the device) once
            check_user_mask(self.settings.user_mask, b)
            self._rows[key] = make_rows(chunks, swapped, patched, b, context.device)
        rows = self._rows[key]
        if ev.context is not None:   # everything derived from the previous rows goes with them
            ev = self._eval = _Evaluation(sigmas=ev.sigmas, sigma=ev.sigma, encodings=ev.encodings,
                                          step_masks=ev.step_masks)
        ev.context, ev.chunks, ev.batch = context, chunks, context.shape[0]
        ev.swap_rows, ev.probes = rows.swap_rows, rows.probes
        if patched:
            ev.select, ev.swap, ev.kinds, ev.swapped_chunks = rows.select, rows.swap, rows.kinds, rows.swapped_chunks
            ev.patched, ev.per_chunk = rows.chunks, rows.per_chunk
        return ev

    # attn2_patch: swap the cond context for this layer's S+ prompt

    def swap_context(self, n: Tensor, context: Tensor, value: Tensor | None, extra_options: dict):
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        if key not in self.layers:
            return n, context, value
        ev = self._evaluation(extra_options)
        if not self.active(ev.sigma):
            return n, context, value
        ev = self._check_rows(ev, context, tuple(extra_options["cond_or_uncond"]), tuple(extra_options.get("uuids") or ()))
        if not ev.swapped_chunks:
            return n, context, value
        prepared = (context.shape[1], context.dtype)
        enc = self._encodings_of(ev, context.device, extra_options, prepared)
        group = self.groups[key]
        contexts = enc.contexts_for(context.device, *prepared)          # (G, L, C): every group on the device
        swapped = ev.swapped.get(prepared)
        if swapped is None:   # every group's swapped context in one where per evaluation (not one per layer)
            swapped = ev.swapped[prepared] = torch.where(ev.swap_rows, contexts[:, None], context).unbind(0)
        ours = swapped[group]                                                  # (B, L, C)
        if value is not None and value is not context and value.shape == context.shape:
            value = torch.where(ev.swap_rows, contexts[group:group + 1], value)
        else:
            value = ours   # ComfyUI passes value = context: V must come from the S+ prompt too
        return n, ours, value

    # attn2 replace: text attention with placeholder bias + masked visual branches

    def attention(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor | None:
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        layer = self.layers.get(key)
        ev = self._eval
        if layer is None or ev is None or not self.active(ev.sigma):
            return None
        if ev.kinds is None or ev.chunks != tuple(extra_options["cond_or_uncond"]) or ev.batch != q.shape[0]:
            return None   # no row of this batch is the node's, or the swap did not see this batch: leave the layer
        if ev.select is None:
            return self._patched(ev, key, layer, q, k, v, extra_options)
        # other cond chunks (another prompt, another Apply node's): the unpatched attention on their rows
        ours, others = ev.select
        out = torch.empty_like(q)
        out.index_copy_(0, ours, self._patched(ev, key, layer, *(x.index_select(0, ours) for x in (q, k, v)),
                                               extra_options).to(q.dtype))
        plain = unpatched_attention(*(x.index_select(0, others) for x in (q, k, v)), extra_options)
        return out.index_copy_(0, others, plain.to(q.dtype))

    def _patched(self, ev: _Evaluation, key: tuple, layer: CrossAttentionLayer, q: Tensor, k: Tensor, v: Tensor,
                 extra_options: dict) -> Tensor:
        """The layer on the rows the node patches. Shapes: q (B', N, H*D), k/v (B', T, H*D) -> (B', N, H*D)."""
        enc = self._encodings_of(ev, q.device, extra_options)
        b = ev.per_chunk
        h, w = extra_options["activations_shape"][-2:]
        masks = ev.step_masks
        subjects = range(len(self.subjects))
        columns = ev.columns.get(k.shape[1])
        if columns is None:
            repeats, length = k.shape[1] // self.prompt.length, self.prompt.length
            columns = ev.columns[k.shape[1]] = [
                tuple(c + length * j for j in range(repeats) for c in self.prompt.columns(s)) for s in subjects]
        capture = self.settings.use_mask and layer.downsample in self.settings.capture_downsample \
            and bool(ev.swapped_chunks)
        heads, projection = extra_options["n_heads"], self._projections[layer.name]
        # capture layers compute in fp32, the others in the UNet's dtype: visual K/V, masks and bias are made once
        # per evaluation in each dtype, not once per layer
        dtype = torch.float32 if capture else q.dtype
        user = self.settings.user_mask
        layer_masks = [ev.layer_mask(s, masks[s] if masks else None, user, (h, w), q.device, dtype)
                       for s in subjects]
        # the same shapes in every step: checked by the first evaluation of a run, trusted afterwards
        shapes = (key, q.shape, k.shape, capture, masks is None)
        check = shapes not in self._checked
        make = SubjectBranch if check else SubjectBranch.unchecked
        gamma, kv_of = self.settings.gamma, ev.visual_kv_of
        branches = [make(*kv_of(self.model.visual_kv, enc, layer.name, s, dtype, q.device), gamma, layer_masks[s],
                         columns[s], ev.swap, visual_k_heads=ev.visual_k_heads_of(layer.name, s, dtype, heads)
                         if capture else None) for s in subjects]
        bias_key = ((h, w), k.shape[1], dtype)
        bias = ev.biases.get(bias_key, False)
        if bias is False:   # (B, 1, N, T): broadcast over heads
            bias = placeholder_bias(branches, q.shape[0], q.shape[1], k.shape[1], self.settings.mask.eps,
                                    q.device, dtype, columns=self._columns(ev, branches, q, k.shape[1])[:, 0])
            bias = ev.biases[bias_key] = None if bias is None else bias[:, None]
        probe = None
        if capture:   # (B, H, T, P): expanded over heads once per run
            probe = ev.probes.get((k.shape[1], heads))
            if probe is None:
                probe = ev.probes[(k.shape[1], heads)] = self._columns(ev, branches, q, k.shape[1]).expand(
                    -1, heads, -1, -1)
        out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=branches, eps=self.settings.mask.eps,
                                             capture=capture, bias=bias, probe=probe, validate=check)
        if check:
            self._checked.add(shapes)
        if maps:
            for s, m in enumerate(maps):
                self.tracker.add(s, _per_latent(m, ev.swapped_chunks, b), (h, w))
        return out

    @staticmethod
    def _columns(ev: _Evaluation, branches: list[SubjectBranch], q: Tensor, keys: int) -> Tensor:
        """Each subject's placeholder columns in its text rows (``placeholder_probe``: the capture layers' probe
        channels, the bias's key factor), kept with the rows of the run. Shapes: -> (B, 1, T, P)."""
        columns = ev.probes.get(keys)
        if columns is None:
            columns = ev.probes[keys] = placeholder_probe(branches, q.shape[0], keys, q.device)
        return columns

"""CUDA-graph mode of the sampling patch: each patched layer's attention replayed as one graph.

Off by default (``ApplySettings.cuda_graphs``). Per model evaluation, what every layer shares (each
subject's visual tokens, which rows are cond/uncond, the masks of each grid) is copied once into static
buffers; each layer's graph reads those and its own static q, k, v and computes the visual K/V
projection, the placeholder bias and both attention branches; capture layers also add their maps to
per-grid sums (static accumulators that the grid's first capture layer writes and the others add to,
handed to the mask tracker when the next evaluation starts). A layer then costs one copy of q, k and v
(``copy_into``: one launch for the three) and one replay instead of a few dozen launches. Static inputs
and outputs are shared by the graphs of equal shapes: ComfyUI consumes ``out`` (``to_out``) before the
next layer replays. A key that cannot be captured runs eagerly from then on (logged once).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from customcontrast_core.attention import SubjectBranch, SubjectMaps, customcontrast_attention
from customcontrast_core.graphs import StaticCall, replay
from customcontrast_core.visual_kv import KVProjection

from .stacked_kv import LayerKV, weight_signature


MAX_GRAPHS = 512   # graphs kept per patch (layers x shapes x first-step/masked variants); beyond, the next
                   # evaluation starts afresh (graphs and buffers of earlier resolutions are released)


class LayerGraphs:
    """The graphs of one ``SubjectPatch`` and the static buffers they read and write; ``emulate`` re-runs
    them (CPU tests). All graphs share one memory pool and one capture stream."""

    def __init__(self, emulate: bool = False) -> None:
        self.emulate = emulate
        self.buffers: dict[tuple, Tensor] = {}          # (name, shape, dtype, device) -> static buffer
        self.calls: dict[tuple, StaticCall | None] = {}  # None: capture failed, the key runs eagerly
        self.captures = 0
        self._fresh: tuple[object, dict] = (None, {})
        self._pool = self._stream = None

    def usable(self, q: Tensor, weight: Tensor) -> bool:
        """Whether the layer can replay: q on CUDA with the projection's ``weight`` (emulated: always)."""
        return self.emulate or (q.is_cuda and weight.device == q.device)

    def _fresh_of(self, evaluation: object) -> dict:
        """The values already made static in this evaluation; a new evaluation starts with none (and, past
        MAX_GRAPHS graphs, without any graph or buffer)."""
        if self._fresh[0] is not evaluation:
            if len(self.calls) >= MAX_GRAPHS:
                self.calls.clear()
                self.buffers.clear()
            self._fresh = (evaluation, {})
        return self._fresh[1]

    def start(self, evaluation: object) -> None:
        """Marks the evaluation the next buffers belong to (past MAX_GRAPHS graphs, it starts afresh)."""
        self._fresh_of(evaluation)

    def static(self, evaluation: object, name: tuple, make: Callable[[], Tensor | None]) -> Tensor | None:
        """The static buffer holding ``make()`` of this evaluation: computed and copied once per evaluation,
        the same tensor in every evaluation whose value has the same shape, dtype and device."""
        fresh = self._fresh_of(evaluation)
        if name not in fresh:
            value = make()
            fresh[name] = None if value is None else self.buffer(name, value.shape, value.dtype,
                                                                 value.device).copy_(value)
        return fresh[name]

    def buffer(self, name: tuple, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The persistent buffer ``name`` of that shape, dtype and device (allocated at first use)."""
        signature = (name, tuple(shape), dtype, device)
        if signature not in self.buffers:
            self.buffers[signature] = torch.empty(tuple(shape), dtype=dtype, device=device)
        return self.buffers[signature]

    def attention(self, key: tuple, q: Tensor, k: Tensor, v: Tensor, *, heads: int, projection: KVProjection | LayerKV,
                  tokens: Sequence[Tensor], kinds: Tensor, rows: Tensor, masks: Sequence[Tensor | None],
                  columns: Sequence[tuple[int, ...]], gamma: float, eps: float,
                  sums: Sequence[tuple[Tensor, Tensor]] = (), assign: bool = False) -> Tensor:
        """One layer of ``customcontrast_attention`` through its graph (captured at the first call of a new key).

        Shapes: q (B, N, H*D), k/v (B, T, H*D); tokens per subject (2, m, C) (subject; blank reference),
        kinds (B,) long (0 cond, 1 uncond row), rows (B,) bool, masks per subject (B, N) or None. With
        ``sums`` (per subject: text and visual (B, N) fp32 accumulators) the layer captures its maps and
        adds them to the accumulators (``assign``: writes them, for the first capture layer of a grid).
        """
        capture = bool(sums)
        statics = (*tokens, kinds, rows, *(m for m in masks if m is not None), *(t for pair in sums for t in pair))
        graph_key = (key, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, heads, capture, assign,
                     tuple(m is None for m in masks), tuple(columns), gamma, eps, weight_signature(projection),
                     tuple(id(t) for t in statics))
        args = (heads, projection, tokens, kinds, rows, masks, columns, gamma, eps, sums, assign)
        outputs = replay(self.calls, graph_key, lambda: self._capture(q, k, v, *args), lambda call: (q, k, v),
                         f"layer {key}")
        return _attention(q, k, v, *args)[0] if outputs is None else outputs[0]

    def _capture(self, q: Tensor, k: Tensor, v: Tensor, *args) -> StaticCall:
        # inputs and outputs live in buffers shared by every graph of the same shapes (the layers run one
        # after another and each output is consumed before the next replay): memory of one layer per shape
        sq, sk, sv = (self.buffer((name,), x.shape, x.dtype, x.device).copy_(x)
                      for name, x in (("q", q), ("k", k), ("v", v)))
        *layer, sums, assign = args
        target = self.buffer(("out",), q.shape, q.dtype, q.device)
        scratch = [(torch.zeros_like(text), torch.zeros_like(visual)) for text, visual in sums]

        def run() -> tuple[Tensor, ...]:
            return (target.copy_(_attention(sq, sk, sv, *layer, sums, assign)[0]),)

        def warmup() -> None:   # the same kernels, writing into scratch buffers
            _attention(sq, sk, sv, *layer, scratch, assign)

        if not self.emulate and self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(q.device)
        call = StaticCall(run, (sq, sk, sv), emulate=self.emulate, warmup=warmup, pool=self._pool, stream=self._stream)
        self.captures += 1
        return call


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int, projection: KVProjection | LayerKV,
               tokens: Sequence[Tensor],
               kinds: Tensor, rows: Tensor, masks: Sequence[Tensor | None], columns: Sequence[tuple[int, ...]],
               gamma: float, eps: float, sums: Sequence[tuple[Tensor, Tensor]],
               assign: bool = False) -> tuple[Tensor, list[SubjectMaps] | None]:
    """The layer's work from static inputs: visual K/V of each subject for each row, the patched attention,
    and with ``sums`` each subject's maps added to its accumulators (written to them with ``assign``)."""
    branches = []
    with torch.no_grad():
        for subject_tokens, mask, cols in zip(tokens, masks, columns):
            visual_k, visual_v = projection(subject_tokens)                    # (2, m, inner) each
            branches.append(SubjectBranch(visual_k.to(q.dtype).index_select(0, kinds),
                                          visual_v.to(q.dtype).index_select(0, kinds),
                                          gamma=gamma, mask=mask, columns=cols, text_rows=rows))
        out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=branches, eps=eps, capture=bool(sums))
        for (text, visual), m in zip(sums, maps or ()):
            if assign:
                text.copy_(m.text)
                visual.copy_(m.visual)
            else:
                text.add_(m.text)
                visual.add_(m.visual)
        return out, maps

"""The ``attn2`` replace ComfyUI calls per block key, and the per-evaluation sigma reader it shares.

Several Apply nodes chain into one ``Attn2Replace``; IPAdapter_plus, applied after them, adds its
callbacks to the same object (duck-typed like its own ``Attn2Replace``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .patch import SubjectPatch


class _SigmaOf:
    """``extra_options["sigmas"]`` as a float, read from the device once per tensor: every layer of one model
    evaluation is handed the same tensor, so the per-layer patches never wait for the GPU."""

    def __init__(self) -> None:
        self._tensor: Tensor | None = None
        self._value = 0.0

    def __call__(self, extra_options: dict) -> float:
        sigmas = extra_options["sigmas"]
        if sigmas is not self._tensor:
            self._tensor, self._value = sigmas, float(sigmas.detach().flatten()[0])
        return self._value


sigma_of = _SigmaOf()


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
                out = result if out is None else out + (result - unpatched_attention(q, k, v, extra_options))
        if out is None:
            out = unpatched_attention(q, k, v, extra_options)
        out = out.to(q.dtype)
        if self.callback:
            sigma = sigma_of(extra_options)
            for callback, kwargs in zip(self.callback, self.kwargs):
                if kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", float("inf")):
                    out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def unpatched_attention(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
    """ComfyUI's own cross-attention of the layer (what the replace would run without a patch)."""
    from comfy.ldm.modules.attention import optimized_attention
    return optimized_attention(q, k, v, extra_options["n_heads"], transformer_options=extra_options)

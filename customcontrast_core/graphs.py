"""One replayable unit of GPU work: a function of static tensors captured once as a CUDA graph.

A patched cross-attention layer launches a few dozen small kernels; on a fast GPU their launch cost,
not their arithmetic, is what the patch adds to sampling. ``StaticCall`` captures such a function
once and replays it with one launch. The function must read only tensors that stay allocated (its
static inputs and buffers the caller refreshes in place) and must not read device values on the
host: both are CUDA graph rules, and the CPU emulation enforces the second and reproduces the first.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CaptureError", "StaticCall", "copy_into", "replay"]

log = logging.getLogger("customcontrast")

# Operators that copy a device value to the host (or build a tensor from host data): not capturable.
HOST_READS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
                        "aten::allclose", "aten::equal", "aten::lift_fresh"})


class CaptureError(RuntimeError):
    """The function cannot be captured (it reads a device value on the host, or CUDA refused the capture)."""


class _ForbidHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_READS:
            raise CaptureError(f"{func._schema.name} reads a device value on the host: it cannot run inside a "
                               "CUDA graph (compute it before the capture and pass it as a static tensor)")
        return func(*args, **(kwargs or {}))


def copy_into(statics: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """Copies each value into its static tensor (values that are their static tensor already are skipped):
    with one ``torch._foreach_copy_`` when they share device, dtype and layout (one kernel on CUDA for all of
    them, as its fused path requires), else one copy each."""
    pairs = [(static, value) for static, value in zip(statics, values) if value is not static]
    if len(pairs) > 1 and all(static.dtype == value.dtype == pairs[0][0].dtype and static.device == value.device
                              == pairs[0][0].device and static.stride() == value.stride() and value.is_contiguous()
                              for static, value in pairs):
        torch._foreach_copy_([static for static, _ in pairs], [value for _, value in pairs])
        return
    for static, value in pairs:
        static.copy_(value)


class StaticCall:
    """Runs ``fn`` (no arguments; it reads ``inputs`` and other tensors it closes over) as one replayable unit.

    ``call(*values)`` copies each value into its static input (:func:`copy_into`: one launch for all of them
    where they share dtype and layout) and replays; it returns ``fn``'s outputs,
    the same tensors at every call, so read or copy them before the next call of any ``StaticCall``
    sharing the pool. On CUDA ``warmup`` (default ``fn``; give a side-effect-free twin when ``fn`` writes
    to buffers it does not return) runs once eagerly on a side stream, so lazy initialisation stays out
    of the graph, and ``fn`` is captured into a ``torch.cuda.CUDAGraph``; it runs only at replays. With
    ``emulate=True`` (CPU, tests) ``fn`` runs at every call, its first results become the static outputs
    and later ones are copied into them: what it reads and writes and what the caller sees are those of
    a replay, and host reads inside ``fn`` raise as in a capture.
    """

    def __init__(self, fn: Callable[[], Sequence[Tensor]], inputs: Sequence[Tensor], *, emulate: bool = False,
                 warmup: Callable[[], object] | None = None, pool=None,
                 stream: torch.cuda.Stream | None = None) -> None:
        self.fn, self.inputs, self.graph = fn, tuple(inputs), None
        self.outputs: tuple[Tensor, ...] | None = None
        if emulate:
            return
        device = self.inputs[0].device
        if device.type != "cuda":
            raise CaptureError(f"CUDA graphs need CUDA tensors, got inputs on {device} (use emulate=True on the CPU)")
        stream = stream if stream is not None else torch.cuda.Stream(device)
        torch.cuda.synchronize(device)   # as torch.cuda.graph does: no pending work overlaps the capture
        stream.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                (warmup or fn)()
                # thread_local: work that other threads (ComfyUI's offloading) start meanwhile is not refused
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    outputs = tuple(fn())
                finally:
                    graph.capture_end()
        except RuntimeError as error:
            raise CaptureError(f"CUDA graph capture failed: {error}") from error
        finally:
            torch.cuda.current_stream(device).wait_stream(stream)
        self.graph, self.outputs = graph, outputs

    def __call__(self, *values: Tensor) -> tuple[Tensor, ...]:
        if len(values) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} input tensors, got {len(values)}")
        for index, (static, value) in enumerate(zip(self.inputs, values)):
            if value.shape != static.shape:
                raise ValueError(f"input {index}: expected shape {tuple(static.shape)} (the captured one), "
                                 f"got {tuple(value.shape)}")
        copy_into(self.inputs, values)   # callers may fill the static inputs themselves (those are skipped)
        if self.graph is not None:
            self.graph.replay()
        elif self.outputs is None:
            with _ForbidHostReads():
                self.outputs = tuple(self.fn())
        else:
            for static, value in zip(self.outputs, self.fn()):
                static.copy_(value)
        return self.outputs


def replay(calls: dict, key: Hashable, make: Callable[[], StaticCall],
           values: Callable[[StaticCall], Sequence[Tensor]], what: str) -> tuple[Tensor, ...] | None:
    """Runs the ``StaticCall`` of ``key`` in ``calls`` on ``values(call)``, made by ``make()`` at the key's first
    use. Returns None when the key cannot be captured (now or at an earlier call: ``calls[key]`` is None), after
    logging it once: the caller then runs the function eagerly. Emulated calls refuse host reads at their first
    replay, CUDA ones at capture: both count as a failed capture."""
    call = calls.get(key, False)
    if call is None:
        return None
    try:
        if call is False:
            call = calls[key] = make()
        return call(*values(call))
    except CaptureError as error:
        log.warning("CustomContrast: %s runs without a CUDA graph: %s", what, error)
        calls[key] = None
        return None

"""Timing, memory and report helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# operators that launch nothing on a GPU: views, allocations, and host-side scalars
NO_LAUNCH_OPS = frozenset({"aten::view", "aten::_unsafe_view", "aten::expand", "aten::slice", "aten::select",
                           "aten::permute", "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze",
                           "aten::alias", "aten::detach", "aten::as_strided", "aten::reshape", "aten::unbind",
                           "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::empty",
                           "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::scalar_tensor"})


class CountOps(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block (backward included): ``count`` all of
    them, ``kernels`` those that are not views or allocations (on a GPU, each is at least one kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = self.kernels = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.count += 1
            self.kernels += func._schema.name not in NO_LAUNCH_OPS
        return func(*args, **(kwargs or {}))


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU kernels of fused attention.

    torch's counter has formulas for the CUDA SDPA kernels only: on the CPU every
    ``scaled_dot_product_attention`` call (the UNet's self-attention, CLIP's attention) would count 0.
    The CPU flash kernel and its backward get torch's own SDPA formulas here (QK^T and PV, full
    rectangle also when causal, as for CUDA).
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_runs(fn: Callable[[], object], repeats: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Runs ``fn`` ``warmup`` times, then times ``repeats`` warm runs: median, min, max, spread (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median": median, "min": min(times), "max": max(times), "spread": (max(times) - min(times)) / median,
            "repeats": repeats}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 1) -> dict[str, dict]:
    """Times several variants round-robin (A B C A B C ...) so that clock drift hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, values in times.items():
        median = statistics.median(values)
        out[name] = {"median": median, "min": min(values), "max": max(values),
                     "spread": (max(values) - min(values)) / median, "repeats": repeats}
    return out


def device_busy(fn: Callable[[], object], device: str) -> dict[str, float]:
    """One run of ``fn`` under ``torch.profiler``: the device's kernel time summed (``busy_seconds``; on the
    CPU the operators' own time) and the profiled run's wall time. Busy time near a run's (unprofiled) wall
    time: the device sets the pace, and a ratio of two variants follows their arithmetic; far below it: the
    host does (Python and launching kernels), and the ratio follows host time per run."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    busy = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events) / 1e6
    return {"busy_seconds": busy, "profiled_wall_seconds": wall}


def busy_fractions(variants: dict[str, Callable[[], object]], names: Sequence[str], times: dict[str, dict],
                   device: str) -> dict[str, dict]:
    """:func:`device_busy` of the named variants, each with its (unprofiled) median wall time and the busy fraction."""
    busy = {}
    for name in names:
        busy[name] = dict(device_busy(variants[name], device), wall_seconds=times[name]["median"])
        busy[name]["busy_fraction"] = busy[name]["busy_seconds"] / times[name]["median"]
    return busy


def peak_memory_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def machine(device: str) -> dict[str, object]:
    """The machine the numbers come from."""
    info: dict[str, object] = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "cpu": platform.processor() or platform.machine()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Random weights for a model built without initialisation: normal(0, std) matrices, unit scales, zero biases."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return module

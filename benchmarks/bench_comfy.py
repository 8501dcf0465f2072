"""Sampling time of a CustomContrast-patched MODEL vs the same MODEL unpatched, through ComfyUI's sampler.

    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.bench_comfy --device cuda            # 512 px SD1.5, 1024 px SDXL
    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.bench_comfy --device cpu --size 64 --steps 3   # CPU smoke
    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.bench_comfy --device cpu --families sd15 --steps 2 \
        --repeats 0 --count-flops          # arithmetic of each variant at the target size (no timing)
    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.bench_comfy --device cpu --size 64 --steps 3 \
        --repeats 0 --count-ops            # kernel launches of each variant (what a launch-bound GPU pays)

Random full-size SD1.5 / SDXL UNets and text encoders (ComfyUI's own modules), a random full-size
CustomContrast checkpoint, one subject; whole sampling runs (euler, normal, CFG) timed warm and
round-robin: plain, patched in the default mode (paper-exact S+ per timestep, encoded a window of
the schedule at a time, reused by the next run: a new seed), the same with the encodings dropped
before every run (``default_cold``: a new subject or prompt), patched with S+ timestep buckets,
and patched without the mask propagation.
Prints the ratios and writes JSON.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .common import CountOps, busy_fractions, flop_counter, interleaved, machine, peak_memory_gb, reset_peak, sync, write_json


def encoding_time(run, device: str) -> dict:
    """Seconds one run spends encoding S+ (the whole ``encode_timesteps``, and its text-encoder part), timed
    with a device sync around each call, in one extra run of ``run``."""
    from . import comfy_runtime as rt

    targets = [(rt.extension("nodes.patch"), "encode_timesteps", "splus_seconds"),
               (rt.extension("nodes.encodings"), "encode_splus", "text_encoder_seconds")]
    spent = {"splus_seconds": 0.0, "text_encoder_seconds": 0.0, "calls": 0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            spent[key] += time.perf_counter() - start
            spent["calls"] += key == "splus_seconds"
            return out
        return wrapper

    originals = [(module, name, getattr(module, name)) for module, name, _ in targets]
    try:
        for (module, name, key), (_, _, fn) in zip(targets, originals):
            setattr(module, name, timed(fn, key))
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        spent["run_seconds"] = time.perf_counter() - start
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)
    return spent


def count_flops(variants: dict) -> dict:
    """Floating-point operations of one warm run of each variant (its second run: the first fills the caches)."""
    flops = {}
    for name, fn in variants.items():
        fn()
        with flop_counter() as counter:
            fn()
        flops[name] = counter.get_total_flops()
        print(f"[comfy] {name}: {flops[name] / 1e12:.3f} TFLOP per run", flush=True)
    return {"flops_per_run": flops, "flops_ratio": {k: v / flops["plain"] for k, v in flops.items()}}


def count_kernels(variants: dict, steps: int) -> dict:
    """ATen operators that launch a kernel (views and allocations aside) in one warm run of each variant, and per
    model evaluation (CFG: one batched evaluation per step with euler): on a GPU whose steps are bound by launching
    kernels from Python, the time ratio follows this ratio."""
    kernels = {}
    for name, fn in variants.items():
        fn()   # the warm run
        with CountOps() as counter:
            fn()
        kernels[name] = counter.kernels
        print(f"[comfy] {name}: {kernels[name]} kernels per run ({kernels[name] / steps:.0f} per step)", flush=True)
    return {"kernels_per_run": kernels, "kernels_per_step": {k: v / steps for k, v in kernels.items()},
            "kernels_ratio": {k: v / kernels["plain"] for k, v in kernels.items()}}


def bench_family(family: str, device: str, dtype: torch.dtype, size: int, steps: int, cfg: float,
                 repeats: int, buckets: int, flops: bool = False, ops: bool = False, narrow: int = 1) -> dict:
    from . import comfy_runtime as rt

    install = rt.extension()
    models = rt.build_models(family, device, dtype, narrow=narrow)
    loaded, subject = rt.customcontrast(family, device, dtype, narrow=narrow)
    negative = rt.encode(models.clip, "")
    plain_positive = rt.encode(models.clip, rt.PLAIN_PROMPT)

    def patched(**kw):
        args = dict(weight=1.0, start_percent=0.0, end_percent=1.0, use_mask=True, mask_mode="soft",
                    mask_threshold=0.2)
        args.update(kw)
        return install.apply_customcontrast(models.model, models.clip, loaded, [subject], rt.PROMPT, **args)

    default, positive = patched()
    bucketed, positive_b = patched(splus_buckets=buckets)
    unmasked, positive_u = patched(use_mask=False)
    run = rt.sampler(models, steps, cfg, size)
    patch = default.model_options["transformer_options"]["customcontrast"][-1]

    def cold():
        patch.cache.clear()   # as a new Apply node (another subject or prompt) starts
        return run(default, positive, negative)

    variants = {
        "plain": lambda: run(models.model, plain_positive, negative),
        "default": lambda: run(default, positive, negative),
        "default_cold": cold,
        f"buckets_{buckets}": lambda: run(bucketed, positive_b, negative),
        "default_no_mask": lambda: run(unmasked, positive_u, negative),
    }
    arithmetic = count_flops(variants) if flops else {}
    if ops:
        arithmetic.update(count_kernels(variants, steps))
    if repeats <= 0:
        return {"family": family, "size": size, "steps": steps, "cfg": cfg, "dtype": str(dtype), "narrow": narrow,
                **arithmetic}
    reset_peak(device)
    times = interleaved(variants, repeats, device)
    plain = times["plain"]["median"]
    cold()
    calls = {"cold": patch.encode_calls}
    run(default, positive, negative)
    calls["warm"] = patch.encode_calls
    encoding = encoding_time(cold, device)
    # is the GPU or the host setting the pace? kernel time vs wall time per run
    busy = busy_fractions(variants, ("plain", "default"), times, device) if device.startswith("cuda") else {}
    return {
        "family": family, "size": size, "steps": steps, "cfg": cfg, "dtype": str(dtype), "narrow": narrow,
        "seconds": times, "ratio": {name: t["median"] / plain for name, t in times.items()},
        "text_encoder_calls_per_run": calls, "splus_encoding_cold_run": encoding,
        "peak_memory_gb": peak_memory_gb(device), **arithmetic,
        **({"device_busy": busy} if busy else {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", default="sd15,sdxl")
    p.add_argument("--size", type=int, default=0, help="image side in px (default: 512 SD1.5, 1024 SDXL)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--buckets", type=int, default=10)
    p.add_argument("--count-flops", action="store_true",
                   help="also count the floating-point operations of one run of each variant (--repeats 0: only that)")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the kernels (non-view ATen operators) of one run of each variant, with "
                        "ComfyUI's SDPA attention as on an NVIDIA GPU")
    p.add_argument("--narrow", type=int, default=1,
                   help="divide the UNet's channel widths by this (1, 2, 5 or 10): the same kernels with almost no "
                        "arithmetic, so the CPU times the host cost per run, as on a GPU bound by launching kernels")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="the UNet's and CustomContrast model's dtype (default: float16 on CUDA, float32 on the CPU); "
                        "float16 with --count-ops on the CPU counts the casts a GPU run launches")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/comfy.json"))
    args = p.parse_args()
    if args.count_ops:   # count what an NVIDIA GPU runs: ComfyUI picks fused SDPA attention there
        from . import comfy_runtime

        comfy_runtime.PYTORCH_ATTENTION = True
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float16 if args.device.startswith("cuda") else torch.float32
    result = {"machine": machine(args.device), "path": "ComfyUI sampler", "families": {}}
    for family in args.families.split(","):
        size = args.size or (1024 if family == "sdxl" else 512)
        r = bench_family(family, args.device, dtype, size, args.steps, args.cfg, args.repeats, args.buckets,
                         args.count_flops, args.count_ops, args.narrow)
        result["families"][family] = r
        write_json(args.out, result)
        if args.count_flops:
            ratios = "  ".join(f"{k} {v:.3f}x" for k, v in r["flops_ratio"].items() if k != "plain")
            print(f"[comfy] {family} {size}px {args.steps} steps: FLOPs per run vs plain: {ratios}", flush=True)
        if args.count_ops:
            ratios = "  ".join(f"{k} {v:.3f}x" for k, v in r["kernels_ratio"].items() if k != "plain")
            print(f"[comfy] {family} {args.steps} steps: kernels per run vs plain: {ratios}", flush=True)
        if "seconds" not in r:
            continue
        ratios = "  ".join(f"{k} {v:.3f}x" for k, v in r["ratio"].items() if k != "plain")
        for name, b in r.get("device_busy", {}).items():
            print(f"[comfy] {family} {name}: GPU kernels busy {b['busy_seconds']:.3f}s of {b['wall_seconds']:.3f}s per run "
                  f"({100 * b['busy_fraction']:.0f} %)", flush=True)
        enc = r["splus_encoding_cold_run"]
        print(f"[comfy] {family} {size}px {args.steps} steps cfg {args.cfg}: plain {r['seconds']['plain']['median']:.3f}s"
              f"  {ratios}  peak {r['peak_memory_gb']}; S+ encoding in a cold run {enc['splus_seconds']:.3f}s "
              f"({enc['calls']} calls, text encoder {enc['text_encoder_seconds']:.3f}s)", flush=True)
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

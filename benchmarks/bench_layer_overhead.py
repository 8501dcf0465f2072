"""Host-side cost of the patched cross-attention layers: microseconds and operator calls per layer.

    python -m benchmarks.bench_layer_overhead                 # SD1.5 (16 layers) and SDXL (70) tables, CPU
    python -m benchmarks.bench_layer_overhead --out benchmarks/results/layer_overhead_cpu.json

On a fast GPU a 512 px SD1.5 step is bound by launching kernels from Python (the H100 numbers in the
docs/performance.md: 52 ms per plain CFG step), so what the patch costs there is mostly host time per layer:
Python, einops parsing and one dispatcher call per operator. This benchmark isolates exactly that on
the CPU with tiny tensors (arithmetic ≈ 0): one model evaluation = ``model_call`` and every layer's
``swap_context`` + ``attention`` of ``nodes.patch.SubjectPatch`` with cond + uncond chunks, against the same number of
``plain_attention`` calls; once with mask capture and masks (default), once without. It also counts
the ATen operators dispatched per layer (each one is at least one kernel launch on a GPU, views aside).
With ``--device cuda`` the same evaluations run on the GPU (tiny tensors: launch-bound).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from customcontrast_core import CustomContrastModel, get_preset, plain_attention

from .common import CountOps, machine, write_json


def _patch(family: str, use_mask: bool, device: str = "cpu", subjects: int = 1,
           dtype: torch.dtype = torch.float32):
    """A SubjectPatch of the tiny preset with encodings for sigmas 1..199; ``subjects`` placeholders at token
    positions 4, 7, 10, ...; the UNet side (and the CustomContrast model, as ComfyUI loads it) in ``dtype``, the
    S+ contexts in fp32 as ComfyUI's CLIP returns them."""
    from .comfy_runtime import extension

    patch_module, encodings = extension("nodes.patch"), extension("nodes.encodings")
    config = get_preset("tiny" if family == "sd15" else "tiny_sdxl")
    model = CustomContrastModel(config).eval().to(device, dtype)
    prompt = extension("nodes.text_encode").PlaceholderPrompt(
        tokens={"l": [[(0, 1.0)] * 77]}, slots=[[(0, 4 + 3 * i)] for i in range(subjects)], base=config.base,
        widths=config.token_widths)
    base = torch.randn(1, 77, config.context_dim, device=device, dtype=dtype)
    patch = patch_module.SubjectPatch(
        model=model, clip=None, subjects=[torch.zeros(1)] * subjects, blank=torch.zeros(1), prompt=prompt,
        base_context=base, layers={layer.comfy_key: layer for layer in config.layers},
        settings=patch_module.ApplySettings(use_mask=use_mask), timestep_of=lambda s: s * 100)
    for sigma in range(1, 200):
        shape = (1, config.num_visual_tokens, config.context_dim)
        patch.cache[float(sigma)] = encodings.Encodings(
            contexts=torch.randn(config.num_groups, 77, config.context_dim, device=device),
            visual=[torch.randn(shape, device=device, dtype=dtype) for _ in range(subjects)],
            blank_visual=[torch.zeros(shape, device=device, dtype=dtype)] * subjects)
    return patch, config, base


def _layers(config, grid: int):
    """Each patched layer with its token-grid side and width at a latent of grid x grid."""
    for layer in config.layers:
        yield layer, max(1, grid // layer.downsample), layer.inner_dim


def _evaluation(patch, config, base, sigma: float, grid: int = 8, heads: int = 4, outputs: list | None = None):
    """One model evaluation (cond + uncond, batch 1 each) through every patched layer, as ComfyUI's hooks call
    them (``nodes/comfy_glue.py``); appends each layer's output to ``outputs`` when given."""
    context = torch.cat([base, torch.randn_like(base)])
    device, dtype = base.device, base.dtype
    with torch.no_grad():
        call = patch.model_call((2, 4, grid, grid), sigma, context, (0, 1))
        for layer, side, inner in _layers(config, grid):
            key = layer.comfy_key
            swapped, _ = patch.swap_context(call, key, context, context)
            q = torch.randn(2, side * side, inner, device=device, dtype=dtype)
            k = torch.randn(2, 77, inner, device=device, dtype=dtype)
            out = patch.attention(call, key, q, k, k, heads, lambda *qkv: plain_attention(*qkv, heads=heads))
            if outputs is not None:
                outputs.append(out)


def layer_outputs(family: str, use_mask: bool, sigmas, device: str = "cpu", subjects: int = 1,
                  dtype: torch.dtype = torch.float32):
    """Every patched layer's output over one evaluation per sigma (fixed seeds): returns the patch, the config
    and the outputs."""
    torch.manual_seed(0)
    patch, config, base = _patch(family, use_mask, device, subjects, dtype)
    outputs = []
    for sigma in sigmas:
        torch.manual_seed(int(sigma))
        _evaluation(patch, config, base, sigma, outputs=outputs)
    return patch, config, outputs


def _plain(config, grid: int = 8, heads: int = 4, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The same layers with unpatched attention."""
    with torch.no_grad():
        for _, side, inner in _layers(config, grid):
            q = torch.randn(2, side * side, inner, device=device, dtype=dtype)
            k = torch.randn(2, 77, inner, device=device, dtype=dtype)
            plain_attention(q, k, k, heads=heads)


def _timed(fn, device: str) -> float:
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(family: str, use_mask: bool, evaluations: int, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> dict:
    """Median time of one evaluation through every patched layer vs plain attention, and operators per layer
    (counted once more on the host)."""
    patch, config, base = _patch(family, use_mask, device, dtype=dtype)
    sigmas = [float(s) for s in range(evaluations + 20, 0, -1)]
    for s in sigmas[:5]:
        _evaluation(patch, config, base, s)
    patched, plain = [], []
    for s in sigmas[5:5 + evaluations]:
        patched.append(_timed(lambda: _evaluation(patch, config, base, s), device))
        plain.append(_timed(lambda: _plain(config, device=device, dtype=dtype), device))
    with CountOps() as ops_patched:
        _evaluation(patch, config, base, sigmas[-1])
    with CountOps() as ops_plain:
        _plain(config, device=device, dtype=dtype)
    layers = len(config.layers)
    per_layer = (statistics.median(patched) - statistics.median(plain)) / layers
    return {"layers": layers, "use_mask": use_mask,
            "patched_eval_ms": 1000 * statistics.median(patched), "plain_eval_ms": 1000 * statistics.median(plain),
            "extra_us_per_layer": 1e6 * per_layer,
            "ops_per_layer_patched": ops_patched.count / layers, "ops_per_layer_plain": ops_plain.count / layers,
            "kernels_per_layer_patched": ops_patched.kernels / layers,
            "kernels_per_layer_plain": ops_plain.kernels / layers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--evaluations", type=int, default=40)
    p.add_argument("--device", default="cpu", help="cpu (host cost alone) or cuda (host + launches)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="the UNet's dtype (default float16 as ComfyUI on a GPU; on the CPU the casts are counted too)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/layer_overhead.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    result = {"machine": machine(args.device), "dtype": args.dtype, "results": []}
    for family in ("sd15", "sdxl"):
        for use_mask in (True, False):
            r = dict(family=family, **measure(family, use_mask, args.evaluations, args.device, dtype))
            result["results"].append(r)
            print(f"[overhead] {family} mask={use_mask}: +{r['extra_us_per_layer']:.0f} us/layer, "
                  f"{r['ops_per_layer_patched']:.1f} ops/layer, {r['kernels_per_layer_patched']:.1f} kernels "
                  f"(plain attention layer: {r['ops_per_layer_plain']:.0f}, {r['kernels_per_layer_plain']:.0f}); "
                  f"evaluation {r['patched_eval_ms']:.2f} ms vs plain {r['plain_eval_ms']:.2f} ms", flush=True)
    write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

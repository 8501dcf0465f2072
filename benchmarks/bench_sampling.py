"""Sampling cost of CustomContrast vs the plain model, side by side in one process (training processors).

    .venv/bin/python -m benchmarks.bench_sampling --out benchmarks/results/sampling_cpu.json
    .venv/bin/python -m benchmarks.bench_sampling --device cuda --latent 64 --repeats 10   # 512 px on a GPU

Builds full-size SD1.5 architectures with random weights (UNet, CLIP-L text encoder, a ViT-H/14-width
CLIP-vision stand-in is not needed: the subject's image features are computed once per run, outside
the timed loop), then times one CFG denoising step: the plain UNet vs the patched one in the paper-exact
mode (S+ re-encoded at this timestep: 16 prompts through CLIP-L, visual branch, mask capture).
Reports median and spread of warm runs, the ratio, and peak memory on CUDA; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from einops import rearrange


def build(device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from customcontrast_core import CustomContrastModel, get_preset
    from training.processors import ProcessorState, install_processors, unet_kv_weights
    from training.text import OpenClipTokenizer, TextEncoderStack

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).to(device, dtype).eval()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)).to(device, dtype).eval()
    stack = TextEncoderStack([text], [OpenClipTokenizer()], base="sd15")
    model = CustomContrastModel(get_preset("sd15")).to(device).eval()
    model.visual_kv.load_from_unet({k: (a.float(), b.float()) for k, (a, b) in unet_kv_weights(unet, model).items()})
    model.to(dtype)
    return unet, stack, model, ProcessorState, install_processors


def time_it(fn, repeats: int, device: str) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", type=int, default=16, help="latent side (64 = 512 px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling.json"))
    args = p.parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    unet, text, model, ProcessorState, install_processors = build(args.device, dtype)
    x = torch.randn(2, 4, args.latent, args.latent, device=args.device, dtype=dtype)
    t = torch.tensor(500, device=args.device)
    tokens = text.tokenize(["a photo of a <subject> dog on the beach"], "<subject>")
    negative, _ = text(text.tokenize([""], "<subject>"))
    plain_ctx = torch.cat([negative, text(tokens)[0]])
    clip_hidden = torch.randn(1, 3, 257, 1280, device=args.device, dtype=dtype)

    with torch.no_grad():
        image = model.encoder.encode_image(clip_hidden)
        plain = time_it(lambda: unet(x, t, encoder_hidden_states=plain_ctx).sample, args.repeats, args.device)
        state = ProcessorState()
        install_processors(unet, model, state, capture_downsample=(2, 4))

        def patched_step():
            enc = model.encoder.encode_timestep(image, t.float().reshape(1))
            cond, _ = text(tokens, enc.splus)                                  # 16 prompts through CLIP-L
            state.reset()
            state.contexts = rearrange(torch.stack([negative.expand_as(cond), cond]), "two g t c -> g two t c")
            state.visual_tokens = torch.cat([enc.visual_tokens * 0, enc.visual_tokens])
            state.slots, state.latent_hw, state.capture = ((), tokens.slots[0]), (args.latent, args.latent), True
            return unet(x, t, encoder_hidden_states=plain_ctx).sample
        patched = time_it(patched_step, args.repeats, args.device)
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "latent": args.latent, "dtype": str(dtype), "repeats": args.repeats,
        "plain_step_s": {"median": statistics.median(plain), "min": min(plain), "max": max(plain)},
        "patched_exact_step_s": {"median": statistics.median(patched), "min": min(patched), "max": max(patched)},
        "ratio_exact": statistics.median(patched) / statistics.median(plain),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"plain {result['plain_step_s']['median']:.3f}s  patched (exact) {result['patched_exact_step_s']['median']:.3f}s"
          f"  ratio {result['ratio_exact']:.2f}x  -> {args.out}")


if __name__ == "__main__":
    main()

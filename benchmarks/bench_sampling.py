"""Sampling cost of CustomContrast vs the plain model through the training processors (no ComfyUI needed).

    python -m benchmarks.bench_sampling --device cuda                      # 512 px, 30 CFG steps, fp16
    python -m benchmarks.bench_sampling --device cpu --latent 16 --steps 2 # CPU: 128 px, 2 steps, fp32

Full-size SD1.5 architectures with random weights (diffusers UNet, CLIP-L text encoder, the ``sd15``
MFI-Encoder). The subject's image features are computed once per run, outside the timed loop (see
``bench_encode`` for their cost). A run is ``--steps`` CFG evaluations of the UNet (cond + uncond in
one batch); the sampler's own arithmetic is negligible and left out. Variants, timed round-robin:

- ``plain``: the unpatched UNet;
- ``exact_per_step``: the paper's loop, S+ encoded at each step (16 prompts through CLIP-L), visual
  branch, mask capture;
- ``exact_batched``: the same computation with every step's S+ prompts encoded up front in batches of
  256 prompts (what the ComfyUI nodes do by default, over the sampler's schedule).

With ``COMFYUI_PATH`` set, ``bench_comfy`` measures the same through ComfyUI's own sampler.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from einops import rearrange

from .common import interleaved, machine, peak_memory_gb, reset_peak, write_json

PROMPTS_PER_CALL = 256


def build(device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from customcontrast_core import CustomContrastModel, get_preset
    from training.text import OpenClipTokenizer, TextEncoderStack

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).to(device, dtype).eval()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)).to(device, dtype).eval()
    stack = TextEncoderStack([text], [OpenClipTokenizer()], base="sd15")
    model = CustomContrastModel(get_preset("sd15")).to(device, dtype).eval()
    return unet, stack, model


def main() -> None:
    from training.processors import ProcessorState, install_processors

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling_processors.json"))
    args = p.parse_args()
    device = args.device
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    unet, text, model = build(device, dtype)
    encoder = model.encoder
    x = torch.randn(2, 4, args.latent, args.latent, device=device, dtype=dtype)
    timesteps = torch.linspace(999, 0, args.steps, device=device)
    tokens = text.tokenize(["a photo of a <subject> dog on the beach"], "<subject>")
    plain_tokens = text.tokenize(["a photo of a dog on the beach"], "<subject>")
    clip_hidden = torch.randn(1, 3, 257, 1280, device=device, dtype=dtype)

    with torch.no_grad():
        negative, _ = text(text.tokenize([""], "<subject>"))
        plain_ctx = torch.cat([negative, text(plain_tokens)[0]])
        image = encoder.encode_image(clip_hidden)
        blank = encoder.encode_image(torch.zeros_like(clip_hidden))
        groups = model.config.num_groups
        state = ProcessorState()

        def plain_run():
            state.visual_tokens = state.contexts = None
            for t in timesteps:
                unet(x, t, encoder_hidden_states=plain_ctx)

        def encode(ts: torch.Tensor):
            """Shapes: ts (n,) -> contexts (n, G, 77, C), visual (n, m, C), blank visual (n, m, C)."""
            n = ts.shape[0]
            enc = encoder.encode_timestep(image.expand(n), ts.to(dtype))
            empty = encoder.encode_timestep(blank.expand(n), ts.to(dtype))
            cond, _ = text(text.tokenize(["a photo of a <subject> dog on the beach"] * n, "<subject>"), enc.splus)
            return rearrange(cond, "(g n) t c -> n g t c", n=n), enc.visual_tokens, empty.visual_tokens

        def step(t, contexts, visual, empty):
            state.reset()
            state.contexts = torch.stack([negative.expand_as(contexts), contexts], dim=1)    # (G, 2, 77, C)
            state.visual_tokens = torch.stack([empty, visual])
            state.slots, state.latent_hw, state.capture = ((), tokens.slots[0]), (args.latent, args.latent), True
            unet(x, t, encoder_hidden_states=plain_ctx)

        def exact_per_step():
            for t in timesteps:
                contexts, visual, empty = encode(t.reshape(1))
                step(t, contexts[0], visual[0], empty[0])

        def exact_batched():
            per_call = max(1, PROMPTS_PER_CALL // groups)
            for start in range(0, args.steps, per_call):
                ts = timesteps[start:start + per_call]
                contexts, visual, empty = encode(ts)
                for i, t in enumerate(ts):
                    step(t, contexts[i], visual[i], empty[i])

        install_processors(unet, model, state, capture_downsample=(2, 4))
        reset_peak(device)
        times = interleaved({"plain": plain_run, "exact_per_step": exact_per_step, "exact_batched": exact_batched},
                            args.repeats, device)
    plain = times["plain"]["median"]
    result = {"machine": machine(device), "path": "training processors (diffusers UNet)", "latent": args.latent,
              "steps": args.steps, "dtype": str(dtype), "seconds": times,
              "ratio": {name: t["median"] / plain for name, t in times.items()},
              "peak_memory_gb": peak_memory_gb(device)}
    write_json(args.out, result)
    ratios = "  ".join(f"{k} {v:.3f}x" for k, v in result["ratio"].items() if k != "plain")
    print(f"[processors] sd15 latent {args.latent} {args.steps} steps: plain {plain:.3f}s  {ratios}  -> {args.out}")


if __name__ == "__main__":
    main()

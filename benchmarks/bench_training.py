"""Training-step cost of CustomContrast vs a plain adapter step, and peak memory, with full-size models.

    python -m benchmarks.bench_training --device cuda                     # SD1.5, 512 px, batch 4, bf16
    python -m benchmarks.bench_training --device cpu --size 64 --batch 2 --repeats 1   # CPU smoke
    python -m benchmarks.bench_training --device cpu --repeats 1 --count-flops         # arithmetic at the target size

Random full-size SD1.5 models (diffusers UNet and VAE, CLIP-L text encoder, ViT-H/14-size CLIP
vision, a ViT-B/32-size appearance encoder) and the full-size ``sd15`` MFI-Encoder. The CustomContrast
step is ``training.step.TrainingModule`` (Eq. 9: LDM + CSCL + MACL + localisation, S+ per layer
group, mask capture). The plain adapter step uses the same UNet, batch and resolution with the
visual branch only: one plain prompt, visual tokens from the Visual Q-Former, LDM loss, no
contrastive terms (IP-Adapter-style). Both run forward + backward + the AdamW of ``training.run``
(fused on CUDA) under bf16 autocast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import CountOps, busy_fractions, flop_counter, interleaved, machine, peak_memory_gb, reset_peak, write_json


def build(device: str, dtype: torch.dtype, size: int):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel,
                              CLIPVisionModelWithProjection)

    from customcontrast_core import CustomContrastModel, get_preset
    from training.models import FrozenModels, ImageEncoder
    from training.text import OpenClipTokenizer, TextEncoderStack

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=size // 8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=size)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                              num_attention_heads=16, image_size=224, patch_size=14))
    appearance = _Embeds(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=32, projection_dim=512)))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    frozen = FrozenModels(unet=unet, vae=vae, text=TextEncoderStack([text], [OpenClipTokenizer()], base="sd15"),
                          clip_vision=ImageEncoder(vision, 224), appearance=ImageEncoder(appearance, 224),
                          scheduler=scheduler).freeze()
    for module in frozen.modules():
        module.to(device, dtype)
    model = CustomContrastModel(get_preset("sd15")).to(device)
    return frozen, model


class _Embeds(torch.nn.Module):
    """transformers CLIP vision with projection -> image embeddings (the appearance features ψ_C)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixel_values=pixels).image_embeds


def make_batch(batch: int, size: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"reference": torch.rand(batch, 3, 224, 224, generator=g).to(device),
            "positive": torch.rand(batch, 3, 224, 224, generator=g).to(device),
            "target": (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device),
            "target_mask": (torch.rand(batch, 1, size, size, generator=g) > 0.5).float().to(device),
            "caption": [f"a photo of <subject> number {i} on a table" for i in range(batch)]}


def main() -> None:
    from training.config import TrainConfig
    from training.loop import make_optimizer
    from training.models import clip_hidden_states, vae_latent_moments
    from training.processors import project_visual_kv
    from training.step import TrainingModule

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--count-ops", action="store_true",
                   help="also count the ATen operators of one step each (the fused AdamW of a GPU run, also on CPU)")
    p.add_argument("--count-flops", action="store_true",
                   help="also count the floating-point operations of one step each (forward + backward)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/training.json"))
    args = p.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    frozen, model = build(device, dtype, args.size)
    # tiny_models=True only skips the local-path check: the frozen models above are passed in directly
    cfg = TrainConfig(encoder_preset="sd15", tiny_models=True, batch_size=args.batch, target_size=args.size,
                      reference_size=224, drop_image=0.0, drop_text=0.0, drop_both=0.0, lr=1e-5)
    module = TrainingModule(model, frozen, cfg)
    # as training.run builds it (fused on CUDA); operator counts use the fused one on every device
    optimizer = make_optimizer(model.parameters(), cfg, "cuda" if args.count_ops else device)
    batch = make_batch(args.batch, args.size, device)
    generator = torch.Generator().manual_seed(2)
    autocast = torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                              enabled=device.startswith("cuda"))

    counter = CountOps()

    def customcontrast_step():
        with autocast:
            loss, _ = module(batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    encoder, state = model.encoder, module.state
    tokens = frozen.text.tokenize([c.replace("<subject>", "dog") for c in batch["caption"]], "<subject>")

    def adapter_step():
        with autocast:
            with torch.no_grad():
                hidden = clip_hidden_states(frozen.clip_vision, batch["reference"], model.config.clip_layers)
                context, _ = frozen.text(tokens)
                mean, std = vae_latent_moments(frozen.vae, batch["target"].to(dtype))
                latents = (mean + std * torch.randn(mean.shape, generator=generator).to(mean)) * 0.18215
            visual = encoder.visual_out(encoder.encode_image(hidden).visual)          # (B, m, C)
            t = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = frozen.scheduler.add_noise(latents, noise, t).to(latents)
            state.reset()
            state.contexts, state.visual_tokens, state.slots, state.capture = None, visual, (), False
            state.visual_kv = project_visual_kv(model.visual_kv, visual)    # the processors' one-matmul path
            pred = frozen.unet(noisy, t, encoder_hidden_states=context).sample
            loss = F.mse_loss(pred.float(), noise.float())
        state.visual_tokens = state.visual_kv = None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory, ops, flops = {}, {}, {}
    steps = {"customcontrast": customcontrast_step, "adapter": adapter_step}
    for name, step in steps.items():
        reset_peak(device)
        step()
        memory[name] = peak_memory_gb(device)
        if args.count_ops:
            counter.count = counter.kernels = 0
            with counter:
                step()
            ops[name] = {"ops": counter.count, "kernels": counter.kernels}
            print(f"[training] {name}: {counter.count} ATen operators per step, {counter.kernels} kernels",
                  flush=True)
        if args.count_flops:
            with flop_counter() as counter:
                step()
            flops[name] = counter.get_total_flops()
            print(f"[training] {name}: {flops[name] / 1e12:.3f} TFLOP per step", flush=True)
    variants = {"adapter": adapter_step, "customcontrast": customcontrast_step}
    times = interleaved(variants, args.repeats, device)
    # is the GPU or the host setting the pace? kernel time vs wall time per step
    busy = busy_fractions(variants, ("adapter", "customcontrast"), times, device) if device.startswith("cuda") else {}
    for name in busy:
        print(f"[training] {name}: GPU kernels busy {busy[name]['busy_seconds']:.3f}s of "
              f"{times[name]['median']:.3f}s per step ({100 * busy[name]['busy_fraction']:.0f} %)", flush=True)
    result = {"machine": machine(device), "size": args.size, "batch": args.batch, "dtype": str(dtype),
              "seconds": times, "ratio": times["customcontrast"]["median"] / times["adapter"]["median"],
              "peak_memory_gb": memory, **({"operators_per_step": ops} if ops else {}),
              **({"device_busy": busy} if busy else {}),
              **({"flops_per_step": flops, "flops_ratio": flops["customcontrast"] / flops["adapter"]} if flops else {})}
    write_json(args.out, result)
    print(f"[training] sd15 {args.size}px batch {args.batch} {dtype}: adapter {times['adapter']['median']:.3f}s  "
          f"customcontrast {times['customcontrast']['median']:.3f}s  ratio {result['ratio']:.3f}x  "
          f"peak GB {memory}  -> {args.out}", flush=True)


if __name__ == "__main__":
    main()

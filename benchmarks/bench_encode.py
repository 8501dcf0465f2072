"""Subject encoding time: CLIP vision (ViT-H/14 size) + MFI-Encoder, once per reference image.

    python -m benchmarks.bench_encode --device cuda          # SD1.5 and SDXL encoders, fp16
    python -m benchmarks.bench_encode --device cpu --repeats 2

Reports the median milliseconds of the CLIP-vision forward (hidden states of the configured layers),
of the Visual Q-Former (once per subject) and of the Textual Q-Former + TV-Fusion for one timestep.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import machine, time_runs, write_json


def main() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from customcontrast_core import CustomContrastModel, get_preset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/encode.json"))
    args = p.parse_args()
    device = args.device
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                              num_attention_heads=16, image_size=224, patch_size=14))
    vision = vision.to(device, dtype).eval()
    pixels = torch.randn(1, 3, 224, 224, device=device, dtype=dtype)
    result = {"machine": machine(device), "dtype": str(dtype), "ms": {}}
    with torch.no_grad():
        result["ms"]["clip_vision_vit_h14"] = 1000 * time_runs(
            lambda: vision(pixel_values=pixels, output_hidden_states=True), args.repeats, device)["median"]
        for family in ("sd15", "sdxl"):
            model = CustomContrastModel(get_preset(family)).to(device, dtype).eval()
            hidden = torch.randn(1, len(model.config.clip_layers), 257, model.config.clip_width, device=device,
                                 dtype=dtype)
            image = model.encoder.encode_image(hidden)
            t = torch.tensor([500.0], device=device, dtype=dtype)
            result["ms"][f"{family}_visual_qformer"] = 1000 * time_runs(
                lambda: model.encoder.encode_image(hidden), args.repeats, device)["median"]
            result["ms"][f"{family}_textual_qformer_per_timestep"] = 1000 * time_runs(
                lambda: model.encoder.encode_timestep(image, t), args.repeats, device)["median"]
    write_json(args.out, result)
    print("[encode] " + "  ".join(f"{k} {v:.2f} ms" for k, v in result["ms"].items()) + f"  -> {args.out}", flush=True)


if __name__ == "__main__":
    main()

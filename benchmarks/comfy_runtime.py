"""ComfyUI in process for the benchmarks: random full-size SD1.5/SDXL models and the CustomContrast patch.

Only ``comfy.*`` is imported (not ComfyUI's server, node registry or front end), and this repository is
imported as the package ComfyUI loads from custom_nodes/ (its modules import one another relatively).
Weights are random: speed and memory do not depend on them.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from customcontrast_core import CustomContrastModel, get_preset

from .common import randomize_

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_customcontrast"
PROMPT = "a photo of <subject> on the beach"
PLAIN_PROMPT = "a photo of dog on the beach"
# ComfyUI's attention backend: None leaves ComfyUI's choice (fused SDPA on an NVIDIA GPU, split or
# sub-quadratic einsum attention on the CPU); True forces SDPA everywhere (set before the first import)
PYTORCH_ATTENTION: bool | None = None


def load_comfy(device: str) -> ModuleType:
    """Imports ComfyUI's ``comfy`` package from COMFYUI_PATH; raises with the reason when it cannot."""
    root = os.environ.get("COMFYUI_PATH")
    if not root or not Path(root, "comfy").is_dir():
        raise RuntimeError(f"COMFYUI_PATH must point at a ComfyUI checkout (a folder with comfy/), found {root!r}")
    if root not in sys.path:
        sys.path.insert(0, str(Path(root).resolve()))
    import comfy.cli_args
    comfy.cli_args.args.cpu = device == "cpu"
    if PYTORCH_ATTENTION is not None and "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.use_pytorch_cross_attention = PYTORCH_ATTENTION
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    return comfy


def extension(module: str = "nodes.apply") -> ModuleType:
    """One module of this repository imported as a package, as ComfyUI imports a custom node (a folder holding a
    link to the repository goes on the path); ``nodes.apply`` by default."""
    if importlib.util.find_spec(PACKAGE) is None:
        folder = Path(tempfile.mkdtemp(prefix="cc_package_"))
        (folder / PACKAGE).symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(folder))
    return importlib.import_module(f"{PACKAGE}.{module}")


def _unet_config(family: str, dtype: torch.dtype) -> dict:
    common = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                  dtype=dtype, in_channels=4, model_channels=320, use_temporal_attention=False,
                  use_temporal_resblock=False)
    if family == "sd15":
        return dict(common, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                    channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False,
                    context_dim=768, num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    return dict(common, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
                use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])


def build_models(family: str, device: str, dtype: torch.dtype, seed: int = 0, narrow: int = 1) -> SimpleNamespace:
    """A random full-size ComfyUI MODEL (ModelPatcher) and CLIP of the family; ``narrow`` > 1 divides the UNet's
    channel widths by it (same modules, layers and kernels per evaluation, almost no arithmetic: the host cost
    of a run, as on a GPU that is bound by launching kernels)."""
    load_comfy(device)
    import comfy.model_detection
    import comfy.sd
    import comfy.model_management as mm
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(_unet_config(family, dtype))
    if config is None:
        raise RuntimeError(f"this ComfyUI does not recognise the {family} UNet config")
    config.set_inference_dtype(dtype, None)
    if narrow > 1:
        config.unet_config = dict(config.unet_config, model_channels=_narrowed(320, narrow))
    base = config.get_model({}, device=mm.get_torch_device())
    randomize_(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    clip = comfy.sd.CLIP(target=config.clip_target())
    randomize_(clip.cond_stage_model, seed + 1)
    return SimpleNamespace(model=model, clip=clip, family=family)


@dataclass
class BenchSubject:
    """The fields of the Encode Subject node's SUBJECT that Apply reads."""

    hidden: torch.Tensor
    blank: torch.Tensor
    width: int
    layers: tuple[int, ...]


def _narrowed(channels: int, narrow: int) -> int:
    """``channels / narrow``, checked: GroupNorm's 32 groups need a multiple of 32."""
    if channels % narrow or (channels // narrow) % 32:
        raise ValueError(f"narrow must divide 320 into a multiple of 32 (1, 2, 5 or 10), got {narrow}")
    return channels // narrow


def customcontrast(family: str, device: str, dtype: torch.dtype, seed: int = 0, narrow: int = 1):
    """A random full-size CustomContrast model of the family, wrapped as the Loader node returns it; with
    ``narrow`` > 1 its visual K/V fit the narrowed UNet of :func:`build_models`."""
    load_comfy(device)
    import comfy.model_management as mm
    import comfy.model_patcher

    torch.manual_seed(seed)
    config = get_preset(family)
    if narrow > 1:
        mult = (1, 2, 4, 4) if family == "sd15" else (1, 2, 4)
        config = dataclasses.replace(config, block_out_channels=tuple(_narrowed(320, narrow) * m for m in mult))
    model = CustomContrastModel(config).to(dtype).eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    config = model.config
    g = torch.Generator().manual_seed(seed + 1)
    shape = (1, len(config.clip_layers), 257, config.clip_width)   # ViT-H/14 at 224 px: 256 patches + CLS
    subject = BenchSubject(hidden=torch.randn(shape, generator=g), blank=torch.randn(shape, generator=g),
                           width=config.clip_width, layers=config.clip_layers)
    return SimpleNamespace(model=model, patcher=patcher), subject


def encode(clip, text: str) -> list:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sampler(models: SimpleNamespace, steps: int, cfg: float, size: int, seed: int = 0):
    """Returns run(model, positive, negative) -> latent, through ComfyUI's own sampler (euler, normal)."""
    import comfy.sample

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)

    def run(model, positive, negative):
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=seed)
    return run

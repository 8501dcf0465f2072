"""The frozen models of training: UNet, VAE, text encoder(s), CLIP vision and the appearance encoder ψ_C.

``build_tiny`` makes random-initialised small models from configs (CPU preset and tests);
``build_from_paths`` loads real ones from local paths only.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from customcontrast_core.checkpoint import VisionTower
from customcontrast_core.config import EncoderConfig

from .config import ModelPaths
from .text import HFTokenizer, OpenClipTokenizer, TextEncoderStack
from .tiny_models import tiny_unet

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)
TINY_PATCH = 8   # patch side of the tiny CLIP-vision model

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageEncoder:
    """A frozen image encoder with its preprocessing: images in [0, 1] -> features."""

    model: nn.Module
    size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def preprocess(self, images: Tensor) -> Tensor:
        """Shapes: images (B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised."""
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device)[None, :, None, None]
        std = torch.tensor(self.std, device=x.device)[None, :, None, None]
        return (x - mean) / std


@dataclass
class FrozenModels:
    """Everything training keeps frozen."""

    unet: nn.Module
    vae: nn.Module
    text: TextEncoderStack
    clip_vision: ImageEncoder        # transformers CLIPVisionModel
    appearance: ImageEncoder         # open_clip visual tower, ψ_C of MACL
    scheduler: object                # diffusers DDPMScheduler

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text, self.clip_vision.model, self.appearance.model]

    def freeze(self) -> "FrozenModels":
        for module in self.modules():
            module.requires_grad_(False).eval()
        return self


def clip_hidden_states(encoder: ImageEncoder, images: Tensor, layers: tuple[int, ...]) -> Tensor:
    """Stacks the requested Hugging Face ``hidden_states`` of the CLIP-vision model.

    Shapes: images (B, 3, H, W) in [0, 1] -> (B, K, T, D).
    """
    pixels = encoder.preprocess(images).to(next(encoder.model.parameters()).dtype)
    out = encoder.model(pixel_values=pixels, output_hidden_states=True)
    return torch.stack([out.hidden_states[i] for i in layers], dim=1)


def appearance_features(encoder: ImageEncoder, images: Tensor) -> Tensor:
    """ψ_C of MACL: open_clip image features of segmented subjects. Shapes: (B, 3, H, W) -> (B, E)."""
    out = encoder.model(encoder.preprocess(images).to(next(encoder.model.parameters()).dtype))
    return out[0] if isinstance(out, tuple) else out


def vae_latent_moments(vae: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the VAE encoder's latent distribution.
    Shapes: images (B, 3, H, W) in the VAE's dtype -> (B, 4, H/8, W/8) twice."""
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


def build_tiny(config: EncoderConfig, *, image_size: int = 64, reference_size: int = 32, seed: int = 0,
               vae_channels: tuple[int, int, int] = (16, 32, 32)) -> FrozenModels:
    """Random-initialised tiny models with the structure of ``config.base`` (no download); ``vae_channels``
    are the autoencoder's block widths (3 blocks: 4x down)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=image_size)
    latent = image_size // 4
    unet = tiny_unet(config, sample_size=latent)
    text_cfg = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    encoders = [CLIPTextModel(CLIPTextConfig(hidden_size=config.token_widths[0], **text_cfg))]
    if config.base == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=config.token_widths[1], projection_dim=config.token_widths[1], **text_cfg)))
    tokenizer = OpenClipTokenizer()
    text = TextEncoderStack(encoders, [tokenizer] * len(encoders), base=config.base)
    vision = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=config.clip_width, intermediate_size=config.clip_width * 2,
        num_hidden_layers=config.clip_num_layers, num_attention_heads=4, image_size=reference_size, patch_size=TINY_PATCH))
    appearance = VisionTransformer(image_size=reference_size, patch_size=8, width=32, layers=2, heads=4,
                                   mlp_ratio=2.0, output_dim=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                              beta_start=0.00085, beta_end=0.012)
    return FrozenModels(unet=unet, vae=vae, text=text,
                        clip_vision=ImageEncoder(vision, reference_size),
                        appearance=ImageEncoder(appearance, reference_size),
                        scheduler=scheduler).freeze()


def _require(path: str, what: str) -> Path:
    p = Path(path)
    if not path or path == "REQUIRED" or not p.exists():
        raise FileNotFoundError(f"{what}: expected a local path, found {path!r}. Nothing is downloaded; "
                                "pass the folder or file you have")
    return p


def builtin_open_clip_name(name: str, what: str) -> str:
    """``name`` when it is one of open_clip's built-in architectures (configs shipped with the package);
    a ValueError otherwise: an ``hf-hub:`` name would be fetched from the Hugging Face Hub, and nothing is
    downloaded."""
    import open_clip
    if not isinstance(name, str) or name not in open_clip.list_models():
        remote = isinstance(name, str) and ":" in name
        raise ValueError(f"{what}: expected a built-in open_clip architecture name (e.g. ViT-B-32, ViT-H-14), "
                         f"found {name!r}" + ("; remote names are never fetched (nothing is downloaded): give the "
                                              "architecture name and a local weights file" if remote else ""))
    return name


def build_from_paths(config: EncoderConfig, paths: ModelPaths) -> FrozenModels:
    """Loads real frozen models from local paths (diffusers folder or single file)."""
    import open_clip
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPVisionModel

    appearance = builtin_open_clip_name(paths.appearance_model, "paths.appearance_model")   # before any loading
    root = _require(paths.diffusion, "diffusion model")
    pipeline_cls = StableDiffusionXLPipeline if config.base == "sdxl" else StableDiffusionPipeline
    if root.is_file():
        kwargs = {"config": str(_require(paths.diffusion_config, "diffusers config folder for the single file"))}
        pipe = pipeline_cls.from_single_file(str(root), local_files_only=True, **kwargs)
    else:
        pipe = pipeline_cls.from_pretrained(str(root), local_files_only=True, safety_checker=None)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if config.base == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if config.base == "sdxl" else [])
    widths = tuple(int(e.config.hidden_size) for e in encoders)
    if widths != config.token_widths:
        raise ValueError(f"text encoders have widths {widths}, the encoder config expects {config.token_widths}")
    text = TextEncoderStack(encoders, [HFTokenizer(t) for t in tokenizers], base=config.base)
    vision = CLIPVisionModel.from_pretrained(str(_require(paths.clip_vision, "CLIP-vision model")), local_files_only=True)
    if vision.config.hidden_size != config.clip_width:
        raise ValueError(f"CLIP-vision width {vision.config.hidden_size} != encoder config clip_width {config.clip_width}")
    clip_model = open_clip.create_model(appearance, pretrained=str(_require(paths.appearance_weights,
                                                                              "open_clip appearance weights")))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    log.info("loaded %s from %s", config.base, root)
    return FrozenModels(unet=pipe.unet, vae=pipe.vae, text=text,
                        clip_vision=ImageEncoder(vision, int(vision.config.image_size)),
                        appearance=ImageEncoder(clip_model.visual, int(clip_model.visual.image_size[0])),
                        scheduler=scheduler).freeze()


def clip_vision_record(cfg: TrainConfig, config: EncoderConfig) -> VisionTower:
    """Which CLIP-vision model a run trains with, for the exported checkpoint: the tiny random model's structure,
    or the ``paths.clip_vision`` folder's name and, when its ``config.json`` is readable here, its image and patch
    sizes (a transformers CLIPVisionConfig, or a CLIPConfig's ``vision_config``)."""
    if cfg.tiny_models:
        return VisionTower(hidden_size=config.clip_width, num_layers=config.clip_num_layers,
                           image_size=cfg.reference_size, patch_size=TINY_PATCH, name="tiny random CLIP vision")
    folder = Path(cfg.paths.clip_vision)
    sizes: dict = {}
    try:
        found = json.loads((folder / "config.json").read_text())
        found = found.get("vision_config", found)
        sizes = {k: found[k] for k in ("image_size", "patch_size") if isinstance(found.get(k), int)}
    except (OSError, ValueError, AttributeError):
        log.info("no readable %s: the checkpoint records the CLIP-vision model's name, width and layers only",
                 folder / "config.json")
    return VisionTower(hidden_size=config.clip_width, num_layers=config.clip_num_layers, name=folder.name, **sizes)

"""Frozen training configuration and its named presets (paper Sec. 4.1)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from customcontrast_core.config import dataclass_from_dict


@dataclass(frozen=True)
class ModelPaths:
    """Local paths of the frozen models (never a hub id: nothing is downloaded)."""

    diffusion: str = ""          # diffusers folder (unet/, vae/, text_encoder/, tokenizer/, ...) or single .safetensors
    diffusion_config: str = ""   # diffusers folder whose configs describe a single-file checkpoint
    clip_vision: str = ""        # transformers CLIPVisionModel folder (e.g. ViT-H/14 image encoder)
    appearance_model: str = "ViT-B-32"   # open_clip architecture name for the MACL appearance features
    appearance_weights: str = ""         # local open_clip weights file for it


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; written to the output folder as JSON."""

    encoder_preset: str = "tiny"          # customcontrast_core preset (tiny, sd15, sdxl, tiny_sdxl)
    tiny_models: bool = True              # random-init tiny frozen models built from configs
    paths: ModelPaths = ModelPaths()
    data: str = "synthetic"               # "synthetic" or a JSONL manifest path
    synthetic_subjects: int = 24
    synthetic_views: int = 4
    output_dir: str = "runs/tiny"
    steps: int = 150
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3                      # paper: 3e-5 (sd15/sdxl presets)
    optimizer: str = "adamw"              # "adamw" (paper) or "sgd" (exact-equivalence checks)
    weight_decay: float = 1e-2
    lambda_contrast: float = 1e-2         # λ1 of Eq. 9
    lambda_loc: float = 1e-3              # λ2 of Eq. 9
    contrastive_terms: tuple[str, ...] = ("cscl", "macl")   # which of Eq. 9's contrastive terms are trained
    cscl_temperature: float = 1.0         # as printed in Eq. 4 (no temperature)
    macl_temperature: float = 0.07
    r_min: float = 0.05                   # clamp of the appearance cosine r in MACL's α = 1/r
    drop_image: float = 0.05
    drop_text: float = 0.05
    drop_both: float = 0.05
    target_size: int = 64                 # training resolution of the target view
    reference_size: int = 32              # CLIP-vision input size
    capture_downsample: tuple[int, ...] = (2, 4)   # layers whose maps feed L_loc (16x16 and 32x32 at 512 px)
    mixed_precision: str = "no"           # "no", "bf16" or "fp16" (accelerate)
    gradient_checkpointing: bool = False
    cuda_graphs: bool = False             # frozen encoders' forward passes as CUDA graphs (training/graphed.py)
    save_every: int = 30
    log_every: int = 5
    num_workers: int = 0
    seed: int = 0
    augment: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.paths, dict):
            object.__setattr__(self, "paths", ModelPaths(**self.paths))
        object.__setattr__(self, "capture_downsample", tuple(self.capture_downsample))
        object.__setattr__(self, "contrastive_terms", tuple(self.contrastive_terms))
        if not set(self.contrastive_terms) <= {"cscl", "macl"}:
            raise ValueError(f"contrastive_terms must be a subset of ('cscl', 'macl'), got {self.contrastive_terms}")
        positive = ("steps", "batch_size", "grad_accum", "target_size", "reference_size", "save_every", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2: the contrastive losses need in-batch negatives, got {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.drop_image + self.drop_text + self.drop_both > 1:
            raise ValueError("condition dropout rates must sum to at most 1")
        if not self.tiny_models and not (self.paths.diffusion and self.paths.clip_vision):
            raise ValueError("real training needs paths.diffusion and paths.clip_vision (local paths)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, data, "training config")

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


PRESETS: dict[str, TrainConfig] = {
    # random-init tiny SD1.5-structured models on procedural multi-view subjects; 2 CPU cores
    "tiny": TrainConfig(),
    # the paper's recipe (Sec. 4.1) at 512 px on SD1.5; fill in paths and data
    "sd15": TrainConfig(encoder_preset="sd15", tiny_models=False, data="", output_dir="runs/sd15",
                        steps=200_000, batch_size=8, lr=3e-5, target_size=512, reference_size=224,
                        mixed_precision="bf16", gradient_checkpointing=True, save_every=5_000, log_every=50,
                        num_workers=8, paths=ModelPaths(diffusion="REQUIRED", clip_vision="REQUIRED")),
    "sdxl": TrainConfig(encoder_preset="sdxl", tiny_models=False, data="", output_dir="runs/sdxl",
                        steps=200_000, batch_size=4, lr=3e-5, target_size=1024, reference_size=224,
                        capture_downsample=(2, 4), mixed_precision="bf16", gradient_checkpointing=True,
                        save_every=5_000, log_every=50, num_workers=8,
                        paths=ModelPaths(diffusion="REQUIRED", clip_vision="REQUIRED")),
}


def get_train_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown training preset {name!r}; expected one of {sorted(PRESETS)}") from None

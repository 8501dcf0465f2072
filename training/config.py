"""Frozen training configuration and its named presets (paper Sec. 4.1)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from customcontrast_core.config import PRESETS as ENCODER_PRESETS
from customcontrast_core.config import dataclass_from_dict

log = logging.getLogger(__name__)

# fields of earlier versions that no longer exist, and why a file that names them still trains the same
REMOVED_FIELDS = {"cuda_graphs": "the frozen encoders always run eagerly now (a CUDA-graph replay gave the same "
                                 "values and was never measured on a GPU)"}


@dataclass(frozen=True)
class ModelPaths:
    """Local paths of the frozen models (never a hub id: nothing is downloaded)."""

    diffusion: str = ""          # diffusers folder (unet/, vae/, text_encoder/, tokenizer/, ...) or single .safetensors
    diffusion_config: str = ""   # diffusers folder whose configs describe a single-file checkpoint
    clip_vision: str = ""        # transformers CLIPVisionModel folder (e.g. ViT-H/14 image encoder)
    appearance_model: str = "ViT-B-32"   # open_clip's built-in architecture name for the MACL appearance features
    appearance_weights: str = ""         # local open_clip weights file for it

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise ValueError(f"TrainConfig.paths.{f.name}: expected a path string, found "
                                 f"{type(value).__name__} {value!r}")
        if ":" in self.appearance_model:   # open_clip fetches "hf-hub:org/name" from the Hugging Face Hub
            raise ValueError("TrainConfig.paths.appearance_model: expected a built-in open_clip architecture name "
                             f"(e.g. ViT-B-32, ViT-H-14), found {self.appearance_model!r}: remote names are never "
                             "fetched; give the architecture name and its local weights file in "
                             "paths.appearance_weights")


def _checked(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` of field ``name`` (int -> float, integral float -> int, list -> tuple);
    a ValueError naming the field, the expected type and what was found otherwise."""
    def refuse(expected: str) -> ValueError:
        return ValueError(f"TrainConfig.{name}: expected {expected}, found {type(value).__name__} {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise refuse("a bool (true or false)")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse("an integer")
        return value
    if hint is float:   # every float field is a rate, a weight or a temperature: NaN and Infinity make no sense
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise refuse("a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise refuse("a string")
        return value
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise refuse(f"a list of {item.__name__}")
        return tuple(_checked(f"{name}[{i}]", item, x) for i, x in enumerate(value))
    if hint is ModelPaths:
        if isinstance(value, dict):
            return dataclass_from_dict(ModelPaths, value, "TrainConfig.paths")
        if not isinstance(value, ModelPaths):
            raise refuse("a ModelPaths or a JSON object of paths")
        return value
    raise TypeError(f"TrainConfig.{name}: no check for the type {hint}")


def _require(ok: bool, name: str, expected: str, found: Any) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name}: expected {expected}, found {found!r}")


SAMPLE_PLACEHOLDER = "<subject>"   # the training captions' placeholder (DataConfig.placeholder)


def _check_schedule_and_samples(cfg: "TrainConfig") -> None:
    """Ranges of the warmup, clipping, checkpoint-keeping and sampling fields."""
    for name in ("warmup_steps", "sample_every"):
        _require(getattr(cfg, name) >= 0, name, ">= 0 (0 = off)", getattr(cfg, name))
    _require(cfg.max_grad_norm >= 0, "max_grad_norm", "a number >= 0 (0 = off)", cfg.max_grad_norm)
    _require(cfg.keep_checkpoints >= 1, "keep_checkpoints", ">= 1 (the newest checkpoint is what --resume reads)",
             cfg.keep_checkpoints)
    _require(cfg.sample_steps >= 1, "sample_steps", "a positive integer", cfg.sample_steps)
    _require(cfg.sample_guidance >= 0, "sample_guidance", "a number >= 0", cfg.sample_guidance)
    _require(bool(cfg.sample_prompts), "sample_prompts", "at least one prompt", cfg.sample_prompts)
    for i, prompt in enumerate(cfg.sample_prompts):
        _require(SAMPLE_PLACEHOLDER in prompt, f"sample_prompts[{i}]",
                 f"a prompt naming the subject by {SAMPLE_PLACEHOLDER!r} ({{cls}} is replaced by its class word)",
                 prompt)
    _require(bool(cfg.sample_seeds) and min(cfg.sample_seeds) >= 0, "sample_seeds", "at least one seed, each >= 0",
             cfg.sample_seeds)
    base = ENCODER_PRESETS[cfg.encoder_preset].base
    _require(cfg.sample_every == 0 or base == "sd15", "sample_every",
             f"0 for {cfg.encoder_preset} (the evaluation sampler conditions SD1.5 UNets only; no SDXL pooled "
             "text or size ids)", cfg.sample_every)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; written to the output folder as JSON."""

    encoder_preset: str = "tiny"          # customcontrast_core preset (tiny, sd15, sdxl, tiny_sdxl)
    tiny_models: bool = True              # random-init tiny frozen models built from configs
    tiny_weights: str = ""                # with tiny_models: a folder of trained tiny models (python -m training.miniworld)
    paths: ModelPaths = ModelPaths()
    data: str = "synthetic"               # "synthetic" or a JSONL manifest path
    allow_single_view: bool = False       # subjects with one image (OpenImages): target/positive from that photo
    allow_unmasked: bool = False          # subjects without masks: unsegmented views, L_loc over the whole image
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
    loc_maps: str = "combined"            # Ā of L_loc: "combined" (text + visual, the inference masks' map) or "text"
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
    save_every: int = 30
    log_every: int = 5                    # progress bar and TensorBoard: mean of the steps since the last log
    keep_checkpoints: int = 2             # newest training checkpoints kept under output_dir/checkpoints
    warmup_steps: int = 0                 # linear learning-rate warmup: step s (1-based) uses lr * min(1, s / warmup)
    max_grad_norm: float = 0.0            # clip the trainable weights' gradient norm to this (0 = off)
    sample_every: int = 0                 # a sample grid every N steps in output_dir/samples (0 = off)
    sample_prompts: tuple[str, ...] = ("a photo of a <subject> {cls}", "a <subject> {cls} on the beach")
    sample_seeds: tuple[int, ...] = (0, 1)   # one column per seed; the reference subject in the first column
    sample_steps: int = 20                # DDIM steps of the evaluation sampler
    sample_guidance: float = 7.5
    num_workers: int = 0
    seed: int = 0
    augment: bool = True
    hflip: bool = True                    # mirror the views (off when captions say left/right)
    # with augment: reference brightness and contrast x (1 ± up to this). Off: in the small world 0.1 costs
    # CustomContrast a fifth of its subject fidelity (E-appearance 0.215 ± 0.009 vs 0.279 ± 0.014, 3 seeds)
    reference_jitter: float = 0.0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f.name, hints[f.name], getattr(self, f.name)))
        _require(self.encoder_preset in ENCODER_PRESETS, "encoder_preset", f"one of {sorted(ENCODER_PRESETS)}",
                 self.encoder_preset)
        for name in ("steps", "grad_accum", "target_size", "reference_size", "save_every", "log_every"):
            _require(getattr(self, name) > 0, name, "a positive integer", getattr(self, name))
        _require(self.batch_size >= 2, "batch_size", ">= 2 (the contrastive losses need in-batch negatives)",
                 self.batch_size)
        for name in ("synthetic_subjects", "synthetic_views"):
            _require(getattr(self, name) >= 2, name, ">= 2", getattr(self, name))
        for name in ("num_workers", "seed"):
            _require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        for name in ("lr", "cscl_temperature", "macl_temperature"):
            _require(getattr(self, name) > 0, name, "a number > 0", getattr(self, name))
        for name in ("weight_decay", "lambda_contrast", "lambda_loc"):
            _require(getattr(self, name) >= 0, name, "a number >= 0", getattr(self, name))
        _require(0 < self.r_min <= 1, "r_min", "0 < r_min <= 1 (clamp of a cosine, inverted)", self.r_min)
        for name in ("drop_image", "drop_text", "drop_both"):
            _require(0 <= getattr(self, name) <= 1, name, "a rate in [0, 1]", getattr(self, name))
        _require(0 <= self.reference_jitter < 1, "reference_jitter", "a number in [0, 1)", self.reference_jitter)
        rates = self.drop_image + self.drop_text + self.drop_both
        _require(rates <= 1, "drop_image + drop_text + drop_both", "at most 1", rates)
        terms = self.contrastive_terms
        _require(set(terms) <= {"cscl", "macl"} and len(set(terms)) == len(terms), "contrastive_terms",
                 "distinct names among ('cscl', 'macl')", terms)
        layers = sorted({layer.downsample for layer in ENCODER_PRESETS[self.encoder_preset].layers})
        _require(set(self.capture_downsample) <= set(layers), "capture_downsample",
                 f"downsample factors of {self.encoder_preset} cross-attention layers, among {layers}",
                 self.capture_downsample)
        _require(self.loc_maps in ("combined", "text"), "loc_maps", "'combined' or 'text'", self.loc_maps)
        _require(bool(self.capture_downsample) or self.lambda_loc == 0, "capture_downsample",
                 "at least one factor while lambda_loc > 0 (no captured layer makes L_loc 0)", self.capture_downsample)
        _require(self.optimizer in ("adamw", "sgd"), "optimizer", "'adamw' or 'sgd'", self.optimizer)
        _require(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "'no', 'bf16' or 'fp16'",
                 self.mixed_precision)
        _check_schedule_and_samples(self)
        _require(not self.tiny_weights or self.tiny_models, "tiny_weights",
                 "an empty string unless tiny_models=true (trained tiny models replace the random ones)", self.tiny_weights)
        if not self.tiny_models and not (self.paths.diffusion and self.paths.clip_vision):
            raise ValueError("TrainConfig.paths: real training (tiny_models=false) needs paths.diffusion and "
                             f"paths.clip_vision (local paths), found {self.paths}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The config of a dict of fields; a field that no longer exists (``REMOVED_FIELDS``) is dropped with a
        logged note, so the config files and saved runs that name it still load."""
        if isinstance(data, dict) and set(data) & set(REMOVED_FIELDS):
            for name in sorted(set(data) & set(REMOVED_FIELDS)):
                log.warning("training config: field %r (%r) is ignored: %s", name, data[name], REMOVED_FIELDS[name])
            data = {k: v for k, v in data.items() if k not in REMOVED_FIELDS}
        return dataclass_from_dict(cls, data, "training config")

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        data = read_config_file(path)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"config file {path}: {err}") from None


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of TrainConfig fields in ``path``; a ValueError naming the file, what was expected and
    what was found otherwise (an unreadable file, invalid JSON, or JSON that is not an object)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise ValueError(f"config file {path}: expected a readable JSON text file, found an error: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path}: expected JSON, found invalid JSON at line {err.lineno} column "
                         f"{err.colno} ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f'config file {path}: expected a JSON object of TrainConfig fields ({{"lr": 0.0001, ...}}), '
                         f"found a JSON {_json_kind(data)}")
    return data


# fields that may differ between a run and its resumption: none changes the model, the data order or the
# arithmetic of a step (gradient checkpointing gives the same values; allow_unmasked and
# allow_single_view are permissions, not data; the sample_* fields only read the weights; warmup_steps and
# max_grad_norm do change the steps, so they are not here)
RESUMABLE_FIELDS = ("steps", "save_every", "log_every", "num_workers", "output_dir", "gradient_checkpointing",
                    "allow_unmasked", "allow_single_view", "keep_checkpoints", "sample_every",
                    "sample_prompts", "sample_seeds", "sample_steps", "sample_guidance")


# a run saved before a field existed trained as these values say (L_loc read the text map only)
LEGACY_DEFAULTS: dict[str, Any] = {"loc_maps": "text"}


def resume_mismatch(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Fields of ``current`` that differ from a run's saved ``config.json`` (``saved``, missing fields at their
    defaults, except fields whose default changed since: those at their old value, ``LEGACY_DEFAULTS``) and may
    not change on resume, as ``"name: saved -> current"`` lines."""
    before = json.loads(TrainConfig.from_dict({**LEGACY_DEFAULTS, **saved}).to_json())
    now = json.loads(current.to_json())
    return [f"{k}: {before[k]!r} -> {now[k]!r}" for k in sorted(now)
            if k not in RESUMABLE_FIELDS and before[k] != now[k]]


PRESETS: dict[str, TrainConfig] = {
    # random-init tiny SD1.5-structured models on procedural multi-view subjects; 2 CPU cores; a sample grid
    # (4 DDIM steps, about a second) at steps 50, 100 and 150
    "tiny": TrainConfig(sample_every=50, sample_steps=4),
    # the paper's recipe (Sec. 4.1) at 512 px on SD1.5; fill in paths and data
    "sd15": TrainConfig(encoder_preset="sd15", tiny_models=False, data="", output_dir="runs/sd15",
                        steps=200_000, batch_size=8, lr=3e-5, target_size=512, reference_size=224,
                        mixed_precision="bf16", gradient_checkpointing=True, save_every=5_000, log_every=50,
                        sample_every=5_000, sample_steps=30, num_workers=8,
                        paths=ModelPaths(diffusion="REQUIRED", clip_vision="REQUIRED")),
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

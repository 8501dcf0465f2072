"""The one reader/writer of CustomContrast weight files (one ``.safetensors`` with metadata).

Keys: ``encoder.*`` and ``visual_kv.<layer>.to_k.weight`` / ``visual_kv.<layer>.to_v.weight``.
Metadata: format name and version, the encoder config JSON, base family, the ordered layer names,
the CLIP-vision width and layer indices it expects, the weights' dtype (``fp32``, ``fp16`` or ``bf16``),
the training step, and free-form extras.
Nothing here unpickles: a pickle or ``torch.save`` file is refused with an explanation. The config is
checked against the header's tensor names and shapes before any module is built or any tensor read.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import REAL_PRESETS, EncoderConfig, dataclass_from_dict, toy_model
from .safetensors_file import CheckpointError, Header, read_header, read_tensors, write_atomically
from .visual_kv import CustomContrastModel

FORMAT = "customcontrast"
FORMAT_VERSION = 1
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")   # safetensors names of the dtypes a checkpoint may use
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}   # what save() may write
_DTYPE_OF_ENTRY = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}

__all__ = ["DTYPES", "FORMAT", "FORMAT_VERSION", "CheckpointError", "CheckpointInfo", "VisionTower", "check_matches",
           "check_real", "expected_shapes", "load", "read_info", "save"]


@dataclass(frozen=True)
class VisionTower:
    """The CLIP-vision model a checkpoint was trained with: its structure and, when known, its name.

    ``image_size`` and ``patch_size`` are None where unknown (they set the token count T of the features);
    checkpoints written before the record know only what their config holds (width and layer count).
    """

    hidden_size: int                # the transformer width (ViT-H/14: 1280, ViT-L/14: 1024)
    num_layers: int                 # transformer layers (ViT-H/14: 32, ViT-L/14: 24)
    image_size: int | None = None   # input resolution in pixels (224, 336)
    patch_size: int | None = None   # patch side in pixels (14)
    name: str = ""                  # e.g. the model folder's name in the training config

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "image_size", "patch_size"):
            value = getattr(self, key)
            optional = key in ("image_size", "patch_size")
            if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, int)
                                                      or not 1 <= value <= 2**16):
                raise ValueError(f"CLIP-vision record {key}: expected an integer from 1 to 65536"
                                 f"{' or null' if optional else ''}, found {value!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"CLIP-vision record name: expected a string, found {self.name!r}")

    @classmethod
    def of_config(cls, config: EncoderConfig) -> "VisionTower":
        """What an encoder config knows of its CLIP-vision model (width and layer count)."""
        return cls(hidden_size=config.clip_width, num_layers=config.clip_num_layers)

    def structure(self) -> str:
        """E.g. ``width 1280, 32 layers, 224 px, patch 14`` (the fields known)."""
        parts = [f"width {self.hidden_size}", f"{self.num_layers} layers"]
        parts += [f"{self.image_size} px"] if self.image_size else []
        parts += [f"patch {self.patch_size}"] if self.patch_size else []
        return ", ".join(parts)

    def describe(self) -> str:
        """E.g. ``'clip-vit-h' (width 1280, 32 layers, 224 px, patch 14)``."""
        return (f"{self.name!r} " if self.name else "") + f"({self.structure()})"

    def differences(self, other: "VisionTower") -> list[str]:
        """The structural fields both records know and that differ, as 'width 1280 here, 1024 there'."""
        out = []
        for key, label in (("hidden_size", "width"), ("num_layers", "layers"), ("image_size", "image size"),
                           ("patch_size", "patch size")):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is not None and theirs is not None and mine != theirs:
                out.append(f"{label} {mine} vs {theirs}")
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VisionTower":
        return dataclass_from_dict(cls, json.loads(text), "CLIP-vision record")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's metadata declares."""

    config: EncoderConfig
    format_version: int
    step: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)   # e.g. the training config
    dtype: str = "fp32"   # the stored weights' dtype: "fp32", "fp16", "bf16" (or "fp64")
    clip_vision: VisionTower | None = None   # the CLIP-vision model it was trained with (None: an older file)

    @property
    def base(self) -> str:
        return self.config.base

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.config.layers)


def dtype_named(name: str, what: str = "dtype") -> torch.dtype:
    """``"fp32"``, ``"fp16"`` or ``"bf16"`` as a torch dtype; ValueError naming ``what`` otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{what}: expected one of {sorted(DTYPES)}, found {name!r}")
    return DTYPES[name]


def save(path: str | Path, model: CustomContrastModel, *, step: int = 0,
         extra: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
         clip_vision: VisionTower | None = None) -> Path:
    """Writes the model atomically (temporary file, fsync, rename): a crash or a full disk never leaves half
    a file under ``path`` (the previous file is kept). The file follows the umask (0o644 under 022).

    ``dtype`` (fp32, fp16 or bf16; None: the model's own, one of them or fp64) is the stored weights'
    dtype, recorded in the metadata: fp16 and bf16 files take half the bytes of fp32. Non-finite weights are
    refused (CheckpointError), as the loader would refuse them, also those that overflow ``dtype``'s range.
    ``clip_vision`` records the CLIP-vision model it was trained with (None: what the config knows of it)."""
    path = Path(path)
    config = model.config
    clip_vision = clip_vision or VisionTower.of_config(config)
    if (clip_vision.hidden_size, clip_vision.num_layers) != (config.clip_width, config.clip_num_layers):
        raise ValueError(f"clip_vision: expected a CLIP-vision model of width {config.clip_width} with "
                         f"{config.clip_num_layers} layers (the encoder config's), found {clip_vision.describe()}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    found = {t.dtype for t in tensors.values()}
    dtype = dtype if dtype is not None else (found.pop() if len(found) == 1 else torch.float32)
    names = {**{v: k for k, v in DTYPES.items()}, torch.float64: "fp64"}
    if dtype not in names:
        raise ValueError(f"checkpoint dtype: expected one of {list(DTYPES.values())}, found {dtype}")
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():   # the loader would refuse the file: never write one
            raise CheckpointError(f"not writing {path}: {key} contains NaN or Inf values (a diverged training "
                                  "run?); any previous file there is kept")
        tensors[key] = tensor.to(dtype)
        if not torch.isfinite(tensors[key]).all():
            peak = tensor.abs().max().item()
            raise CheckpointError(f"not writing {path} in {names[dtype]}: {key} holds values up to {peak:.4g}, beyond "
                                  f"{names[dtype]}'s range ({torch.finfo(dtype).max:.4g}); write it as bf16 or fp32. "
                                  "Any previous file there is kept")
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "base": config.base,
        "layers": json.dumps([layer.name for layer in config.layers]),
        "clip_width": str(config.clip_width),
        "clip_layers": json.dumps(list(config.clip_layers)),
        "dtype": names[dtype],
        "clip_vision": clip_vision.to_json(),
        "step": str(int(step)),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    return write_atomically(path, tensors, metadata)


def _info_from_header(path: Path, header: Header) -> CheckpointInfo:
    meta = header.metadata
    found = meta.get("format")
    if found != FORMAT:
        raise CheckpointError(
            f"{path} is a .safetensors file but not a CustomContrast checkpoint: expected metadata "
            f"format={FORMAT!r}, found {found!r} (IP-Adapter and other adapters have their own loaders)"
        )
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: metadata has no integer format_version") from None
    if version < 1:
        raise CheckpointError(f"{path}: format_version must be 1..{FORMAT_VERSION}, found {version}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format version {version}; this version of CustomContrast reads "
            f"up to {FORMAT_VERSION}. Update the extension."
        )
    try:
        config = EncoderConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: metadata has no valid encoder config ({err})") from None
    declared = {"base": config.base, "clip_width": str(config.clip_width),
                "layers": [layer.name for layer in config.layers], "clip_layers": list(config.clip_layers)}
    for key, expected in declared.items():
        value = meta.get(key)
        value = _parsed(path, key, value) if key in ("layers", "clip_layers") and value is not None else value
        if value != expected:
            raise CheckpointError(f"{path}: metadata {key}={value!r} contradicts its config ({expected!r})")
    try:
        step = int(meta.get("step", 0))
    except ValueError:
        raise CheckpointError(f"{path}: metadata step must be an integer, found {meta['step']!r}") from None
    extra = _parsed(path, "extra", meta.get("extra", "{}"))
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: metadata extra must be a JSON object, found {type(extra).__name__}")
    stored = sorted({entry.dtype for entry in header.entries.values()})
    dtype = _DTYPE_OF_ENTRY.get(stored[0], stored[0]) if len(stored) == 1 else "mixed"
    declared_dtype = meta.get("dtype", dtype)   # files written before the field: the tensors' dtype
    if declared_dtype != dtype and dtype in _DTYPE_OF_ENTRY.values():   # other dtypes: refused by _check_entries
        raise CheckpointError(f"{path}: metadata dtype={declared_dtype!r} contradicts its tensors, stored as {stored}")
    return CheckpointInfo(config=config, format_version=version, step=step, extra=extra, dtype=dtype,
                          clip_vision=_clip_vision(path, meta, config))


def _clip_vision(path: Path, meta: Mapping[str, str], config: EncoderConfig) -> VisionTower | None:
    """The metadata's CLIP-vision record (None in files written before it), checked against the config."""
    if "clip_vision" not in meta:
        return None
    try:
        tower = VisionTower.from_json(meta["clip_vision"])
    except (ValueError, TypeError) as err:   # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: metadata clip_vision is not a CLIP-vision record ({err})") from None
    if (tower.hidden_size, tower.num_layers) != (config.clip_width, config.clip_num_layers):
        raise CheckpointError(f"{path}: metadata clip_vision {tower.describe()} contradicts its config (CLIP-vision "
                              f"width {config.clip_width}, {config.clip_num_layers} layers)")
    return tower


def check_real(path: str | Path, config: EncoderConfig) -> None:
    """Refuses a checkpoint no real SD1.5 / SDXL model can use (a ``tiny`` preset's), saying what it is."""
    toy = toy_model(config)
    if toy is not None:
        presets = " or ".join(REAL_PRESETS)
        raise CheckpointError(f"{path} is a checkpoint of {toy}. Expected a "
                              f"checkpoint of a real preset ({presets}), trained with `python -m training.run "
                              f"--preset sd15` or `--preset sdxl` (docs/training.md)")


def _parsed(path: Path, key: str, text: str):
    """One JSON-valued metadata entry, or CheckpointError naming it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata {key} is not valid JSON ({err})") from None


def read_info(path: str | Path) -> CheckpointInfo:
    """Reads and validates a checkpoint's metadata without loading its tensors."""
    path = Path(path)
    return _info_from_header(path, read_header(path))


def _block_shapes(prefix: str, c: EncoderConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """One QFormerBlock (perceiver.py): bias-free attention and feed-forward, LayerNorms with bias."""
    w, inner, hidden = c.width, c.heads * c.dim_head, c.width * c.ff_mult
    for norm in ("attn.norm_features", "attn.norm_queries"):
        yield f"{prefix}{norm}.weight", (w,)
        yield f"{prefix}{norm}.bias", (w,)
    yield f"{prefix}attn.to_q.weight", (inner, w)
    yield f"{prefix}attn.to_kv_features.weight", (2 * inner, w)
    yield f"{prefix}attn.to_kv_queries.weight", (2 * inner, w)
    yield f"{prefix}attn.to_out.weight", (w, inner)
    yield f"{prefix}ff.0.weight", (w,)
    yield f"{prefix}ff.0.bias", (w,)
    yield f"{prefix}ff.1.weight", (hidden, w)
    yield f"{prefix}ff.3.weight", (w, hidden)


def _linear(name: str, out_dim: int, in_dim: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{name}.weight", (out_dim, in_dim)
    yield f"{name}.bias", (out_dim,)


def _norm(name: str, dim: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{name}.weight", (dim,)
    yield f"{name}.bias", (dim,)


def expected_shapes(config: EncoderConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of a checkpoint of ``config`` with its shape, in module order, without building a module.

    Lazy, so a config that claims 20000 Q-Former blocks costs nothing beyond the tensors a file holds.
    Mirrors CustomContrastModel's state_dict (tests compare the two for every preset and variants).
    """
    c, e = config, "encoder."
    w = c.width
    yield f"{e}layer_embed", (len(c.clip_layers), c.clip_width)
    yield from _linear(f"{e}proj_in", w, c.clip_width)
    yield f"{e}visual_queries", (c.num_visual_tokens + 1, w)
    for i in range(c.depth):
        yield from _block_shapes(f"{e}visual_qformer.blocks.{i}.", c)
    yield f"{e}group_queries", (c.num_groups + 1, w)
    yield from _linear(f"{e}time_mlp.0", w, c.fourier_dim)
    yield from _linear(f"{e}time_mlp.2", w, w)
    for i in range(c.depth):
        yield from _block_shapes(f"{e}text_qformer.blocks.{i}.", c)
    yield from _norm(f"{e}text_out.0", w)
    yield from _linear(f"{e}text_out.1", c.token_dim, w)
    yield from _linear(f"{e}text_to_width", w, c.token_dim)
    yield from _block_shapes(f"{e}tv_fusion.", c)
    yield from _linear(f"{e}visual_out.0", c.context_dim, w)
    yield from _norm(f"{e}visual_out.1", c.context_dim)
    yield from _linear(f"{e}visual_cls_proj", c.cls_dim, w)
    yield from _linear(f"{e}text_cls_proj", c.cls_dim, c.token_dim)
    for layer in c.layers:
        yield f"visual_kv.{layer.name}.to_k.weight", (layer.inner_dim, c.context_dim)
        yield f"visual_kv.{layer.name}.to_v.weight", (layer.inner_dim, c.context_dim)


def _summary(c: EncoderConfig) -> str:
    return (f"{c.base}, depth {c.depth}, width {c.width}, heads {c.heads} x dim_head {c.dim_head}, "
            f"ff_mult {c.ff_mult}, {c.num_visual_tokens} visual tokens, clip_width {c.clip_width}, "
            f"context_dim {c.context_dim}, {len(c.layers)} layers")


def check_matches(path: str | Path, config: EncoderConfig, what: str = "its config") -> None:
    """Raises CheckpointError unless the file's tensor names, shapes and dtype (header only) fit ``config``."""
    path = Path(path)
    _check_entries(path, read_header(path), config, what)


def _check_entries(path: Path, header: Header, config: EncoderConfig, what: str = "its config") -> None:
    """Names, shapes and dtypes from the header against the config, before any tensor is read."""
    entries = header.entries
    expected: dict[str, tuple[int, ...]] = {}
    limit = 2 * len(entries) + 64   # enumeration bounded by the file's size, whatever the config claims
    for key, shape in expected_shapes(config):
        expected[key] = shape
        if len(expected) > limit:
            missing = [k for k in expected if k not in entries]
            raise CheckpointError(
                f"{path} does not match {what} ({_summary(config)}): the config implies more than "
                f"{limit} tensors, the file holds {len(entries)} (missing e.g. {missing[:3]})"
            )
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match {what} ({_summary(config)}): {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    dtypes = sorted({entry.dtype for entry in entries.values()})
    if len(dtypes) != 1 or dtypes[0] not in WEIGHT_DTYPES:
        raise CheckpointError(f"{path}: expected every tensor in one floating-point dtype {WEIGHT_DTYPES} (as "
                              f"`python -m training.export` writes), found {dtypes}")
    for key, shape in expected.items():
        if entries[key].shape != shape:
            raise CheckpointError(f"{path}: {key} has shape {entries[key].shape}, expected {shape} from {what} "
                                  f"({_summary(config)})")


def load(path: str | Path, *, expected_base: str | None = None, expected_clip_width: int | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[CustomContrastModel, CheckpointInfo]:
    """Loads and validates a checkpoint; raises CheckpointError saying what was expected and found.

    Order: header (no tensor data), metadata and config, names/shapes/dtypes against the config, then the
    tensors (finite), and only then a module, so a crafted small file costs no more than its size.
    """
    path = Path(path)
    header = read_header(path)
    info = _info_from_header(path, header)
    config = info.config
    if expected_base is not None and config.base != expected_base:
        raise CheckpointError(
            f"{path} was trained for {config.base.upper()} but the model is {expected_base.upper()}; "
            f"pick a {expected_base} CustomContrast checkpoint"
        )
    if expected_clip_width is not None and config.clip_width != expected_clip_width:
        raise CheckpointError(
            f"{path} expects a CLIP-vision model of width {config.clip_width}, the one given has width "
            f"{expected_clip_width}; load the CLIP-vision model it was trained with"
        )
    _check_entries(path, header, config)
    tensors: dict[str, Tensor] = read_tensors(path)
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {key} contains NaN or Inf values (a diverged training run?)")
    model = CustomContrastModel(config, device=torch.device("meta"))
    model.load_state_dict(tensors, assign=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    return model.eval().requires_grad_(False), info

"""The one reader/writer of CustomContrast weight files (one ``.safetensors`` with metadata).

Keys: ``encoder.*`` and ``visual_kv.<layer>.to_k.weight`` / ``visual_kv.<layer>.to_v.weight``.
Metadata: format name and version, the encoder config JSON, base family, the ordered layer names,
the CLIP-vision width and layer indices it expects, the training step, and free-form extras.
Nothing here unpickles: a pickle or ``torch.save`` file is refused with an explanation.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import EncoderConfig
from .visual_kv import CustomContrastModel

FORMAT = "customcontrast"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 2**20   # a safetensors header larger than this is not one of ours


class CheckpointError(ValueError):
    """A weight file that is not a valid CustomContrast checkpoint; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's metadata declares."""

    config: EncoderConfig
    format_version: int
    step: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)   # e.g. the CLIP-vision model name

    @property
    def base(self) -> str:
        return self.config.base

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.config.layers)


def save(path: str | Path, model: CustomContrastModel, *, step: int = 0,
         extra: Mapping[str, str] | None = None) -> Path:
    """Writes the model atomically (temporary file + rename), so a crash never leaves half a file."""
    path = Path(path)
    config = model.config
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "base": config.base,
        "layers": json.dumps([layer.name for layer in config.layers]),
        "clip_width": str(config.clip_width),
        "clip_layers": json.dumps(list(config.clip_layers)),
        "step": str(int(step)),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read_header(path: Path) -> dict:
    """Parses the safetensors header and checks that the file holds every byte it declares."""
    if not path.is_file():
        raise FileNotFoundError(f"no CustomContrast checkpoint at {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(
                f"{path.name} is a pickle / torch.save file; expected a .safetensors CustomContrast checkpoint. "
                "Pickles are never loaded (they can run code): export with `python -m training.export`."
            )
        if len(head) < 8:
            raise CheckpointError(f"{path.name} has {size} bytes; a .safetensors file has at least 8")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path.name} is not a .safetensors file (its first 8 bytes are not a header length)")
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{path.name} is truncated: header declares {n} bytes, file has {size - 8} after the length")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name} is not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a .safetensors file (its header is not a JSON object)")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    bad = [k for k, v in entries.items() if not (isinstance(v, dict) and isinstance(v.get("dtype"), str)
                                                  and isinstance(v.get("shape"), list)
                                                  and isinstance(v.get("data_offsets"), list)
                                                  and len(v["data_offsets"]) == 2
                                                  and all(isinstance(o, int) for o in v["data_offsets"]))]
    if bad:
        raise CheckpointError(f"{path.name} is not a valid .safetensors file: tensor entry {bad[0]!r} lacks "
                              "dtype, shape or data_offsets [begin, end]")
    end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name} is truncated: expected {8 + n + end} bytes, found {size} (re-copy or re-export the file)"
        )
    return header


def _info_from_metadata(path: Path, meta: Mapping[str, str]) -> CheckpointInfo:
    found = meta.get("format")
    if found != FORMAT:
        raise CheckpointError(
            f"{path.name} is a .safetensors file but not a CustomContrast checkpoint: expected metadata "
            f"format={FORMAT!r}, found {found!r} (IP-Adapter and other adapters have their own loaders)"
        )
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path.name}: metadata has no integer format_version") from None
    if version < 1:
        raise CheckpointError(f"{path.name}: format_version must be 1..{FORMAT_VERSION}, found {version}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name} uses checkpoint format version {version}; this version of CustomContrast reads "
            f"up to {FORMAT_VERSION}. Update the extension."
        )
    try:
        config = EncoderConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path.name}: metadata has no valid encoder config ({err})") from None
    declared = {"base": config.base, "clip_width": str(config.clip_width),
                "layers": [layer.name for layer in config.layers], "clip_layers": list(config.clip_layers)}
    for key, expected in declared.items():
        value = meta.get(key)
        value = _parsed(path, key, value) if key in ("layers", "clip_layers") and value is not None else value
        if value != expected:
            raise CheckpointError(f"{path.name}: metadata {key}={value!r} contradicts its config ({expected!r})")
    try:
        step = int(meta.get("step", 0))
    except ValueError:
        raise CheckpointError(f"{path.name}: metadata step must be an integer, found {meta['step']!r}") from None
    extra = _parsed(path, "extra", meta.get("extra", "{}"))
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path.name}: metadata extra must be a JSON object, found {type(extra).__name__}")
    return CheckpointInfo(config=config, format_version=version, step=step, extra=extra)


def _parsed(path: Path, key: str, text: str):
    """One JSON-valued metadata entry, or CheckpointError naming it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path.name}: metadata {key} is not valid JSON ({err})") from None


def read_info(path: str | Path) -> CheckpointInfo:
    """Reads and validates a checkpoint's metadata without loading its tensors."""
    path = Path(path)
    header = _read_header(path)
    return _info_from_metadata(path, header.get("__metadata__") or {})


def _check_tensors(path: Path, tensors: Mapping[str, Tensor], config: EncoderConfig) -> None:
    expected = CustomContrastModel(config, device=torch.device("meta")).state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path.name} does not match its {config.base} config: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    dtypes = {tensor.dtype for tensor in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise CheckpointError(f"{path.name}: expected every tensor in one floating-point dtype (as "
                              f"`python -m training.export` writes), found {sorted(str(d) for d in dtypes)}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path.name}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(ref.shape)}")
        if tensors[key].is_floating_point() and not torch.isfinite(tensors[key]).all():
            raise CheckpointError(f"{path.name}: {key} contains NaN or Inf values (a diverged training run?)")


def load(path: str | Path, *, expected_base: str | None = None, expected_clip_width: int | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[CustomContrastModel, CheckpointInfo]:
    """Loads and validates a checkpoint; raises CheckpointError saying what was expected and found."""
    path = Path(path)
    info = read_info(path)
    config = info.config
    if expected_base is not None and config.base != expected_base:
        raise CheckpointError(
            f"{path.name} was trained for {config.base.upper()} but the model is {expected_base.upper()}; "
            f"pick a {expected_base} CustomContrast checkpoint"
        )
    if expected_clip_width is not None and config.clip_width != expected_clip_width:
        raise CheckpointError(
            f"{path.name} expects a CLIP-vision model of width {config.clip_width}, the one given has width "
            f"{expected_clip_width}; load the CLIP-vision model it was trained with"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path.name} could not be read as .safetensors: {err}") from None
    _check_tensors(path, tensors, config)
    model = CustomContrastModel(config, device=torch.device("meta"))
    model.load_state_dict(tensors, assign=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    return model.eval().requires_grad_(False), info

"""Encoded subjects as files (Save Subject / Load Subject), and the weighted average of several references.

A subject file is one ``.safetensors`` with two fp32 tensors, ``hidden`` and ``blank`` (each (1, K, T, D): the
CLIP-vision hidden states of the reference at the checkpoint's K layers, and those of a blank reference), and
string metadata: ``format = "customcontrast_subject"``, ``format_version``, ``preset`` (the checkpoint's preset
name, or ``custom``), ``base``, ``clip_width``, ``clip_layers``, ``clip_vision`` (the CLIP-vision record),
``token_shape`` ([K, T, D]), ``images`` and ``image_weights`` (how the references were averaged).

Reading checks the file as checkpoints are checked (a pickle is refused unread, the header before any tensor),
then the metadata, the tensor names, dtypes, shapes and values; ``check_fits`` checks a subject against the
checkpoint it is used with: the same CLIP-vision features (width, layers, model), whatever the base model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import VisionTower
from .config import EncoderConfig, preset_of
from .safetensors_file import CheckpointError, read_header, read_tensors, write_atomically

FORMAT = "customcontrast_subject"
FORMAT_VERSION = 1
TENSORS = ("blank", "hidden")

__all__ = ["FORMAT", "FORMAT_VERSION", "SavedSubject", "check_fits", "image_weights", "load_subject", "save_subject",
           "weighted_mean"]


@dataclass(frozen=True, eq=False)
class SavedSubject:
    """An encoded subject with what it was encoded for."""

    hidden: Tensor                  # (1, K, T, D) fp32 CLIP-vision hidden states of the reference(s)
    blank: Tensor                   # (1, K, T, D) fp32, the same for a blank reference
    clip_layers: tuple[int, ...]    # the K hidden-state indices
    clip_vision: VisionTower        # the CLIP-vision model the checkpoint was trained with (D = its width)
    preset: str = "custom"          # the checkpoint's preset name, "custom" for a config of its own
    base: str = "sd15"
    images: int = 1                 # references averaged into ``hidden``
    image_weights: tuple[float, ...] = ()   # their weights (empty: equal, or one image)

    @property
    def width(self) -> int:
        return int(self.hidden.shape[-1])


def save_subject(path: str | Path, subject: SavedSubject) -> Path:
    """Writes the subject atomically as fp32 (a crash never leaves half a file); refuses non-finite values and
    tensors whose shapes do not fit the subject's layers and width."""
    path = Path(path)
    _check_tensors(path, {"hidden": subject.hidden, "blank": subject.blank}, subject.clip_layers,
                   subject.clip_vision.hidden_size, writing=True)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "preset": subject.preset,
        "base": subject.base,
        "clip_width": str(subject.width),
        "clip_layers": json.dumps(list(subject.clip_layers)),
        "clip_vision": subject.clip_vision.to_json(),
        "token_shape": json.dumps(list(subject.hidden.shape[1:])),
        "images": str(int(subject.images)),
        "image_weights": json.dumps(list(subject.image_weights)),
    }
    tensors = {"hidden": subject.hidden.detach().float().cpu().contiguous(),
               "blank": subject.blank.detach().float().cpu().contiguous()}
    return write_atomically(path, tensors, metadata)


def _meta(path: Path, meta: Mapping[str, str], key: str, expected: str):
    """A JSON metadata value, or CheckpointError naming the key, what was expected and what was found."""
    if key not in meta:
        raise CheckpointError(f"{path}: metadata lacks {key} ({expected}); was it written by Save Subject?")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata {key} must be {expected}, found {meta[key]!r:.100}") from None


def _int_list(path: Path, meta: Mapping[str, str], key: str) -> tuple[int, ...]:
    value = _meta(path, meta, key, "a JSON list of integers")
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{path}: metadata {key} must be a JSON list of integers, found {value!r:.100}")
    return tuple(value)


def load_subject(path: str | Path) -> SavedSubject:
    """Reads and checks a subject file; CheckpointError saying what was expected and found."""
    path = Path(path)
    header = read_header(path)   # refuses pickles, truncated and malformed files before reading any tensor
    meta = header.metadata
    found = meta.get("format")
    if found != FORMAT:
        hint = (" (a CustomContrast checkpoint: load it with Load CustomContrast Model)" if found == "customcontrast"
                else "")
        raise CheckpointError(f"{path} is not a saved CustomContrast subject: expected metadata format={FORMAT!r}, "
                              f"found {found!r}{hint}")
    version = _meta(path, meta, "format_version", "an integer")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: subject format version {version!r}; this version of CustomContrast reads 1 to "
                              f"{FORMAT_VERSION}" + (" (update the extension)" if isinstance(version, int)
                                                     and version > FORMAT_VERSION else ""))
    layers = _int_list(path, meta, "clip_layers")
    shape = _int_list(path, meta, "token_shape")
    try:
        tower = VisionTower.from_json(meta.get("clip_vision", "null"))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: metadata clip_vision is not a CLIP-vision record ({err})") from None
    width = _meta(path, meta, "clip_width", "an integer")
    if width != tower.hidden_size or len(shape) != 3 or (shape[0], shape[2]) != (len(layers), width):
        raise CheckpointError(f"{path}: metadata token_shape {list(shape)} contradicts its {len(layers)} clip_layers "
                              f"and clip_width {width} (CLIP-vision record {tower.describe()}): expected [K, T, D] = "
                              f"[{len(layers)}, T, {tower.hidden_size}]")
    names = sorted(header.entries)
    if names != sorted(TENSORS):
        missing = sorted(set(TENSORS) - set(names))
        unexpected = sorted(set(names) - set(TENSORS))
        raise CheckpointError(f"{path}: expected the tensors {list(TENSORS)}, found {names} (missing {missing}, "
                              f"unexpected {unexpected[:3]})")
    for name, entry in header.entries.items():
        if entry.dtype != "F32" or entry.shape != (1, *shape):
            raise CheckpointError(f"{path}: tensor {name!r} must be F32 of shape {[1, *shape]} (the metadata's "
                                  f"token_shape), found {entry.dtype} of shape {list(entry.shape)}")
    tensors = read_tensors(path)
    _check_tensors(path, tensors, layers, width)
    weights = _meta(path, meta, "image_weights", "a JSON list of numbers") if "image_weights" in meta else []
    images = _meta(path, meta, "images", "an integer") if "images" in meta else 1
    return SavedSubject(hidden=tensors["hidden"], blank=tensors["blank"], clip_layers=layers, clip_vision=tower,
                        preset=str(meta.get("preset", "custom")), base=str(meta.get("base", "sd15")),
                        images=images if isinstance(images, int) else 1,
                        image_weights=tuple(float(w) for w in weights) if isinstance(weights, list) else ())


def _check_tensors(path: Path, tensors: Mapping[str, Tensor], layers: tuple[int, ...], width: int,
                   writing: bool = False) -> None:
    """Both tensors (1, K, T, D) with K = len(layers), D = width, the same shape, finite."""
    verb = f"not writing {path}" if writing else f"{path}"
    hidden, blank = tensors["hidden"], tensors["blank"]
    if hidden.ndim != 4 or hidden.shape[0] != 1 or hidden.shape[1] != len(layers) or hidden.shape[3] != width:
        raise CheckpointError(f"{verb}: hidden must have shape (1, {len(layers)}, T, {width}) (one subject, its "
                              f"{len(layers)} CLIP-vision layers, width {width}), found {tuple(hidden.shape)}")
    if blank.shape != hidden.shape:
        raise CheckpointError(f"{verb}: blank must have the shape of hidden {tuple(hidden.shape)}, found "
                              f"{tuple(blank.shape)}")
    for name in TENSORS:
        if not torch.isfinite(tensors[name]).all():
            raise CheckpointError(f"{verb}: {name} contains NaN or infinite values")


def check_fits(path: str | Path, subject: SavedSubject, config: EncoderConfig,
               clip_vision: VisionTower | None) -> None:
    """Refuses a subject encoded for other CLIP-vision features than the checkpoint (``config``, and its record
    ``clip_vision`` when it has one) reads: another width, other layers, another CLIP-vision model. The base
    model does not matter: the sd15 and sdxl presets read the same ViT-H/14 features."""
    trained = clip_vision or VisionTower.of_config(config)
    preset = preset_of(config) or "custom"
    problems = []
    if subject.width != config.clip_width or subject.clip_layers != config.clip_layers:
        problems.append(f"CLIP-vision width {subject.width} and layers {subject.clip_layers} here, "
                        f"{config.clip_width} and {config.clip_layers} for the checkpoint")
    problems += [f"{d} (subject vs checkpoint)" for d in subject.clip_vision.differences(trained)]
    if problems:
        raise CheckpointError(f"{path} was encoded with a checkpoint of the `{subject.preset}` preset and CLIP-vision "
                              f"model {subject.clip_vision.describe()}; the CUSTOMCONTRAST given (`{preset}` preset) "
                              f"reads {trained.describe()}: {'; '.join(problems)}. Encode the subject again with this "
                              "checkpoint and its CLIP-vision model")


def image_weights(text: str, images: int) -> list[float] | None:
    """The Encode Subject ``image_weights`` input: "" (None: equal weights) or comma-separated numbers, one per
    image, finite, not negative, not all zero; ValueError naming the input otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"image_weights must be comma-separated numbers such as '1.0, 0.5', found {text!r}") from None
    if len(weights) != images:
        raise ValueError(f"image_weights gives {len(weights)} weight(s) for {images} image(s): give one per image "
                         f"(e.g. {', '.join(['1.0'] * images)!r}) or leave it empty for equal weights")
    bad = [p for p, w in zip(parts, weights) if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"image_weights must be finite numbers of at least 0, found {bad[0]!r} in {text!r}")
    if sum(weights) <= 0:
        raise ValueError(f"image_weights are all zero ({text!r}): at least one image must have a weight above 0")
    return weights


def weighted_mean(hidden: Tensor, weights: list[float] | None) -> Tensor:
    """The references' features averaged, each with its weight (equal without). Shapes: (B, K, T, D) ->
    (1, K, T, D)."""
    if weights is None:
        return hidden.mean(0, keepdim=True)
    w = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device)
    return (hidden * (w / w.sum())[:, None, None, None]).sum(0, keepdim=True)

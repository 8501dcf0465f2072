"""Frozen configuration of the MFI-Encoder and its named presets."""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from typing import Any

from .layers import BASE_CHANNELS, BASE_LAYER_COUNT, CrossAttentionLayer, default_layer_groups, layer_table


def dataclass_from_dict(cls: type, data: dict[str, Any], what: str, complete: bool = False) -> Any:
    """Builds a dataclass from a plain dict, refusing unknown fields by name (configs read from JSON);
    ``complete``: every field must be given (a saved config, where a default would silently differ)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object (a dict), found {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown}; expected a subset of {sorted(known)}")
    missing = sorted(known - set(data))
    if complete and missing:
        raise ValueError(f"{what} lacks the fields {missing}; a saved config names all of {sorted(known)}")
    return cls(**data)


_WIDTH = (1, 2**16)   # any real width is far below; a larger one would only fail later, deep inside torch
_INT_RANGES: dict[str, tuple[int, int]] = {   # field -> inclusive [low, high]
    "clip_width": _WIDTH, "clip_num_layers": (1, 1024), "width": _WIDTH, "heads": (1, 1024),
    "dim_head": (1, 4096), "depth": (1, 256), "ff_mult": (1, 64), "num_visual_tokens": (1, 4096),
    "context_dim": _WIDTH, "fourier_dim": (2, 2**16), "max_timestep": (1, 10**6), "cls_dim": _WIDTH,
}
_TUPLE_FIELDS: dict[str, tuple[int, int]] = {   # field -> inclusive range of each entry
    "block_out_channels": _WIDTH, "clip_layers": (0, 1024), "token_widths": _WIDTH, "layer_groups": (0, 1024),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"encoder config {name}: expected an integer in [{low}, {high}], found {value!r}")


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    """A list/tuple of integers in the field's range, as a tuple of ints (JSON gives lists)."""
    low, high = _TUPLE_FIELDS[name]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"encoder config {name}: expected a non-empty list of integers, found {value!r}")
    for i, x in enumerate(value):
        _check_int(f"{name}[{i}]", x, low, high)
    return tuple(int(x) for x in value)


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild an MFI-Encoder and its visual K/V projections (Sec. 3.2, 4.1)."""

    base: str = "sd15"                                  # UNet family: "sd15" or "sdxl"
    block_out_channels: tuple[int, ...] = BASE_CHANNELS["sd15"]  # UNet widths (decides visual K/V sizes)
    clip_width: int = 1280                              # CLIP-vision hidden size (ViT-H/14 = 1280)
    clip_num_layers: int = 32                           # transformer layers of that CLIP-vision model
    clip_layers: tuple[int, ...] = (11, 22, 32)         # HF hidden_states indices (0 = patch embeddings)
    width: int = 768                                    # Q-Former width d
    heads: int = 12
    dim_head: int = 64
    depth: int = 4                                      # Q-Former blocks per Q-Former (Sec. 4.1)
    ff_mult: int = 4
    num_visual_tokens: int = 16                         # m visual tokens (+1 visual CLS query)
    token_widths: tuple[int, ...] = (768,)              # word-embedding width per text encoder (SDXL: 768, 1280)
    context_dim: int = 768                              # UNet cross-attention context width
    layer_groups: tuple[int, ...] = tuple(range(16))    # S+ token group of each layer, execution order
    fourier_dim: int = 256                              # Fourier features of the timestep
    max_timestep: int = 1000                            # training schedule's timesteps (the Fourier map takes
                                                        # raw timesteps in [0, max_timestep), recorded)
    cls_dim: int = 512                                  # shared width of the projected CLS tokens (CSCL)

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or self.base not in BASE_LAYER_COUNT:
            raise ValueError(f"encoder config base: expected one of {sorted(BASE_LAYER_COUNT)}, found {self.base!r}")
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, _int_tuple(name, getattr(self, name)))
        for name, (low, high) in _INT_RANGES.items():
            _check_int(name, getattr(self, name), low, high)
        n_layers = len(self.layers)
        if n_layers != BASE_LAYER_COUNT[self.base]:
            raise ValueError(f"{self.base} has {BASE_LAYER_COUNT[self.base]} cross-attention layers, got {n_layers}")
        if len(self.layer_groups) != n_layers:
            raise ValueError(
                f"layer_groups must give one group per cross-attention layer: expected {n_layers} "
                f"entries, found {len(self.layer_groups)}"
            )
        groups = sorted(set(self.layer_groups))
        if groups != list(range(len(groups))):
            raise ValueError(f"layer_groups must use every group id 0..G-1 exactly, found ids {groups}")
        bad = [i for i in self.clip_layers if not 0 <= i <= self.clip_num_layers]
        if bad or not self.clip_layers:
            raise ValueError(
                f"clip_layers must be non-empty HF hidden_states indices in [0, {self.clip_num_layers}], found {self.clip_layers}"
            )
        if self.fourier_dim % 2:
            raise ValueError(f"fourier_dim must be even (sin and cos halves), found {self.fourier_dim}")

    @property
    def layers(self) -> tuple[CrossAttentionLayer, ...]:
        """Cross-attention layers of the UNet this encoder serves, in execution order."""
        return layer_table(self.base, self.block_out_channels)

    @property
    def num_groups(self) -> int:
        """Number of S+ tokens the Textual Q-Former emits (one per layer group)."""
        return max(self.layer_groups) + 1

    @property
    def token_dim(self) -> int:
        """Width of one S+ token: the word-embedding widths of all text encoders concatenated."""
        return sum(self.token_widths)

    def to_json(self) -> str:
        """Serialises the config for checkpoint metadata."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EncoderConfig":
        """Rebuilds a config from :meth:`to_json`; unknown or missing fields raise ValueError."""
        data: dict[str, Any] = json.loads(text)
        return dataclass_from_dict(cls, data, "encoder config", complete=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        """Builds a config from a plain dict (missing fields take their defaults), rejecting unknown fields."""
        return dataclass_from_dict(cls, data, "encoder config")


def _preset(base: str, channels: tuple[int, ...] | None = None, **kwargs: Any) -> EncoderConfig:
    layers = layer_table(base, channels)
    kwargs.setdefault("layer_groups", default_layer_groups(base, layers))
    return EncoderConfig(base=base, block_out_channels=channels or BASE_CHANNELS[base], **kwargs)


PRESETS: dict[str, EncoderConfig] = {
    # SD1.5 + CLIP ViT-H/14 vision features, one S+ token per layer (16), as in the paper
    "sd15": _preset("sd15"),
    # SDXL + ViT-H/14, S+ width 768 (CLIP-L) + 1280 (CLIP-G), one group per transformer stack (11)
    "sdxl": _preset("sdxl", width=1280, heads=20, token_widths=(768, 1280), context_dim=2048),
    # same structure as sd15 with small widths, for CPU tests and the CPU training preset
    "tiny": _preset("sd15", (32, 64, 64, 64), clip_width=64, clip_num_layers=4,
                    clip_layers=(2, 3, 4), width=64, heads=4, dim_head=16, depth=2, num_visual_tokens=4,
                    token_widths=(32,), context_dim=32, fourier_dim=32, cls_dim=32),
    # same structure as sdxl with small widths (two text encoders)
    "tiny_sdxl": _preset("sdxl", (32, 64, 64), clip_width=64, clip_num_layers=4, clip_layers=(2, 3, 4),
                         width=64, heads=4, dim_head=16, depth=2, num_visual_tokens=4,
                         token_widths=(32, 48), context_dim=80, fourier_dim=32, cls_dim=32),
}


def get_preset(name: str) -> EncoderConfig:
    """Returns a named preset config."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown encoder preset {name!r}; expected one of {sorted(PRESETS)}") from None




REAL_PRESETS = ("sd15", "sdxl")   # the presets whose UNet widths are a real SD1.5 / SDXL model's


def preset_of(config: EncoderConfig) -> str | None:
    """The name of the preset ``config`` equals, or None (a config of its own)."""
    return next((name for name, preset in PRESETS.items() if preset == config), None)


def toy_model(config: EncoderConfig) -> str | None:
    """What makes ``config`` a toy that no real SD1.5 / SDXL model can use (None when it is not one): UNet widths
    other than the base model's, as the ``tiny`` presets of the tests and the quick CPU training have."""
    if config.block_out_channels == BASE_CHANNELS[config.base]:
        return None
    name = preset_of(config)
    what = f"the `{name}` preset, the toy test model" if name else "a toy model"
    base = {"sd15": "SD1.5", "sdxl": "SDXL"}[config.base]
    return (f"{what}: it cannot draw on a real SD1.5 or SDXL model (its UNet widths are {config.block_out_channels}, "
            f"{base}'s are {BASE_CHANNELS[config.base]}; its CLIP-vision width is {config.clip_width})")

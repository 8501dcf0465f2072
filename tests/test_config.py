"""Encoder config validation and JSON round trip."""
import dataclasses
import json

import pytest

from customcontrast_core import PRESETS, EncoderConfig, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    config = get_preset(name)
    assert EncoderConfig.from_json(config.to_json()) == config


def test_sdxl_can_use_one_group_per_layer():
    config = dataclasses.replace(get_preset("sdxl"), layer_groups=tuple(range(70)))
    assert config.num_groups == 70 and config.token_dim == 2048


@pytest.mark.parametrize("change,message", [
    (dict(layer_groups=tuple(range(15))), "expected 16 entries, found 15"),
    (dict(layer_groups=(0,) * 15 + (2,)), "every group id"),
    (dict(clip_layers=(2, 9)), r"\[0, 4\]"),
    (dict(fourier_dim=33), "even"),
    (dict(heads=0), r"encoder config heads: expected an integer in \[1, 1024\], found 0"),
])
def test_invalid_configs_say_what_is_wrong(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_preset("tiny"), **change)


def test_unknown_fields_and_presets():
    with pytest.raises(ValueError, match="unknown encoder config fields"):
        EncoderConfig.from_dict({"base": "sd15", "wdith": 3})
    with pytest.raises(ValueError, match="expected one of"):
        get_preset("sd21")


def test_a_saved_config_must_name_every_field():
    """A checkpoint's config without heads/dim_head would load with the defaults (12 x 64 = 8 x 96 in width:
    the weights fit, the head split is wrong): refused. A user's partial dict still takes the defaults."""
    data = json.loads(get_preset("tiny").to_json())
    del data["heads"], data["dim_head"]
    with pytest.raises(ValueError, match=r"lacks the fields \['dim_head', 'heads'\]"):
        EncoderConfig.from_json(json.dumps(data))
    assert EncoderConfig.from_dict({"base": "sd15"}).heads == 12


@pytest.mark.parametrize("field, value, message", [
    ("width", 64.5, r"encoder config width: expected an integer in \[1, 65536\], found 64.5"),
    ("width", 64.0, r"encoder config width: expected an integer in \[1, 65536\], found 64.0"),
    ("heads", "4", r"encoder config heads: expected an integer in \[1, 1024\], found '4'"),
    ("depth", True, r"encoder config depth: expected an integer in \[1, 256\], found True"),
    ("depth", 20000, r"encoder config depth: expected an integer in \[1, 256\], found 20000"),
    ("dim_head", None, r"encoder config dim_head: expected an integer in \[1, 4096\], found None"),
    ("fourier_dim", 0, r"encoder config fourier_dim: expected an integer in \[2, 65536\], found 0"),
    ("clip_width", 2**20, r"encoder config clip_width: expected an integer in \[1, 65536\], found 1048576"),
    ("block_out_channels", [32, 64.5, 64, 64],
     r"encoder config block_out_channels\[1\]: expected an integer in \[1, 65536\], found 64.5"),
    ("clip_layers", "234", r"encoder config clip_layers: expected a non-empty list of integers, found '234'"),
    ("token_widths", [], r"encoder config token_widths: expected a non-empty list of integers, found \[\]"),
    ("layer_groups", list(range(15)) + [-1],
     r"encoder config layer_groups\[15\]: expected an integer in \[0, 1024\], found -1"),
    ("base", 5, r"encoder config base: expected one of \['sd15', 'sdxl'\], found 5"),
])
def test_every_field_is_type_and_range_checked_from_json(field, value, message):
    """A JSON config with a float, string, bool or out-of-range value is refused naming the field, never passed
    on to torch (64.5 used to fail inside torch.empty) nor truncated (64.5 in a list used to become 64)."""
    data = {**json.loads(get_preset("tiny").to_json()), field: value}
    with pytest.raises(ValueError, match=message):
        EncoderConfig.from_json(json.dumps(data))


def test_json_lists_become_tuples():
    data = json.loads(get_preset("tiny").to_json())
    config = EncoderConfig.from_dict(data)
    assert config == get_preset("tiny") and isinstance(config.block_out_channels, tuple)

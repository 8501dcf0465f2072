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
    (dict(heads=0), "heads must be positive"),
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

"""Layer tables against real diffusers UNets with SD1.5 and SDXL block structure."""
import pytest
import torch

from customcontrast_core import get_preset, layer_table
from customcontrast_core.layers import by_comfy_key, by_diffusers_name, default_layer_groups
from training.tiny_models import tiny_unet


def test_layer_counts():
    assert len(layer_table("sd15")) == 16
    assert len(layer_table("sdxl")) == 70


def test_sd15_table_matches_comfyui_keys_and_widths():
    layers = layer_table("sd15")
    assert [layer.comfy_key for layer in layers] == (
        [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
        + [("output", i, 0) for i in range(3, 12)]
    )
    assert [layer.inner_dim for layer in layers] == [320, 320, 640, 640, 1280, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3
    assert [layer.downsample for layer in layers][:7] == [1, 1, 2, 2, 4, 4, 8]
    assert layers[6].diffusers_name == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert layers[7].diffusers_name == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


def test_sdxl_table_matches_comfyui_keys():
    layers = layer_table("sdxl")
    keys = by_comfy_key(layers)
    assert len(keys) == 70
    counts = {}
    for block, number, _ in keys:
        counts[(block, number)] = counts.get((block, number), 0) + 1
    assert counts == {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10,
                      ("middle", 0): 10, ("output", 0): 10, ("output", 1): 10, ("output", 2): 10,
                      ("output", 3): 2, ("output", 4): 2, ("output", 5): 2}
    assert sum(layer.inner_dim == 640 for layer in layers) == 10
    assert [layer.stack for layer in layers] == list(default_layer_groups("sdxl", layers))
    assert max(default_layer_groups("sdxl", layers)) + 1 == 11
    assert by_diffusers_name(layers)["mid_block.attentions.0.transformer_blocks.9.attn2"].comfy_key == ("middle", 0, 9)


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_names_exist_and_execution_order_matches_hook_trace(preset):
    config = get_preset(preset)
    torch.manual_seed(0)
    unet = tiny_unet(config).eval()
    modules = dict(unet.named_modules())
    attn2 = [name for name in modules if name.endswith("attn2")]
    table = config.layers
    assert sorted(attn2) == sorted(layer.diffusers_name for layer in table)
    for layer in table:
        assert modules[layer.diffusers_name].to_q.out_features == layer.inner_dim
        assert modules[layer.diffusers_name].to_k.in_features == config.context_dim

    trace: list[tuple[str, int]] = []
    hooks = [modules[name].register_forward_hook(
        lambda mod, args, kwargs, out, name=name: trace.append((name, args[0].shape[1])), with_kwargs=True)
        for name in attn2]
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 7, config.context_dim))
    finally:
        for hook in hooks:
            hook.remove()
    assert [name for name, _ in trace] == [layer.diffusers_name for layer in table]
    # token grid of each layer = (16 / downsample)^2 for a 16x16 latent
    assert [n for _, n in trace] == [(16 // layer.downsample) ** 2 for layer in table]
    # the order diffusers lists processors in is NOT execution order (down -> up -> mid)
    processor_order = [k.removesuffix(".processor") for k in unet.attn_processors if "attn2" in k]
    assert processor_order != [layer.diffusers_name for layer in table]

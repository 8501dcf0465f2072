"""CustomContrast chained with the real ComfyUI_IPAdapter_plus (COMFYUI_PATH and IPADAPTER_PLUS_PATH).

IPAdapter_plus registers its ``attn2`` replaces under two-part keys on SD1.5 (``("input", 1)``) and three-part keys
on SDXL (``("input", 4, 0)``); ComfyUI looks a layer up under the three-part key first. Both adapters must act
whichever is applied first, and a second Apply must keep IPAdapter's callbacks.
"""
import sys
from types import SimpleNamespace

import pytest
import torch

from comfy_env import comfyui, ipadapter_plus_path
from test_comfyui_nodes import apply, encode, files, loaded, photo, sample  # noqa: F401 (fixtures)

SD15_LAYER_WIDTHS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]  # IPAdapter's order


@pytest.fixture(scope="module")
def env():
    env = comfyui()
    if not ipadapter_plus_path():
        pytest.skip("IPADAPTER_PLUS_PATH is not set to a ComfyUI_IPAdapter_plus folder (see docs/testing.md)")
    return env


@pytest.fixture(scope="module")
def ipadapter_module(env):
    return next(m for name, m in sys.modules.items() if name.endswith("IPAdapterPlus") and hasattr(m, "ipadapter_execute"))


def random_ipadapter(context: int, widths: list[int], embeds: int, seed: int = 3) -> dict:
    """The state of an IPAdapter (the basic, non-plus kind) with random weights, as IPAdapter_plus' loader returns it."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=generator) * 0.05   # noqa: E731
    image_proj = {"proj.weight": normal(4 * context, embeds), "proj.bias": torch.zeros(4 * context),
                  "norm.weight": torch.ones(context), "norm.bias": torch.zeros(context)}
    ip_adapter = {}
    for number, width in enumerate(widths):     # module keys 1, 3, 5, ... as IPAdapter_plus numbers the layers
        ip_adapter[f"{2 * number + 1}.to_k_ip.weight"] = normal(width, context) * 20
        ip_adapter[f"{2 * number + 1}.to_v_ip.weight"] = normal(width, context) * 20
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def lookup(model, key: tuple[str, int, int]):
    """The attn2 replace ComfyUI's BasicTransformerBlock runs for a layer: three-part key first, then two-part
    (comfy/ldm/modules/attention.py, BasicTransformerBlock.forward)."""
    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replaces.get(key, replaces.get(key[:2]))


@pytest.fixture(scope="module")
def sd15(env, loaded, photo):  # noqa: F811 (the imported fixtures)
    """The SD1.5 models and photo of test_comfyui_nodes (its fixtures, on this module's ``env``), a random IPAdapter."""
    return SimpleNamespace(loaded=loaded, photo=photo, subject=encode(env, loaded, photo),
                           ipadapter=random_ipadapter(768, SD15_LAYER_WIDTHS, embeds=768),
                           negative=env.nodes.CLIPTextEncode().encode(loaded["clip"], "")[0])


def ipadapter(env, model, sd15, weight=1.0):
    node = env.nodes.NODE_CLASS_MAPPINGS["IPAdapterAdvanced"]()
    return node.apply_ipadapter(model, sd15.ipadapter, weight=weight, image=sd15.photo,
                                clip_vision=sd15.loaded["clip_vision"])[0]


def test_sd15_both_adapters_act_in_either_order_and_with_a_second_apply(env, sd15):
    """Fails when CustomContrast registers SD1.5 layers under three-part keys only: ComfyUI then runs its replace and
    never IPAdapter's two-part one, and the chained samples equal CustomContrast alone (max difference 0)."""
    base = sd15.loaded["model"]
    cc, positive = apply(env, sd15.loaded, sd15.subject)
    run = lambda model: sample(env, model, positive, sd15.negative)   # noqa: E731
    plain, cc_alone, ip_alone = run(base), run(cc), run(ipadapter(env, base, sd15))
    ip_then_cc = run(apply(env, dict(sd15.loaded, model=ipadapter(env, base, sd15)), sd15.subject)[0])
    cc_then_ip = run(ipadapter(env, cc, sd15))
    assert (ip_alone - plain).abs().max() > 1e-2 and (cc_alone - plain).abs().max() > 1e-2
    for chained in (ip_then_cc, cc_then_ip):
        assert (chained - cc_alone).abs().max() > 1e-2, "IPAdapter dropped"
        assert (chained - ip_alone).abs().max() > 1e-2, "CustomContrast dropped"
    torch.testing.assert_close(ip_then_cc, cc_then_ip, rtol=0, atol=0)   # one replace: patches then callbacks

    # a second Apply (another prompt) on the chained MODEL keeps IPAdapter's callbacks on the first positive's rows
    second, positive2 = apply(env, dict(sd15.loaded, model=ipadapter(env, cc, sd15)), sd15.subject,
                              prompt="<subject> in the snow", weight=0.5)
    torch.testing.assert_close(run(second), cc_then_ip, rtol=0, atol=0)
    second_alone = apply(env, dict(sd15.loaded, model=ipadapter(env, base, sd15)), sd15.subject,
                         prompt="<subject> in the snow", weight=0.5)[0]
    torch.testing.assert_close(sample(env, second, positive2, sd15.negative),
                               sample(env, second_alone, positive2, sd15.negative), rtol=0, atol=0)


def test_sd15_ipadapter_weight_zero_in_the_chain_is_customcontrast_alone(env, sd15):
    """Chaining adds nothing of its own: with IPAdapter's weight at 0 the chained samples are CustomContrast's."""
    cc, positive = apply(env, sd15.loaded, sd15.subject)
    chained = ipadapter(env, cc, sd15, weight=0.0)
    torch.testing.assert_close(sample(env, chained, positive, sd15.negative),
                               sample(env, cc, positive, sd15.negative), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_layer_finds_both_adapters_under_ipadapters_real_keys(env, ipadapter_module, family):
    """On the SD1.5 and SDXL layer tables, with IPAdapter_plus' own registration code (ipadapter_execute): for every
    cross-attention layer, the replace ComfyUI picks after chaining (either order) runs this patch and exactly the
    IPAdapter callbacks ComfyUI would run for that layer with IPAdapter alone."""
    import comfy.model_patcher
    import comfy.model_sampling

    from customcontrast_core.layers import by_comfy_key, layer_table

    glue = sys.modules[env.nodes.NODE_CLASS_MAPPINGS["CustomContrastApply"].__module__.replace(".apply_node",
                                                                                             ".comfy_glue")]
    layers = by_comfy_key(layer_table(family))
    holder = torch.nn.Module()
    holder.model_sampling = comfy.model_sampling.ModelSamplingDiscrete()
    model = comfy.model_patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))
    context, count = (768, 16) if family == "sd15" else (2048, 70)
    state = random_ipadapter(context, [8] * count, embeds=16)

    def with_ipadapter(m):
        m = m.clone()
        ipadapter_module.ipadapter_execute(m, state, None, pos_embed=torch.randn(1, 16))
        return m

    patch = SimpleNamespace(layers=layers)
    alone = with_ipadapter(model)
    for chained in (glue.install(alone, patch, []), with_ipadapter(glue.install(model, patch, []))):
        for key in layers:
            replace, expected = lookup(chained, key), lookup(alone, key)
            assert isinstance(replace, glue.Attn2Replace) and replace.patches == [patch], key
            assert len(replace.callback) == (len(expected.callback) if expected is not None else 0), key
    # IPAdapter alone reaches at least every input and output layer (its middle key is ("middle", 1), ComfyUI's
    # middle block is ("middle", 0) in some versions), so the loop above compared real callbacks
    middle = sum(key[0] == "middle" for key in layers)
    assert sum(lookup(alone, key) is not None for key in layers) >= count - middle

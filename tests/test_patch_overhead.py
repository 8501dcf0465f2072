"""Operator counts of the sampling patch: deterministic regression guards for its per-layer cost.

Counting dispatched ATen operators (not timing them) is exact and machine-independent; on a GPU each
non-view operator is a kernel launch, which is what bounds a fast GPU's sampling speed.
"""
import pytest
import torch

from benchmarks.bench_layer_overhead import measure
from customcontrast_core import CustomContrastModel, get_preset


@pytest.mark.parametrize("family,use_mask,limit,kernels", [("sd15", True, 48, 17), ("sd15", False, 27, 7),
                                                           ("sdxl", True, 49, 17), ("sdxl", False, 25, 7)])
def test_operators_per_patched_layer_stay_bounded(family, use_mask, limit, kernels):
    result = measure(family, use_mask, evaluations=2)
    assert result["layers"] == {"sd15": 16, "sdxl": 70}[family]
    assert result["ops_per_layer_plain"] < result["ops_per_layer_patched"] <= limit
    assert result["kernels_per_layer_plain"] < result["kernels_per_layer_patched"] <= kernels


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_fused_visual_kv_equals_each_layers_projection(preset):
    torch.manual_seed(0)
    model = CustomContrastModel(get_preset(preset)).eval()
    tokens = torch.randn(2, 4, model.config.context_dim)
    weight, slices = model.visual_kv.fused()
    projected = torch.nn.functional.linear(tokens, weight)
    assert list(slices) == [layer.name for layer in model.config.layers]
    for name, proj in model.visual_kv.items():
        offset, inner = slices[name]
        k, v = proj(tokens)
        torch.testing.assert_close(projected[..., offset:offset + inner], k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(projected[..., offset + inner:offset + 2 * inner], v, rtol=1e-5, atol=1e-6)
    assert weight.shape[0] == sum(2 * layer.inner_dim for layer in model.config.layers)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_stacked_and_per_layer_visual_projection_give_the_same_layers(family, monkeypatch):
    """The Loader's stacked visual K/V (one parameter), a stacked copy of a per-layer checkpoint and per-layer
    projection (a per-layer checkpoint too large for a copy): the same layer outputs."""
    from benchmarks.bench_layer_overhead import _evaluation, _patch
    from benchmarks.comfy_runtime import extension

    stacked_kv = extension("nodes.stacked_kv")
    outputs = {}
    for variant, stacked, limit in (("loader", True, 0), ("copy", False, 2**40), ("per_layer", False, 0)):
        monkeypatch.setattr(stacked_kv, "FUSED_WEIGHT_BYTES", limit)
        torch.manual_seed(0)
        patch, config, base = _patch(family, True, stacked=stacked)
        outputs[variant] = []
        for sigma in (9.0, 8.0, 7.0):        # masks from the first evaluation act in the later ones
            torch.manual_seed(int(sigma))
            _evaluation(patch, config, base, sigma, outputs=outputs[variant])
        assert isinstance(patch.model.visual_kv, stacked_kv.StackedVisualKV) == stacked
        assert (stacked_kv.stacked_visual_kv(patch.model.visual_kv) is None) == (variant == "per_layer")
    assert len(outputs["loader"]) == 3 * len(config.layers)
    for loader, copy, per_layer in zip(outputs["loader"], outputs["copy"], outputs["per_layer"]):
        torch.testing.assert_close(loader, copy, rtol=0, atol=0)
        torch.testing.assert_close(loader, per_layer, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_loader_stacks_the_visual_kv_into_one_parameter_without_a_copy(preset):
    """One parameter holds every layer's W_k, W_v (ComfyUI moves it as one tensor); the per-layer weights are
    gone (same parameter count); each layer's slices project as its KVProjection did; after a move (here a
    dtype change) the layers read the moved weight."""
    from benchmarks.comfy_runtime import extension

    stacked_kv = extension("nodes.stacked_kv")
    torch.manual_seed(0)
    model = CustomContrastModel(get_preset(preset)).eval()
    per_layer = {name: proj for name, proj in model.visual_kv.items()}
    count = sum(p.numel() for p in model.parameters())
    stacked_kv.stack_for_sampling(model)
    stacked = model.visual_kv
    assert [name for name, _ in stacked.named_parameters()] == ["weight"]
    assert sum(p.numel() for p in model.parameters()) == count and len(stacked) == len(per_layer)
    assert list(stacked.keys()) == [layer.name for layer in model.config.layers]
    assert stacked_kv.stack_for_sampling(model).visual_kv is stacked                  # converting twice: a no-op
    tokens = torch.randn(2, 4, model.config.context_dim)
    for name, proj in per_layer.items():
        for got, expected in zip(stacked[name](tokens), proj(tokens)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    model.to(torch.float64)
    weight_k, _ = stacked[model.config.layers[0].name].weights
    assert weight_k.dtype == torch.float64 and weight_k.data_ptr() == stacked.weight.data_ptr()
    with pytest.raises(ValueError, match="stacked visual K/V weight must be"):
        stacked_kv.StackedVisualKV(torch.zeros(3, 8), stacked.slices)


def test_flop_counter_counts_fused_attention_on_the_cpu():
    """The benchmarks' FLOP counts include SDPA: QK^T and PV forward, 2.5x that backward (torch's formulas)."""
    from benchmarks.common import flop_counter

    q = torch.randn(2, 3, 40, 16, requires_grad=True)
    k, v = torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 16)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    forward = 2 * (2 * 3 * 40 * 24 * 16) * 2   # two products of 2*B*H*L*S*D each
    assert counter.get_total_flops() == forward + forward * 5 // 2


def test_placeholder_bias_rows_stay_aligned_in_the_patch():
    """The bias each grid shares is built in the layers' dtype with rows padded in memory (fused kernels read it
    without padding a copy per layer), and the capture layers' probes are kept with the rows of the run."""
    from benchmarks.bench_layer_overhead import _evaluation, _patch
    from customcontrast_core.attention import BIAS_ALIGNMENT

    patch, config, base = _patch("sd15", True, dtype=torch.float16)
    for sigma in (9.0, 8.0):   # the second evaluation applies the first one's masks: every grid has a bias
        _evaluation(patch, config, base, sigma)
    biases = [b for b in patch._eval.biases.values() if b is not None]
    assert len(biases) == len({layer.downsample for layer in config.layers})
    for (_, keys, dtype), bias in patch._eval.biases.items():   # (B, 1, N, T): broadcast over heads
        assert bias.dtype == dtype and bias.shape[1] == 1 and bias.shape[-1] == keys
        assert bias.stride(2) % BIAS_ALIGNMENT == 0
    probes = patch._eval.probes              # keys -> the placeholder columns, (keys, heads) -> over the heads
    assert sorted(probes, key=str) == [(77, 4), 77] and probes[(77, 4)].shape == (2, 4, 77, 8)
    assert probes[77].shape == (2, 1, 77, 8) and probes[(77, 4)].data_ptr() == probes[77].data_ptr()
    _evaluation(patch, config, base, 7.0)
    assert patch._eval.probes[(77, 4)] is probes[(77, 4)]


def test_device_busy_sums_the_operators_time():
    """On the CPU the profiled busy time is the operators' own time: positive, and within the run's wall time."""
    from benchmarks.common import busy_fractions, device_busy

    a = torch.randn(256, 256)
    result = device_busy(lambda: [a @ a for _ in range(20)], "cpu")
    assert 0 < result["busy_seconds"] <= result["profiled_wall_seconds"]
    busy = busy_fractions({"mm": lambda: a @ a}, ["mm"], {"mm": {"median": 2.0}}, "cpu")["mm"]
    assert busy["wall_seconds"] == 2.0 and busy["busy_fraction"] == busy["busy_seconds"] / 2.0 > 0

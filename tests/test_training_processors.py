"""Training processors: the one-matmul visual K/V and the unbound per-group contexts give the per-layer results."""
import pytest
import torch

from customcontrast_core import CustomContrastModel, get_preset
from training.models import build_tiny
from training.processors import ProcessorState, install_processors, project_visual_kv


def test_projected_visual_kv_equals_each_layers_projection():
    torch.manual_seed(0)
    # float64: the fused and per-layer gradients sum the same terms in another order, which float32 rounds
    # differently per CPU (2.9e-6 apart on some machines); any wiring error is many orders larger
    model = CustomContrastModel(get_preset("tiny")).double()
    tokens = torch.randn(3, model.config.num_visual_tokens, model.config.context_dim, dtype=torch.float64,
                         requires_grad=True)
    projected = project_visual_kv(model.visual_kv, tokens)
    assert list(projected) == list(model.visual_kv)
    grads = []
    for fused in (True, False):
        total = 0
        for name, kv in model.visual_kv.items():
            k, v = projected[name] if fused else kv(tokens)
            assert k.shape == v.shape == (3, model.config.num_visual_tokens, kv.to_k.weight.shape[0])
            total = total + (k * torch.cos(k)).sum() + v.square().sum()
        grads.append(torch.autograd.grad(total, [tokens, *model.visual_kv.parameters()]))
        if not fused:
            torch.testing.assert_close(projected[name][0], k)
            torch.testing.assert_close(projected[name][1], v)
    for fused, per_layer in zip(*grads):
        torch.testing.assert_close(fused, per_layer, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_unet_forward_with_fast_inputs_equals_per_layer_inputs(preset):
    """A UNet forward with the unbound contexts and projected K/V: same output, maps and gradients."""
    config = get_preset(preset)
    torch.manual_seed(0)
    frozen, model = build_tiny(config), CustomContrastModel(config)
    state = ProcessorState()
    install_processors(frozen.unet, model, state, capture_downsample=(2, 4))
    b, groups = 2, config.num_groups
    contexts = torch.randn(groups, b, 77, config.context_dim, requires_grad=True)
    visual = torch.randn(b, config.num_visual_tokens, config.context_dim, requires_grad=True)
    latents, timesteps = torch.randn(b, 4, 16, 16), torch.tensor([10, 700])
    added = None
    if config.base == "sdxl":
        added = {"text_embeds": torch.randn(b, config.token_widths[1]),   # the pooled CLIP-G width
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(b, -1)}
    results = []
    for fast in (False, True):
        state.reset()
        state.contexts = contexts.unbind(0) if fast else contexts
        state.visual_tokens = visual
        state.visual_kv = project_visual_kv(model.visual_kv, visual) if fast else None
        state.slots, state.latent_hw, state.capture = ((3,), (5,)), (16, 16), True
        out = frozen.unet(latents, timesteps, encoder_hidden_states=contexts[0], added_cond_kwargs=added).sample
        maps = torch.cat([torch.cat([m.text, m.visual], dim=1) for m in state.maps.values()], dim=1)
        loss = out.square().mean() + maps.square().sum()
        grads = torch.autograd.grad(loss, [contexts, visual, *model.visual_kv.parameters()])
        results.append((out.detach(), maps.detach(), grads))
    (out_a, maps_a, grads_a), (out_b, maps_b, grads_b) = results
    assert len(state.maps) > 0
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps_b, maps_a, rtol=1e-5, atol=1e-7)
    assert grads_a[0].abs().sum() > 0 and grads_a[1].abs().sum() > 0
    for fast, slow in zip(grads_b, grads_a):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("slots", [((4,), (), (4,)), ((4,), (), (6,)), ((2, 7), (5,), ())])
def test_rows_with_other_or_no_placeholder_share_one_call(with_mask, slots):
    """Prompts without a placeholder (text dropout, the uncond row when evaluating) or with it at other
    positions go through one call per layer (``text_rows``, per-row ``column_weights``): the batched UNet
    equals one UNet call per row (outputs, maps, gradients)."""
    config = get_preset("tiny")
    torch.manual_seed(1)
    frozen, model = build_tiny(config), CustomContrastModel(config)
    state = ProcessorState()
    install_processors(frozen.unet, model, state, capture_downsample=(2, 4))
    b = 3
    contexts = torch.randn(config.num_groups, b, 77, config.context_dim, requires_grad=True)
    visual = torch.randn(b, config.num_visual_tokens, config.context_dim, requires_grad=True)
    latents, timesteps = torch.randn(b, 4, 16, 16), torch.tensor([10, 400, 700])
    masks = torch.rand(b, 16, 16, generator=torch.Generator().manual_seed(2)) if with_mask else None

    def run(rows):
        state.reset()
        state.contexts, state.visual_tokens, state.visual_kv = contexts[:, rows], visual[rows], None
        state.slots, state.latent_hw, state.capture = tuple(slots[i] for i in rows), (16, 16), True
        state.mask = None if masks is None else masks[rows]
        out = frozen.unet(latents[rows], timesteps[rows], encoder_hidden_states=contexts[0, rows]).sample
        maps = torch.cat([torch.cat([m.text, m.visual], dim=1) for m in state.maps.values()], dim=1)
        return out, maps

    out, maps = run(list(range(b)))
    grads = torch.autograd.grad(out.square().sum() + maps.square().sum(), [contexts, visual])
    alone = [run([i]) for i in range(b)]
    grads_alone = torch.autograd.grad(sum(o.square().sum() + m.square().sum() for o, m in alone), [contexts, visual])
    torch.testing.assert_close(out, torch.cat([o for o, _ in alone]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps, torch.cat([m for _, m in alone]), rtol=1e-5, atol=1e-6)
    for batched, single in zip(grads, grads_alone):
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert maps[1].abs().max() > 0   # every row has visual maps, the dropped one a zero text map

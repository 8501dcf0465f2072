"""MFI-Encoder shapes, timestep dependence and gradient flow."""
import pytest
import torch

from customcontrast_core import CustomContrastModel, get_preset, timestep_fourier_features


def clip_hidden(config, batch=2, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, len(config.clip_layers), tokens, config.clip_width, generator=g)


@pytest.mark.parametrize("preset,groups,token_dim,context", [
    ("tiny", 16, 32, 32), ("tiny_sdxl", 11, 80, 80), ("sd15", 16, 768, 768), ("sdxl", 11, 2048, 2048),
])
def test_output_shapes(preset, groups, token_dim, context):
    config = get_preset(preset)
    torch.manual_seed(0)
    model = CustomContrastModel(config)
    with torch.no_grad():
        out = model.encoder(clip_hidden(config), torch.tensor([1.0, 999.0]))
    m = config.num_visual_tokens
    assert out.splus.shape == (2, groups, token_dim)
    assert out.text_cls.shape == (2, token_dim)
    assert out.visual_tokens.shape == (2, m, context)
    assert out.visual_cls.shape == (2, config.width)
    assert out.visual_cls_embed.shape == out.text_cls_embed.shape == (2, config.cls_dim)
    assert model.encoder.layer_tokens(out.splus).shape == (2, len(config.layers), token_dim)
    assert len(model.visual_kv) == {"sd15": 16, "sdxl": 70}[config.base]


def test_splus_depends_on_timestep_only_through_t():
    config = get_preset("tiny")
    torch.manual_seed(0)
    encoder = CustomContrastModel(config).encoder
    x = clip_hidden(config, batch=1)
    with torch.no_grad():
        a, b, c = (encoder(x, torch.tensor([t])) for t in (100.0, 100.0, 600.0))
    assert torch.equal(a.splus, b.splus) and torch.equal(a.visual_tokens, b.visual_tokens)
    assert (a.splus - c.splus).abs().max() > 1e-4
    assert (a.visual_tokens - c.visual_tokens).abs().max() > 1e-5   # TV-Fusion sees the text tokens
    assert torch.equal(a.visual_cls, c.visual_cls)                  # the visual Q-Former does not


def test_batched_timesteps_equal_single_calls():
    config = get_preset("tiny")
    torch.manual_seed(0)
    encoder = CustomContrastModel(config).encoder
    x = clip_hidden(config, batch=3)
    t = torch.tensor([0.0, 250.0, 999.0])
    with torch.no_grad():
        batched = encoder(x, t).splus
        single = torch.cat([encoder(x[i:i + 1], t[i:i + 1]).splus for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_layer_tokens_follow_layer_groups():
    config = get_preset("tiny_sdxl")
    encoder = CustomContrastModel(config).encoder
    splus = torch.arange(11.0)[None, :, None].expand(1, 11, 80)
    tokens = encoder.layer_tokens(splus)
    assert tokens[0, :, 0].tolist() == [float(g) for g in config.layer_groups]


def test_gradients_reach_every_parameter():
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = CustomContrastModel(config)
    out = model.encoder(clip_hidden(config), torch.tensor([10.0, 700.0]))
    loss = sum(t.square().mean() for t in (out.splus, out.text_cls, out.visual_tokens,
                                           out.visual_cls_embed, out.text_cls_embed))
    for name, proj in model.visual_kv.items():
        k, v = proj(out.visual_tokens)
        loss = loss + k.square().mean() + v.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_bad_clip_features_are_rejected_with_shapes():
    config = get_preset("tiny")
    encoder = CustomContrastModel(config).encoder
    with pytest.raises(ValueError, match=r"\(B, 3, T, 64\).*found \(2, 3, 5, 32\)"):
        encoder(torch.randn(2, 3, 5, 32), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="one timestep per sample"):
        encoder(clip_hidden(config), torch.tensor([1.0, 2.0, 3.0]))


def test_fourier_features_closed_form():
    feats = timestep_fourier_features(torch.tensor([0.0, 1.0]), 4)
    torch.testing.assert_close(feats[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    expected = torch.tensor([torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01)),
                             torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01))])
    torch.testing.assert_close(feats[1], expected)

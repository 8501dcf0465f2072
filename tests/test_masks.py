"""Subject masks (Sec. 3.4): known-answer maps, resizing and edge cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from customcontrast_core.masks import (MASK_MODES, MaskConfig, combine_maps, intersect_user_mask, make_mask,
                                       minmax_normalize, resize_mask)


def _blob_map(size: int = 32, center=(10, 21), sigma: float = 3.0, noise: float = 0.05, seed: int = 0):
    """Returns a Gaussian blob plus uniform noise (1, size, size) and the blob's support (radius 2 sigma)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dist2 = (yy - center[0]) ** 2 + (xx - center[1]) ** 2
    blob = torch.exp(-dist2 / (2 * sigma**2))
    g = torch.Generator().manual_seed(seed)
    return (blob + noise * torch.rand(size, size, generator=g))[None], (dist2 <= (2 * sigma) ** 2)[None]


def test_topk_mask_recovers_a_planted_blob():
    maps, support = _blob_map()
    ratio = support.float().mean().item()
    mask = make_mask(maps * 1e-3 + 0.5, MaskConfig(mode="topk", topk_ratio=ratio))   # scale/offset must not matter
    predicted = mask > 0.5
    iou = (predicted & support).sum() / (predicted | support).sum()
    assert iou > 0.8
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_soft_mask_zeroes_values_under_the_threshold_and_keeps_the_rest():
    ramp = torch.linspace(3.0, 7.0, 11).expand(2, 11)[:, None, :]        # (2, 1, 11): min-max gives 0, 0.1, ..., 1
    mask = make_mask(ramp, MaskConfig(mode="soft", threshold=0.25))
    expected = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    torch.testing.assert_close(mask[0, 0], expected)


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_constant_maps_give_zeros_not_nan(mode):
    maps = torch.stack([torch.full((8, 8), 0.3), torch.zeros(8, 8)])
    mask = make_mask(maps, MaskConfig(mode=mode))
    assert torch.isfinite(mask).all() and mask.abs().max() == 0


def test_minmax_normalize_is_per_sample():
    x = torch.stack([torch.arange(4.0), 10 * torch.arange(4.0) - 5, torch.full((4,), 2.0)])
    expected = torch.tensor([[0, 1 / 3, 2 / 3, 1]] * 2 + [[0.0] * 4])
    torch.testing.assert_close(minmax_normalize(x), expected)


def test_combine_maps_averages_a_16_and_a_32_grid():
    g = torch.Generator().manual_seed(1)
    small, large = torch.rand(2, 16 * 16, generator=g), torch.rand(2, 32 * 32, generator=g)
    # bilinear (align_corners=False) at an exact factor 2 downsampling is a 2x2 average
    pooled = F.avg_pool2d(rearrange(large, "b (h w) -> b 1 h w", h=32), 2)
    expected = (rearrange(small, "b (h w) -> b h w", h=16) + rearrange(pooled, "b 1 h w -> b h w")) / 2
    torch.testing.assert_close(combine_maps([small, large], [(16, 16), (32, 32)], (16, 16)), expected)
    # upsampling a constant 16x16 map is that constant
    up = combine_maps([torch.full((1, 256), 0.2), torch.full((1, 1024), 0.6)], [(16, 16), (32, 32)], (32, 32))
    torch.testing.assert_close(up, torch.full((1, 32, 32), 0.4))


def test_combine_maps_rejects_a_wrong_grid():
    with pytest.raises(ValueError, match=r"maps\[0\] must be \(B, 256\)"):
        combine_maps([torch.rand(1, 200)], [(16, 16)], (16, 16))


def test_resize_mask_keeps_all_ones_and_clamps():
    torch.testing.assert_close(resize_mask(torch.ones(2, 32, 32), (16, 24)), torch.ones(2, 16 * 24))
    checker = (torch.arange(64).reshape(8, 8) % 2).float()[None]
    same = resize_mask(checker, (8, 8))
    torch.testing.assert_close(same, rearrange(checker, "b h w -> b (h w)"))
    overshoot = resize_mask(checker * 3 - 1, (16, 16))                  # values in [-1, 2] before clamping
    assert overshoot.min() == 0 and overshoot.max() == 1


def test_intersect_user_mask_resizes_and_multiplies():
    mask = torch.full((2, 16, 16), 0.5)
    user = torch.zeros(1, 64, 64)
    user[:, :, :32] = 1.0                                                # left half of the image
    out = intersect_user_mask(mask, user)
    assert out.shape == (2, 16, 16)
    torch.testing.assert_close(out[:, :, :7], torch.full((2, 16, 7), 0.5))
    torch.testing.assert_close(out[:, :, 9:], torch.zeros(2, 16, 7))
    with pytest.raises(ValueError, match="1 or 2 samples"):
        intersect_user_mask(mask, torch.ones(3, 16, 16))


def test_mask_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="unknown mask mode 'hard'"):
        MaskConfig(mode="hard")
    with pytest.raises(ValueError, match="threshold"):
        MaskConfig(threshold=1.5)
    with pytest.raises(ValueError, match="topk_ratio"):
        MaskConfig(topk_ratio=0.0)


@pytest.mark.parametrize("mode", MASK_MODES)
def test_make_mask_of_normalized_maps_skips_nothing(mode):
    """normalized=True (maps already min-max normalised, as the tracker's location map is) gives the same
    mask as normalising again, constant maps included."""
    torch.manual_seed(0)
    maps = torch.cat([torch.rand(3, 8, 8) * 5 - 1, torch.full((1, 8, 8), 0.7)])
    cfg = MaskConfig(mode=mode)
    torch.testing.assert_close(make_mask(minmax_normalize(maps), cfg, normalized=True), make_mask(maps, cfg),
                               rtol=0, atol=0)
    assert make_mask(minmax_normalize(maps), cfg, normalized=True)[3].abs().sum() == 0


def test_resize_mask_into_a_given_buffer():
    mask = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(5))
    out = torch.empty(1, 16)
    result = resize_mask(mask, (4, 4), out=out)
    assert result is out
    torch.testing.assert_close(out, resize_mask(mask, (4, 4)), rtol=0, atol=0)


def test_shrinking_a_mask_averages_instead_of_dropping_rows():
    """32x32 -> 8x8 (SD1.5's middle layer at 512 px): plain bilinear samples 2 of every 4 columns, so a
    one-pixel stripe can vanish; the area average keeps every stripe and the mask's mean."""
    for column in range(32):
        stripe = torch.zeros(1, 32, 32)
        stripe[..., column] = 1.0
        small = resize_mask(stripe, (8, 8)).reshape(8, 8)
        assert small[:, column // 4].tolist() == [0.25] * 8, column   # the stripe's share of each token
        assert small.sum() == 2.0
    up = resize_mask(stripe, (64, 64))                     # growing: the same as plain bilinear
    plain = F.interpolate(stripe[None], size=(64, 64), mode="bilinear", align_corners=False).reshape(1, -1)
    torch.testing.assert_close(up, plain.clamp(0, 1))

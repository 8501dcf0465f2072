"""The small world's base-model training cycles (training/miniworld/base.py)."""
from __future__ import annotations

import numpy as np
import torch

from customcontrast_core.config import get_preset
from training.miniworld.base import BaseConfig, Cycle, build_base, min_snr_weights, train_unet

CFG = BaseConfig(batch_size=4, restart_warmup=1)


def _weights_after(cycle: Cycle) -> list[torch.Tensor]:
    """The UNet's and text encoder's weights after ``cycle`` (the first restart) from the same random start."""
    models = build_base(get_preset("tiny"), 32, 32, seed=0, vae_channels=(8, 8, 8))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    train_unet(models, images, ["a red star"] * 8, CFG, cycle, index=1)
    return [p.detach().clone() for p in [*models.unet.parameters(), *models.text.parameters()]]


def test_an_ema_cycle_ends_on_the_moving_average_of_its_weights():
    """EMA decay 0.75 over two steps ends on 0.5625 w0 + 0.1875 w1 + 0.25 w2, where w_k are the weights after k
    plain steps (the average does not change the steps; a cycle's first step does not depend on its length).
    Fails if the average is not copied in at the end, or uses the decay the wrong way round (0.0625 / 0.1875 /
    0.75)."""
    w0 = _weights_after(Cycle(0, 1e-3))
    w1 = _weights_after(Cycle(1, 1e-3))
    w2 = _weights_after(Cycle(2, 1e-3))
    averaged = _weights_after(Cycle(2, 1e-3, ema=0.75))
    assert any(not torch.equal(a, b) for a, b in zip(w1, w2))
    for a, p0, p1, p2 in zip(averaged, w0, w1, w2):
        torch.testing.assert_close(a, 0.5625 * p0 + 0.1875 * p1 + 0.25 * p2, rtol=1e-5, atol=1e-6)


def test_min_snr_weights_cap_the_high_snr_timesteps_only():
    """min(SNR, 5) / SNR: 1 below gamma, gamma / SNR above; gamma 0 is plain MSE. Fails if the weight is
    min(SNR, gamma) undivided or the cap is applied below gamma."""
    snr = torch.tensor([0.01, 1.0, 5.0, 20.0, 500.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0), torch.tensor([1.0, 1.0, 1.0, 0.25, 0.01]))
    torch.testing.assert_close(min_snr_weights(snr, 0.0), torch.ones(5))

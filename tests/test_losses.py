"""Loss functions against hand-computed values (Eq. 4, 7, 8, 9)."""
import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (cscl_loss, gather_with_grad, localization_loss, macl_loss, sample_condition_dropout,
                             total_loss)


def test_cscl_orthogonal_closed_form():
    b = 5
    eye = torch.eye(b, 8)
    # a_ii = 1, a_ij = 0 -> each direction: -(1 - log(B - 1)), positive excluded from the denominator
    torch.testing.assert_close(cscl_loss(eye, eye), torch.tensor(-1 + math.log(b - 1)))
    torch.testing.assert_close(cscl_loss(eye, eye, temperature=0.5), torch.tensor(-2 + math.log(b - 1)))


def test_cscl_hand_computed_asymmetric_case():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    a = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    def direction(m):
        return sum(-m[i, i] + torch.logsumexp(torch.cat([m[i, :i], m[i, i + 1:]]), 0) for i in range(3)) / 3
    torch.testing.assert_close(cscl_loss(v, t), (direction(a) + direction(a.T)) / 2)


def info_nce(anchor, positive, tau):
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(anchor.shape[0]))


def test_macl_with_alpha_one_is_infonce_summed_over_layers():
    torch.manual_seed(0)
    anchor, positive = torch.randn(4, 3, 16), torch.randn(4, 3, 16)
    same = torch.randn(1, 8).expand(4, 8)                      # identical appearance: r = 1, α = 1
    expected = sum(info_nce(anchor[:, l], positive[:, l], 0.07) for l in range(3))
    torch.testing.assert_close(macl_loss(anchor, positive, same, same, temperature=0.07), expected)


def test_macl_hand_computed_two_by_two():
    anchor = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    positive = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]])
    app_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    app_p = torch.tensor([[0.6, 0.8], [0.0, 1.0]])              # r = [[0.6, 0], [0.8, 1]] -> clamp 0 to 0.05
    r = torch.tensor([[0.6, 0.05], [0.8, 1.0]])
    cos = torch.tensor([[1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 1.0]])
    logits = cos / r / 0.5
    expected = F.cross_entropy(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(macl_loss(anchor, positive, app_a, app_p, temperature=0.5, r_min=0.05), expected)


def test_macl_gradients_finite_near_zero_and_orthogonal_appearance():
    torch.manual_seed(0)
    anchor = torch.randn(3, 2, 8, requires_grad=True)
    positive = torch.randn(3, 2, 8, requires_grad=True)
    app = torch.eye(3, 4)                                       # orthogonal: r = 0 off-diagonal
    loss = macl_loss(anchor, positive, app, app * 1e-9 + torch.eye(3, 4) * 1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(anchor.grad).all() and torch.isfinite(positive.grad).all()


def test_localization_closed_forms():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(localization_loss(mask, mask), torch.tensor(-1.0))
    torch.testing.assert_close(localization_loss(1 - mask, mask), torch.tensor(1.0))
    torch.testing.assert_close(localization_loss(torch.full_like(mask, 0.3), mask), torch.tensor(0.0))
    empty = localization_loss(torch.rand(2, 4), torch.zeros(2, 4))
    assert torch.isfinite(empty)


def test_total_loss_weights():
    terms = {"ldm": torch.tensor(0.5), "cscl": torch.tensor(2.0), "macl": torch.tensor(3.0), "loc": torch.tensor(-1.0)}
    torch.testing.assert_close(total_loss(terms), torch.tensor(0.5 + 1e-2 * 5.0 - 1e-3))
    torch.testing.assert_close(total_loss({"ldm": torch.tensor(0.5)}), torch.tensor(0.5))
    with pytest.raises(ValueError, match="needs the 'ldm' term"):
        total_loss({"cscl": torch.tensor(1.0)})


def test_condition_dropout_rates_and_determinism():
    g = torch.Generator().manual_seed(0)
    image, text = sample_condition_dropout(200_000, generator=g)
    only_image = (image & ~text).float().mean().item()
    only_text = (text & ~image).float().mean().item()
    both = (image & text).float().mean().item()
    assert abs(only_image - 0.05) < 0.005 and abs(only_text - 0.05) < 0.005 and abs(both - 0.05) < 0.005
    assert abs((~image & ~text).float().mean().item() - 0.85) < 0.005
    a = sample_condition_dropout(64, generator=torch.Generator().manual_seed(3))
    b = sample_condition_dropout(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="at least 2 samples"):
        cscl_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        macl_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3), torch.randn(2, 3))

"""Loss functions against hand-computed values (Eq. 4, 7, 8, 9), their reductions, and the paper's settings (Sec. 4.1)."""
import math

import pytest
import torch
import torch.nn.functional as F

from customcontrast_core import get_preset
from customcontrast_core.encoder import MFIEncoder
from customcontrast_core.propagation import subject_location
from training.config import get_train_preset
from training.losses import (cscl_loss, gather_with_grad, localization_loss, location_map, macl_loss,
                             sample_condition_dropout, total_loss)


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


# Reductions: which sums and means each loss takes (the paper prints sums over the batch for Eq. 4 and 7)

def test_cscl_is_the_mean_over_the_batch_of_both_directions_halved():
    """Eq. 4 prints L_c as a sum over i of both directions; implemented: each direction's mean over i, averaged."""
    torch.manual_seed(1)
    v, t = torch.randn(4, 6), torch.randn(4, 6)
    a = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T

    def rows(m):   # -log(exp(m_ii) / sum_{j != i} exp(m_ij)) for each i
        return torch.stack([torch.logsumexp(torch.cat([m[i, :i], m[i, i + 1:]]), 0) - m[i, i] for i in range(4)])

    paper_sum = rows(a).sum() + rows(a.T).sum()
    torch.testing.assert_close(cscl_loss(v, t), paper_sum / (2 * 4))
    assert not torch.isclose(cscl_loss(v, t), paper_sum)


def test_macl_sums_over_layers_and_averages_over_anchors():
    """Eq. 7: the sum over cross-attention layers; anchors: mean (the paper's sum over i divided by B)."""
    torch.manual_seed(2)
    anchor, positive = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    app_a, app_p = torch.rand(3, 5) + 0.5, torch.rand(3, 5) + 0.5
    r = (F.normalize(app_a, dim=-1) @ F.normalize(app_p, dim=-1).T).clamp(0.05, 1.0)
    per = torch.stack([F.cross_entropy(F.normalize(anchor[:, l], dim=-1) @ F.normalize(positive[:, l], dim=-1).T
                                       / r / 0.07, torch.arange(3), reduction="none") for l in range(4)])   # (L, B)
    torch.testing.assert_close(macl_loss(anchor, positive, app_a, app_p), per.sum(0).mean())
    assert not torch.isclose(macl_loss(anchor, positive, app_a, app_p), per.mean())


def test_localization_is_a_per_sample_balance_then_the_batch_mean():
    """Each sample's background mean minus its subject mean, then the mean over samples (not over all pixels)."""
    attn = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.8, 0.6, 0.4, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    per_sample = torch.tensor([0.1 - 0.9, 0.0 - 0.6])
    torch.testing.assert_close(localization_loss(attn, mask), per_sample.mean())


def test_location_map_combined_is_the_inference_location_and_text_is_the_raw_mean():
    """Ā of L_loc: with visual maps, the map the inference masks are made from (each map min-max normalised over
    space, averaged, normalised again); without, the mean text map in probability units."""
    text = torch.tensor([[0.1, 0.2, 0.3, 0.4]])        # normalised: 0, 1/3, 2/3, 1
    visual = torch.tensor([[0.1, 0.5, 0.2, 0.2]])      # normalised: 0, 1, 1/4, 1/4
    combined = location_map([text], [visual], [(2, 2)])
    torch.testing.assert_close(combined, torch.tensor([[[0.0, 1.0], [11 / 16, 15 / 16]]]))
    torch.testing.assert_close(location_map([text], None, [(2, 2)]), text.view(1, 2, 2))
    # two layers on two grids: each map type averaged over layers on the larger grid first
    small_t, small_v = torch.tensor([[0.4]]), torch.tensor([[1.0]])
    both = location_map([text, small_t], [visual, small_v], [(2, 2), (1, 1)])
    mean_t, mean_v = (text + 0.4) / 2, (visual + 1.0) / 2
    torch.testing.assert_close(both, subject_location(mean_t.view(1, 2, 2), mean_v.view(1, 2, 2)))
    with pytest.raises(ValueError, match="needs every capture layer's visual map"):
        location_map([text], [None], [(2, 2)])


# The paper's recipe (Sec. 4.1) in the sd15 and sdxl presets

@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_presets_hold_the_paper_settings(name):
    cfg = get_train_preset(name)
    encoder = get_preset(cfg.encoder_preset)
    assert cfg.lambda_contrast == 1e-2 and cfg.lambda_loc == 1e-3          # λ1, λ2 of Eq. 9
    assert cfg.lr == 3e-5 and cfg.optimizer == "adamw"
    assert cfg.steps == 200_000
    assert cfg.contrastive_terms == ("cscl", "macl") and cfg.loc_maps == "combined"
    assert (cfg.drop_image, cfg.drop_text, cfg.drop_both) == (0.05, 0.05, 0.05)   # IP-Adapter's condition dropout
    assert encoder.depth == 4                                              # Q-Former blocks
    assert encoder.clip_layers == (11, 22, 32) and encoder.clip_num_layers == 32   # K = 3: 1/3, 2/3, last of ViT-H
    with torch.device("meta"):
        model = MFIEncoder(encoder)
    assert len(model.visual_qformer.blocks) == len(model.text_qformer.blocks) == 4
    assert model.layer_embed.shape[0] == 3


def test_total_loss_uses_the_config_weights():
    terms = {"ldm": torch.tensor(0.5), "cscl": torch.tensor(2.0), "macl": torch.tensor(3.0), "loc": torch.tensor(-1.0)}
    cfg = get_train_preset("sd15")
    torch.testing.assert_close(total_loss(terms, lambda_contrast=cfg.lambda_contrast, lambda_loc=cfg.lambda_loc),
                               torch.tensor(0.5 + 1e-2 * (2.0 + 3.0) + 1e-3 * -1.0))

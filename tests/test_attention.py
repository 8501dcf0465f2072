"""Patched cross-attention (Eq. 3): equivalences against plain attention and float64 references."""
from __future__ import annotations

import pytest
import torch
from einops import einsum, rearrange

from customcontrast_core.attention import (
    SubjectBranch,
    customcontrast_attention,
    placeholder_bias,
    placeholder_columns,
    plain_attention,
)

B, N, T, S = 2, 24, 12, 5


def cols(*columns, rows=(True,) * B):
    """The placeholder of a subject at ``columns`` in the rows whose text holds it. Shapes: -> (B, T)."""
    return placeholder_columns([columns if row else () for row in rows], T)


def _inputs(heads: int, dim_head: int = 8, seed: int = 0):
    """Returns random q (B, N, H*D), k, v (B, T, H*D)."""
    g = torch.Generator().manual_seed(seed)
    inner = heads * dim_head
    return (torch.randn(B, N, inner, generator=g), torch.randn(B, T, inner, generator=g),
            torch.randn(B, T, inner, generator=g))


def _visual(heads: int, dim_head: int = 8, seed: int = 1):
    """Returns random visual k, v (B, S, H*D)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, heads * dim_head, generator=g), torch.randn(B, S, heads * dim_head, generator=g)


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x.double(), "b n (h d) -> b h n d", h=heads)


def _reference_text(q, k, v, heads, masks_and_columns, eps=1e-6):
    """Float64 reference: plain softmax, placeholder probabilities times max(M, eps), rows renormalised."""
    qh, kh, vh = _split(q, heads), _split(k, heads), _split(v, heads)
    probs = (einsum(qh, kh, "b h i d, b h j d -> b h i j") * qh.shape[-1] ** -0.5).softmax(dim=-1)
    for mask, columns in masks_and_columns:
        factor = rearrange(mask.double().clamp_min(eps), "b n -> b 1 n 1")
        probs[..., list(columns)] = probs[..., list(columns)] * factor
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return rearrange(einsum(probs, vh, "b h i j, b h j d -> b h i d"), "b h n d -> b n (h d)"), probs


def _reference_visual(q, vk, vv, heads):
    """Float64 reference of softmax(q vk^T * scale) vv and of the space-normalised visual map."""
    qh, kh, vh = _split(q, heads), _split(vk, heads), _split(vv, heads)
    sim = einsum(qh, kh, "b h i d, b h j d -> b h i j") * qh.shape[-1] ** -0.5
    out = rearrange(einsum(sim.softmax(-1), vh, "b h i j, b h j d -> b h i d"), "b h n d -> b n (h d)")
    return out, sim.softmax(dim=2).mean(dim=(1, 3))


@pytest.mark.parametrize("heads", [1, 2, 8])
@pytest.mark.parametrize("capture", [False, True])
def test_zero_gamma_and_no_mask_equals_plain_attention(heads, capture):
    q, k, v = _inputs(heads)
    vk, vv = _visual(heads)
    subject = SubjectBranch(vk, vv, gamma=0.0, mask=None, placeholder=cols(3, 9))
    out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[subject], capture=capture)
    assert (out - plain_attention(q, k, v, heads=heads)).abs().max() < 1e-5
    assert (maps is not None) == capture


@pytest.mark.parametrize("columns", [(4,), (4, 10)])
def test_log_bias_equals_explicit_renormalisation(columns):
    heads = 4
    q, k, v = _inputs(heads, seed=2)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(3))
    mask[0, :6] = 0.0                                                   # exercises the eps floor
    vk, vv = _visual(heads)
    subject = SubjectBranch(vk, vv, gamma=0.0, mask=mask, placeholder=cols(*columns))
    out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[subject], capture=True)
    expected, probs = _reference_text(q, k, v, heads, [(mask, columns)])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    placeholder = probs[..., list(columns)].sum(dim=-1).mean(dim=1)     # (B, N)
    torch.testing.assert_close(maps[0].text.double(), placeholder, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("capture", [False, True])
def test_two_subjects_match_float64_reference(capture):
    heads = 2
    q, k, v = _inputs(heads, seed=4)
    g = torch.Generator().manual_seed(5)
    masks = [torch.rand(B, N, generator=g), torch.rand(1, N, generator=g)]      # second broadcasts over batch
    visual = [_visual(heads, seed=6), _visual(heads, seed=7)]
    gammas, columns = [0.7, 1.3], [(2,), (7,)]
    subjects = [SubjectBranch(vk, vv, gamma=gm, mask=m, placeholder=cols(*c))
                for (vk, vv), gm, m, c in zip(visual, gammas, masks, columns)]
    out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=subjects, capture=capture)

    expected, probs = _reference_text(q, k, v, heads, list(zip(masks, columns)))
    for (vk, vv), gm, m in zip(visual, gammas, masks):
        branch, _ = _reference_visual(q, vk, vv, heads)
        expected = expected + gm * rearrange(m.double(), "b n -> b n 1") * branch
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if capture:
        for subject_maps, (vk, vv), c in zip(maps, visual, columns):
            torch.testing.assert_close(subject_maps.text.double(), probs[..., list(c)].sum(-1).mean(1),
                                       atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(subject_maps.visual.double(), _reference_visual(q, vk, vv, heads)[1],
                                       atol=1e-6, rtol=1e-5)


def test_visual_map_is_a_distribution_over_space_and_not_constant():
    heads = 4
    q, k, v = _inputs(heads, seed=8)
    vk, vv = _visual(heads, seed=9)
    _, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[SubjectBranch(vk, vv, placeholder=cols(1))],
                                       capture=True)
    visual = maps[0].visual
    assert visual.shape == (B, N) and visual.dtype == torch.float32
    torch.testing.assert_close(visual.sum(dim=1), torch.ones(B))
    assert (visual.amax(dim=1) - visual.amin(dim=1)).min() > 1e-3       # a token-normalised mean would be 1/S
    assert (visual[0] - visual[1]).abs().max() > 1e-3


def test_text_maps_alone_leave_output_and_text_maps_unchanged():
    """Training asks only for the text maps (L_loc): same output, text maps and gradient, no visual map."""
    heads = 4
    q, k, v = _inputs(heads, seed=10)
    vk, vv = _visual(heads, seed=11)
    q.requires_grad_(True)
    subject = SubjectBranch(vk, vv, gamma=0.7, mask=torch.rand(B, N), placeholder=cols(2, 5))
    both, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[subject], capture=True)
    text_only, text_maps = customcontrast_attention(q, k, v, heads=heads, subjects=[subject], capture=True,
                                                    visual_maps=False)
    assert maps[0].visual is not None and text_maps[0].visual is None
    torch.testing.assert_close(text_only, both, rtol=0, atol=0)
    torch.testing.assert_close(text_maps[0].text, maps[0].text, rtol=0, atol=0)
    grads = [torch.autograd.grad(out.sum() + m[0].text.sum(), q)[0] for out, m in ((both, maps), (text_only, text_maps))]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_text_rows_leave_other_rows_unbiased():
    heads = 2
    q, k, v = _inputs(heads, seed=10)
    vk, vv = _visual(heads)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(11))
    rows = (False, True)                                                # uncond first, as ComfyUI batches
    subject = SubjectBranch(vk, vv, gamma=0.0, mask=mask, placeholder=cols(5, rows=rows))
    out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[subject], capture=True)
    expected, _ = _reference_text(q, k, v, heads, [(mask, (5,))])
    torch.testing.assert_close(out[0], plain_attention(q, k, v, heads=heads)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1].double(), expected[1], atol=1e-5, rtol=1e-5)
    assert maps[0].text[0].abs().max() == 0


def test_low_precision_inputs_return_their_dtype():
    heads = 2
    q, k, v = (x.to(torch.bfloat16) for x in _inputs(heads, seed=12))
    vk, vv = _visual(heads)
    subject = SubjectBranch(vk, vv, gamma=1.0, mask=torch.rand(B, N), placeholder=cols(0))
    out, _ = customcontrast_attention(q, k, v, heads=heads, subjects=[subject])
    reference, _ = customcontrast_attention(q.float(), k.float(), v.float(), heads=heads, subjects=[subject])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)


def test_bad_inputs_raise_value_error_naming_shapes():
    heads = 2
    q, k, v = _inputs(heads)
    vk, vv = _visual(heads)
    with pytest.raises(ValueError, match="gamma"):
        SubjectBranch(vk, vv, gamma=-1.0)
    with pytest.raises(ValueError, match="placeholder must be 2-D"):
        SubjectBranch(vk, vv, placeholder=torch.ones(T))
    with pytest.raises(ValueError, match=f"mask must be \\({B} or 1, {N}\\)"):
        customcontrast_attention(q, k, v, heads=heads, subjects=[SubjectBranch(vk, vv, mask=torch.ones(B, N + 1))])
    with pytest.raises(ValueError, match=f"placeholder must be \\({B} or 1, {T}\\)"):
        customcontrast_attention(q, k, v, heads=heads, subjects=[SubjectBranch(vk, vv, placeholder=torch.ones(B, 5))])
    with pytest.raises(ValueError, match="outside a text context"):
        placeholder_columns([(T,)], T)
    with pytest.raises(ValueError, match="divisible"):
        customcontrast_attention(q, k, v, heads=3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_path_equals_explicit_capture_path(dtype, tol):
    """Layers that capture no maps run fused SDPA with the bias as a float mask: same output as the explicit path."""
    heads = 4
    q, k, v = (x.to(dtype) for x in _inputs(heads, seed=8))
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(B, N, generator=g)
    mask[1, :5] = 0.0
    vk, vv = (x.to(dtype) for x in _visual(heads, seed=10))
    subject = SubjectBranch(vk, vv, gamma=0.8, mask=mask, placeholder=cols(3, 7, rows=(True, False)))
    fused, none = customcontrast_attention(q, k, v, heads=heads, subjects=[subject], capture=False)
    explicit, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[subject], capture=True)
    assert none is None and len(maps) == 1 and fused.dtype == dtype
    assert (fused.float() - explicit.float()).abs().max() < tol


@pytest.mark.parametrize("dtype,visual_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_capture_path_casts_inside_its_operators(dtype, visual_dtype):
    """Low-precision q/k/v (the UNet's dtype) with fp32 or low-precision visual K/V: the maps are those of the
    all-fp32 computation on the same values, the output that rounded to the inputs' dtype; with q requiring
    grad (training) the same values and a gradient."""
    heads = 4
    q, k, v = (x.to(dtype) for x in _inputs(heads, seed=21))
    vk, vv = (x.to(visual_dtype) for x in _visual(heads, seed=22))
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(23))
    rows = (True, False)
    low = SubjectBranch(vk, vv, gamma=0.7, mask=mask, placeholder=cols(2, 5, rows=rows))
    full = SubjectBranch(vk.float(), vv.float(), gamma=0.7, mask=mask, placeholder=cols(2, 5, rows=rows))
    out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[low], capture=True)
    ref, ref_maps = customcontrast_attention(q.float(), k.float(), v.float(), heads=heads, subjects=[full],
                                             capture=True)
    assert out.dtype == dtype and maps[0].text.dtype == torch.float32
    torch.testing.assert_close(maps[0].text, ref_maps[0].text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps[0].visual, ref_maps[0].visual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    assert maps[0].text[1].abs().max() == 0                      # the uncond row holds no placeholder
    trained = q.clone().requires_grad_(True)
    out_grad, maps_grad = customcontrast_attention(trained, k, v, heads=heads, subjects=[low], capture=True)
    torch.testing.assert_close(out_grad.detach(), out, rtol=0, atol=0)
    torch.testing.assert_close(maps_grad[0].text.detach(), maps[0].text, rtol=0, atol=0)
    out_grad.float().sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0


def test_per_row_columns_equal_one_call_per_row():
    """Each row its own placeholder columns (captions with the placeholder at different positions): the rows are
    biased and mapped as one call per row gives."""
    heads = 2
    q, k, v = _inputs(heads, seed=30)
    vk, vv = _visual(heads, seed=31)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(32))
    weights = torch.zeros(B, T)
    weights[0, 3], weights[1, [2, 9]] = 1.0, 1.0
    batched, maps = customcontrast_attention(q, k, v, heads=heads, capture=True, subjects=[
        SubjectBranch(vk, vv, mask=mask, placeholder=weights)])
    for row, columns in enumerate([(3,), (2, 9)]):
        one = slice(row, row + 1)
        out, row_maps = customcontrast_attention(q[one], k[one], v[one], heads=heads, capture=True, subjects=[
            SubjectBranch(vk[one], vv[one], mask=mask[one], placeholder=placeholder_columns([columns], T))])
        torch.testing.assert_close(batched[one], out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps[0].text[one], row_maps[0].text, rtol=1e-5, atol=1e-7)


def test_bias_holds_each_rows_columns_only():
    """Rows without the placeholder (the uncond row), repeated columns (LCM-padded contexts), per-row columns and a
    mask shared by the batch (1, N): the bias is the dense sum over each row's own columns, exactly."""
    g = torch.Generator().manual_seed(44)
    mask, shared = torch.rand(B, N, generator=g), torch.rand(1, N, generator=g)
    subjects = [SubjectBranch(*_visual(2), mask=mask, placeholder=cols(2, 8, rows=(True, False))),
                SubjectBranch(*_visual(2), mask=shared, placeholder=placeholder_columns([(1,), (4, 9)], T))]
    bias = placeholder_bias(subjects, N, 1e-6)
    dense = torch.zeros(B, N, T)
    dense[0, :, 2] += mask[0].clamp_min(1e-6).log()
    dense[0, :, 8] += mask[0].clamp_min(1e-6).log()
    dense[0, :, 1] += shared[0].clamp_min(1e-6).log()
    dense[1, :, 4] += shared[0].clamp_min(1e-6).log()
    dense[1, :, 9] += shared[0].clamp_min(1e-6).log()
    torch.testing.assert_close(bias, dense, rtol=0, atol=0)
    assert placeholder_bias([SubjectBranch(*_visual(2), placeholder=cols(2))], N, 1e-6) is None


def test_many_subjects_capture_each_placeholder_map():
    """Nine subjects: each text map is its own placeholder's probability."""
    heads = 2
    q, k, v = _inputs(heads, seed=44)
    columns = [(i,) for i in range(9)]
    subjects = [SubjectBranch(*_visual(heads, seed=45 + i), gamma=0.1, placeholder=cols(*c))
                for i, c in enumerate(columns)]
    _, maps = customcontrast_attention(q, k, v, heads=heads, subjects=subjects, capture=True)
    _, probs = _reference_text(q, k, v, heads, [])
    for m, c in zip(maps, columns):
        torch.testing.assert_close(m.text.double(), probs[..., c[0]].mean(1), rtol=1e-5, atol=1e-6)

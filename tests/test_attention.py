"""Patched cross-attention (Eq. 3): equivalences against plain attention and float64 references."""
from __future__ import annotations

import pytest
import torch
from einops import einsum, rearrange

from customcontrast_core.attention import (
    BIAS_ALIGNMENT,
    SubjectBranch,
    customcontrast_attention,
    placeholder_bias,
    placeholder_probe,
    plain_attention,
)
from customcontrast_core.capture import probed_text

B, N, T, S = 2, 24, 12, 5


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
    subject = SubjectBranch(vk, vv, gamma=0.0, mask=None, columns=(3, 9))
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
    subject = SubjectBranch(vk, vv, gamma=0.0, mask=mask, columns=columns)
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
    subjects = [SubjectBranch(vk, vv, gamma=gm, mask=m, columns=c)
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
    _, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[SubjectBranch(vk, vv, columns=(1,))],
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
    subject = SubjectBranch(vk, vv, gamma=0.7, mask=torch.rand(B, N), columns=(2, 5))
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
    rows = torch.tensor([False, True])                                  # uncond first, as ComfyUI batches
    subject = SubjectBranch(vk, vv, gamma=0.0, mask=mask, columns=(5,), text_rows=rows)
    out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[subject], capture=True)
    expected, _ = _reference_text(q, k, v, heads, [(mask, (5,))])
    torch.testing.assert_close(out[0], plain_attention(q, k, v, heads=heads)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1].double(), expected[1], atol=1e-5, rtol=1e-5)
    assert maps[0].text[0].abs().max() == 0


def test_low_precision_inputs_return_their_dtype():
    heads = 2
    q, k, v = (x.to(torch.bfloat16) for x in _inputs(heads, seed=12))
    vk, vv = _visual(heads)
    subject = SubjectBranch(vk, vv, gamma=1.0, mask=torch.rand(B, N), columns=(0,))
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
    with pytest.raises(ValueError, match="distinct"):
        SubjectBranch(vk, vv, columns=(3, 3))
    with pytest.raises(ValueError, match=f"mask must be \\({B} or 1, {N}\\)"):
        customcontrast_attention(q, k, v, heads=heads, subjects=[SubjectBranch(vk, vv, mask=torch.ones(B, N + 1))])
    with pytest.raises(ValueError, match="outside a text context"):
        customcontrast_attention(q, k, v, heads=heads, subjects=[SubjectBranch(vk, vv, columns=(T,))])
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
    subject = SubjectBranch(vk, vv, gamma=0.8, mask=mask, columns=(3, 7), text_rows=torch.tensor([True, False]))
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
    rows = torch.tensor([True, False])
    low = SubjectBranch(vk, vv, gamma=0.7, mask=mask, columns=(2, 5), text_rows=rows)
    full = SubjectBranch(vk.float(), vv.float(), gamma=0.7, mask=mask, columns=(2, 5), text_rows=rows)
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
    """column_weights (B, T): each row its own placeholder columns, biased and mapped as with `columns`."""
    heads = 2
    q, k, v = _inputs(heads, seed=30)
    vk, vv = _visual(heads, seed=31)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(32))
    weights = torch.zeros(B, T)
    weights[0, 3], weights[1, [2, 9]] = 1.0, 1.0
    batched, maps = customcontrast_attention(q, k, v, heads=heads, capture=True, subjects=[
        SubjectBranch(vk, vv, mask=mask, column_weights=weights)])
    for row, columns in enumerate([(3,), (2, 9)]):
        one = slice(row, row + 1)
        out, row_maps = customcontrast_attention(q[one], k[one], v[one], heads=heads, capture=True, subjects=[
            SubjectBranch(vk[one], vv[one], mask=mask[one], columns=columns)])
        torch.testing.assert_close(batched[one], out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps[0].text[one], row_maps[0].text, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="replaces columns"):
        SubjectBranch(vk, vv, columns=(1,), column_weights=weights)
    with pytest.raises(ValueError, match="column_weights must be"):
        customcontrast_attention(q, k, v, heads=heads, subjects=[SubjectBranch(vk, vv, column_weights=weights[:, :5])])


def test_probe_channels_need_no_equal_widths():
    """Values wider than the keys (the CUDA route) and zero-padded queries/keys (the CPU route) agree."""
    heads = 4
    q, k, v = _inputs(heads, seed=40)
    subject = SubjectBranch(*_visual(heads, seed=41), columns=(3, 8), text_rows=torch.tensor([True, False]))
    probe = placeholder_probe([subject], B, T, q.device).expand(B, heads, -1, -1)
    qh, kh, vh = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    bias = torch.randn(B, 1, N, T, generator=torch.Generator().manual_seed(42))
    values = torch.cat([vh, probe], dim=-1)
    wide = probed_text(qh, kh, values, bias, 0.35, equal_widths=False)
    padded = probed_text(qh, kh, values, bias, 0.35, equal_widths=True)
    torch.testing.assert_close(padded, wide, rtol=1e-5, atol=1e-6)
    probs = (einsum(qh.double(), kh.double(), "b h i d, b h j d -> b h i j") * 0.35 + bias.double()).softmax(-1)
    torch.testing.assert_close(wide[..., 8 * 1].double(), probs[..., [3, 8]].sum(-1) * torch.tensor([1.0, 0.0]).double()
                               .view(B, 1, 1), rtol=1e-5, atol=1e-6)   # channel D + 0: the placeholder, text rows only


def test_probe_and_bias_layouts():
    """The probe has one channel per subject in blocks of 8; the bias rows are padded in memory to the alignment of
    fused kernels and hold log max(M, eps) on each subject's columns (summed where subjects share one)."""
    heads = 2
    g = torch.Generator().manual_seed(43)
    masks = [torch.rand(B, N, generator=g) for _ in range(9)]
    subjects = [SubjectBranch(*_visual(heads), mask=m, columns=(i % 4,)) for i, m in enumerate(masks)]
    probe = placeholder_probe(subjects, B, T, torch.device("cpu"))
    assert probe.shape == (B, 1, T, 16)
    expected = torch.zeros(B, 1, T, 16)
    for i in range(9):
        expected[:, :, i % 4, i] = 1.0
    torch.testing.assert_close(probe, expected, rtol=0, atol=0)
    bias = placeholder_bias(subjects, B, N, T, 1e-6, torch.device("cpu"), torch.float16)
    assert bias.shape == (B, N, T) and bias.dtype == torch.float16 and bias.stride(1) % BIAS_ALIGNMENT == 0
    dense = torch.zeros(B, N, T)
    for i, m in enumerate(masks):
        dense[:, :, i % 4] += m.clamp_min(1e-6).log()
    torch.testing.assert_close(bias.float(), dense.half().float(), rtol=2e-3, atol=2e-3)
    given = placeholder_bias(subjects, B, N, T, 1e-6, torch.device("cpu"), torch.float16, columns=probe[:, 0])
    torch.testing.assert_close(given, bias, rtol=0, atol=0)


def test_bias_holds_each_rows_columns_only():
    """Text rows (the cond row; 0 in the uncond row), repeated columns (LCM-padded contexts), per-row columns and a
    mask shared by the batch (1, N): the bias equals the dense sum over each row's own columns, exactly."""
    g = torch.Generator().manual_seed(44)
    mask, shared = torch.rand(B, N, generator=g), torch.rand(1, N, generator=g)
    weights = torch.zeros(B, T)
    weights[0, 1], weights[1, [4, 9]] = 1.0, 1.0
    subjects = [SubjectBranch(*_visual(2), mask=mask, columns=(2, 8), text_rows=torch.tensor([True, False])),
                SubjectBranch(*_visual(2), mask=shared, column_weights=weights)]
    bias = placeholder_bias(subjects, B, N, T, 1e-6, torch.device("cpu"))
    dense = torch.zeros(B, N, T)
    dense[0, :, 2] += mask[0].clamp_min(1e-6).log()
    dense[0, :, 8] += mask[0].clamp_min(1e-6).log()
    dense[0, :, 1] += shared[0].clamp_min(1e-6).log()
    dense[1, :, 4] += shared[0].clamp_min(1e-6).log()
    dense[1, :, 9] += shared[0].clamp_min(1e-6).log()
    torch.testing.assert_close(bias, dense, rtol=0, atol=0)
    assert placeholder_bias([SubjectBranch(*_visual(2), columns=(2,))], B, N, T, 1e-6, torch.device("cpu")) is None


def test_many_subjects_capture_each_placeholder_map():
    """Nine subjects (two blocks of probe channels): each text map is its own placeholder's probability."""
    heads = 2
    q, k, v = _inputs(heads, seed=44)
    columns = [(i,) for i in range(9)]
    subjects = [SubjectBranch(*_visual(heads, seed=45 + i), gamma=0.1, columns=c) for i, c in enumerate(columns)]
    _, maps = customcontrast_attention(q, k, v, heads=heads, subjects=subjects, capture=True)
    _, probs = _reference_text(q, k, v, heads, [])
    for m, c in zip(maps, columns):
        torch.testing.assert_close(m.text.double(), probs[..., c[0]].mean(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="probe must be"):
        customcontrast_attention(q, k, v, heads=heads, subjects=subjects, capture=True,
                                 probe=torch.zeros(B, 1, T, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gammas", [(0.7,), (0.0,), (0.5, 0.9)])
def test_capture_path_without_autograd_writes_the_same_output(dtype, gammas):
    """Without autograd the capture path adds its last branch straight into the merged output (out=, in q's
    dtype): bit-identical to the autograd path's add-then-merge-and-cast, maps included; also for several
    subjects (one without a mask) and for gamma 0 (no branch added)."""
    heads = 4
    q, k, v = (x.to(dtype) for x in _inputs(heads, seed=40))
    g = torch.Generator().manual_seed(41)
    subjects = []
    for index, gamma in enumerate(gammas):
        vk, vv = _visual(heads, seed=42 + index)
        mask = None if index == 1 else torch.rand(B, N, generator=g)
        subjects.append(SubjectBranch(vk, vv, gamma=gamma, mask=mask, columns=(2 + index,),
                                      text_rows=torch.tensor([True, False])))
    with torch.enable_grad():
        reference, reference_maps = customcontrast_attention(q, k, v, heads=heads, subjects=subjects, capture=True)
    with torch.no_grad():
        out, maps = customcontrast_attention(q, k, v, heads=heads, subjects=subjects, capture=True)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    for got, expected in zip(maps, reference_maps):
        torch.testing.assert_close(got.text, expected.text, rtol=0, atol=0)
        torch.testing.assert_close(got.visual, expected.visual, rtol=0, atol=0)


def test_unchecked_branch_and_unvalidated_call_equal_the_checked_ones():
    """The sampling hot path builds branches without ``__post_init__`` and skips the shape checks after the first
    evaluation: same fields, same output; a 4-D bias and a probe expanded over heads are taken as given."""
    heads = 2
    q, k, v = _inputs(heads, seed=50)
    vk, vv = _visual(heads, seed=51)
    mask, rows = torch.rand(B, N, generator=torch.Generator().manual_seed(52)), torch.tensor([True, False])
    checked = SubjectBranch(vk, vv, 0.6, mask, (3,), rows)
    fast = SubjectBranch.unchecked(vk, vv, 0.6, mask, (3,), rows)
    assert vars(fast) == vars(checked)
    bias = placeholder_bias([checked], B, N, T, 1e-6, torch.device("cpu"))
    probe = placeholder_probe([checked], B, T, torch.device("cpu"))
    for capture in (False, True):
        expected, _ = customcontrast_attention(q, k, v, heads=heads, subjects=[checked], capture=capture)
        got, _ = customcontrast_attention(q, k, v, heads=heads, subjects=[fast], capture=capture, bias=bias[:, None],
                                          probe=probe.expand(-1, heads, -1, -1), validate=False)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="bias must be"):
        customcontrast_attention(q, k, v, heads=heads, subjects=[checked], bias=bias[:1])


def test_head_first_visual_keys_give_the_same_maps_and_output():
    """Visual keys also given split head-first (H, B, S, D) — the visual map's matmul then reads them and a
    head-first copy of q without copying the keys — give the maps and output of the (B, S, H*D) keys alone."""
    heads, dims = 4, 8
    q, k, v = _inputs(heads, seed=60)
    vk, vv = _visual(heads, seed=61)
    vk = vk.expand(B, -1, -1).contiguous()
    vv = vv.expand(B, -1, -1).contiguous()
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(62))
    split = vk.view(B, S, heads, dims).permute(2, 0, 1, 3).contiguous()
    plain = SubjectBranch(vk, vv, gamma=0.8, mask=mask, columns=(3,))
    first = SubjectBranch(vk, vv, gamma=0.8, mask=mask, columns=(3,), visual_k_heads=split)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            expected, expected_maps = customcontrast_attention(q, k, v, heads=heads, subjects=[plain], capture=True)
            got, maps = customcontrast_attention(q, k, v, heads=heads, subjects=[first], capture=True)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(maps[0].visual, expected_maps[0].visual, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(maps[0].text, expected_maps[0].text, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="visual_k_heads must be"):
        SubjectBranch(vk, vv, visual_k_heads=split[:, :1])

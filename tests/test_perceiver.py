"""PerceiverAttention against a naive float64 reference of Eq. 2."""
import pytest
import torch

from customcontrast_core.perceiver import PerceiverAttention, QFormer


def naive_perceiver(module: PerceiverAttention, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Loop-over-heads float64 reference: q from queries, k/v from [features; queries]."""
    m = module.double()
    f, x = features.double(), queries.double()
    f = torch.nn.functional.layer_norm(f, f.shape[-1:], m.norm_features.weight, m.norm_features.bias)
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], m.norm_queries.weight, m.norm_queries.bias)
    q = x @ m.to_q.weight.T
    kv = torch.cat([f @ m.to_kv_features.weight.T, x @ m.to_kv_queries.weight.T], dim=1)
    inner = m.heads * m.dim_head
    k, v = kv[..., :inner], kv[..., inner:]
    outs = []
    for h in range(m.heads):
        sl = slice(h * m.dim_head, (h + 1) * m.dim_head)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / m.dim_head**0.5, dim=-1)
        outs.append(w @ v[..., sl])
    out = torch.cat(outs, dim=-1) @ m.to_out.weight.T
    m.float()
    return out


@pytest.mark.parametrize("heads,dim_head", [(1, 16), (4, 8), (8, 4), (3, 10)])
def test_perceiver_matches_float64_reference(heads, dim_head):
    torch.manual_seed(heads)
    module = PerceiverAttention(24, heads=heads, dim_head=dim_head, feature_dim=40)
    for p in module.parameters():   # non-trivial LayerNorm affine parameters too
        torch.nn.init.normal_(p, std=0.3)
    features, queries = torch.randn(3, 11, 40), torch.randn(3, 5, 24)
    expected = naive_perceiver(module, features, queries)
    out = module(features, queries)
    assert out.shape == (3, 5, 24)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_queries_attend_to_themselves():
    """Removing the queries from the keys (plain cross-attention) changes the output: [f; q] is used."""
    torch.manual_seed(0)
    module = PerceiverAttention(16, heads=2, dim_head=8)
    features, queries = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    full = module(features, queries)
    with torch.no_grad():
        module.to_kv_queries.weight.zero_()   # queries' keys become 0 logits, values 0
    assert (full - module(features, queries)).abs().max() > 1e-3


def test_qformer_blocks_are_residual():
    torch.manual_seed(0)
    qformer = QFormer(16, depth=4, heads=2, dim_head=8, ff_mult=2)
    assert len(qformer.blocks) == 4
    for block in qformer.blocks:
        torch.nn.init.zeros_(block.attn.to_out.weight)
        torch.nn.init.zeros_(block.ff[-1].weight)
    queries = torch.randn(2, 5, 16)
    torch.testing.assert_close(qformer(torch.randn(2, 7, 16), queries), queries)


def test_perceiver_in_bfloat16_stays_within_its_rounding():
    """Half-precision inputs go through the fused attention with fp32 softmax statistics."""
    torch.manual_seed(1)
    module = PerceiverAttention(32, heads=4, dim_head=8, feature_dim=48)
    features, queries = torch.randn(2, 20, 48), torch.randn(2, 6, 32)
    expected = naive_perceiver(module, features, queries)
    out = module.to(torch.bfloat16)(features.bfloat16(), queries.bfloat16())
    assert out.dtype == torch.bfloat16
    error = (out.double() - expected).abs().max().item()
    assert error < 0.05 * expected.abs().max().item()

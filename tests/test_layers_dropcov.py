"""Tests of DropCov's head: the rate rule, channel dropout and DropCovPool, against references written from the
formulas (DropCov, NeurIPS 2022)."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_gcp.functional import channel_dropout, dropcov_rate
from timm_gcp.layers import DropCovPool


def _ref_cov(x):
    """Biased covariance of the H·W positions, written out: (1/N)·(X − μ)(X − μ)ᵀ."""
    b, c = x.shape[:2]
    s = x.reshape(b, c, -1)
    s = s - s.mean(dim=2, keepdim=True)
    return s @ s.transpose(1, 2) / s.shape[2]


def _ref_triu(m):
    d = m.shape[-1]
    return torch.stack([m[:, i, j] for i in range(d) for j in range(i, d)], dim=1)


def _ref_attention(pool, y):
    """a = softmax over channels of a 3-tap filter across the channel means (zero padding at both ends)."""
    w = pool.attn.weight.reshape(3)
    m = F.pad(y.mean(dim=(2, 3)), (1, 1))
    return torch.softmax(w[0] * m[:, :-2] + w[1] * m[:, 1:-1] + w[2] * m[:, 2:], dim=1)


def test_rate_on_hand_made_features():
    # d = 4: p = 1 − (10 / log2 4)·ρ = 1 − 5ρ. Sample 0: attention e1, row sums (0.1, √0.99, 0, 0)·3 → ρ = 0.1;
    # sample 1: row sums (0.2, √0.96, 0, 0) → ρ = 0.2.
    attn = torch.tensor([[1., 0, 0, 0], [1., 0, 0, 0]])
    cov = torch.zeros(2, 4, 4)
    cov[0] = torch.diag(torch.tensor([0.1, math.sqrt(0.99), 0, 0]) * 3)
    cov[1] = torch.diag(torch.tensor([0.2, math.sqrt(0.96), 0, 0]))
    torch.testing.assert_close(dropcov_rate(attn, cov, per_sample=True), torch.tensor([0.5, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(dropcov_rate(attn, cov), torch.tensor([0.25, 0.25]), rtol=0, atol=1e-6)  # ρ mean 0.15
    # d = 256: the factor is 10/8; the sign of ρ matters (anti-aligned: p clamps at 1)
    attn = torch.zeros(1, 256)
    attn[0, 0] = 1.
    cov = torch.zeros(1, 256, 256)
    cov[0, 0, 0], cov[0, 1, 1] = 0.6, 0.8  # ρ = 0.6
    torch.testing.assert_close(dropcov_rate(attn, cov), torch.tensor([1 - 1.25 * 0.6]), rtol=0, atol=1e-6)
    torch.testing.assert_close(dropcov_rate(attn, -cov), torch.tensor([1.]), rtol=0, atol=0)


def test_rate_edge_cases_and_no_gradient():
    attn = torch.rand(3, 8, requires_grad=True)
    cov = torch.rand(3, 8, 8, requires_grad=True)
    p = dropcov_rate(attn, cov)
    assert not p.requires_grad and p.grad_fn is None
    # a sample whose covariance vanishes (constant channels) has ρ = 0, so p = 1, not NaN
    assert torch.equal(dropcov_rate(torch.rand(1, 8), torch.zeros(1, 8, 8)), torch.ones(1))
    with pytest.raises(ValueError, match='d >= 2'):
        dropcov_rate(torch.rand(1, 1), torch.rand(1, 1, 1))
    with pytest.raises(ValueError, match=r'attn \(B, d\) and cov \(B, d, d\)'):
        dropcov_rate(torch.rand(2, 4), torch.rand(2, 4, 3))


def test_per_sample_rate_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    attn, cov = torch.rand(4, 16), torch.rand(4, 16, 16)
    whole = dropcov_rate(attn, cov, per_sample=True)
    alone = torch.cat([dropcov_rate(attn[i:i + 1], cov[i:i + 1], per_sample=True) for i in range(4)])
    torch.testing.assert_close(whole, alone, rtol=0, atol=0)
    assert dropcov_rate(attn, cov).unique().numel() == 1  # the batch rule: one rate for all


def test_channel_dropout_drops_whole_channels_and_rescales():
    torch.manual_seed(0)
    x = torch.rand(2, 4000, 3, 3) + 0.5
    out = channel_dropout(x, torch.tensor([0.25, 1.0]))
    zero = (out == 0).reshape(2, 4000, -1)
    assert torch.equal(zero.all(dim=2), zero.any(dim=2))  # a channel is dropped whole or not at all
    dropped = zero[0, :, 0]
    torch.testing.assert_close(out[0, ~dropped], x[0, ~dropped] * (4 / 3), rtol=1e-6, atol=0)  # survivors × 1/(1 − p)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03  # 4,000 channels: ~0.007 standard deviation
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # p = 1: all dropped, no 1/0
    assert torch.equal(channel_dropout(x, torch.zeros(2)), x)


def test_eval_is_reduce_covariance_triangle():
    torch.manual_seed(0)
    pool = DropCovPool(6, gcp_dim=4).eval()
    with torch.no_grad():
        pool.bn.running_mean.uniform_(-0.2, 0.2)
        pool.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 6, 5, 5)
    bn = pool.bn
    y = torch.einsum('oc,bchw->bohw', pool.conv.weight[:, :, 0, 0], x)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])
    torch.testing.assert_close(pool(x), _ref_triu(_ref_cov(y)), rtol=1e-5, atol=1e-6)  # float32 rounding
    assert pool.out_features == 10


@pytest.mark.parametrize('per_sample', [False, True])
def test_train_forward_matches_the_reference(per_sample):
    # Reference: modulate, form the covariance, take the rate, drop channels of the features, form it again.
    torch.manual_seed(0)
    pool = DropCovPool(8, gcp_dim=None, per_sample=per_sample).double().train()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    torch.manual_seed(1)
    out = pool(x)
    a = _ref_attention(pool, x)
    xm = x * (1 + a[:, :, None, None])
    cov = _ref_cov(xm)
    rho = torch.stack([F.cosine_similarity(a[i], cov[i].sum(dim=1), dim=0) for i in range(3)])
    rate = (1 - (10 / 3) * (rho if per_sample else rho.mean().expand(3))).clamp(0, 1)  # log2 8 = 3
    torch.manual_seed(1)
    keep = (torch.rand(3, 8, dtype=torch.float64) < (1 - rate)[:, None]).double() / (1 - rate)[:, None]
    ref = _ref_triu(_ref_cov(xm * keep[:, :, None, None]))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_train_gradient_does_not_flow_through_the_rate():
    torch.manual_seed(0)
    pool = DropCovPool(8, gcp_dim=None).double().train()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    g = torch.autograd.grad(pool(x).square().sum(), x)[0]
    a = _ref_attention(pool, x)
    xm = x * (1 + a[:, :, None, None])
    torch.manual_seed(1)
    p = dropcov_rate(a, _ref_cov(xm)).detach()
    keep = (torch.rand(3, 8, dtype=torch.float64) < (1 - p)[:, None]).double() / (1 - p)[:, None]
    g_ref = torch.autograd.grad(_ref_triu(_ref_cov(xm * keep[:, :, None, None])).square().sum(), x)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    torch.manual_seed(0)
    pool = DropCovPool(5, gcp_dim=3).double().eval()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pool, (x,))
    # the dropout with a fixed rate and mask (the same seed every call) is linear in x
    p = torch.tensor([0.3, 0.6], dtype=torch.float64)

    def dropped(x):
        torch.manual_seed(3)
        return channel_dropout(x, p)
    assert torch.autograd.gradcheck(dropped, (x,))


def test_rate_is_computed_without_a_host_sync():
    # A .item() (host synchronisation) breaks a full-graph compile; the whole training forward must trace as one graph.
    torch.manual_seed(0)
    pool = DropCovPool(8, gcp_dim=4).train()
    compiled = torch.compile(pool, backend='eager', fullgraph=True)
    assert compiled(torch.randn(2, 8, 3, 3)).shape == (2, 10)


def test_low_precision_input_covariance_in_float32():
    torch.manual_seed(0)
    pool = DropCovPool(6, gcp_dim=4).eval()
    x = torch.randn(2, 6, 4, 4)
    ref = pool(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = pool(x)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)  # bf16 conv: ~3 significant digits
    low = pool.to(torch.bfloat16)(x.bfloat16())
    assert low.dtype == torch.bfloat16  # Σ formed in float32, cast back to the input dtype
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.02)


def test_tokens_and_class_token():
    torch.manual_seed(0)
    pool = DropCovPool(6, gcp_dim=4, input_fmt='NLC', num_prefix_tokens=1, cls_token=True).eval()
    x = torch.randn(2, 10, 6)
    out = pool(x)
    assert out.shape == (2, 6 + 10) and torch.equal(out[:, :6], x[:, 0])
    maps = x[:, 1:].transpose(1, 2).reshape(2, 6, 9, 1)
    pool_map = DropCovPool(6, gcp_dim=4).eval()
    pool_map.load_state_dict(pool.state_dict())
    torch.testing.assert_close(out[:, 6:], pool_map(maps), rtol=1e-6, atol=1e-7)  # strided vs contiguous matmul


def test_bad_arguments():
    with pytest.raises(ValueError, match='kernel_size must be an odd positive int'):
        DropCovPool(6, kernel_size=2)
    with pytest.raises(ValueError, match='per_sample must be a bool'):
        DropCovPool(6, per_sample='yes')
    with pytest.raises(ValueError, match='cls_token=True needs a class token'):
        DropCovPool(6, cls_token=True)
    with pytest.raises(ValueError, match='gcp_dim must be an int >= 2'):
        DropCovPool(6, gcp_dim=1)


@pytest.mark.parametrize('shape', [(2, 6, 1, 1), (2, 1, 6)])
def test_dropcov_refuses_a_single_position(shape):
    """One position (a 1×1 map, or one token) has covariance 0 for every input: refused with the shape named, in
    training and in evaluation, as CovPool refuses it."""
    from timm_gcp.layers import TooFewPositionsError
    pool = DropCovPool(6, gcp_dim=4, input_fmt='NCHW' if len(shape) == 4 else 'NLC')
    for mode in (True, False):
        with pytest.raises(TooFewPositionsError, match=r'at least 2 positions.*H×W = 1×1'):
            pool.train(mode)(torch.randn(shape))

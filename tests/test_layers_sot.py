"""Tests of SoT's head: the token cross-covariance, svPN and SoTPool, against references written from the formulas
(SoT, arXiv:2104.10935), in numpy where a second implementation helps."""
import numpy as np
import pytest
import torch

from timm_gcp.functional import EPS, svpn, token_cross_cov
from timm_gcp.layers import SoTPool
from timm_gcp.layers.sot import check_sot_options, sot_preset


def _np_cross_cov(q, k):
    """(N, r) each: one scalar mean per matrix, Σ = QcᵀKc / N."""
    qc, kc = q - q.mean(), k - k.mean()
    return qc.T @ kc / q.shape[0]


def _np_svpn(cov, v0, alpha=0.5, eps=1e-5):
    u = cov @ v0
    u = u / np.linalg.norm(u)
    v = cov.T @ u
    v = v / np.linalg.norm(v)
    s = u @ cov @ v
    return np.outer(u, v) * s ** alpha + (cov - np.outer(u, v) * s) / (s ** (1 - alpha) + eps)


def test_token_cross_cov_matches_the_formula():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 3, 7, 4)), rng.normal(size=(2, 3, 7, 4)) + 2.0
    out = token_cross_cov(torch.from_numpy(q), torch.from_numpy(k)).numpy()
    ref = np.stack([np.stack([_np_cross_cov(q[b, h], k[b, h]) for h in range(3)]) for b in range(2)])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    assert not np.allclose(out, out.transpose(0, 1, 3, 2))  # a cross-covariance is not symmetric


def test_svpn_matches_the_formula_and_is_a_rescaling():
    rng = np.random.default_rng(1)
    cov, v0 = rng.normal(size=(3, 5, 5)), rng.normal(size=5)
    out = svpn(torch.from_numpy(cov), torch.from_numpy(v0)).numpy()
    for b in range(3):
        np.testing.assert_allclose(out[b], _np_svpn(cov[b], v0), rtol=1e-10, atol=1e-12)
        # α = ½: Σ/√σ̂ up to the 1e-5 in the denominator (an absolute error below 2e-5·max|Σ|/σ̂)
        u = cov[b] @ v0 / np.linalg.norm(cov[b] @ v0)
        s = np.linalg.norm(cov[b].T @ u)
        np.testing.assert_allclose(out[b], cov[b] / np.sqrt(s), rtol=0, atol=2e-5 * np.abs(cov[b]).max() / s)


def test_svpn_of_a_rank_one_matrix_divides_by_the_root_of_its_singular_value():
    # one power-iteration step is exact on a rank-one Σ = σ·a·bᵀ: σ̂ = σ and svPN gives Σ/√σ exactly (up to 1e-5)
    a, b = torch.tensor([3., 4., 0.], dtype=torch.float64) / 5, torch.tensor([0., 0.6, 0.8], dtype=torch.float64)
    cov = (7. * torch.outer(a, b)).unsqueeze(0)
    out = svpn(cov, torch.tensor([1., 1., 1.], dtype=torch.float64))
    torch.testing.assert_close(out, cov / 7 ** 0.5, rtol=0, atol=1e-12)
    assert torch.equal(svpn(torch.zeros(1, 3, 3), torch.ones(3)), torch.zeros(1, 3, 3))  # Σ = 0: no NaN


def test_gradcheck_float64():
    torch.manual_seed(0)
    cov = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(svpn, (cov, v0))
    q = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(token_cross_cov, (q, k))
    pool = SoTPool(5, num_heads=2, head_dim=3, input_fmt='NLC', num_prefix_tokens=1, cls_token=True).double().eval()
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pool, (x,))


def test_pool_forward_matches_the_reference():
    torch.manual_seed(0)
    pool = SoTPool(8, num_heads=2, head_dim=3, drop=0.5, input_fmt='NLC', num_prefix_tokens=1, cls_token=True)
    pool = pool.double().eval()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    out = pool(x).detach().numpy()
    w, v0, xs = pool.proj.weight.detach().numpy(), pool.v0.detach().numpy(), x.numpy()
    for b in range(2):
        proj = xs[b, 1:] @ w.T  # (N, 2·h·r): Q of every head, then K of every head
        q, k = proj[:, :6].reshape(5, 2, 3), proj[:, 6:].reshape(5, 2, 3)
        visual = np.concatenate([_np_svpn(_np_cross_cov(q[:, h], k[:, h]), v0).ravel() for h in range(2)])
        np.testing.assert_allclose(out[b], np.concatenate([xs[b, 0], visual]), rtol=1e-10, atol=1e-12)
    assert pool.out_features == 8 + 2 * 9


def test_dropout_is_on_the_visual_features_only_and_in_training_only():
    torch.manual_seed(0)
    pool = SoTPool(8, num_heads=2, head_dim=3, drop=0.5, input_fmt='NLC', num_prefix_tokens=1, cls_token=True)
    x = torch.randn(2, 6, 8)
    train = pool.train()(x)
    assert torch.equal(train[:, :8], x[:, 0])
    ev = pool.eval()(x)
    dropped = train[:, 8:] == 0
    assert 0 < dropped.float().mean() < 1
    torch.testing.assert_close(train[:, 8:][~dropped], 2 * ev[:, 8:][~dropped])


def test_presets_by_width():
    assert sot_preset(240) == (6, 14, 0.) and sot_preset(384) == (6, 24, 0.5) and sot_preset(528) == (6, 38, 0.7)
    assert sot_preset(768) == (6, 38, 0.7)  # Swin-T: the widest published preset
    pool = SoTPool(384)
    assert (pool.num_heads, pool.head_dim, pool.drop.p, pool.out_features) == (6, 24, 0.5, 3456)
    assert SoTPool(384, num_heads=2, drop=0.).out_features == 2 * 24 * 24


def test_exact_root_option_is_the_root_of_the_positive_part_of_the_symmetric_part():
    torch.manual_seed(0)
    pool = SoTPool(6, num_heads=1, head_dim=4, norm='svd', input_fmt='NLC').double().eval()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    out = pool(x).reshape(2, 4, 4).detach().numpy()
    proj = (x @ pool.proj.weight.T).detach().numpy()
    for b in range(2):
        s = _np_cross_cov(proj[b, :, :4], proj[b, :, 4:])
        lam, u = np.linalg.eigh((s + s.T) / 2)
        assert lam.min() < 0  # indefinite: the floor matters
        ref = u @ np.diag(np.sqrt(np.maximum(lam, EPS))) @ u.T
        np.testing.assert_allclose(out[b], ref, rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match='eigen-method'):
        SoTPool(6, norm='isqrt')


def test_maps_are_tokens_without_a_class_token():
    torch.manual_seed(0)
    nhwc = SoTPool(6, num_heads=1, head_dim=2, input_fmt='NHWC').eval()
    nlc = SoTPool(6, num_heads=1, head_dim=2, input_fmt='NLC').eval()
    nlc.load_state_dict(nhwc.state_dict())
    x = torch.randn(2, 3, 3, 6)
    torch.testing.assert_close(nhwc(x), nlc(x.reshape(2, 9, 6)), rtol=1e-6, atol=1e-7)
    assert nhwc.out_features == 4
    with pytest.raises(ValueError, match='cls_token=True needs a class token'):
        SoTPool(6, input_fmt='NHWC', cls_token=True)
    with pytest.raises(ValueError, match=r'unknown option\(s\) heads'):
        check_sot_options({'heads': 2})

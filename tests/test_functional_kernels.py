"""The backward kernels K of the eigen-methods: closed forms, tie values, the paper's Tables 6 and 7, SVD-PI."""
import math

import pytest
import torch

import timm_gcp

from timm_gcp import sqrtm
from timm_gcp.paper.kernels import PAPER_TABLE7, pade_coefficients, pade_eval, table6, table7, taylor_eval
from timm_gcp.functional.eig_sqrt import (
    EPS, TIE_GAP, exact_kernel, kernel_weight, pade_kernel, pi_kernel, pi_weight, taylor_kernel, trunc_kernel)

from helpers.functional import eig_desc, grad_of, ionescu_literal, sample_cov, spd, sym


def _lam(*vals):
    return torch.tensor([vals], dtype=torch.float64)


def _expected(lam, upper):
    """K from a scalar rule ``upper(λ_i, λ_j)`` for i < j (λ_i ≥ λ_j), antisymmetric, zero diagonal."""
    d = lam.shape[-1]
    k = torch.zeros(1, d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(i + 1, d):
            v = upper(float(lam[0, i]), float(lam[0, j]))
            k[0, i, j], k[0, j, i] = v, -v
    return k


LAM = _lam(4.0, 2.5, 1.0, 0.9, 0.3, 1e-3)


def test_exact_kernel_and_tie_rule():
    torch.testing.assert_close(exact_kernel(LAM), _expected(LAM, lambda a, b: 1 / (a - b)), rtol=1e-15, atol=0)
    k = exact_kernel(_lam(1.0, EPS, EPS))
    assert k[0, 1, 2] == 0 and k[0, 2, 1] == 0 and (k.diagonal(dim1=1, dim2=2) == 0).all()


def test_taylor_kernel_is_the_truncated_series():
    for degree in (0, 1, 5, 100):
        # term-by-term reference sum (python floats) against the closed form (1 − r^{K+1})/(1 − r)
        ref = _expected(LAM, lambda a, b: sum((b / a) ** k for k in range(degree + 1)) / a)
        torch.testing.assert_close(taylor_kernel(LAM, degree=degree), ref, rtol=1e-13, atol=0)
    k = taylor_kernel(_lam(1.0, EPS, EPS), degree=100)
    assert k[0, 1, 2] == pytest.approx(101 / EPS, rel=1e-15) and k[0, 2, 1] == -k[0, 1, 2]


def test_trunc_kernel_clips_and_ties():
    lam = _lam(1.0, 1.0 - 1e-6, 0.5, EPS, EPS)
    ref = _expected(lam, lambda a, b: max(-1e5, min(1e5, 1 / (a - b))) if a != b else 1e5)
    torch.testing.assert_close(trunc_kernel(lam, threshold=1e5), ref, rtol=1e-15, atol=0)
    assert trunc_kernel(lam, threshold=1e5)[0, 3, 4] == 1e5
    k = trunc_kernel(lam, threshold=float('inf'))  # no clipping: ±inf at ties, still 0 on the diagonal
    assert k[0, 3, 4] == float('inf') and k[0, 4, 3] == -float('inf') and (k.diagonal(dim1=1, dim2=2) == 0).all()
    torch.testing.assert_close(k[0, :3], exact_kernel(lam)[0, :3], rtol=1e-15, atol=0)


def test_pade_kernel_matches_reference_pade_and_ties():
    p, q = pade_coefficients(50, 50)
    # the reference coefficients (p₁..p₃ = 1.05905, 0.20074, −0.23819; q₁..q₃ = 0.05905, −0.85831, −0.43893)
    assert p[1:4] == pytest.approx((1.05905, 0.20074, -0.23819), abs=1e-5)
    assert q[1:4] == pytest.approx((0.05905, -0.85831, -0.43893), abs=1e-5)
    r = torch.linspace(0.0, 0.999, 2000, dtype=torch.float64)
    lam = torch.stack([torch.ones_like(r), r], -1)
    ours = pade_kernel(lam)[:, 0, 1]
    ref = pade_eval(r, p, q)
    # the degenerate [50/50] pair equals 1/(1−r) to ≤ 1e-9 relative up to r = 0.999
    assert float(((ours - ref) / ref).abs().max()) <= 1e-9
    k = pade_kernel(_lam(1.0, EPS, EPS))
    assert k[0, 1, 2] == 1 / (EPS * TIE_GAP) and k[0, 2, 1] == -k[0, 1, 2]


def test_pi_kernel_closed_form():
    iters = 7
    ref = _expected(LAM, lambda a, b: sum((b / a) ** t for t in range(iters)) / a)
    lower = _expected(LAM, lambda a, b: sum((b / a) ** t for t in range(iters - 1)) / a)
    k = pi_kernel(LAM, iters=iters)
    torch.testing.assert_close(k.triu(1), ref.triu(1), rtol=1e-13, atol=0)
    torch.testing.assert_close(k.tril(-1), lower.tril(-1), rtol=1e-13, atol=0)
    # the direct W equals K_ij √λ_i + K_ji √λ_j
    sq = LAM.sqrt()
    w = k * sq.unsqueeze(-1) + k.transpose(-1, -2) * sq.unsqueeze(-2)
    torch.testing.assert_close(pi_weight(LAM, sq, iters=iters).triu(1), w.triu(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize('method,opts,kernel', [
    ('svd', {}, lambda lam: exact_kernel(lam)),
    ('pade', {}, lambda lam: pade_kernel(lam)),
    ('taylor', {'degree': 3}, lambda lam: taylor_kernel(lam, degree=3)),
    ('taylor', {}, lambda lam: taylor_kernel(lam, degree=100)),
    ('trunc', {'threshold': 2.0}, lambda lam: trunc_kernel(lam, threshold=2.0)),
    ('pi', {'iters': 3}, lambda lam: pi_kernel(lam, iters=3)),
])
def test_backward_equals_literal_ionescu(method, opts, kernel):
    # the fast S∘W backward equals the matrix-backprop formula written out literally, with K from the kernel; on a
    # spectrum spread over [0.2, 3] there is no cancellation in the literal form, so float64 agrees to ~1e-12
    cov = spd(2, 9, lo=0.2, hi=3.0, seed=20)
    g = torch.randn(2, 9, 9, dtype=torch.float64)
    lam, u = eig_desc(cov)
    ref = ionescu_literal(u, lam, kernel(lam), g)
    torch.testing.assert_close(grad_of(method, cov, g, **opts), ref, rtol=1e-10, atol=1e-12)


def test_trunc_and_taylor_differ_from_exact_where_they_should():
    cov = spd(1, 6, lo=1.0, hi=1.05, seed=21)  # gaps 0.01: exact K up to 100, r ≥ 0.95
    g = torch.randn(1, 6, 6, dtype=torch.float64)
    exact = grad_of('svd', cov, g)
    assert float((grad_of('trunc', cov, g, threshold=1.0) - exact).abs().max()) > 1e-3
    assert float((grad_of('taylor', cov, g, degree=2) - exact).abs().max()) > 1e-3
    torch.testing.assert_close(grad_of('trunc', cov, g, threshold=1e10), exact, rtol=1e-12, atol=1e-14)


def test_trunc_without_clipping_is_svd_on_rank_deficient_input():
    # threshold = inf (no clipping, accepted by resolve_method) must be the exact K with svd's tie rule: the
    # ε-floored eigenvalues of a rank-deficient Σ tie by the dozen, where 1/0 = inf times √λ_i − √λ_j = 0 gave NaN
    cov = sample_cov(2, 16, 8, seed=24)
    g = torch.randn(2, 16, 16, dtype=torch.float64)
    out = grad_of('trunc', cov, g, threshold=float('inf'))
    assert torch.isfinite(out).all()
    # same K, computed as a reciprocal times a difference instead of one quotient: ~1 ulp per weight
    ref = grad_of('svd', cov, g)
    assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_kernel_weight_zero_at_exact_ties():
    lam = _lam(2.0, EPS, EPS)
    sq = lam.sqrt()
    for name in ('exact', 'pade', 'taylor', 'trunc'):
        w = kernel_weight(name, lam, sq)
        assert w[0, 1, 2] == 0 and torch.isfinite(w).all()
        assert w[0, 1, 1] == 0.5 / math.sqrt(EPS)


# ------------------------------------------------------------------------------------------------------------ SVD-PI
def _pi_brute(m: torch.Tensor, iters: int) -> torch.Tensor:
    """Autograd through an explicit deflated power iteration per eigenvector, started at the exact eigenvectors."""
    lam, u = torch.linalg.eigh(m.detach())
    lam, u = lam.flip(-1), u.flip(-1)
    vs, ls = [], []
    for k in range(m.shape[-1]):
        mk = m
        for v_j, l_j in zip(vs, ls):
            mk = mk - l_j * torch.outer(v_j, v_j)  # own projector per eigenvector
        v = u[:, k]
        for _ in range(iters):
            w = mk @ v
            v = w / w.norm()
        vs.append(v)
        ls.append(v @ mk @ v)
    return sum(l_k.sqrt() * torch.outer(v_k, v_k) for v_k, l_k in zip(vs, ls))


@pytest.mark.parametrize('iters', [1, 2, 5, 20])
def test_pi_backward_equals_brute_force_power_iteration(iters):
    m = spd(1, 6, lo=0.3, hi=5.0, seed=22)[0]
    g = torch.randn(6, 6, dtype=torch.float64)
    x = m.clone().requires_grad_()
    (_pi_brute(sym(x), iters) * g).sum().backward()
    y = m.clone().requires_grad_()
    (sqrtm(sym(y)[None], 'pi', iters=iters)[0] * g).sum().backward()
    # both are float64 first-order derivatives of the same map at an exact fixed point: agreement to ~1e-14
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-10, atol=1e-12)


def test_pi_converges_to_exact_gradient():
    cov = spd(1, 6, lo=1.0, hi=3.0, seed=23)  # r ≤ 0.93 for neighbours: 2000 steps leave r^T ≈ 0
    g = torch.randn(1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(grad_of('pi', cov, g, iters=2000), grad_of('svd', cov, g), rtol=1e-10, atol=1e-12)
    assert float((grad_of('pi', cov, g, iters=2) - grad_of('svd', cov, g)).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------------------ Tables 6, 7
def test_table6_taylor_row():
    t6 = table6()
    # paper Table 6 (degree-100 Taylor, float64) at r = 0.9, 0.99, 0.999: 2e-4, 36, 904; exact r^101/(1−r)
    for r, err in zip((0.9, 0.99, 0.999), t6['taylor'][4:]):
        assert err == pytest.approx(r ** 101 / (1 - r), rel=1e-6)
    assert t6['taylor'][4] == pytest.approx(2.4e-4, rel=0.05)
    assert round(t6['taylor'][5]) == 36 and round(t6['taylor'][6]) == 904
    assert t6['taylor_termwise'][4:] == pytest.approx(t6['taylor'][4:], rel=1e-9)
    # our closed-form Padé kernel is float64-accurate (≤ 1e-13 absolute up to 1/(1−r) = 1000)
    assert max(t6['pade']) < 1e-13
    # reference [50/50] coefficients: below 1e-9 at 0.999 (the paper's Table 6: 3e-10)
    assert 1e-11 < t6['pade_reference'][6] < 1e-8


def test_table7_bounds():
    t7 = table7()
    assert t7['taylor']['tie'] == pytest.approx(PAPER_TABLE7['taylor'], rel=1e-3)  # 101/ε = 4.55e17
    assert t7['trunc']['worst'] == PAPER_TABLE7['trunc']
    assert t7['pade']['tie'] == 2.0 ** 53 / EPS
    assert t7['svd']['tie'] == pytest.approx(1.0)  # ties contribute 0; largest is the pair (1, ε)
    assert t7['svd']['worst'] == pytest.approx(1 / (EPS * 2.0 ** -52))
    assert t7['pi']['tie'] == pytest.approx(20 / EPS)
    for row in t7.values():
        assert all(math.isfinite(v) for v in row.values())


def test_taylor_eval_horner():
    r = torch.tensor([0.5], dtype=torch.float64)
    assert float(taylor_eval(r, 3)) == 1 + 0.5 + 0.25 + 0.125


def test_rank_deficient_kernels_finite():
    lam, _ = eig_desc(sample_cov(1, 64, 10))
    for k in (exact_kernel(lam), pade_kernel(lam), taylor_kernel(lam), trunc_kernel(lam), pi_kernel(lam)):
        assert torch.isfinite(k).all()


# ------------------------------------------------------------------------------- pade with series=True (reference)
def test_pade_series_equals_closed_form_away_from_ties():
    from timm_gcp.functional.eig_sqrt import pade_kernel
    from timm_gcp.functional.pade_series import pade_series_kernel
    lam = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.1, 1e-3]], dtype=torch.float64)  # r ≤ 0.67 between neighbours
    torch.testing.assert_close(pade_series_kernel(lam), pade_kernel(lam), rtol=1e-13, atol=0)
    # the reference's coefficients (mpmath at 20 digits) and its error near r = 1: 1e-14 at 0.99, 4e-13 at 0.999
    from timm_gcp.functional.pade_series import reference_pade_coefficients
    p, q = reference_pade_coefficients()
    assert (round(p[1], 5), round(p[2], 5), round(q[1], 5), round(q[2], 5)) == (1.05905, 0.20074, 0.05905, -0.85831)
    r = torch.tensor([0.99, 0.999], dtype=torch.float64)
    k = pade_series_kernel(torch.stack([torch.ones_like(r), r], -1))[:, 0, 1]
    err = (k * (1 - r) - 1).abs()
    assert float(err[0]) < 1e-13 and float(err[1]) < 1e-11


def test_pade_series_ties_take_the_samples_own_most_negative_k():
    from timm_gcp.functional.pade_series import pade_series_kernel
    lam = torch.tensor([[1.0, 0.5, EPS, EPS], [4.0, 1.0, 0.25, EPS]], dtype=torch.float64)
    k = pade_series_kernel(lam)
    # sample 0: P(1)/Q(1) = −inf at the (ε, ε) tie in both triangles → that sample's most negative finite K, 1/(ε−0.5)
    # ... which is −1/(0.5 − ε) ≈ −2; symmetric, unlike the closed form's ±2⁵³/ε
    assert float(k[0, 2, 3]) == float(k[0, 3, 2]) == float(k[0][torch.isfinite(k[0])].min())
    assert float(k[0, 2, 3]) == pytest.approx(-1 / (0.5 - EPS))
    # sample 1 has no tie: untouched by sample 0's (per sample, unlike the reference's batch-wide replacement)
    torch.testing.assert_close(k[1], pade_series_kernel(lam[1:])[0], rtol=0, atol=0)
    assert torch.isfinite(k).all()


def test_pade_series_gives_the_closed_form_gradient_into_features():
    # the two evaluations differ only in the null-space block of a rank-deficient covariance, which the covariance
    # backward multiplies by the centred features, orthogonal to it up to float64 rounding. The series' tie value is
    # the sample's most negative finite K, ~1e16 when a noise eigenvalue sits just above ε next to the floored ones,
    # so the rounding-level overlap is amplified: measured 5e-7 relative here (1e-6 allowed), against 0 for
    # identical backwards and O(1) for a real difference
    gen = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(2, 48, 20, generator=gen, dtype=torch.float64))
    grads = []
    for opts in ({}, {'series': True}):
        xx = x.clone().requires_grad_()
        out = timm_gcp.functional.cov_pool(xx, 'pade', **opts)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).sum().backward()
        grads.append(xx.grad)
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-6
    with pytest.raises(ValueError, match=r"series='yes' is invalid; it must be True or False"):
        timm_gcp.sqrtm(torch.eye(3).expand(1, 3, 3), 'pade', series='yes')

"""Behaviour of every registered matrix square-root method: values, gradients, rank deficiency, ties, batches."""
import pytest
import torch

from timm_gcp import METHODS, covariance, sqrtm
from timm_gcp.functional.eig_sqrt import EPS
from timm_gcp.functional.mpa import lyap_sign_solve, pade_sqrt_coefficients
from timm_gcp.functional.newton_schulz import ns_sqrtm

from helpers.functional import exact_root, grad_of, ns_reference, sample_cov, spd, sym

ALL = sorted(METHODS)
# these tests feed float32 covariances to the float64 eigen-methods on purpose (dtype handling, well-conditioned
# matrices); the precision warning that protects users is tested in test_precision.py
pytestmark = pytest.mark.filterwarnings('ignore::timm_gcp.functional.PrecisionWarning')
EIGEN = sorted(m for m, s in METHODS.items() if s.eigen)
F64 = {'isqrt': {'dtype': torch.float64}, 'mpa': {'dtype': torch.float64}}


def test_all_ten_methods_registered():
    assert set(METHODS) == {'isqrt', 'svd', 'pade', 'taylor', 'trunc', 'topn', 'newton', 'pi', 'lyap', 'mpa'}
    assert set(EIGEN) == {'svd', 'pade', 'taylor', 'trunc', 'topn', 'newton', 'pi', 'lyap'}


@pytest.mark.parametrize('method', sorted(set(EIGEN) - {'topn'}))
def test_eigen_forward_is_the_exact_root(method):
    cov = sample_cov(2, 12, 40)
    # float64 eigh: the root squares back to Σ to rounding (eigenvalues up to ~4, so 1e-12 absolute is ~1e3 ulps)
    torch.testing.assert_close(sqrtm(cov, method), exact_root(cov), rtol=0, atol=1e-12)


def test_topn_keeps_top_n_eigenvalues():
    cov = spd(1, 8)
    q = sqrtm(cov, 'topn', top_n=3)
    lam = torch.linalg.eigvalsh(q @ q).flip(-1)
    ref = torch.linalg.eigvalsh(cov).flip(-1)
    torch.testing.assert_close(lam[:, :3], ref[:, :3], rtol=1e-12, atol=0)
    torch.testing.assert_close(lam[:, 3:], torch.full_like(lam[:, 3:], EPS), rtol=0, atol=1e-15)
    # default: N = d − 50 for d ≥ 256, the same fraction below (d = 60 keeps 60 − round(50·60/256) = 48)
    from timm_gcp.functional.registry import default_top_n
    assert [default_top_n(d) for d in (256, 512, 64, 8, 1)] == [206, 462, 52, 6, 1]
    cov = sample_cov(1, 60, 200)
    lam = torch.linalg.eigvalsh(sqrtm(cov, 'topn')).flip(-1)
    assert (lam[:, :48] > 1e-3).all() and (lam[:, 48:] < 1e-7).all()


def test_isqrt_matches_reference_iteration_and_converges():
    cov = spd(3, 10, seed=1)
    # hand-written forward == the textbook loop (same arithmetic in float64, different association at step 0)
    torch.testing.assert_close(sqrtm(cov, 'isqrt', dtype=torch.float64), ns_reference(cov, 5), rtol=1e-12, atol=1e-14)
    # many iterations on a well-conditioned input converge to the exact root
    torch.testing.assert_close(sqrtm(cov, 'isqrt', iters=30, dtype=torch.float64), exact_root(cov), rtol=0,
        atol=1e-12)
    # default float32 compute, float64 in → float64 out
    q = sqrtm(cov, 'isqrt')
    assert q.dtype == torch.float64
    torch.testing.assert_close(q, ns_reference(cov, 5), rtol=0, atol=1e-5)


def test_mpa_forward_within_pade_error():
    cov = spd(4, 256, lo=1.0, hi=2.0, seed=2)  # B ≥ 2, n = 256: the regime where batched LU fails here
    n = torch.linalg.matrix_norm(cov)
    p, q = pade_sqrt_coefficients(5, 5)
    # scalar Padé error at the extreme eigenvalues bounds the matrix error (same function of the same spectrum)
    a = torch.linalg.eigvalsh(cov) / n.view(-1, 1)
    x = 1 - a
    approx = sum(c * x ** k for k, c in enumerate(p)) / sum(c * x ** k for k, c in enumerate(q))
    bound = float(((approx - a.sqrt()).abs() * n.sqrt().view(-1, 1)).max())
    err = float((sqrtm(cov, 'mpa', dtype=torch.float64) - exact_root(cov)).abs().max())
    assert err <= 1.01 * bound + 1e-12
    assert bound < 0.2  # ‖·‖_F normalisation at d = 256 puts A's spectrum near 0.07: the [5/5] error is visible
    # float32 default: the polynomials' coefficients (up to 2.75) sum to values near 0.03 at x ≈ 0.93, a ~100×
    # cancellation of float32's 6e-8, accumulated over d = 256 terms (√256) and the solve: ~1e-4, allow 5e-4
    q32 = sqrtm(cov.float(), 'mpa')
    torch.testing.assert_close(q32.double(), sqrtm(cov, 'mpa', dtype=torch.float64), rtol=0, atol=5e-4)


def test_mpa_denominator_spd_and_solve_checked():
    p, q = pade_sqrt_coefficients(5, 5)
    x = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert (sum(c * x ** k for k, c in enumerate(q)) > 1e-3).all()
    # rank-deficient d = 256 covariance: the solve result times the denominator gives back the numerator
    cov = sample_cov(2, 256, 49)
    nrm = torch.linalg.matrix_norm(cov).view(-1, 1, 1)
    xm = torch.eye(256, dtype=torch.float64) - cov / nrm
    pw = [torch.eye(256, dtype=torch.float64).expand_as(xm)]
    for _ in range(5):
        pw.append(pw[-1] @ xm)
    num = sum(c * m for c, m in zip(p, pw))
    den = sum(c * m for c, m in zip(q, pw))
    assert torch.linalg.eigvalsh(den).min() > 1e-3
    y = sqrtm(cov, 'mpa', dtype=torch.float64) / nrm.sqrt()
    torch.testing.assert_close(den @ y, num, rtol=0, atol=1e-10)


def test_lyap_sign_solve_residual():
    b = spd(2, 12, lo=0.2, hi=1.0, seed=3)
    c = sym(torch.randn(2, 12, 12, dtype=torch.float64))
    x = lyap_sign_solve(b, c, iters=12)
    torch.testing.assert_close(b @ x + x @ b, c, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------- gradients
def _sym_input(method, **opts):
    return lambda a: sqrtm(sym(a), method, **opts)


@pytest.mark.parametrize('method', ['svd', 'lyap', 'isqrt', 'mpa', 'pade', 'newton'])
def test_gradcheck(method):
    # eigenvalues in [1, 2] (d = 5): well separated for the eigen kernels and, after ‖·‖_F scaling, x = 1 − a ≤ 0.71
    # where the [5/5] Padé of √(1−x) is within 1.5e-6, far inside gradcheck's rtol 1e-3 (mpa is checked against its
    # own forward although its backward is the exact root's gradient). newton: ten NS steps have converged on this
    # spectrum (trace-normalised eigenvalues 0.13–0.27), so the NS map's gradient is the root's within tolerance
    a = spd(2, 5, lo=1.0, hi=2.0, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(_sym_input(method, **F64.get(method, {})), (a,))


@pytest.mark.parametrize('method,opts', [
    ('taylor', {}),  # neighbouring r ≤ 0.875 on this spectrum: the degree-100 tail r^101 ≤ 1.4e-6 relative
    ('trunc', {}),  # |K| ≤ 4 here, far below T = 1e10: nothing clipped
    ('topn', {'top_n': 5}),  # N = d keeps the whole spectrum
    ('pi', {'iters': 200}),  # 0.875^199 ≈ 3e-12: the power-iteration series has converged
])
def test_gradcheck_approximate_kernels_where_exact(method, opts):
    # the approximate backwards are the true gradient of their forward where their approximation vanishes: checks
    # the plumbing (signs, transposes, diagonal) of each kernel through finite differences
    a = spd(2, 5, lo=1.0, hi=2.0, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(_sym_input(method, **opts), (a,))


def test_svd_equals_lyap_away_from_ties():
    cov = spd(3, 16, lo=0.1, hi=3.0, seed=5)
    g = torch.randn(3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(grad_of('svd', cov, g), grad_of('lyap', cov, g), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('method', ['svd', 'pade', 'trunc', 'topn', 'newton'])
def test_exact_gradients_agree_with_lyap_on_the_range(method):
    # rank 9 of d = 24 (10 samples): on the range of Σ (range×range and range×null blocks in Σ's eigenbasis) every
    # exact-gradient method is the root's derivative, 1/(√λ_i + √λ_j); they differ only inside the null block, where
    # the ε ties make the derivative a convention (0 for svd's tie rule, 1/(2√ε) for lyap). Tolerance: null-block
    # entries of 1/(2√ε) ≈ 3.4e7 leak into the projections through eigenvector rounding (~1e-16), ~1e-8 relative.
    # newton differentiates NS₁₀, which has converged on this range (trace-normalised eigenvalues ≥ 0.02)
    cov = sample_cov(2, 24, 10, seed=30)
    lam, u = torch.linalg.eigh(cov)
    assert ((lam > 1e-10).sum(-1) == 9).all()
    ur, un = u[..., -9:], u[..., :-9]
    g = sym(torch.randn(2, 24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    ref, out = grad_of('lyap', cov, g), grad_of(method, cov, g)
    for left, right in ((ur, ur), (ur, un)):
        r, o = left.transpose(-1, -2) @ ref @ right, left.transpose(-1, -2) @ out @ right
        assert float((o - r).norm() / r.norm()) < 1e-6


def test_pade_equals_svd_away_from_tiny_gaps():
    cov = sample_cov(2, 32, 200, seed=6)  # full rank, relative gaps ≥ 1e-3
    lam = torch.linalg.eigvalsh(cov)
    assert ((lam[:, 1:] - lam[:, :-1]) / lam[:, 1:]).min() > 1e-3
    g = torch.randn(2, 32, 32, dtype=torch.float64)
    gs, gp = grad_of('svd', cov, g), grad_of('pade', cov, g)
    assert float((gp - gs).norm() / gs.norm()) <= 1e-10


def test_newton_backward_is_ns_map_gradient():
    cov = sample_cov(2, 10, 30, seed=7)
    g = torch.randn(2, 10, 10, dtype=torch.float64)
    c = cov.clone().requires_grad_()
    (ns_reference(c, 10) * g).sum().backward()
    # sqrtm symmetrises its input, so its gradient is the symmetric part of the map's
    torch.testing.assert_close(grad_of('newton', cov, g), sym(c.grad), rtol=1e-10, atol=1e-12)
    # forward is the exact root, not NS
    torch.testing.assert_close(sqrtm(cov, 'newton'), exact_root(cov), rtol=0, atol=1e-12)


def test_isqrt_backward_is_autograd_of_forward():
    cov = sample_cov(2, 12, 8, seed=8)  # rank-deficient
    g = torch.randn(2, 12, 12, dtype=torch.float64)
    for iters in (1, 2, 5):
        c = cov.clone().requires_grad_()
        (ns_reference(c, iters) * g).sum().backward()
        # the hand-written backward itself, non-symmetric part included (ns_sqrtm does not symmetrise)
        c2 = cov.clone().requires_grad_()
        (ns_sqrtm(c2, iters, torch.float64) * g).sum().backward()
        torch.testing.assert_close(c2.grad, c.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_of('isqrt', cov, g, iters=iters, dtype=torch.float64), sym(c.grad),
            rtol=1e-10, atol=1e-12)


def test_mpa_backward_close_to_exact_root_gradient():
    cov = spd(2, 6, lo=1.0, hi=2.0, seed=9)
    g = torch.randn(2, 6, 6, dtype=torch.float64)
    # Lyapunov backward at the Padé root: differs from the exact gradient by the Padé error of the forward (≤ 1.5e-6
    # relative here) and the sign iteration's residual after 8 quadratic steps (negligible for this spectrum)
    gm, gl = grad_of('mpa', cov, g, dtype=torch.float64), grad_of('lyap', cov, g)
    assert float((gm - gl).norm() / gl.norm()) < 1e-5


# ------------------------------------------------------------------------------------------ rank deficiency and ties
def _fwd_bwd(method, cov, seed=0, **opts):
    c = cov.detach().clone().requires_grad_()
    q = sqrtm(c, method, **opts)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(q.dtype)
    (q * g).sum().backward()
    return q.detach(), c.grad


@pytest.mark.parametrize('method', ALL)
@pytest.mark.parametrize('m', [49, pytest.param(196, marks=pytest.mark.slow)])
def test_rank_deficient_d256_finite(method, m):
    cov = sample_cov(2, 256, m, seed=m, dtype=torch.float32)
    q, g = _fwd_bwd(method, cov)
    assert torch.isfinite(q).all() and torch.isfinite(g).all()
    assert q.dtype == g.dtype == torch.float32
    assert float(g.abs().max()) > 0


def _tied(d=8, seed=10):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(2, d, d, generator=gen, dtype=torch.float64))
    lam = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)[:d]
    return sym((q * lam) @ q.transpose(-1, -2))


@pytest.mark.parametrize('method', ALL)
def test_repeated_eigenvalues_finite(method):
    q, g = _fwd_bwd(method, _tied())
    assert torch.isfinite(q).all() and torch.isfinite(g).all()


@pytest.mark.parametrize('method', ALL)
def test_zero_matrix_and_constant_features(method):
    zero = torch.zeros(2, 6, 6, dtype=torch.float64)
    q, g = _fwd_bwd(method, zero)
    assert torch.isfinite(q).all() and torch.isfinite(g).all()
    if METHODS[method].eigen:
        # eigenvalues floored at ε: Q = √ε·I
        torch.testing.assert_close(q, EPS ** 0.5 * torch.eye(6, dtype=torch.float64).expand(2, 6, 6))
    else:
        # isqrt/mpa: output 0 and zero gradient (no division by the zero trace/norm)
        assert (q == 0).all() and (g == 0).all()
    # constant features give an exactly zero covariance; the whole pipeline stays finite
    x = torch.full((2, 6, 7, 7), 3.25, requires_grad=True)
    out = sqrtm(covariance(x), method)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('method', ALL)
def test_samples_are_independent(method):
    # a normal sample next to a zero matrix, a huge rank-3 one and a tiny multiple of I: nothing batch-wide may leak
    batch = torch.cat([sample_cov(1, 16, 40, seed=11), torch.zeros(1, 16, 16, dtype=torch.float64),
        sample_cov(1, 16, 3, seed=12) * 1e6, torch.eye(16, dtype=torch.float64).unsqueeze(0) * 1e-30])
    g = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = F64.get(method, {})
    c_all = batch.clone().requires_grad_()
    q_all = sqrtm(c_all, method, **opts)
    (q_all * g).sum().backward()
    for i in range(4):
        c = batch[i:i + 1].clone().requires_grad_()
        q = sqrtm(c, method, **opts)
        (q * g[i:i + 1]).sum().backward()
        assert torch.isfinite(q_all[i]).all() and torch.isfinite(c_all.grad[i]).all()
        # batched and single LAPACK/BLAS calls may round differently: relative 1e-9 of the sample's own scale
        scale_q, scale_g = float(q.detach().abs().max()) + 1e-300, float(c.grad.abs().max()) + 1e-300
        assert float((q_all[i] - q[0]).detach().abs().max()) <= 1e-9 * scale_q
        assert float((c_all.grad[i] - c.grad[0]).abs().max()) <= 1e-9 * scale_g


def test_newton_spectral_backward_equals_matrix_iteration_rank_deficient():
    # the Daleckii–Krein/Leibniz backward against the matrix NS reverse sweep (ns_vjp) on a rank-deficient
    # covariance with a cluster of near-equal eigenvalues: both float64, agreement to ~1e-12 of the gradient's size
    from timm_gcp.functional.newton_schulz import ns_vjp
    cov = sample_cov(2, 48, 20, seed=14)
    cov[:, :4, :4] += 1e-9 * torch.eye(4, dtype=torch.float64)
    g = torch.randn(2, 48, 48, dtype=torch.float64)
    ref = ns_vjp(cov, g, iters=10, dtype=torch.float64)
    out = grad_of('newton', cov, g)
    assert float((out - sym(ref)).abs().max()) <= 1e-10 * float(ref.abs().max())


def test_split_eigh_matches_single_call():
    from timm_gcp.functional import eig_sqrt
    cov = sample_cov(5, 32, 20, seed=15)
    lam, u = eig_sqrt._eigh(cov)
    lam1, u1 = torch.linalg.eigh(cov)
    torch.testing.assert_close(lam, lam1, rtol=0, atol=0)
    torch.testing.assert_close(u, u1, rtol=0, atol=0)
    with torch.inference_mode():
        lam2, _ = eig_sqrt._eigh(cov)
    torch.testing.assert_close(lam2, lam1, rtol=0, atol=0)


def test_eig_forward_keeps_autograd_when_the_cpu_batch_is_split(monkeypatch):
    # eig_forward is public: with a cov that requires grad it must be differentiable (through torch's eigh) whatever
    # the thread count; the concurrent split ran eigh under no_grad and silently returned detached tensors
    from timm_gcp.functional import eig_sqrt
    from timm_gcp.functional.eig_sqrt import eig_forward
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cov = spd(4, 6, seed=31).requires_grad_()
        q, u, lam = eig_forward(cov)
        assert q.requires_grad and u.requires_grad and lam.requires_grad
        g = torch.autograd.grad(q.sum(), cov)[0]
        monkeypatch.setattr(eig_sqrt, 'SPLIT_EIGH', False)
        ref = torch.autograd.grad(eig_forward(cov)[0].sum(), cov)[0]
        torch.testing.assert_close(g, ref, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize('method', ALL)
def test_saved_tensors_go_through_saved_tensor_hooks(method):
    # activation checkpointing (torch.utils.checkpoint, non-reentrant) and torch.autograd.graph.save_on_cpu manage
    # memory through saved-tensor hooks: what a backward keeps must be saved with save_for_backward to reach them
    # (isqrt kept its 3N Newton-Schulz iterates as ctx attributes, invisible to both)
    cov = spd(2, 8, seed=32)
    g = torch.randn(2, 8, 8, dtype=torch.float64)
    opts = F64.get(method, {})
    store = []

    def pack(t):
        store.append(t)
        return len(store) - 1

    c = cov.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda i: store[i]):
        q = sqrtm(c, method, **opts)
    matrices = sum(1 for t in store if t.shape[-2:] == (8, 8))
    assert len({id(t) for t in store}) == len(store)  # each tensor once (save_on_cpu would copy a repeat twice)
    (q * g).sum().backward()
    # isqrt's reverse sweep needs Y_k and T_k of all 5 steps; the eigen-methods U, mpa its root
    assert matrices >= (10 if method == 'isqrt' else 1)
    torch.testing.assert_close(c.grad, grad_of(method, cov, g, **opts), rtol=0, atol=0)

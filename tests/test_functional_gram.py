"""The Gram path (``timm_gcp.functional.gram``): the same function and gradient as the covariance path, at d = 256
with M = 16, 49 and 196 positions, on the inputs that stress it.

Tolerances, relative (max |Δ| / max |ref| for roots, ‖Δ‖/‖ref‖ for gradients into the features):
- float64 methods: 1e-6. Measured 2e-9 to 1e-7: the two paths differ in how the null space of Σ is held. The Gram
  path puts it exactly at the floor ε; the covariance path decomposes it, and float64 rounding leaves its ~200
  eigenvalues at ~1e-16·λ_max instead (√ of that, against √λ_max, is the forward's 1e-8 level).
- ``isqrt`` (float32 on both paths): 1e-4; measured 1e-6 to 8e-6.
- ``mpa``: its covariance path evaluates a matrix Padé approximant in float32, whose rounding moves the root by
  3e-4 to 1e-3 of its size (measured against the same path in float64); the Gram path applies the same rational
  function to each eigenvalue in float64 and matches the float64 covariance path to 1e-7. So ``mpa`` is compared
  with the covariance path in float64 at 1e-6, and with its float32 default at 2e-3 (root) and 5e-4 (gradient).
"""
import pytest
import torch

import timm_gcp
from timm_gcp import METHODS
from timm_gcp.functional import features_sqrtm, triu_vec, use_gram
from timm_gcp.functional.gram import GRAM_MAX_FRACTION

D = 256
FLOAT64 = sorted(m for m, s in METHODS.items() if s.eigen)
TOL = {m: 1e-6 for m in FLOAT64}
TOL['isqrt'] = 1e-4


def _features(kind: str, m: int, b: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    x = torch.randn(b, D, m, generator=g).relu_()  # ReLU features, as after the 1×1 reduction
    if kind == 'rank_one':
        # products of few-bit numbers are exact in float32: exactly rank one, one non-zero eigenvalue
        a = torch.randint(-64, 64, (b, D, 1), generator=g).float() / 64
        r = torch.randint(1, 64, (b, 1, m), generator=g).float() / 64
        x = a * r
    elif kind == 'duplicated':
        x[:, D // 2:] = x[:, :D // 2]  # exact ties in Σ's spectrum (pairs of equal channels)
    elif kind == 'constant':
        x[:, : D // 2] = 3.0  # half the channels carry no variance
    elif kind == 'tiny':
        x = x * 1e-6
    return x


def _root_and_grad(x: torch.Tensor, method: str, path: str, **options):
    x = x.clone().requires_grad_()
    q = features_sqrtm(x, method, path=path, **options)
    d = q.shape[-1]
    w = torch.linspace(-1, 1, d * (d + 1) // 2, dtype=q.dtype)
    (triu_vec(q) * w).sum().backward()
    return q.detach(), x.grad


def _rel(a: torch.Tensor, ref: torch.Tensor, norm: bool) -> float:
    if norm:
        return float((a - ref).norm() / ref.norm())
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize('m', [16, 49, 196])
@pytest.mark.parametrize('kind', ['random', 'rank_one', 'duplicated', 'constant', 'tiny'])
def test_gram_path_is_the_covariance_path(kind, m):
    x = _features(kind, m)
    failures = []
    for method in METHODS:
        opts = {'dtype': 'float64'} if method == 'mpa' else {}
        qg, gg = _root_and_grad(x, method, 'gram', **opts)
        qc, gc = _root_and_grad(x, method, 'cov', **opts)
        tol = TOL.get(method, 1e-6)
        if kind == 'rank_one' and method != 'isqrt':
            # one non-zero eigenvalue: the covariance path's ~255 null eigenvalues are all rounding noise, which
            # its backward weights by up to 1/(2·√noise) (measured up to 1e-6 on the root, 1.5e-5 on the gradient)
            tol = 3e-5
        err = (_rel(qg, qc, norm=False), _rel(gg, gc, norm=True))
        if not (torch.isfinite(gg).all() and max(err) < tol):
            failures.append(f'{method}: root {err[0]:.1e}, gradient {err[1]:.1e} (tolerance {tol:.0e})')
    assert not failures, '; '.join(failures)


@pytest.mark.parametrize('m', [49, 196])
def test_mpa_float32_default_matches_within_its_own_rounding(m):
    x = _features('random', m)
    qg, gg = _root_and_grad(x, 'mpa', 'gram')
    qc, gc = _root_and_grad(x, 'mpa', 'cov')
    assert qg.dtype == qc.dtype == torch.float32
    assert _rel(qg, qc, norm=False) < 2e-3 and _rel(gg, gc, norm=True) < 5e-4
    q64, _ = _root_and_grad(x, 'mpa', 'cov', dtype='float64')
    assert _rel(qg.double(), q64, norm=False) < 1e-6  # the Gram path is the float64 function, rounded once


def test_rank_one_root_is_the_closed_form():
    # Xc = a·bᵀ: Σ = β·a·aᵀ (β = |b|²/M), Σ^½ = √ε·I + (|a|·√β − √ε)·â·âᵀ, written without any eigendecomposition
    x = _features('rank_one', 49, b=1).double()
    xc = x - x.mean(-1, keepdim=True)
    a, b = x[0, :, :1], xc[0, :1] / x[0, :1, :1]
    beta = float((b ** 2).sum() / 49)
    ahat = a / a.norm()
    eps = timm_gcp.functional.EPS
    ref = eps ** 0.5 * torch.eye(D, dtype=torch.float64) + (float(a.norm()) * beta ** 0.5 - eps ** 0.5) * ahat @ ahat.T
    for method in ('svd', 'lyap', 'pade'):
        q = features_sqrtm(x, method, path='gram')[0]
        assert _rel(q, ref, norm=False) < 1e-12


@pytest.mark.parametrize('method', FLOAT64 + ['isqrt'])
def test_gram_path_is_scale_equivariant_at_huge_scale(method):
    # Σ^½ is homogeneous of degree 1 (the ε floor aside), so the root of 1e6·x is 1e6 times the root of x and the
    # gradient into the features is the same at both scales. The Gram path keeps both to rounding; the covariance
    # path does not at 1e6 (its null-space noise, ~1e-16·λ_max ≈ 1e-4, is far above ε: measured 3e-3 to 9e-2 on the
    # gradient of svd, lyap and pi, see docs/methods.md).
    x = _features('random', 49).double()
    q1, g1 = _root_and_grad(x, method, 'gram')
    qh, gh = _root_and_grad(x * 1e6, method, 'gram')
    tol = 1e-4 if method == 'isqrt' else 1e-7
    assert _rel(qh, 1e6 * q1, norm=False) < tol and _rel(gh, g1, norm=True) < tol


@pytest.mark.parametrize('method', ['svd', 'lyap', 'pade', 'topn'])
def test_gram_backward_passes_gradcheck(method):
    # these backward kernels are the exact gradient of the root; M = 5 positions in d = 7 channels: rank 4, a
    # smooth function of x for generic x (every perturbation keeps the rank at M − 1)
    x = torch.randn(2, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: features_sqrtm(v, method, path='gram'), (x,), atol=1e-6, rtol=1e-5)


def test_isqrt_gram_backward_passes_gradcheck():
    x = torch.randn(2, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: features_sqrtm(v, 'isqrt', path='gram', dtype='float64'), (x,))


@pytest.mark.parametrize('method', ['svd', 'pade', 'isqrt', 'mpa', 'newton'])
def test_bf16_autocast_does_not_reach_the_gram_path(method):
    x = _features('random', 49).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        qg, gg = _root_and_grad(x, method, 'gram')
        qc, gc = _root_and_grad(x, method, 'cov')
    assert qg.dtype == timm_gcp.method_dtype(method)
    tol = 2e-3 if method == 'mpa' else TOL[method]
    assert _rel(qg.to(qc.dtype), qc, norm=False) < tol
    assert gg.dtype == torch.bfloat16 and _rel(gg.float(), gc.float(), norm=True) < 1e-2  # bf16 gradient: 2⁻⁸


@pytest.mark.parametrize('method', list(METHODS))
def test_gram_path_runs_on_meta_tensors(method):
    # no data-dependent Python control flow (and so no host synchronisation) in the path: shapes only
    out = timm_gcp.cov_pool(torch.empty(3, D, 49, device='meta'), method, path='gram')
    assert out.device.type == 'meta' and out.shape == (3, D * (D + 1) // 2)


def test_constant_features_give_zero_root_and_gradient_for_isqrt_and_mpa():
    x = torch.full((2, 16, 9), 2.0)
    for method in ('isqrt', 'mpa'):
        q, g = _root_and_grad(x, method, 'gram')
        assert torch.count_nonzero(q) == 0 and torch.count_nonzero(g) == 0


def test_use_gram_policy():
    assert use_gram(256, 49) and use_gram(256, 196) and use_gram(256, 16)
    assert not use_gram(256, 256) and not use_gram(256, 784) and not use_gram(256, 256, 'gram')
    assert use_gram(256, 255, 'gram') and not use_gram(256, 49, 'cov')
    edge = int(GRAM_MAX_FRACTION * 256)
    assert use_gram(256, edge, method='isqrt') and not use_gram(256, edge + 1, method='isqrt')
    assert use_gram(256, 255, method='svd') and use_gram(256, 255, method='mpa')  # faster at every M < d measured
    with pytest.raises(ValueError, match='path must be one of'):
        use_gram(256, 49, 'fast')


def test_cov_pool_takes_the_gram_path_automatically():
    calls = []
    spec = METHODS['svd']
    real = spec.gram_fn
    object.__setattr__(spec, 'gram_fn', lambda x, **o: calls.append(x.shape) or real(x, **o))
    try:
        timm_gcp.cov_pool(torch.randn(2, 64, 7, 7), 'svd')
        timm_gcp.cov_pool(torch.randn(2, 16, 7, 7), 'svd')  # M = 49 ≥ d = 16: the covariance path
    finally:
        object.__setattr__(spec, 'gram_fn', real)
    assert calls == [(2, 64, 49)]

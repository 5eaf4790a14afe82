"""Devices, precisions, autocast, input validation and the registry's error messages."""
import pytest
import torch

import timm_gcp
import timm_gcp.functional.eig_sqrt as eig_sqrt
from timm_gcp import METHODS, covariance, sqrtm
from timm_gcp.functional import mpa_sqrtm, ns_sqrtm, resolve_method

from helpers.functional import sample_cov, spd

ALL = sorted(METHODS)
# these tests feed float32 covariances to the float64 eigen-methods on purpose (dtype handling, well-conditioned
# matrices); the precision warning that protects users is tested in test_precision.py
pytestmark = pytest.mark.filterwarnings('ignore::timm_gcp.functional.PrecisionWarning')


@pytest.mark.parametrize('method', ALL)
def test_meta_device_shapes(method):
    cov = torch.empty(3, 16, 16, device='meta', dtype=torch.float32, requires_grad=True)
    q = sqrtm(cov, method)
    assert q.device.type == 'meta' and q.shape == (3, 16, 16) and q.dtype == torch.float32


@pytest.mark.parametrize('method', sorted(m for m in ALL if METHODS[m].eigen))
def test_meta_device_shapes_with_eig_device(method):
    # a model configured with eig_device='cpu' (e.g. for CUDA training) still runs on meta for shape inference:
    # there is nothing to copy to the eig device, so the option does not apply
    cov = torch.empty(3, 16, 16, device='meta', dtype=torch.float32, requires_grad=True)
    q = sqrtm(cov, method, eig_device='cpu')
    assert q.device.type == 'meta' and q.shape == (3, 16, 16) and q.dtype == torch.float32
    q.sum().backward()
    assert cov.grad.device.type == 'meta'


@pytest.mark.parametrize('method', ALL)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_in_and_out(method, dtype):
    cov = sample_cov(2, 12, 30, seed=1, dtype=torch.float32)
    # topn's default N = max(d − 50, 1) would floor 11 of 12 eigenvalues to ε, whose gradient 1/(2√ε) ≈ 3.4e7 is
    # beyond float16's range: keep them all here
    opts = {'top_n': 12} if method == 'topn' else {}
    c = cov.to(dtype).requires_grad_()
    q = sqrtm(c, method, **opts)
    q.float().sum().backward()
    assert q.dtype == dtype and c.grad.dtype == dtype
    assert torch.isfinite(q.float()).all() and torch.isfinite(c.grad.float()).all()
    ref = sqrtm(c.detach().float(), method, **opts)
    # computed from the rounded input in float32/64 and rounded once on the way out: half-precision rounding of
    # entries up to ~1.5 (bf16: 8 bits → 2^-8·1.5 ≈ 6e-3; fp16: 11 bits → 8e-4)
    atol = 8e-3 if dtype == torch.bfloat16 else 1.5e-3
    torch.testing.assert_close(q.float(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize('method', ALL)
def test_autocast_does_not_leak_in(method):
    cov = sample_cov(2, 12, 30, seed=2, dtype=torch.float32)
    ref = sqrtm(cov, method)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = sqrtm(cov, method)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize('method', ALL)
def test_autocast_does_not_leak_into_backward(method):
    # backward() called inside an autocast region runs the custom backward with the caller's autocast state unless
    # the Function turns it off: isqrt/mpa then did their float32 matmuls in bf16 (1-3% gradient error)
    cov = spd(2, 24, lo=0.5, hi=2.0, seed=5, dtype=torch.float32)
    g = torch.randn(2, 24, 24, generator=torch.Generator().manual_seed(0))
    ref_c = cov.clone().requires_grad_()
    (sqrtm(ref_c, method) * g).sum().backward()
    c = cov.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        (sqrtm(c, method) * g).sum().backward()
    torch.testing.assert_close(c.grad, ref_c.grad, rtol=0, atol=0)


@pytest.mark.parametrize('fn', [ns_sqrtm, mpa_sqrtm, eig_sqrt.eig_sqrtm])
def test_method_functions_disable_autocast_themselves(fn):
    # the per-method functions are public too: called directly (not through sqrtm) they keep their precision
    cov = spd(2, 24, lo=0.5, hi=2.0, seed=6, dtype=torch.float32)
    ref = fn(cov)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = fn(cov)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_eig_device_option_runs_eigh_there(monkeypatch):
    seen = []
    real = torch.linalg.eigh

    def spy(a, *args, **kwargs):
        seen.append(a.device.type)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, 'eigh', spy)
    cov = sample_cov(2, 10, 30, seed=3)
    c = cov.clone().requires_grad_()
    q = sqrtm(c, 'pade', eig_device='cpu')
    q.sum().backward()
    assert seen and set(seen) == {'cpu'}
    torch.testing.assert_close(q, sqrtm(cov, 'pade'), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('method', ALL)
def test_cuda(method):
    cov = sample_cov(2, 64, 30, seed=4, dtype=torch.float32)
    c = cov.cuda().requires_grad_()
    q = sqrtm(c, method)
    q.sum().backward()
    assert q.device.type == 'cuda' and c.grad.device.type == 'cuda'
    ref_c = cov.clone().requires_grad_()
    ref = sqrtm(ref_c, method)
    ref.sum().backward()
    torch.testing.assert_close(q.cpu(), ref, rtol=1e-3, atol=1e-4)
    if METHODS[method].eigen:
        c2 = cov.cuda().requires_grad_()
        q2 = sqrtm(c2, method, eig_device='cpu')
        q2.sum().backward()
        assert q2.device.type == 'cuda' and c2.grad.device.type == 'cuda'
        torch.testing.assert_close(q2.cpu(), ref, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('method', ALL)
def test_non_finite_input_names_samples(method):
    cov = spd(4, 6, dtype=torch.float32)
    cov[1, 0, 0] = float('nan')
    cov[3, 2, :3] = float('inf')
    with pytest.raises(ValueError, match=r'2 of 4 samples.*sample 1: 1, sample 3: 3'):
        sqrtm(cov, method)


def test_check_false_skips_the_check():
    cov = spd(2, 6)
    cov[0, 0, 0] = float('nan')
    out = sqrtm(cov, 'isqrt', check=False)  # no ValueError; NaN propagates in that sample only
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize('bad,exc,msg', [
    (torch.ones(2, 4, 4, dtype=torch.int64), TypeError, 'floating-point'),
    (torch.ones(2, 4, 5), ValueError, r'\(B, d, d\)'),
    (torch.ones(4, 4), ValueError, r'\(B, d, d\)'),
    (torch.ones(2, 3, 4, 4), ValueError, r'\(B, d, d\)'),
    ([[1.0]], TypeError, 'torch.Tensor'),
])
def test_bad_shapes_and_dtypes(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        sqrtm(bad, 'svd')


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match=r"unknown matrix square-root method 'qr'.*isqrt.*svd.*pade.*mpa"):
        sqrtm(spd(1, 4), 'qr')
    with pytest.raises(ValueError, match=r"'svd' does not take option\(s\) iters; valid options: eps, eig_device"):
        sqrtm(spd(1, 4), 'svd', iters=3)
    assert resolve_method('taylor', degree=7) == {
        'degree': 7, 'eps': eig_sqrt.EPS, 'eig_device': None, 'dtype': torch.float64}


@pytest.mark.parametrize('method,opts,msg', [
    ('isqrt', {'iters': 0}, 'iters'),
    ('isqrt', {'dtype': 'int32'}, 'dtype'),
    ('mpa', {'dtype': 'banana'}, 'dtype'),
    ('mpa', {'degree': 0}, 'degree'),
    ('pi', {'iters': 0}, 'iters'),
    ('topn', {'top_n': 0}, 'top_n'),
    ('topn', {'top_n': 7}, 'top_n'),
])
def test_bad_option_values(method, opts, msg):
    with pytest.raises(ValueError, match=msg):
        sqrtm(spd(1, 6), method, **opts)


@pytest.mark.parametrize('method,opts,msg', [
    ('svd', {'eps': 0.0}, r'eps=0\.0.*positive'),  # eigenvalues floored at 0: inf/NaN gradient on rank-deficient Σ
    ('lyap', {'eps': -1e-12}, 'eps'),  # negative floor: NaN root
    ('pade', {'eps': float('nan')}, 'eps'),
    ('pade', {'eps': '1e-12'}, 'eps'),
    ('trunc', {'threshold': -5.0}, 'threshold'),  # clamp(T, −T): every K became −|T|
    ('trunc', {'threshold': 0}, 'threshold'),
    ('taylor', {'degree': -1}, 'degree'),  # empty series: K = 0 everywhere
    ('taylor', {'degree': 2.7}, r'degree.*integer'),  # was silently truncated to 2
    ('newton', {'iters': 0}, 'iters'),  # silently ran one Newton-Schulz step
    ('newton', {'iters': -3}, 'iters'),
    ('pi', {'iters': 1.5}, 'iters'),
    ('isqrt', {'iters': True}, 'iters'),
    ('isqrt', {'iters': 2.5}, 'iters'),
    ('mpa', {'lyap_iters': 0}, 'lyap_iters'),
    ('topn', {'top_n': 3.5}, 'top_n'),
    ('topn', {'top_n': -2}, 'top_n'),
    ('svd', {'eig_device': 'banana'}, 'eig_device'),
    ('svd', {'eig_device': 3.0}, 'eig_device'),
    ('svd', {'eig_device': 'meta'}, r"eig_device='meta'.*holds values"),  # no values to decompose
    ('svd', {'eps': 1e300}, r'eps=1e\+300.*below 1'),  # √ε overflowed the float32 output: inf
    ('mpa', {'dtype': torch.float16}, r'dtype=torch\.float16.*float32 or torch\.float64'),  # failed in Cholesky
    ('isqrt', {'dtype': 'bfloat16'}, 'dtype'),
    ('mpa', {'degree': 40}, r'degree=40 is invalid with dtype=torch\.float32; it must be at most 10'),
    ('mpa', {'degree': 21, 'dtype': 'float64'}, r'degree=21.*at most 20'),
])
def test_bad_option_values_rejected_up_front(method, opts, msg):
    # resolve_method is what MatrixSqrt/CovPool/set_gcp_method and timm-gcp-train's --gcp-switch-kwargs check run at
    # construction (or at startup for a switch 45 epochs later): a bad value must fail there, naming the option
    with pytest.raises(ValueError, match=msg):
        resolve_method(method, **opts)
    with pytest.raises(ValueError, match=msg):
        sqrtm(spd(1, 6), method, **opts)


def test_good_option_values_accepted():
    assert resolve_method('taylor', degree=0)['degree'] == 0  # K = 1/λ_max: degenerate but well defined
    assert resolve_method('trunc', threshold=10 ** 10)['threshold'] == 10 ** 10
    assert resolve_method('trunc', threshold=float('inf'))['threshold'] == float('inf')  # = svd
    assert resolve_method('svd', eps=0.5, eig_device=torch.device('cpu'))['eps'] == 0.5
    assert resolve_method('pade', eig_device='cuda:1')['eig_device'] == 'cuda:1'  # not required to exist here
    assert resolve_method('topn', top_n=None)['top_n'] is None


def test_dtype_option_accepts_names():
    cov = spd(1, 6)
    for method in ('isqrt', 'mpa'):
        torch.testing.assert_close(sqrtm(cov, method, dtype='float64'), sqrtm(cov, method, dtype=torch.float64),
            rtol=0, atol=0)
        torch.testing.assert_close(sqrtm(cov, method, dtype='torch.float32'), sqrtm(cov, method), rtol=0, atol=0)


def test_not_psd_for_mpa_is_reported():
    cov = -spd(2, 6)  # negative definite: the Padé denominator is not SPD
    with pytest.raises(ValueError, match='cov is not positive semi-definite in 2 of 2 samples'):
        sqrtm(cov, 'mpa')
    with pytest.raises(ValueError, match='not positive definite'):
        sqrtm(cov, 'mpa', check=False)


@pytest.mark.parametrize('bad', [['pade'], None, 3, ('svd',)])
def test_method_that_is_not_a_name_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r'unknown matrix square-root method .* \(a method name, one of: isqrt'):
        resolve_method(bad)


def test_mpa_degree_limits_work_on_rank_deficient_input():
    # the caps are where the Padé denominator still factorises on the worst inputs measured (d = 256, M = 49)
    x = torch.relu(torch.randn(2, 256, 49, generator=torch.Generator().manual_seed(0)))
    for dtype, degree in ((torch.float32, 10), (torch.float64, 20)):
        q = sqrtm(covariance(x, dtype=dtype), 'mpa', degree=degree, dtype=dtype)
        assert torch.isfinite(q).all()


@pytest.mark.parametrize('method', sorted(METHODS))
def test_psd_contract_is_the_same_for_every_method(method):
    # negative definite and indefinite input (beyond rounding) is refused by every method with the same message;
    # before, isqrt returned NaN, newton's backward NaN, mpa blamed its denominator and the eigen-methods clamped
    good = spd(3, 6, lo=0.0, hi=2.0)  # PSD with an exact zero eigenvalue: accepted
    indefinite = good.clone()
    indefinite[1] -= 0.3 * torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r'cov is not positive semi-definite in 1 of 3 samples: sample 1 '):
        sqrtm(indefinite, method)
    with pytest.raises(ValueError, match=r'not positive semi-definite in 3 of 3 samples'):
        sqrtm(-spd(3, 6), method)
    assert torch.isfinite(sqrtm(good, method)).all()


@pytest.mark.parametrize('method', sorted(METHODS))
def test_non_symmetric_input_is_refused_and_rounding_asymmetry_symmetrised(method):
    cov = spd(2, 6)
    skew = cov.clone()
    skew[0, 0, 3] += 0.5
    with pytest.raises(ValueError, match=r'cov is not symmetric in 1 of 2 samples: sample 0 \(max\|Σ − Σᵀ\| = 0\.5'):
        sqrtm(skew, method)
    # unchecked, every method takes the symmetric part: all agree with the root of ½(Σ + Σᵀ)
    opts = {'dtype': torch.float64} if method in ('isqrt', 'mpa') else {}
    out = sqrtm(skew, method, check=False, **opts)
    ref = sqrtm(0.5 * (skew + skew.mT), method, **opts)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # asymmetry at the rounding level (a covariance computed as X·Xᵀ in float32) passes the check
    x = torch.randn(2, 64, 30, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(sqrtm(torch.bmm(x, x.mT) / 30, method, dtype='float32')).all()


@pytest.mark.parametrize('d,m', [(256, 49), (256, 196)])
def test_float32_covariances_of_model_features_pass_the_psd_check(d, m):
    # the check's tolerance must accept what covariance() produces in float32 (rank-deficient, rounding noise on the
    # zero eigenvalues), or isqrt/mpa models would fail on CPU
    gen = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(4, d, m, generator=gen) * torch.logspace(-3, 1, d).view(1, d, 1))
    cov = covariance(x)
    assert cov.dtype == torch.float32 and float(torch.linalg.eigvalsh(cov.double()).min()) < 0  # noise below 0
    for method in ('isqrt', 'mpa'):
        assert torch.isfinite(sqrtm(cov, method)).all()


def test_features_whose_covariance_overflows_are_a_clear_error():
    x = torch.randn(2, 8, 10, dtype=torch.float64)
    x[1] *= 1e20  # finite, but (1e20)² overflows float32; float64 holds it
    with pytest.raises(ValueError, match=r'covariance of 1 of 2 samples would overflow torch\.float32.*sample 1'):
        covariance(x, dtype=torch.float32)
    with pytest.raises(ValueError, match='would overflow torch.float32'):
        timm_gcp.functional.cov_pool(x, 'isqrt')
    assert torch.isfinite(covariance(x, dtype=torch.float64)).all()
    assert torch.isfinite(timm_gcp.functional.cov_pool(x, 'svd')).all()  # eigen-methods form Σ in float64


@pytest.mark.parametrize('scale', [1e19, 1e30])
def test_mpa_norm_does_not_overflow_on_large_psd_input(scale):
    # ‖Σ‖_F in float32 used to overflow to inf from entries of ~1e19 on (also for float64 input): NaN root
    cov = spd(2, 16)
    q = sqrtm(cov * scale, 'mpa')
    assert torch.isfinite(q).all()
    # the root is positively homogeneous: √(sΣ) = √s·√Σ, to float32 rounding
    torch.testing.assert_close(q / scale ** 0.5, sqrtm(cov, 'mpa'), rtol=1e-5, atol=1e-6)


def test_float64_input_beyond_the_float32_range_of_a_float32_method():
    cov = spd(1, 4) * 1e38  # d·max|Σ| > 3.4e38: cannot be represented in isqrt's float32
    with pytest.raises(ValueError, match=r"too large for torch\.float32.*dtype='float64'"):
        sqrtm(cov, 'isqrt')
    assert torch.isfinite(sqrtm(cov, 'isqrt', dtype='float64')).all()

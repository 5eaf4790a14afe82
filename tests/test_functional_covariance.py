"""covariance(), triu_vec()/triu_unvec() and their input checks."""
import pytest
import torch

from timm_gcp import covariance, triu_unvec, triu_vec


def test_covariance_equals_centring_matrix_formula():
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    xf = x.flatten(2)
    n = xf.shape[-1]
    i_hat = torch.eye(n, dtype=torch.float64) / n - torch.full((n, n), 1.0 / n ** 2, dtype=torch.float64)
    ref = xf @ i_hat @ xf.transpose(1, 2)  # the references' (1/N)·X·(I − 11ᵀ/N)·Xᵀ
    out = covariance(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(covariance(xf), out, rtol=0, atol=0)
    assert (out == out.transpose(1, 2)).all()


def test_covariance_dtype_and_autocast():
    x = torch.randn(2, 4, 9)
    assert covariance(x.to(torch.bfloat16)).dtype == torch.float32
    assert covariance(x.double()).dtype == torch.float64
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = covariance(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, covariance(x), rtol=0, atol=0)


def test_covariance_never_builds_n_by_n():
    # N = 2e5 samples: an N×N float32 centring matrix would need 160 GB; mean subtraction needs ~N·C·4 bytes
    n = 200_000
    x = torch.randn(1, 3, n)
    out = covariance(x)  # would raise an out-of-memory error if it materialised N×N
    torch.testing.assert_close(out[0], torch.cov(x[0], correction=0), rtol=1e-4, atol=1e-5)
    assert out.shape == (1, 3, 3)


def test_covariance_bad_input():
    with pytest.raises(TypeError, match='floating-point'):
        covariance(torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r'\(B, C, H, W\) or \(B, C, N\)'):
        covariance(torch.ones(2, 3))
    with pytest.raises(ValueError, match='at least one sample'):
        covariance(torch.ones(2, 3, 0))
    x = torch.randn(3, 4, 5)
    x[2, 1, 1] = float('nan')
    with pytest.raises(ValueError, match=r'1 of 3 samples.*sample 2: 1'):
        covariance(x)


def test_triu_round_trip_and_order():
    d = 7
    m = torch.randn(2, d, d, dtype=torch.float64)
    m = m + m.transpose(1, 2)
    v = triu_vec(m)
    assert v.shape == (2, d * (d + 1) // 2)
    rows, cols = torch.triu_indices(d, d)
    torch.testing.assert_close(v, m[:, rows, cols], rtol=0, atol=0)
    torch.testing.assert_close(triu_unvec(v), m, rtol=0, atol=0)
    upper = triu_unvec(v, symmetric=False)
    torch.testing.assert_close(upper, m.triu(), rtol=0, atol=0)
    assert triu_vec(torch.zeros(1, 256, 256)).shape == (1, 32896)


def test_triu_bad_input():
    with pytest.raises(ValueError, match='d\\(d\\+1\\)/2'):
        triu_unvec(torch.ones(1, 5))
    with pytest.raises(ValueError, match=r'\(B, d, d\)'):
        triu_vec(torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match='floating-point'):
        triu_vec(torch.ones(1, 3, 3, dtype=torch.long))

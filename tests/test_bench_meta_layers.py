"""timm_gcp.bench.meta_layers: the flop counts and error helpers the meta-layer scripts report (no timings)."""
import pytest
import torch

from timm_gcp.bench import errors_vs_exact, isqrt_matmul_flops
from timm_gcp.paper import random_covariances
from timm_gcp.functional.newton_schulz import ns_backward, ns_forward


@pytest.mark.parametrize('iters', [1, 2, 3, 5])
def test_isqrt_matmul_flops_counts_the_matmuls_the_code_runs(monkeypatch, iters):
    # the throughput line of bench_meta_layers.py divides these flops by the measured time: count what runs
    b, d = 2, 6
    cov = random_covariances(b, 10, dim=d)
    calls = []
    for name in ('bmm', 'baddbmm', 'matmul'):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    _, saved = ns_forward(cov, iters)
    n_fwd = len(calls)
    ns_backward(saved, torch.ones_like(cov))
    n_bwd = len(calls) - n_fwd
    per = 2.0 * b * d ** 3
    assert isqrt_matmul_flops(b, d, iters, backward=False) == n_fwd * per
    assert isqrt_matmul_flops(b, d, iters, backward=True) == (n_fwd + n_bwd) * per


def test_errors_vs_exact_reference_is_zero_and_isqrt_is_not():
    cov = random_covariances(2, 40, dim=8, decades=0.0)
    err = errors_vs_exact(cov, ['lyap', 'svd', 'isqrt'])
    assert err['lyap'] == {'root': 0.0, 'grad': 0.0}
    # full-rank, well-separated spectrum (40 samples, d = 8): svd is the exact gradient to float64 rounding
    assert err['svd']['root'] < 1e-12 and err['svd']['grad'] < 1e-9
    assert err['isqrt']['root'] > 1e-4  # five NS steps are a different function

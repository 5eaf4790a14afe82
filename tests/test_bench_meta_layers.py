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


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_pooling_benchmark_reports_both_paths_against_the_baseline():
    """scripts/bench_meta_layers.py --pooling, as a user runs it: a table per M with the Gram and the covariance path
    of each method as fractions of the d-space Newton-Schulz baseline, '-' where the Gram path does not apply (M ≥ d),
    and the crossover summary."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / 'scripts' / 'bench_meta_layers.py'
    res = subprocess.run([sys.executable, str(script), '--pooling', '--crossover', '--batch', '2', '--dim', '16',
        '--samples', '4', '20', '--repeats', '1', '--methods', 'isqrt', 'svd', 'mpa'], capture_output=True, text=True,
        timeout=300)
    assert res.returncode == 0, res.stderr
    out, crossover = res.stdout.split('B=2: largest M')
    assert 'B=2 M=4: isqrt/cov' in out and 'B=2 M=20: isqrt/cov' in out
    rows = {(block.split(':')[0], line.split()[0]): line.split()[1:] for block in out.split('B=2 ')[1:]
            for line in block.splitlines()[2:] if line.strip() and line.split()[0] in ('isqrt', 'svd', 'mpa')}
    assert rows[('M=4', 'isqrt')][3] == '1.000'  # cov/NS of the baseline itself
    assert all(float(v) > 0 for v in rows[('M=4', 'svd')])  # M = 4 < d = 16: both paths timed
    assert rows[('M=20', 'svd')][0] == '-' and rows[('M=20', 'svd')][2] == '-'  # M ≥ d: no Gram path
    assert [line.split()[0] for line in crossover.strip().splitlines()[1:]] == ['isqrt', 'svd', 'mpa']

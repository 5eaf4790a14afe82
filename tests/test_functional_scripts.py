"""The meta-layer scripts run end to end on tiny sizes and print every method (numbers are not asserted here)."""
import subprocess
import sys

import pytest

from timm_gcp import METHODS

from helpers.data import ROOT, subprocess_env



def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
        timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_compare_meta_layers_runs():
    out = _run('scripts/compare_meta_layers.py', '--batch', '2', '--dim', '8', '--samples', '20', '--repeats', '1')
    for m in METHODS:
        assert f'\n{m} ' in out
    # errors against the exact root and gradient: the eigen-methods with the exact backward reproduce both on a
    # well-conditioned covariance (20 samples, d = 8); five Newton-Schulz steps are a different function
    err = {line.split()[0]: [float(v) for v in line.split()[-2:]] for line in out.splitlines()
           if line.split() and line.split()[0] in METHODS}
    assert max(err['svd'] + err['pade']) < 1e-10
    assert err['isqrt'][0] > 1e-3


@pytest.mark.slow
def test_bench_meta_layers_runs():
    out = _run('scripts/bench_meta_layers.py', '--batch', '2', '--samples', '20', '--dim', '16', '--repeats', '1',
        '--device', 'cpu')
    assert 'GFLOP/s fp32' in out and 'isqrt matmul throughput' in out
    for m in METHODS:
        assert f'\n  {m} ' in out


@pytest.mark.slow
def test_paper_tables_prints_taylor_row():
    out = _run('scripts/paper_tables.py')
    taylor = next(line for line in out.splitlines() if 'Taylor, ours' in line)
    assert taylor.split()[-3:] == ['0.000239', '36.2', '904']

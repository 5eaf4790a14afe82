"""The meta-layer scripts run end to end on tiny sizes and print every method (numbers are not asserted here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from timm_gcp import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = dict(os.environ)
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_compare_meta_layers_runs():
    out = _run('scripts/compare_meta_layers.py', '--batch', '2', '--dim', '8', '--samples', '20', '--repeats', '1')
    for m in METHODS:
        assert f'\n{m} ' in out
    # lyap is the reference: zero error against itself
    lyap_line = next(line for line in out.splitlines() if line.startswith('lyap '))
    assert lyap_line.split()[-2:] == ['0.0e+00', '0.0e+00']


@pytest.mark.slow
def test_bench_meta_layers_runs():
    out = _run('scripts/bench_meta_layers.py', '--batch', '2', '--samples', '20', '--dim', '16', '--repeats', '1',
        '--device', 'cpu')
    assert 'GFLOP/s fp32' in out and 'isqrt matmul throughput' in out
    for m in METHODS:
        assert f'\n  {m} ' in out


def test_paper_tables_prints_taylor_row():
    out = _run('scripts/paper_tables.py')
    taylor = next(line for line in out.splitlines() if 'Taylor, ours' in line)
    assert taylor.split()[-3:] == ['0.000239', '36.2', '904']

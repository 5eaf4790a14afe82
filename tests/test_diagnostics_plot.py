"""scripts/plot_run.py turns a summary.csv into PNG figures."""
import os
import subprocess
import sys

import pytest

pytest.importorskip('matplotlib')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'plot_run.py')

CSV = """epoch,train_loss,train_cond_median,train_cond_max,train_eig_ratio_median,train_floor_frac,\
train_lam_max_median,train_range_cond_median,train_head_grad_norm,train_gcp_method,eval_loss,eval_top1,eval_top5,lr
0,1.3,4e15,9e15,3.1,0.4,0.9,40,0.8,isqrt,1.2,40.0,100.0,0.05
1,1.0,3e15,8e15,2.9,0.35,0.7,60,0.6,isqrt,1.0,60.0,100.0,0.04
2,0.8,2e15,7e15,2.5,0.30,0.5,90,0.5,svd,0.9,70.0,100.0,0.01
"""


def test_plots_summary(tmp_path):
    (tmp_path / 'summary.csv').write_text(CSV)
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path), '--out', str(tmp_path / 'fig')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = sorted(os.path.basename(p) for p in r.stdout.split())
    assert names == ['head_grad.png', 'metrics.png', 'spectrum.png']
    for n in names:
        data = (tmp_path / 'fig' / n).read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000


def test_plot_only_available_columns_and_errors(tmp_path):
    (tmp_path / 'summary.csv').write_text('epoch,train_loss,eval_top1\n0,1.0,50\n1,0.5,70\n')
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path / 'summary.csv')], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and [os.path.basename(p) for p in r.stdout.split()] == ['metrics.png']
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path / 'missing')], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and 'plot_run: error' in r.stderr

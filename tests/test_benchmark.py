"""Tests of timm_gcp.bench.models, scripts/benchmark.py and scripts/gpu_check.sh (no timing assertions)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from timm_gcp.bench import models as benchmark
from timm_gcp.functional import cov_pool

from helpers.data import ROOT, subprocess_env



class _TinyCovPool(nn.Module):
    """A GCP head with the submodule names of timm_gcp's CovPool (conv, bn, act, sqrtm), small enough for a test."""

    def __init__(self, in_chs: int, dim: int, method: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.act = nn.ReLU()
        self.sqrtm = nn.Identity()  # marks the module as a GCP head, as CovPool's MatrixSqrt does
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cov_pool(self.act(self.bn(self.conv(x))), self.method)


def _tiny_model_fn(name: str) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet
    if name.startswith('broken'):
        raise RuntimeError(f'Unknown model ({name})')
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5, stem_width=16, channels=(16, 16, 32, 32))
    if name.endswith('_gcp_dropcov'):
        from timm_gcp.layers import DropCovPool
        model.global_pool = DropCovPool(model.num_features, gcp_dim=8)
        model.fc = nn.Linear(8 * 9 // 2, 5)
    elif '_gcp_' in name:
        model.global_pool = _TinyCovPool(model.num_features, 8, name.split('_gcp_')[1])
        model.fc = nn.Linear(8 * 9 // 2, 5)
    return model


def test_saved_tensor_bytes_counts_each_storage_once():
    a = torch.randn(1000, requires_grad=True)
    with benchmark.saved_tensor_bytes() as counter:
        b = a.exp()  # saves its output: 4000 bytes
        c = b * b  # saves b twice: the same storage, not counted again
    assert counter.bytes == 4000
    c.sum().backward()  # unpacking still works
    torch.testing.assert_close(a.grad, 2 * a.detach().exp() ** 2)


def test_eigh_path_names_cuda_batched_rule(monkeypatch):
    assert 'LAPACK' in benchmark.eigh_path(torch.device('cpu'))
    monkeypatch.setattr(torch, '__version__', '2.11.0+cu128')
    assert 'per-matrix' in benchmark.eigh_path(torch.device('cuda'), probe=False)
    monkeypatch.setattr(torch, '__version__', '2.12.1')
    assert 'cusolverDnXsyevBatched' in benchmark.eigh_path(torch.device('cuda'), probe=False)


def test_targets_apply_to_the_resnet50_family():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert benchmark._target(cpu, 'resnet50', 'isqrt', dict(head_ratio_pooled=0.15))[1] is True
    assert benchmark._target(cpu, 'resnet50', 'isqrt', dict(head_ratio_pooled=0.16))[1] is False
    assert benchmark._target(cpu, 'resnet50', 'svd', dict(head_ratio_pooled=0.25))[1] is True
    assert benchmark._target(cpu, 'resnet50', 'pade', dict(head_ratio_pooled=0.26))[1] is False
    assert benchmark._target(cpu, 'resnet50', 'mpa', dict(head_ratio_pooled=0.2)) == (None, None)  # none stated
    assert benchmark._target(cpu, 'convnext_tiny', 'svd', dict(head_ratio_pooled=0.9)) == (None, None)
    assert benchmark._target(cuda, 'resnet50', 'isqrt', dict(throughput_ratio=0.84))[1] is False
    assert benchmark._target(cpu, 'resnet50', None, {}) == (None, None)
    # at batch 32 on CPU the target is the train-step throughput, for isqrt, pade, svd and mpa
    assert benchmark._target(cpu, 'resnet50', 'mpa', dict(batch=32, throughput_ratio=0.95))[1] is True
    assert benchmark._target(cpu, 'resnet50', 'svd', dict(batch=32, throughput_ratio=0.94))[1] is False
    assert benchmark._target(cpu, 'resnet50', 'lyap', dict(batch=32, throughput_ratio=0.5)) == (None, None)
    checks = benchmark._checks([dict(family='resnet50', method='svd', head_ms=10.0),
                                dict(family='resnet50', method='pade', head_ms=11.6),
                                dict(family='vit', method='pade', head_ms=1.0)], cpu)
    assert checks == [dict(family='resnet50', check='pade head ÷ svd head', value=pytest.approx(1.16),
                           target='≤ 1.15', met=False)]


def test_bench_groups_pair_each_family_with_its_own_model():
    cfg = benchmark.BenchConfig(methods=('isqrt', 'svd'), models=(
        'convnext_tiny_gcp_isqrt', 'convnext_tiny_gcp_pade', 'resnet50_gcp_lyap', 'convnext_tiny_gcp_isqrt'))
    assert benchmark.bench_groups(cfg) == [
        ('resnet50', [('resnet50', None), ('resnet50_gcp_isqrt', 'isqrt'), ('resnet50_gcp_svd', 'svd'),
                      ('resnet50_gcp_lyap', 'lyap')]),
        ('convnext_tiny', [('convnext_tiny', None), ('convnext_tiny_gcp_isqrt', 'isqrt'),
                           ('convnext_tiny_gcp_pade', 'pade')])]
    only = benchmark.BenchConfig(baseline='', models=('vit_small_patch16_224_gcp_isqrt',))
    assert benchmark.bench_groups(only) == [
        ('vit_small_patch16_224', [('vit_small_patch16_224', None), ('vit_small_patch16_224_gcp_isqrt', 'isqrt')])]
    with pytest.raises(ValueError, match='<family>_gcp_<method>'):
        benchmark.bench_groups(benchmark.BenchConfig(models=('resnet50',)))


def test_run_benchmark_rows_and_markdown():
    cfg = benchmark.BenchConfig(methods=('isqrt', 'svd', 'no-such-method', 'dropcov'), baseline='tiny',
                                models=('other_gcp_pade', 'broken_gcp_svd'), batch_size=2, img_size=64,
                                num_classes=5, rounds=2, warmup=1)
    lines = []
    result = benchmark.run_benchmark(cfg, progress=lines.append, model_fn=_tiny_model_fn)
    rows = {r['model']: r for r in result['rows']}
    assert list(rows) == ['tiny', 'tiny_gcp_isqrt', 'tiny_gcp_svd', 'tiny_gcp_no-such-method', 'tiny_gcp_dropcov',
                          'other', 'other_gcp_pade', 'broken', 'broken_gcp_svd']
    assert 'unknown matrix square-root method' in rows['tiny_gcp_no-such-method']['error']
    assert 'Unknown model' in rows['broken']['error'] and 'Unknown model' in rows['broken_gcp_svd']['error']
    # the four tiny models share the backbone: the pooled denominator is one number, between their own medians
    pooled = rows['tiny']['head_ms'] / rows['tiny']['head_ratio_pooled']
    own = [rows[n]['backbone_ms'] for n in ('tiny', 'tiny_gcp_isqrt', 'tiny_gcp_svd', 'tiny_gcp_dropcov')]
    assert min(own) * 0.999 <= pooled <= max(own) * 1.001
    # each family is compared with its own model
    assert rows['tiny']['throughput_ratio'] == pytest.approx(1.0) and rows['other']['throughput_ratio'] == 1.0
    for name in ('tiny', 'tiny_gcp_isqrt', 'tiny_gcp_svd', 'other', 'other_gcp_pade'):
        r = rows[name]
        assert r['images_s'] > 0 and r['head_ms'] > 0 and r['backbone_ms'] > 0
        assert r['step_mem_mib'] > 0 and r['state_mib'] > 0
    # GCP heads: the covariance of the reduced features (2 × 8 × 2×2) timed alone in both dtypes; not for avg pool
    for name in ('tiny_gcp_isqrt', 'tiny_gcp_svd', 'other_gcp_pade'):
        r = rows[name]
        assert r['cov64_ms'] > 0 and r['cov32_ms'] > 0
        assert r['cov64_share'] == pytest.approx(r['cov64_ms'] / r['head_ms'])
    assert 'cov64_ms' not in rows['tiny']
    # where the root ran: the 2×2 map at 64 px has M = 4 < d = 8 positions; DropCov has no root, so no path
    assert rows['tiny_gcp_isqrt']['root_path'] == 'gram' and rows['tiny_gcp_svd']['root_path'] == 'gram'
    assert rows['tiny_gcp_dropcov']['cov64_ms'] > 0 and 'root_path' not in rows['tiny_gcp_dropcov']
    assert 'root_path' not in rows['tiny']
    assert rows['tiny_gcp_svd']['params_m'] > rows['tiny']['params_m']
    assert rows['tiny_gcp_isqrt']['meets_target'] is None  # targets are stated for resnet50 only
    assert result['env']['device'] == 'cpu' and 'LAPACK' in result['env']['eigh_path']
    md = benchmark.format_markdown(result)
    assert md.count('\n| tiny') == 5 and md.count('\n| other') == 2 and 'cov64 share' in md
    assert any(line.startswith('round 2/2') for line in lines)


def test_run_benchmark_rejects_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip('CUDA present')
    with pytest.raises(RuntimeError, match='cuda'):
        benchmark.run_benchmark(benchmark.BenchConfig(device='cuda'), model_fn=_tiny_model_fn)


@pytest.mark.slow
def test_benchmark_script_help_documents_the_full_table():
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--help'],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0
    assert '--models' in res.stdout and 'convnext_tiny_gcp_isqrt' in res.stdout
    assert 'zoo/results/benchmark_cpu' in res.stdout


@pytest.mark.slow
def test_benchmark_script_writes_csv(tmp_path):
    csv_path = tmp_path / 'b.csv'
    md_path = tmp_path / 'b.md'
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--baseline', 'resnet18', '--methods', 'isqrt',
         '--models', 'resnet34_gcp_svd', '--quick', '--rounds', '1', '--batch-size', '2', '--img-size', '64',
         '--csv', str(csv_path), '--markdown', str(md_path)],
        capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert '| resnet18_gcp_isqrt |' in res.stdout and '| resnet34 |' in res.stdout
    text = csv_path.read_text()
    assert text.startswith('family,model,') and 'resnet34_gcp_svd' in text and 'env_eigh_path' in text
    assert 'cov64_share' in text.splitlines()[0] and md_path.read_text().startswith('Device: cpu')


def test_gpu_check_syntax_and_dry_run(tmp_path):
    script = os.path.join(ROOT, 'scripts', 'gpu_check.sh')
    assert subprocess.run(['bash', '-n', str(script)]).returncode == 0
    res = subprocess.run(['bash', str(script), '--dry-run', str(tmp_path / 'r')], capture_output=True, text=True)
    assert res.returncode == 0
    for step in ('env', 'meta_layers', 'gram_path', 'model_benchmark', 'pytest_cuda'):
        assert step in res.stdout
    assert 'bench_meta_layers.py --quick' in res.stdout and '-m cuda' in res.stdout and '--pooling' in res.stdout
    # one process on the GPU (no pytest-xdist workers from the project's addopts, which may not be installed there)
    assert '-o addopts=-ra -m cuda' in res.stdout
    total = int(res.stdout.split('total time limit: ')[1].split('s')[0])
    assert total <= 360  # 6 minutes: a rerun still fits a 15-minute device budget
    assert not (tmp_path / 'r').exists()  # a dry run writes nothing


def test_gpu_check_records_failures_and_continues(tmp_path):
    """Run the real script with a fake python that fails one step: every step runs, the summary says which failed."""
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'fakepy').write_text('#!/bin/sh\ncase "$*" in *bench_meta_layers*) echo meta; exit 3;; esac\n'
                                 'echo "ran: $*"\n')
    (fake / 'fakepy').chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake / 'fakepy'), PATH=f'{fake}:{os.environ["PATH"]}')
    env.pop('OUT', None)
    out = tmp_path / 'results'
    res = subprocess.run(['bash', str(os.path.join(ROOT, 'scripts', 'gpu_check.sh')), str(out)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 1  # one step failed
    summary = (out / 'summary.txt').read_text()
    assert 'meta_layers      FAILED   rc=3' in summary
    assert 'model_benchmark  ok' in summary and 'pytest_cuda      ok' in summary
    assert '--device cuda --amp' in (out / 'model_benchmark.log').read_text()


def test_eigh_kernels_names_the_cusolver_stages_seen_on_an_h100():
    """Event names as torch 2.11's profiler reported them for eigh of 8 float64 256×256 matrices on an H100
    (zoo/results/gpu_h100/eigh_probe.log): one sytrd per matrix, the per-matrix syevd loop."""
    events = [('cudaLaunchKernel', 427), ('sm90_xmma_gemm_f64f64_f64f64_f64_nn_n_tilesize32x32x32_stage3', 64),
              ('void laed2_copy<double2, double, 256>(int, int, double*, int, int*, in', 40),
              ('void sytrd4_gpu<sytrd_params<double, 32, 8, 512, 32, 16, 1, 2> >(int, ', 32),
              ('void laed2_par<double, 1>(int, double*)', 8), ('void laed2_par<double, 2>(int, double*)', 8)]
    # instantiations of one kernel are summed; the most launched first
    assert benchmark.eigh_kernels(events) == 'laed2_copy ×40, sytrd4_gpu ×32, laed2_par ×16'
    assert benchmark.eigh_kernels([('cudaLaunchKernel', 3)]) == 'none matched'

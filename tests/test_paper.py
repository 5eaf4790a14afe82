"""Tests of timm_gcp.paper: the analyses behind scripts/reproduce_paper.py, on small, fast inputs."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_gcp import paper

ROOT = Path(__file__).resolve().parents[1]


def test_random_covariances_rank_is_samples_minus_one():
    cov = paper.random_covariances(3, samples=10, dim=32, seed=1)
    assert cov.shape == (3, 32, 32) and cov.dtype == torch.float64
    torch.testing.assert_close(cov, cov.transpose(1, 2), rtol=0, atol=0)
    lam = torch.linalg.eigvalsh(cov)
    # mean subtraction removes one dimension: rank M - 1; 1e-10·λmax separates genuine from round-off (~1e-16·λmax)
    assert ((lam > 1e-10 * lam[:, -1:]).sum(-1) == 9).all()
    assert (lam[:, 0] > -1e-12 * lam[:, -1]).all()


def test_random_covariances_rejects_bad_sizes():
    with pytest.raises(ValueError, match='samples'):
        paper.random_covariances(1, samples=0)


def test_ns_curve_matches_scalar_newton_schulz():
    a = torch.tensor([1e-6, 1e-3, 1e-1, 1.0], dtype=torch.float64)
    curves = paper.ns_function_curve(a, iters=(5, 10), dim=256, extra_methods=())
    torch.testing.assert_close(curves['exact'], torch.ones(4, dtype=torch.float64))
    ns5 = curves['NS 5 it.']
    # SPEC §2: about 0.24·√a at a = 1e-3 after five steps; the scalar recursion gives 0.23656. fp32 compute → 1e-4.
    assert abs(float(ns5[1]) - 0.23656) < 1e-4
    assert float(ns5[0]) < 0.01  # a tiny eigenvalue is shrunk a hundredfold
    assert abs(float(ns5[2]) - 1) < 3e-3 and abs(float(ns5[3]) - 1) < 1e-5
    assert (curves['NS 10 it.'] >= ns5 - 1e-6).all()  # more iterations move every eigenvalue toward the root


def test_ns_curve_rejects_eigenvalues_outside_unit_interval():
    with pytest.raises(ValueError, match=r'\(0, 1\]'):
        paper.ns_function_curve(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match='dim'):
        paper.ns_function_curve(torch.tensor([0.5]), dim=1)


def test_method_gradient_is_symmetric_and_matches_finite_difference():
    torch.manual_seed(0)
    cov = paper.covariance(torch.randn(1, 6, 40, dtype=torch.float64))
    up = torch.randn(1, 6, 6, dtype=torch.float64)
    g = paper.method_gradient(cov, 'isqrt', up, iters=5)
    torch.testing.assert_close(g, g.transpose(1, 2), rtol=0, atol=1e-12)
    e = torch.randn(1, 6, 6, dtype=torch.float64)
    e = e + e.transpose(1, 2)
    h = 1e-6
    loss = lambda c: float((paper.sqrtm(c, 'isqrt', iters=5, dtype=torch.float64) * up).sum())  # noqa: E731
    fd = (loss(cov + h * e) - loss(cov - h * e)) / (2 * h)
    # the gradient is computed in float32 (the method's precision): agreement to ~1e-5 relative
    assert abs(float((g * e).sum()) - fd) < 1e-4 * abs(fd) + 1e-6


def test_gradient_comparison_identity_and_converged_newton_schulz():
    torch.manual_seed(0)
    full = paper.covariance(torch.randn(2, 12, 200, dtype=torch.float64))
    variants = [paper.GradVariant('svd', 'svd'),
                paper.GradVariant('ns30', 'isqrt', {'iters': 30, 'dtype': torch.float64}),
                paper.GradVariant('ns5', 'isqrt'),
                paper.GradVariant('missing', 'no-such-method')]
    rows = {r['method']: r for r in paper.gradient_comparison({'full': full}, variants, reference='svd')}
    assert set(rows) == {'svd', 'ns30', 'ns5'}  # unregistered methods are skipped
    assert rows['svd']['rel_err'] == 0 and abs(rows['svd']['cos'] - 1) < 1e-12
    # 30 NS steps converge on a well-conditioned 12-d covariance: the same function, so the same gradient
    assert rows['ns30']['rel_err'] < 1e-8
    # 5 steps do not: a different function, visibly different gradient
    assert rows['ns5']['rel_err'] > 1e-2
    assert rows['ns5']['finite'] is True and rows['ns5']['max_abs_grad'] > 0


def test_gradient_comparison_rank_deficient_null_space_dominates():
    cov = paper.random_covariances(2, samples=10, dim=32, seed=3)
    variants = [paper.GradVariant('ns5', 'isqrt'), paper.GradVariant('ns30', 'isqrt', {'iters': 30,
                                                                                        'dtype': torch.float64})]
    rows = {r['method']: r for r in paper.gradient_comparison({'r': cov}, variants, reference='svd')}
    # exact gradient ≈ 1/(2√ε) on the null space: 3e7 × |G|; NS stays O(1)–O(1e3)
    assert rows['ns5']['ref_max_abs_grad'] > 1e6 and rows['ns5']['max_abs_grad'] < 1e3
    assert rows['ns30']['rel_err'] > 0.9  # full matrix: the null-space block dominates
    assert rows['ns30']['rel_err_range'] < 1e-3  # on the range the converged iteration is the exact root
    assert rows['ns5']['rel_err_lead'] < 0.2 < rows['ns5']['rel_err_range']


def test_gradient_comparison_unknown_reference():
    with pytest.raises(ValueError, match='reference method'):
        paper.gradient_comparison({'x': torch.eye(3)[None].double()}, reference='nope')


def test_eig_precision_counts_fp32_loses_tiny_eigenvalue():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    lam = torch.zeros(64, dtype=torch.float64)
    lam[:4] = torch.tensor([1.0, 0.3, 1e-3, 1e-10])  # 1e-10 is far below float32's ~1e-7 resolution
    cov = (q * lam) @ q.T
    row = paper.eig_precision_counts({'c': cov[None]})[0]
    assert row['genuine_rank'] == 4
    assert row['fp32_lost_genuine'] >= 1  # the 1e-10 eigenvalue drowns in float32 noise
    assert 1e-9 < row['fp32_noise_rel'] < 1e-5
    assert row['fp64_le_eps'] <= 60 and row['fp32_spurious_positive'] >= 1
    assert abs(row['smallest_genuine_rel'] - 1e-10) < 1e-12


def test_condition_numbers_use_eps_floor():
    cov = torch.diag_embed(torch.tensor([[4.0, 1.0, 0.0]], dtype=torch.float64))
    c = paper.condition_numbers(cov)
    assert float(c[0]) == pytest.approx(4.0 / paper.EPS64)


def _fake_trainer(tmp_path: Path):
    """A stand-in trainer: writes summary.csv with accuracy = 50 + seed (+5 if hybrid), or fails for 'bad'."""
    script = tmp_path / 'fake_train.py'
    script.write_text(
        'import sys, pathlib\n'
        'method, hybrid, seed, out = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), pathlib.Path(sys.argv[4])\n'
        'if method == "bad":\n    sys.exit("boom")\n'
        'acc = 50 + seed + (5 if hybrid else 0)\n'
        '(out / "summary.csv").write_text("epoch,eval_top1,cond_median\\n0,10,1e14\\n1,%s,1e12\\n" % acc)\n')
    calls = []

    def command_fn(cfg, method, hybrid, seed, run_dir):
        calls.append((method, hybrid, seed))
        return [sys.executable, str(script), method, '1' if hybrid else '0', str(seed), str(run_dir)]
    return command_fn, calls


def test_run_table2_collects_summarises_and_resumes(tmp_path):
    command_fn, calls = _fake_trainer(tmp_path)
    cfg = paper.Table2Config(methods=('isqrt', 'svd', 'bad'), seeds=(0, 2), epochs=2, out_dir=str(tmp_path / 'runs'))
    lines = []
    rows = paper.run_table2(cfg, progress=lines.append, command_fn=command_fn)
    # isqrt standalone only; svd and bad standalone + hybrid; 2 seeds each
    assert len(rows) == 10 and len(calls) == 10 and len(lines) == 10
    bad = [r for r in rows if r['method'] == 'bad']
    assert all('boom' in r['error'] for r in bad)
    summary = {(s['method'], s['protocol']): s for s in paper.summarise_table2(rows)}
    s = summary[('svd', 'hybrid')]
    assert s['mean'] == pytest.approx(56.0) and s['std'] == pytest.approx(2 ** 0.5) and s['n'] == 2
    assert s['cond_trend'] == pytest.approx([1e14, 1e12])
    assert summary[('bad', 'standalone')]['failed'] == 2 and summary[('bad', 'standalone')]['mean'] is None
    # finished runs are read back, not retrained; failed ones are retried
    calls.clear()
    paper.run_table2(cfg, command_fn=command_fn)
    assert sorted(set(m for m, _, _ in calls)) == ['bad']
    # a partial run (fewer summary rows than epochs) is retrained, and stale files go with it
    partial = tmp_path / 'runs' / 'svd-hybrid-s2'
    (partial / 'summary.csv').write_text('epoch,eval_top1\n0,10\n')
    (partial / 'stale.txt').write_text('x')
    calls.clear()
    rows = paper.run_table2(cfg, command_fn=command_fn)
    assert ('svd', True, 2) in calls and not (partial / 'stale.txt').exists()
    assert [r['top1'] for r in rows if (r['method'], r['protocol'], r['seed']) == ('svd', 'hybrid', 2)] == [57.0]
    assert all(r['seconds'] is not None and r['seconds'] > 0 for r in rows)


def test_run_table2_collect_only_marks_pending_and_report_says_so(tmp_path):
    command_fn, calls = _fake_trainer(tmp_path)
    cfg = paper.Table2Config(methods=('isqrt', 'svd'), seeds=(0, 1), epochs=2, out_dir=str(tmp_path / 'runs'))
    paper.run_table2(paper.Table2Config(**{**cfg.__dict__, 'seeds': (0,)}), command_fn=command_fn)
    calls.clear()
    rows = paper.run_table2(cfg, command_fn=command_fn, train=False)
    assert calls == []  # nothing trained
    assert [(r['method'], r['protocol'], r['seed']) for r in rows if r.get('pending')] == [
        ('isqrt', 'standalone', 1), ('svd', 'standalone', 1), ('svd', 'hybrid', 1)]
    summary = {(s['method'], s['protocol']): s for s in paper.summarise_table2(rows)}
    assert summary[('svd', 'hybrid')]['n'] == 1 and summary[('svd', 'hybrid')]['pending'] == 1
    md = '\n'.join(paper._table2_section(cfg, rows, tmp_path, 'python finish.py'))
    assert '**PARTIAL** — 3 runs pending' in md and '`python finish.py`' in md
    assert '| svd | MPN-COV | 50.00 (n=1) | 55.00 (n=1) | 0 |' in md


def test_write_report_writes_sections_figures_and_csvs(tmp_path):
    covs = {'r': paper.random_covariances(1, samples=8, dim=16, seed=0)}
    command_fn, _ = _fake_trainer(tmp_path)
    cfg = paper.Table2Config(methods=('isqrt', 'svd'), seeds=(0, 1), epochs=2, out_dir=str(tmp_path / 'runs'))
    rows = paper.run_table2(cfg, command_fn=command_fn)
    path = paper.write_report(tmp_path / 'out', 'python scripts/reproduce_paper.py --test', grad_covs=covs,
                              table2_cfg=cfg, table2_rows=rows, reference='svd',
                              ns_points=7)
    text = path.read_text()
    assert '`python scripts/reproduce_paper.py --test`' in text
    assert '| r | isqrt |' in text and 'against the exact stable gradient (`svd`)' in text
    assert '| 0.999 |' in text and '| taylor | 4.55e+17 |' in text  # Tables 6 and 7 from the core's analysis module
    assert '**Computed findings**' in text and 'Same gradient as `svd` on the range of Σ' in text
    for section in ('Tables 6 and 7', 'Gradients on realistic covariances', 'Newton–Schulz as a function',
                    'float32 against float64', 'Table 2 (small scale)'):
        assert section in text
    assert '| svd | MPN-COV | 50.50 ± 0.71 (n=2) | 55.50 ± 0.71 (n=2) | 0 |' in text
    for name in ('gradients.png', 'ns_function.png', 'table2_condition.png', 'gradients.csv', 'ns_function.csv',
                 'eig_precision.csv', 'table2.csv', 'table2_runs.csv'):
        assert (tmp_path / 'out' / name).stat().st_size > 0, name


def test_reproduce_paper_script_help():
    res = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'reproduce_paper.py'), '--help'],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and '--table2' in res.stdout


def test_train_command_passes_topn_size_standalone_and_hybrid():
    cfg = paper.Table2Config()
    standalone = paper._train_command(cfg, 'topn', False, 1, Path('run'))
    assert standalone[standalone.index('--model') + 1] == 'resnet18_gcp_topn'
    # --model-kwargs swallows the words after it, so it must come last and hold the method options
    i = standalone.index('--model-kwargs')
    assert standalone[i + 1:] == ['gcp_dim=32', 'output_stride=8', "gcp_kwargs={'top_n': 26}"]
    hybrid = paper._train_command(cfg, 'topn', True, 1, Path('run'))
    assert hybrid[hybrid.index('--model') + 1] == 'resnet18_gcp_isqrt'
    assert hybrid[hybrid.index('--gcp-switch-method') + 1] == 'topn'
    assert hybrid[hybrid.index('--gcp-switch-kwargs') + 1] == 'top_n=26'
    assert hybrid[hybrid.index('--model-kwargs') + 1:] == ['gcp_dim=32', 'output_stride=8']
    plain = paper._train_command(cfg, 'svd', False, 0, Path('run'))
    assert 'gcp_kwargs' not in ' '.join(plain) and '--gcp-switch-epoch' not in plain


def test_table2_samples_condition_numbers_every_step_and_report_says_so(tmp_path):
    cfg = paper.Table2Config()
    cmd = paper._train_command(cfg, 'svd', True, 0, tmp_path)
    i = cmd.index('--diag-interval')
    assert cmd[i + 1] == '1' and cmd.index('--model-kwargs') > i  # before the greedy --model-kwargs
    assert 'at every training step' in paper._cond_sampling_note(cfg)
    assert 'epochs 3 to 3 (1-based)' in paper._cond_sampling_note(cfg)
    sparse = paper.Table2Config(extra_args=('--img-size', '32', '--diag-interval', '20'))
    assert 'every 20-th training step' in paper._cond_sampling_note(sparse)

"""Tests of timm_gcp.paper: the analyses behind scripts/reproduce_paper.py, on small, fast inputs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_gcp import covariance, sqrtm
from timm_gcp.functional import EPS
from timm_gcp.paper import (
    Fig2Config, GradVariant, Table2Config, condition_numbers, effective_beta, eig_precision_counts,
    gradient_comparison, head_gradient_precision, method_gradient, ns_function_curve, random_covariances,
    random_features, reference_tie_kernel, run_fig2, run_table2, summarise_fig2, summarise_table2,
    tie_rule_comparison, train_command, train_fig2_run, write_report)
from timm_gcp.paper.kernels import pade_tie_quotient, topn_bounds
from timm_gcp.paper.report import _section_table2

from helpers.data import ROOT



# ---------------------------------------------------------------------------------------------------- covariances
def test_random_covariances_rank_is_samples_minus_one():
    cov = random_covariances(3, samples=10, dim=32, seed=1)
    assert cov.shape == (3, 32, 32) and cov.dtype == torch.float64
    torch.testing.assert_close(cov, cov.transpose(1, 2), rtol=0, atol=0)
    lam = torch.linalg.eigvalsh(cov)
    # mean subtraction removes one dimension: rank M - 1; 1e-10·λmax separates genuine from round-off (~1e-16·λmax)
    assert ((lam > 1e-10 * lam[:, -1:]).sum(-1) == 9).all()
    assert (lam[:, 0] > -1e-12 * lam[:, -1]).all()


def test_random_covariances_options():
    x = random_features(2, 5, dim=4, decades=0.0, relu=False, seed=3)
    assert x.shape == (2, 4, 5) and (x < 0).any()  # no ReLU
    assert (random_features(2, 5, dim=4, seed=3) >= 0).all()
    c32 = random_covariances(2, 5, dim=4, seed=3, dtype=torch.float32)
    assert c32.dtype == torch.float32
    # the float64 covariance rounded, not a float32 computation
    assert torch.equal(c32, random_covariances(2, 5, dim=4, seed=3).float())
    with pytest.raises(ValueError, match='samples'):
        random_covariances(1, samples=0)
    with pytest.raises(ValueError, match='decades'):
        random_covariances(1, samples=3, decades=-1.0)


def test_condition_numbers_use_eps_floor():
    cov = torch.diag_embed(torch.tensor([[4.0, 1.0, 0.0]], dtype=torch.float64))
    assert float(condition_numbers(cov)[0]) == pytest.approx(4.0 / EPS)


# -------------------------------------------------------------------------------------------------------- kernels
def test_pade_tie_quotient_is_infinite_in_float64_and_about_paper_value_in_mpmath():
    t = pade_tie_quotient()
    # float64, the reference's summation order: Q(1) is exactly 0, P(1) negative, so K = −inf at a tie
    assert t['float64_q'] == 0.0 and t['float64_p'] < 0
    # 20-digit arithmetic, term by term: |P(1)/Q(1)|/ε is the paper's Table 7 entry, 6.00e36 (6.0025e36 with mpmath
    # 1.3); Q(1) is a cancellation, so summing the same coefficients exactly gives another value (7.29e36)
    assert t['mp_over_eps'] == pytest.approx(6.00e36, rel=1e-3) and t['mp_over_eps'] == pytest.approx(
        abs(t['mp_quotient']) / EPS)
    assert t['exact_over_eps'] == pytest.approx(7.29e36, rel=1e-2)


def test_topn_bound_holds_only_when_n_is_at_most_the_rank():
    rows = {(r['spectrum'], r['which']): r for r in topn_bounds()}
    assert rows[('random49', 'default')]['N'] == 206 and rows[('random49', 'rank')]['N'] == 48
    # N = 206 > rank 48 keeps round-off eigenvalues: K as large as svd's (≥ 1e15); N = rank: genuine gaps only
    assert rows[('random49', 'default')]['max_k'] > 1e15
    assert rows[('random49', 'rank')]['max_k'] < 1e3 and rows[('random196', 'rank')]['max_k'] < 1e6
    assert rows[('random49', 'rank')]['one_over_eps'] == pytest.approx(4.5036e15, rel=1e-4)


# ------------------------------------------------------------------------------------------------------ gradients
def test_ns_curve_matches_scalar_newton_schulz():
    a = torch.tensor([1e-6, 1e-3, 1e-1, 1.0], dtype=torch.float64)
    curves = ns_function_curve(a, iters=(5, 10), dim=256, extra_methods=())
    torch.testing.assert_close(curves['exact'], torch.ones(4, dtype=torch.float64))
    ns5 = curves['NS 5 it.']
    # about 0.24·√a at a = 1e-3 after five steps; the scalar recursion gives 0.23656. float32 compute → 1e-4.
    assert abs(float(ns5[1]) - 0.23656) < 1e-4
    assert float(ns5[0]) < 0.01  # a tiny eigenvalue is shrunk a hundredfold
    assert abs(float(ns5[2]) - 1) < 3e-3 and abs(float(ns5[3]) - 1) < 1e-5
    assert (curves['NS 10 it.'] >= ns5 - 1e-6).all()  # more iterations move every eigenvalue toward the root


def test_ns_curve_rejects_bad_input():
    with pytest.raises(ValueError, match=r'\(0, 1\]'):
        ns_function_curve(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match='dim'):
        ns_function_curve(torch.tensor([0.5]), dim=1)
    with pytest.raises(ValueError, match='unknown method'):
        ns_function_curve(torch.tensor([0.5]), extra_methods=('nope',))


def test_method_gradient_is_symmetric_and_matches_finite_difference():
    torch.manual_seed(0)
    cov = covariance(torch.randn(1, 6, 40, dtype=torch.float64))
    up = torch.randn(1, 6, 6, dtype=torch.float64)
    g = method_gradient(cov, 'isqrt', up, iters=5, dtype=torch.float64)
    torch.testing.assert_close(g, g.transpose(1, 2), rtol=0, atol=1e-12)
    e = torch.randn(1, 6, 6, dtype=torch.float64)
    e = e + e.transpose(1, 2)
    h = 1e-6
    loss = lambda c: float((sqrtm(c, 'isqrt', iters=5, dtype=torch.float64) * up).sum())  # noqa: E731
    fd = (loss(cov + h * e) - loss(cov - h * e)) / (2 * h)
    # float64 throughout: the central difference is accurate to ~1e-9 relative here
    assert abs(float((g * e).sum()) - fd) < 1e-7 * abs(fd) + 1e-9


def test_gradient_comparison_identity_and_converged_newton_schulz():
    torch.manual_seed(0)
    full = covariance(torch.randn(2, 12, 200, dtype=torch.float64))
    variants = [GradVariant('svd', 'svd'), GradVariant('ns30', 'isqrt', {'iters': 30, 'dtype': torch.float64}),
                GradVariant('ns5', 'isqrt'), GradVariant('missing', 'no-such-method')]
    rows = {r['method']: r for r in gradient_comparison({'full': full}, variants, reference='svd')}
    assert set(rows) == {'svd', 'ns30', 'ns5'}  # unregistered methods are skipped
    assert rows['svd']['rel_err'] == 0 and abs(rows['svd']['cos'] - 1) < 1e-12
    # 30 NS steps converge on a well-conditioned 12-d covariance: the same function, so the same gradient
    assert rows['ns30']['rel_err'] < 1e-8
    # 5 steps do not: a different function, visibly different gradient
    assert rows['ns5']['rel_err'] > 1e-2
    assert rows['ns5']['finite'] is True and rows['ns5']['max_abs_grad'] > 0


def test_gradient_comparison_rank_deficient_null_space_dominates():
    cov = random_covariances(2, samples=10, dim=32, seed=3)
    variants = [GradVariant('ns5', 'isqrt'), GradVariant('ns30', 'isqrt', {'iters': 30, 'dtype': torch.float64})]
    rows = {r['method']: r for r in gradient_comparison({'r': cov}, variants, reference='svd')}
    # exact gradient ≈ 1/(2√ε) on the null space: 3e7 × |G|; NS stays O(1)–O(1e3)
    assert rows['ns5']['ref_max_abs_grad'] > 1e6 and rows['ns5']['max_abs_grad'] < 1e3
    assert rows['ns30']['rel_err'] > 0.9  # full matrix: the null-space block dominates
    assert rows['ns30']['rel_err_range'] < 1e-3  # on the range the converged iteration is the exact root
    assert rows['ns5']['rel_err_lead'] < 0.2 < rows['ns5']['rel_err_range']


def test_gradient_comparison_unknown_reference():
    with pytest.raises(ValueError, match='reference method'):
        gradient_comparison({'x': torch.eye(3)[None].double()}, reference='nope')


# ------------------------------------------------------------------------------------------------------ precision
def test_eig_precision_counts_fp32_loses_tiny_eigenvalue():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    lam = torch.zeros(64, dtype=torch.float64)
    lam[:4] = torch.tensor([1.0, 0.3, 1e-3, 1e-10])  # 1e-10 is far below float32's ~1e-7 resolution
    cov = (q * lam) @ q.T
    row = eig_precision_counts({'c': cov[None]})[0]
    assert row['genuine_rank'] == 4
    assert row['fp32_lost_genuine'] >= 1  # the 1e-10 eigenvalue drowns in float32 noise
    assert 1e-9 < row['fp32_noise_rel'] < 1e-5
    assert row['fp64_le_eps'] <= 60 and row['fp32_spurious_positive'] >= 1
    assert abs(row['smallest_genuine_rel'] - 1e-10) < 1e-12


def test_head_gradient_precision_float32_hurts_svd_not_isqrt():
    rows = {r['method']: r for r in head_gradient_precision(['isqrt', 'svd'], img_sizes=(64,), num=2,
                                                             model_kwargs=dict(gcp_dim=8))}
    isqrt, svd = rows['isqrt'], rows['svd']
    assert isqrt['samples'] == svd['samples'] == 4  # 64 px through a stride-32 ResNet: 2×2, M = 4 < d = 8
    assert isqrt['default_dtype'] == 'float32' and svd['default_dtype'] == 'float64'
    # Newton–Schulz has no 1/(λi − λj): float32 only rounds (~1e-6 relative here)
    assert isqrt['cos'] > 0.9999 and 0 < isqrt['rel_err'] < 1e-4 and isqrt['finite']
    # the exact eigen backward amplifies float32's null-space noise (seed 0: cosine 0.82, worst image 0.69), while the
    # logits agree to ~2e-4: the forward barely changes, the gradient does
    assert svd['cos'] < 0.95 and svd['rel_err'] > 0.1 and svd['logits_rel_err'] < 1e-2 and svd['finite']
    # the Gram path decomposes the 4 x 4 Gram matrix instead: no null space, float32 only rounds
    gram = head_gradient_precision(['svd'], img_sizes=(64,), num=2, model_kwargs=dict(gcp_dim=8), path='gram')[0]
    assert gram['cos'] > 0.999 and gram['finite']


def _tie_features(seed: int = 0) -> torch.Tensor:
    # d = 32 channels, M = 8 samples: rank 7, 25 null eigenvalues; at this scale their round-off straddles ε: some are
    # floored (exact ties), some stay just above ε (near-ties, K up to ~1e15, which the reference puts at the ties)
    return 10.0 * random_features(2, 8, dim=32, decades=0.0, seed=seed)


def test_reference_tie_kernel_replaces_ties_symmetrically_by_batch_extremes():
    lam = torch.tensor([[1.0, 0.5, EPS, EPS]], dtype=torch.float64)
    k = reference_tie_kernel(lam, 'svd')
    finite = 1.0 / (lam[0, :, None] - lam[0, None, :])
    finite = finite[torch.isfinite(finite) & ~torch.eye(4, dtype=torch.bool)]
    assert k[0, 2, 3] == k[0, 3, 2] == finite.max()  # +inf → batch maximum, in both triangles
    assert k[0, 0, 1] == 2.0 and k[0, 1, 0] == -2.0 and (k[0].diagonal() == 0).all()
    kp = reference_tie_kernel(lam, 'pade')
    assert kp[0, 2, 3] == kp[0, 3, 2] == kp[0][~torch.eye(4, dtype=torch.bool)].min() < 0  # −inf → batch minimum
    # away from ties the reference [50/50] Padé is the exact K to ≤ 1e-9 (r = 0.5)
    assert float(kp[0, 0, 1]) == pytest.approx(2.0, rel=1e-9)
    with pytest.raises(ValueError, match='tie rule'):
        reference_tie_kernel(lam, 'taylor')


def test_tie_rule_changes_dl_dsigma_only_in_the_null_space_and_not_dl_dx():
    rows = {r['rule']: r for r in tie_rule_comparison({'f': _tie_features()})}
    for rule, row in rows.items():
        assert row['floored'] >= 2 and row['k_at_ties'] > 1e12, rule
        assert row['literal_check'] < 1e-12, rule  # our K through the literal backward is the library's gradient
        assert row['sigma_rel_diff'] > 1.0, rule  # the tie rule changes ∂L/∂Σ completely ...
        assert row['null_share'] > 1 - 1e-9, rule  # ... inside the floored block only ...
        assert row['x_rel_diff'] < 1e-5, rule  # ... which the centred features are orthogonal to (float64 round-off)
        assert row['lyap_x_rel_diff'] < 1e-5, rule


# ------------------------------------------------------------------------------------------------------ Fig. 2
class _Quadratic(nn.Module):
    """L(θ) = ½θᵀAθ (the input is ignored)."""

    def __init__(self, a: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer('a', a)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta


def test_effective_beta_of_a_quadratic_is_the_curvature_along_the_gradient():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    lam = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    a = (q * lam) @ q.T
    loss = lambda out, _: out  # noqa: E731
    x = torch.zeros(1)
    # θ an eigenvector: g = Aθ = λθ, so ∇L(θ − ηg) − ∇L(θ) = −ηA·g and β = λ exactly, for every η
    res = effective_beta(_Quadratic(a, q[:, 1]), loss, x, None, [0.01, 0.1, 1.0])
    assert res['ratios'] == pytest.approx([3.0] * 3, rel=1e-12) and res['beta'] == pytest.approx(3.0, rel=1e-12)
    # a general θ: β = ‖A·g‖/‖g‖ = √(gᵀA²g / gᵀg), g = Aθ
    theta = torch.randn(6, generator=gen, dtype=torch.float64)
    model = _Quadratic(a, theta)
    res = effective_beta(model, loss, x, None, [0.1, 2.0])
    g = a @ theta
    assert res['beta'] == pytest.approx(float((a @ g).norm() / g.norm()), rel=1e-12)
    assert res['grad_norm'] == pytest.approx(float(g.norm()), rel=1e-12)
    assert res['loss'] == pytest.approx(float(0.5 * theta @ a @ theta), rel=1e-12)
    torch.testing.assert_close(model.theta.detach(), theta)  # the probe leaves the parameters alone


def test_effective_beta_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    res = effective_beta(model, F.cross_entropy, x, y, [0.05, 0.1])
    assert res['beta'] > 0 and math.isfinite(res['loss_range'])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _tiny_fig2(tmp_path: Path, **kw) -> Fig2Config:
    return Fig2Config(**{**dict(methods=('isqrt',), dtypes=('float32', 'float64'), seeds=(0,), gcp_dim=8,
                                model_kwargs={'output_stride': 8, 'layers': (1, 1, 1, 1)}, train_samples=8,
                                val_samples=4, batch_size=4, epochs=1, beta_interval=1, beta_multipliers=(1.0,),
                                out_dir=str(tmp_path / 'fig2')), **kw})


@pytest.mark.parametrize('method, dtype', [('isqrt', 'float64'), ('svd', 'float32')])
def test_fig2_training_run_records_errors_and_beta(tmp_path, method, dtype):
    cfg = _tiny_fig2(tmp_path)
    rec = train_fig2_run(cfg, method, dtype, seed=0)
    assert rec['method'] == method and rec['dtype'] == dtype and not rec['diverged']
    (epoch,) = rec['epochs']
    assert 0 <= epoch['train_err'] <= 100 and 0 <= epoch['val_err'] <= 100 and math.isfinite(epoch['train_loss'])
    assert [b['step'] for b in rec['beta']] == [0, 1]  # 8 samples / batch 4, a probe at every step
    assert all(b['beta'] > 0 and math.isfinite(b['beta']) for b in rec['beta'])
    assert rec['recipe'] == cfg.recipe() and json.loads(json.dumps(rec)) == rec  # what result.json holds


def test_fig2_model_runs_its_meta_layer_in_the_requested_dtype(tmp_path):
    from timm_gcp.paper.fig2 import build_fig2_model
    cfg = _tiny_fig2(tmp_path)
    for method, dtype in (('svd', 'float32'), ('svd', 'float64'), ('isqrt', 'float64')):
        model = build_fig2_model(cfg, method, dtype)
        assert model.global_pool.sqrtm.compute_dtype == getattr(torch, dtype)
        assert model.global_pool.dim == 8 and model.num_classes == cfg.num_classes


def test_run_fig2_reuses_finished_runs_and_summarises(tmp_path):
    calls = []

    def fake(cfg, method, dtype, seed):
        calls.append((method, dtype, seed))
        err = 50.0 if dtype == 'float32' else 10.0 + seed
        return dict(method=method, dtype=dtype, seed=seed, recipe=cfg.recipe(), diverged=False, seconds=1.0,
                    epochs=[dict(epoch=1, train_loss=1.0, train_err=err, val_err=err)],
                    beta=[dict(step=0, epoch=0, beta=2.0 + seed, lr=0.1)])

    cfg = _tiny_fig2(tmp_path, seeds=(0, 1))
    recs = run_fig2(cfg, train_fn=fake)
    assert len(recs) == len(calls) == 4
    calls.clear()
    assert run_fig2(cfg, train_fn=fake) == recs and calls == []  # read back, not retrained
    changed = _tiny_fig2(tmp_path, seeds=(0, 1), lr=0.01)
    run_fig2(changed, train_fn=fake)
    assert len(calls) == 4  # another recipe: retrained
    pending = run_fig2(_tiny_fig2(tmp_path / 'other', seeds=(0,)), train=False, train_fn=fake)
    assert all(r.get('pending') for r in pending)
    rows = {(r['method'], r['dtype']): r for r in summarise_fig2(recs)}
    assert rows[('isqrt', 'float64')]['train_err'] == pytest.approx(10.5)
    assert rows[('isqrt', 'float64')]['beta_median'] == pytest.approx(2.5)
    assert rows[('isqrt', 'float32')]['train_err_max'] == 50.0 and rows[('isqrt', 'float32')]['diverged'] == 0


# ------------------------------------------------------------------------------------------------------ Table 2
class _FakeTrainer:
    """A stand-in trainer script: writes summary.csv with accuracy = 50 + seed (+5 if hybrid), or fails for 'bad';
    logs every run it trains, so a test can tell trained runs from reused ones."""

    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / 'fake_train.py'
        self.log = tmp_path / 'trained.txt'
        self.script.write_text(
            'import sys, pathlib\n'
            'method, hybrid, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])\n'
            f'with open({str(self.log)!r}, "a") as f:\n    f.write(f"{{method}} {{hybrid}} {{seed}}\\n")\n'
            'if method == "bad":\n    sys.exit("boom")\n'
            'acc = 50 + seed + (5 if hybrid == "1" else 0)\n'
            '(out / "summary.csv").write_text("epoch,eval_top1,train_cond_median,train_lam_max_median,'
            'train_range_cond_median\\n0,10,1e14,0.01,1e3\\n1,%s,1e12,0.0001,1e2\\n" % acc)\n')

    def command(self, cfg, method, hybrid, seed, run_dir):
        return [sys.executable, str(self.script), method, '1' if hybrid else '0', str(seed), str(run_dir)]

    def trained(self):
        """(method, hybrid, seed) of every run trained since the last ``reset``."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [(m, h == '1', int(s)) for m, h, s in (line.split() for line in lines)]

    def reset(self) -> None:
        self.log.write_text('')


def test_run_table2_collects_summarises_and_resumes(tmp_path):
    fake = _FakeTrainer(tmp_path)
    cfg = Table2Config(methods=('isqrt', 'svd', 'bad'), seeds=(0, 2), epochs=2, out_dir=str(tmp_path / 'runs'))
    lines = []
    rows = run_table2(cfg, progress=lines.append, command_fn=fake.command)
    # isqrt standalone only; svd and bad standalone + hybrid; 2 seeds each
    assert len(rows) == 10 and len(fake.trained()) == 10 and len(lines) == 10
    assert all('boom' in r['error'] for r in rows if r['method'] == 'bad')
    summary = {(s['method'], s['protocol']): s for s in summarise_table2(rows)}
    s = summary[('svd', 'hybrid')]
    assert s['mean'] == pytest.approx(56.0) and s['std'] == pytest.approx(2 ** 0.5) and s['n'] == 2
    assert s['cond_trend'] == pytest.approx([1e14, 1e12]) and s['lam_max_trend'] == pytest.approx([0.01, 1e-4])
    assert s['range_cond_trend'] == pytest.approx([1e3, 1e2])
    assert summary[('bad', 'standalone')]['failed'] == 2 and summary[('bad', 'standalone')]['mean'] is None
    # finished runs are read back, not retrained; failed ones are retried
    fake.reset()
    run_table2(cfg, command_fn=fake.command)
    assert sorted(set(m for m, _, _ in fake.trained())) == ['bad']
    # a partial run (fewer summary rows than epochs) is retrained, and stale files go with it
    partial = tmp_path / 'runs' / 'svd-hybrid-s2'
    (partial / 'summary.csv').write_text('epoch,eval_top1\n0,10\n')
    (partial / 'stale.txt').write_text('x')
    fake.reset()
    rows = run_table2(cfg, command_fn=fake.command)
    assert ('svd', True, 2) in fake.trained() and not (partial / 'stale.txt').exists()
    assert [r['top1'] for r in rows if (r['method'], r['protocol'], r['seed']) == ('svd', 'hybrid', 2)] == [57.0]
    assert all(r['seconds'] is not None and r['seconds'] > 0 for r in rows)
    # a run trained by another command line (another recipe or interpreter) is retrained
    log = tmp_path / 'runs' / 'svd-standalone-s0' / 'train.log'
    log.write_text('python other_trainer.py\n' + log.read_text().split('\n', 1)[1])
    fake.reset()
    run_table2(cfg, command_fn=fake.command)
    assert ('svd', False, 0) in fake.trained()


def test_run_table2_collect_only_marks_pending_and_report_says_so(tmp_path):
    fake = _FakeTrainer(tmp_path)
    cfg = Table2Config(methods=('isqrt', 'svd'), seeds=(0, 1), epochs=2, out_dir=str(tmp_path / 'runs'))
    run_table2(Table2Config(**{**cfg.__dict__, 'seeds': (0,)}), command_fn=fake.command)
    fake.reset()
    rows = run_table2(cfg, command_fn=fake.command, train=False)
    assert fake.trained() == []  # nothing trained
    assert [(r['method'], r['protocol'], r['seed']) for r in rows if r.get('pending')] == [
        ('isqrt', 'standalone', 1), ('svd', 'standalone', 1), ('svd', 'hybrid', 1)]
    summary = {(s['method'], s['protocol']): s for s in summarise_table2(rows)}
    assert summary[('svd', 'hybrid')]['n'] == 1 and summary[('svd', 'hybrid')]['pending'] == 1
    md = '\n'.join(_section_table2(tmp_path, cfg, rows, 'python finish.py'))
    assert '**PARTIAL** — 3 runs pending' in md and '`python finish.py`' in md
    assert '| svd | MPN-COV | 50.00 (n=1) | 55.00 (n=1) | 0 |' in md


def test_train_command_passes_topn_size_standalone_and_hybrid():
    cfg = Table2Config()
    standalone = train_command(cfg, 'topn', False, 1, Path('run'))
    assert standalone[standalone.index('--model') + 1] == 'resnet18_gcp_topn'
    # --model-kwargs swallows the words after it, so it must come last and hold the method options
    i = standalone.index('--model-kwargs')
    assert standalone[i + 1:] == ['gcp_dim=32', 'output_stride=8', "gcp_kwargs={'top_n': 26}"]
    hybrid = train_command(cfg, 'topn', True, 1, Path('run'))
    assert hybrid[hybrid.index('--model') + 1] == 'resnet18_gcp_isqrt'
    assert hybrid[hybrid.index('--gcp-switch-method') + 1] == 'topn'
    assert hybrid[hybrid.index('--gcp-switch-kwargs') + 1] == 'top_n=26'
    assert hybrid[hybrid.index('--model-kwargs') + 1:] == ['gcp_dim=32', 'output_stride=8']
    plain = train_command(cfg, 'svd', False, 0, Path('run'))
    assert 'gcp_kwargs' not in ' '.join(plain) and '--gcp-switch-epoch' not in plain


# ------------------------------------------------------------------------------------------------------- report
def test_write_report_writes_sections_figures_and_csvs(tmp_path):
    covs = {'r': random_covariances(1, samples=8, dim=16, seed=0)}
    cfg = Table2Config(methods=('isqrt', 'svd'), seeds=(0, 1), epochs=2, out_dir=str(tmp_path / 'runs'))
    rows = run_table2(cfg, command_fn=_FakeTrainer(tmp_path).command)
    fig2_cfg = _tiny_fig2(tmp_path, dtypes=('float32',))
    fig2 = run_fig2(fig2_cfg)
    path = write_report(tmp_path / 'out', 'python scripts/reproduce_paper.py --test', grad_covs=covs,
                        tie_features={'t': _tie_features()},
                        head_precision=dict(methods=['isqrt', 'svd'], img_sizes=(64,), model_kwargs=dict(gcp_dim=8)),
                        fig2_cfg=fig2_cfg, fig2_records=fig2, table2_cfg=cfg, table2_rows=rows, reference='svd',
                        ns_points=7)
    text = path.read_text()
    assert '`python scripts/reproduce_paper.py --test`' in text
    assert '| r | isqrt |' in text and 'against the exact stable gradient (`svd`)' in text
    assert '| 0.999 |' in text and '| taylor | 4.55e+17 |' in text  # Tables 6 and 7
    assert '|P(1)/Q(1)|/ε' in text and '| random49 | rank | 48 |' in text  # the Padé and TopN notes
    assert '**Computed findings**' in text and 'Same gradient as `svd` on the range of Σ' in text
    assert '| t | svd |' in text and '| t | pade |' in text  # tie rule
    assert '| isqrt | float32 | 64 | 4 |' in text and '| svd | float64 | 64 | 4 |' in text  # head gradient
    assert '| isqrt | float32 | 1 | 0 |' in text  # Fig. 2 summary: 1 run, 0 diverged
    for section in ('Tables 6 and 7', 'Gradients on realistic covariances', 'Exact ties', 'Newton–Schulz as a',
                    'float32 against float64', 'Fig. 2 (small scale)', 'Table 2 (small scale)'):
        assert section in text
    assert '| svd | MPN-COV | 50.50 ± 0.71 (n=2) | 55.50 ± 0.71 (n=2) | 0 |' in text
    for name in ('gradients.png', 'ns_function.png', 'table2_condition.png', 'fig2.png', 'gradients.csv',
                 'ns_function.csv', 'eig_precision.csv', 'head_gradient_precision.csv', 'tie_rule.csv', 'fig2.csv',
                 'fig2_epochs.csv', 'fig2_beta.csv', 'table2.csv', 'table2_runs.csv', 'table6.csv', 'table7.csv',
                 'topn.csv', 'pade_tie.csv'):
        assert (tmp_path / 'out' / name).stat().st_size > 0, name


def test_write_report_marks_missing_runs_pending(tmp_path):
    path = write_report(tmp_path, 'cmd', grad_covs={'r': random_covariances(1, samples=8, dim=16, seed=0)},
                        tie_features={'t': _tie_features()}, ns_points=5)
    text = path.read_text()
    assert text.count('**PENDING**') == 3  # head-gradient measurement, Fig. 2, Table 2


@pytest.mark.slow
def test_reproduce_paper_script_help():
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'reproduce_paper.py'), '--help'],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and '--table2' in res.stdout and '--fig2' in res.stdout

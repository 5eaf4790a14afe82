"""Covariance diagnostics: spectral statistics on known matrices and the hook-based collector."""
import pytest
import torch
import torch.nn as nn

from timm_gcp.diagnostics import EPS, CovStatsCollector, covariance_stats, eigvals_floored, head_grad_norm


def test_stats_of_known_spectrum():
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    lam = torch.tensor([4., 2., 1., 0.], dtype=torch.float64)
    cov = torch.stack([q @ torch.diag(lam) @ q.T, torch.diag(torch.tensor([3., 3., 1., 1.], dtype=torch.float64))])
    s = covariance_stats(cov)
    # Round-off of the rotated zero eigenvalue is ~1e-16 relative to λ_max=4; it is floored at ε, so cond ≈ 4/ε
    # within a factor that the round-off can reach (eigenvalues within a few ε of 0 are all floored to ε or above).
    assert 4 / EPS / 50 < s['cond'][0] <= 4 / EPS
    torch.testing.assert_close(s['cond'][1], torch.tensor(3., dtype=torch.float64))
    torch.testing.assert_close(s['eig_ratio'], torch.tensor([2., 1.], dtype=torch.float64))
    assert s['floor_frac'][1] == 0
    assert s['floor_frac'][0] in (0.0, 0.25)  # the rotated zero lands within a few ε of 0, on either side


def test_rank_deficient_covariance_is_ill_conditioned():
    x = torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(1))  # d=16 channels, M=5 samples
    xc = x - x.mean(-1, keepdim=True)
    cov = xc @ xc.transpose(1, 2) / 5
    lam = eigvals_floored(cov.float())  # computed in float64 whatever the input dtype
    assert lam.dtype == torch.float64 and (lam[:, :-1] >= lam[:, 1:]).all()
    assert (covariance_stats(cov)['cond'] > 1e5).all()  # ≥ 12 eigenvalues are zero up to float32 round-off


def test_eps_is_the_library_floor():
    assert EPS == 2.220446049250313e-16 == torch.finfo(torch.float64).eps  # not a truncated copy


def test_scale_and_range_condition_number():
    # rank 2 of 4: λ = 4, 1 genuine, two zeros. cond = λ_max/ε follows the scale; range_cond = 4/1 does not
    cov = torch.diag_embed(torch.tensor([[4.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    for scale in (1.0, 1e3):
        s = covariance_stats(scale * cov)
        assert float(s['lam_max']) == pytest.approx(4.0 * scale)
        assert float(s['cond']) == pytest.approx(4.0 * scale / EPS)
        assert float(s['range_cond']) == pytest.approx(4.0)
    # float32 resolves eigenvalues only above d·ε₃₂·λ_max ≈ 1.9e-6·λ_max: 1e-7 counts as round-off there, not in
    # float64
    tiny = torch.diag_embed(torch.tensor([[1.0, 1e-7, 0.0, 0.0]], dtype=torch.float64))
    assert float(covariance_stats(tiny)['range_cond']) == pytest.approx(1e7)
    assert float(covariance_stats(tiny.float())['range_cond']) == pytest.approx(1.0)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r'\(B, d, d\)'):
        eigvals_floored(torch.ones(3, 3))
    with pytest.raises(ValueError, match='d >= 2'):
        covariance_stats(torch.ones(2, 1, 1))


def test_head_grad_norm():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2, 2))
    assert head_grad_norm([a, b]) is None
    a.grad = torch.tensor([3., 0., 0.])
    b.grad = torch.tensor([[0., 4.], [0., 0.]])
    assert head_grad_norm([a, b]).item() == pytest.approx(5.0)


class _Sqrt(nn.Module):
    def forward(self, cov):
        return cov


class _TinyGcp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.sqrtm = _Sqrt()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        f = self.conv(x).flatten(2)
        f = f - f.mean(-1, keepdim=True)
        return self.fc(self.sqrtm(f @ f.transpose(1, 2) / f.shape[-1]).flatten(1))


def test_collector_samples_every_nth_step_and_resets():
    torch.manual_seed(0)
    model = _TinyGcp()
    col = CovStatsCollector(model, list(model.fc.parameters()), interval=2, module_types=(_Sqrt,))
    assert col.num_hooked == 1
    sampled_norms = []
    for i in range(5):
        sampled = col.step(i)
        assert sampled == (i % 2 == 0)
        model.zero_grad()
        model(torch.randn(3, 3, 4, 4)).sum().backward()
        if sampled:
            sampled_norms.append(head_grad_norm(model.fc.parameters()).item())
        col.after_backward()
    out = col.summary()
    assert set(out) == {'cond_median', 'cond_max', 'eig_ratio_median', 'floor_frac', 'head_grad_norm',
                        'lam_max_median', 'range_cond_median'}
    assert out['head_grad_norm'] == pytest.approx(sum(sampled_norms) / 3)
    assert out['cond_max'] >= out['cond_median'] >= 1 and out['eig_ratio_median'] >= 1
    assert 0 <= out['floor_frac'] <= 1
    assert col.summary() == {}  # reset after reading
    model.eval()  # evaluation forwards are never sampled (and no gradient exists to record)
    model.zero_grad(set_to_none=True)
    col.step(0)
    model(torch.randn(2, 3, 4, 4))
    col.after_backward()
    assert col.summary() == {}
    col.remove()
    assert col.num_hooked == 1 and not model.sqrtm._forward_hooks


def test_collector_interval_validated():
    with pytest.raises(ValueError, match='interval'):
        CovStatsCollector(nn.Linear(2, 2), interval=0)

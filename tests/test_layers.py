"""Tests of timm_gcp.layers: MatrixSqrt, CovPool, set_gcp_method / get_gcp_method."""
from unittest import mock

import pytest
import torch
import torch.nn as nn
from timm.layers import create_feature_extractor

import timm_gcp
import timm_gcp.layers.matrix_sqrt as matrix_sqrt_module
from timm_gcp import METHODS, CovPool, MatrixSqrt, get_gcp_method, set_gcp_method
from timm_gcp.functional import covariance, triu_unvec, triu_vec

from helpers.models import EIGEN_METHOD, NS_METHOD


def _feat(b=3, c=6, h=5, w=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=dtype)


def test_exports():
    assert timm_gcp.CovPool is CovPool and timm_gcp.MatrixSqrt is MatrixSqrt
    assert timm_gcp.set_gcp_method is set_gcp_method and timm_gcp.get_gcp_method is get_gcp_method


@pytest.mark.parametrize('method', list(METHODS))
def test_matrix_sqrt_matches_functional(method):
    cov = covariance(_feat(c=5, h=6, w=6))  # 36 samples > 5 channels: well conditioned
    out = MatrixSqrt(method)(cov)
    torch.testing.assert_close(out, timm_gcp.sqrtm(cov, method), rtol=0, atol=0)
    assert out.shape == cov.shape and out.dtype == cov.dtype


def test_matrix_sqrt_validates_method_and_options():
    with pytest.raises(ValueError, match='unknown matrix square-root method'):
        MatrixSqrt('no_such_method')
    with pytest.raises(ValueError, match='does not take option'):
        MatrixSqrt(NS_METHOD, bogus=1)
    m = MatrixSqrt(EIGEN_METHOD)
    with pytest.raises(ValueError):
        m.set_method('no_such_method')
    assert m.get_method() == (EIGEN_METHOD, {})  # a failed switch changes nothing
    assert EIGEN_METHOD in repr(m)


def test_cov_pool_no_reduction_is_triu_of_root():
    x = _feat()
    pool = CovPool(6, gcp_dim=None, method=EIGEN_METHOD)
    assert list(pool.state_dict()) == [] and pool.out_features == 21
    out = pool(x)
    q = triu_unvec(out)
    # the eigen root in float64 squares back to the covariance up to rounding
    torch.testing.assert_close(q @ q, covariance(x), rtol=0, atol=1e-12)
    assert out.dtype == torch.float64


def test_cov_pool_reduction_pipeline_values():
    torch.manual_seed(0)
    x = _feat(c=10)
    pool = CovPool(10, gcp_dim=4, method=EIGEN_METHOD, dtype=torch.float64).eval()
    pool.bn.running_mean.uniform_(-0.1, 0.1)
    pool.bn.running_var.uniform_(0.5, 2.0)
    y = torch.relu(pool.bn(pool.conv(x)))
    expected = triu_vec(timm_gcp.sqrtm(covariance(y), EIGEN_METHOD))
    torch.testing.assert_close(pool(x), expected, rtol=0, atol=0)
    assert pool(x).shape == (3, 10)


def test_cov_pool_out_features_and_param_names_do_not_depend_on_method():
    keys = None
    for method in METHODS:
        pool = CovPool(32, gcp_dim=256, method=method, device='meta')
        assert pool.out_features == 32896
        if keys is None:
            keys = list(pool.state_dict())
        assert list(pool.state_dict()) == keys
    assert keys == ['conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var',
        'bn.num_batches_tracked']


@pytest.mark.parametrize('method', [NS_METHOD, EIGEN_METHOD])
def test_cov_pool_paper_size_forward(method):
    """d = 256 from a 2048-channel 7×7 map (rank-deficient: 49 samples < 256): 32,896 finite values."""
    torch.manual_seed(0)
    pool = CovPool(2048, gcp_dim=256, method=method).eval()
    out = pool(torch.randn(2, 2048, 7, 7))
    assert out.shape == (2, 32896) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_cov_pool_conv_init_is_kaiming_fan_out():
    torch.manual_seed(0)
    pool = CovPool(512, gcp_dim=256, method=EIGEN_METHOD)
    assert pool.conv.bias is None
    # kaiming normal, fan_out = 256 outputs × 1×1: std √(2/256); 131k samples put the estimate within ~0.5%
    std = pool.conv.weight.std().item()
    assert abs(std - (2 / 256) ** 0.5) < 0.03 * (2 / 256) ** 0.5
    assert torch.equal(pool.bn.weight, torch.ones(256)) and torch.equal(pool.bn.bias, torch.zeros(256))


@pytest.mark.parametrize('method', [NS_METHOD, EIGEN_METHOD])
def test_cov_pool_output_dtype_follows_input(method):
    torch.manual_seed(0)
    pool = CovPool(6, gcp_dim=4, method=method).eval()
    x = _feat(dtype=torch.float32)
    ref = pool(x)
    assert ref.dtype == torch.float32
    out = pool.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # the conv/BN run in bf16 (8 mantissa bits); the root itself runs in float32/float64
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    pool.float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = pool(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_cov_pool_bad_arguments():
    with pytest.raises(ValueError, match='in_chs'):
        CovPool(0)
    with pytest.raises(ValueError, match='gcp_dim'):
        CovPool(8, gcp_dim=-3, method=EIGEN_METHOD)
    with pytest.raises(TypeError, match='method_kwargs'):
        CovPool(8, gcp_dim=4, method=EIGEN_METHOD, method_kwargs='eps=1')
    with pytest.raises(ValueError, match='does not take option'):
        CovPool(8, gcp_dim=4, method=EIGEN_METHOD, method_kwargs={'bogus': 1})
    with pytest.raises(ValueError, match=r'\(B, 6, H, W\)'):
        CovPool(6, gcp_dim=None, method=EIGEN_METHOD)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match='non-finite'):
        CovPool(3, gcp_dim=None, method=EIGEN_METHOD)(torch.full((2, 3, 2, 2), float('nan')))


def test_finiteness_check_is_cpu_only_by_default_and_can_be_forced():
    nan = torch.full((2, 3, 2, 2), float('nan'))
    pool = CovPool(3, gcp_dim=None, method='isqrt')
    with pytest.raises(ValueError, match='non-finite'):
        pool(nan)  # CPU: the check costs no device sync, so it runs
    pool.sqrtm.check_finite = False  # what an accelerator input gets by default: no per-step host round trip
    assert torch.isnan(pool(nan)).all()
    seen = []
    real = matrix_sqrt_module.sqrtm
    pool.sqrtm.check_finite = None
    real = matrix_sqrt_module.features_sqrtm
    with mock.patch.object(matrix_sqrt_module, 'features_sqrtm',
            lambda x, m, check, **o: seen.append(check) or real(x, m, check=check, **o)):
        pool(torch.randn(2, 3, 2, 2))
        meta = torch.empty(2, 3, 4, device='meta')
        pool.sqrtm(meta)
    assert seen == [True, False]  # CPU: the features are checked (no device sync there); meta: nothing


def test_cov_pool_meta_device():
    pool = CovPool(16, gcp_dim=8, method=EIGEN_METHOD, device='meta')
    out = pool(torch.empty(2, 16, 7, 7, device='meta'))
    assert out.device.type == 'meta' and out.shape == (2, 36)


def test_set_and_get_gcp_method():
    torch.manual_seed(0)
    model = nn.Sequential(CovPool(6, gcp_dim=4, method=NS_METHOD), nn.Linear(10, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert get_gcp_method(model) == (NS_METHOD, {})
    assert set_gcp_method(model, EIGEN_METHOD) == 1
    assert get_gcp_method(model) == (EIGEN_METHOD, {})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = _feat(dtype=torch.float32)
    model.eval()
    feats = torch.relu(model[0].bn(model[0].conv(x)))
    # the switch changes the precision too: the eigen-method forms the covariance in float64
    expected = model[1](triu_vec(timm_gcp.sqrtm(covariance(feats, dtype=torch.float64), EIGEN_METHOD)).float())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x), model[1](timm_gcp.functional.cov_pool(feats, EIGEN_METHOD)), rtol=0, atol=0)
    with pytest.raises(ValueError, match='unknown matrix square-root method'):
        set_gcp_method(model, 'no_such_method')
    assert get_gcp_method(model) == (EIGEN_METHOD, {})
    with pytest.raises(ValueError, match='contains no MatrixSqrt'):
        set_gcp_method(nn.Linear(2, 2), EIGEN_METHOD)
    with pytest.raises(ValueError, match='contains no MatrixSqrt'):
        get_gcp_method(nn.Linear(2, 2))


def test_get_gcp_method_refuses_mixed_models():
    model = nn.ModuleList([MatrixSqrt(NS_METHOD), MatrixSqrt(EIGEN_METHOD)])
    if NS_METHOD == EIGEN_METHOD:
        model[1].set_method(EIGEN_METHOD, eps=1e-12)
    with pytest.raises(ValueError, match='differ'):
        get_gcp_method(model)
    assert set_gcp_method(model, EIGEN_METHOD) == 2
    assert get_gcp_method(model) == (EIGEN_METHOD, {})


def test_set_gcp_method_options_are_kept_and_validated():
    root = MatrixSqrt(EIGEN_METHOD)
    set_gcp_method(root, NS_METHOD, iters=3)
    assert get_gcp_method(root) == (NS_METHOD, {'iters': 3})
    assert root.resolved_options()['iters'] == 3
    cov = covariance(_feat(dtype=torch.float32))
    torch.testing.assert_close(root(cov), timm_gcp.sqrtm(cov, NS_METHOD, iters=3), rtol=0, atol=0)






class _Net(nn.Module):
    def __init__(self, method):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = CovPool(6, gcp_dim=4, method=method)

    def forward(self, x):
        return self.pool(self.stem(x))


@pytest.mark.parametrize('method', list(METHODS))
def test_fx_keeps_matrix_sqrt_as_leaf_with_the_same_gradient(method):
    torch.manual_seed(0)
    net = _Net(method).double().eval()
    fx = create_feature_extractor(net, {'pool.sqrtm': 'root', 'pool': 'out'})
    graph = fx.graph
    calls = [n for n in graph.nodes if n.op == 'call_module']
    assert any(n.target == 'pool.sqrtm' for n in calls), 'MatrixSqrt must stay a leaf module of the FX graph'
    # nothing of the square root itself was inlined into the graph
    assert not any('eigh' in str(n.target) or 'matmul' in str(n.target) for n in graph.nodes)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out_fx = fx(x)['out']
    out = net(x)
    torch.testing.assert_close(out_fx, out, rtol=0, atol=0)
    g_fx = torch.autograd.grad(out_fx.sum(), net.stem.weight)[0]
    g = torch.autograd.grad(net(x).sum(), net.stem.weight)[0]
    torch.testing.assert_close(g_fx, g, rtol=0, atol=0)


def test_fx_graph_runs_the_methods_own_backward():
    """SVD-Trunc with a tiny threshold clips K hard: its gradient differs from the exact one (svd). An FX graph that
    had inlined the square root would give the autograd-through-eigh gradient instead of the clipped one."""
    torch.manual_seed(0)
    net = _Net('svd').double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    exact = torch.autograd.grad(net(x).sum(), net.stem.weight)[0]
    net.pool.sqrtm.set_method('trunc', threshold=1e-3)
    fx = create_feature_extractor(net, {'pool': 'out'})
    g_fx = torch.autograd.grad(fx(x)['out'].sum(), net.stem.weight)[0]
    g = torch.autograd.grad(net(x).sum(), net.stem.weight)[0]
    torch.testing.assert_close(g_fx, g, rtol=0, atol=0)
    assert (g - exact).abs().max() > 1e-3 * exact.abs().max()




def test_torchscript_refuses_with_the_reason():
    with pytest.raises(RuntimeError, match='torch.jit.script.*autograd.Function'):
        torch.jit.script(CovPool(6, gcp_dim=4, method=EIGEN_METHOD))


def test_matrix_sqrt_checks_the_contract_standalone_and_only_finiteness_in_cov_pool():
    indefinite = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    indefinite[1, 0, 0] = -1.0
    with pytest.raises(ValueError, match='not positive semi-definite in 1 of 2 samples'):
        MatrixSqrt('svd')(indefinite)
    pool = CovPool(6, gcp_dim=4, method='svd')
    assert pool.sqrtm.from_features is True  # its input is the samples: their covariance is PSD by construction
    samples = torch.randn(2, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(pool.sqrtm(samples), timm_gcp.sqrtm(timm_gcp.covariance(samples), 'svd'))
    samples[1, 2, 3] = float('nan')
    with pytest.raises(timm_gcp.functional.NonFiniteError, match='non-finite'):  # a ValueError the trainer can tell
        pool.sqrtm(samples)
    with pytest.raises(ValueError, match="check must be True, False or 'finite'"):
        timm_gcp.sqrtm(indefinite, 'svd', check='psd')


def test_cov_pool_layouts_pool_the_same_positions():
    """An NHWC map and a token sequence (prefix tokens first) give the covariance of the same positions as the
    NCHW map; the parameters and their names are the same for every layout."""
    torch.manual_seed(0)
    x = _feat(b=2, c=6, h=3, w=4, dtype=torch.float32)
    ref = CovPool(6, gcp_dim=4, method=EIGEN_METHOD).eval()
    ref.bn.running_var.uniform_(0.5, 2.0)
    expected = ref(x)
    nhwc = CovPool(6, gcp_dim=4, method=EIGEN_METHOD, input_fmt='NHWC').eval()
    nhwc.load_state_dict(ref.state_dict())
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), expected, rtol=0, atol=0)
    tokens = x.flatten(2).transpose(1, 2)  # (B, 12, 6), row-major positions
    prefix = torch.randn(2, 2, 6)
    nlc = CovPool(6, gcp_dim=4, method=EIGEN_METHOD, input_fmt='NLC', num_prefix_tokens=2).eval()
    nlc.load_state_dict(ref.state_dict())
    torch.testing.assert_close(nlc(torch.cat([prefix, tokens], 1)), expected, rtol=1e-6, atol=1e-7)
    # with the class token: it leads the vector, unreduced, and the covariance part is unchanged
    cls = CovPool(6, gcp_dim=4, method=EIGEN_METHOD, input_fmt='NLC', num_prefix_tokens=2, cls_token=True).eval()
    cls.load_state_dict(ref.state_dict())
    out = cls(torch.cat([prefix, tokens], 1))
    assert cls.out_features == 6 + 10 and out.shape == (2, 16)
    torch.testing.assert_close(out[:, :6], prefix[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 6:], expected, rtol=1e-6, atol=1e-7)
    assert list(nhwc.state_dict()) == list(nlc.state_dict()) == list(ref.state_dict())


def test_cov_pool_layout_errors_name_the_layout():
    with pytest.raises(ValueError, match=r'\(B, H, W, 6\) feature map \(NHWC\), got shape \(2, 6, 3, 3\)'):
        CovPool(6, gcp_dim=4, method=EIGEN_METHOD, input_fmt='NHWC')(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match=r'\(B, N, 6\) token sequence \(NLC\) with 1 prefix tokens'):
        CovPool(6, gcp_dim=4, method=EIGEN_METHOD, input_fmt='NLC', num_prefix_tokens=1)(torch.randn(2, 1, 6))
    with pytest.raises(ValueError, match='input_fmt must be one of'):
        CovPool(6, input_fmt='NCL')
    with pytest.raises(ValueError, match='num_prefix_tokens'):
        CovPool(6, input_fmt='NCHW', num_prefix_tokens=1)
    with pytest.raises(ValueError, match='cls_token=True needs a class token'):
        CovPool(6, input_fmt='NLC', cls_token=True)


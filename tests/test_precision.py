"""Precision of the GCP meta-layer on the path the models run: float32 or bf16-autocast features of a real timm model,
d = 256, M = 49 (224 px) and M = 196 (448 px) samples, so every covariance is rank-deficient.

The gradient each model head sends back (into the covariance input X, the ReLU output of the 1×1 reduction, and into
the backbone features) is compared with an independent float64 reference written here: float64 covariance, float64
eigh, and each method's backward written out from its definition (the exact Daleckii–Krein weight 1/(√λi + √λj) for
the exact-gradient methods, direct power sums for the Taylor and power-iteration series, autograd through a plain
Newton–Schulz loop for ``newton``).
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_gcp
from timm_gcp import METHODS
from timm_gcp.functional import EPS, PrecisionWarning, covariance, sqrtm

from helpers.functional import ns_reference

EIGEN = sorted(m for m, s in METHODS.items() if s.eigen)
K_METHODS = sorted(set(EIGEN) - {'newton'})  # methods whose backward weights pairs of eigenvalues by a K matrix


def _geometric(r: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_{k<n} r^k by direct summation (independent of the library's closed form)."""
    out, p = torch.zeros_like(r), torch.ones_like(r)
    for _ in range(n):
        out, p = out + p, p * r
    return out


def _weight(method: str, lam: torch.Tensor) -> torch.Tensor:
    """The symmetric backward weight W of ``method`` at descending eigenvalues ``lam``: ∂L/∂Σ = U[(UᵀḠU) ∘ W]Uᵀ."""
    s = lam.sqrt()
    li, lj, si, sj = lam[..., :, None], lam[..., None, :], s[..., :, None], s[..., None, :]
    lmax, lmin = torch.maximum(li, lj), torch.minimum(li, lj)
    smax, smin = torch.maximum(si, sj), torch.minimum(si, sj)
    r = lmin / lmax
    if method in ('svd', 'pade', 'lyap', 'topn'):
        # the exact gradient of the root (topn keeps N = 206 eigenvalues, more than the rank of these covariances,
        # so its forward and gradient are the exact ones here)
        return 1.0 / (si + sj)
    if method == 'trunc':
        k = (1.0 / (lmax - lmin)).clamp(max=1e10)
        w = k * (smax - smin)
    elif method == 'taylor':
        w = _geometric(r, 101) / lmax * (smax - smin)
    elif method == 'pi':
        w = (_geometric(r, 20) * smax - _geometric(r, 19) * smin) / lmax
    else:
        raise AssertionError(method)
    w = torch.where(lmax == lmin, torch.zeros_like(w), w)
    return w + torch.diag_embed(0.5 / s) - torch.diag_embed(w.diagonal(dim1=-2, dim2=-1))


class _RefRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cov: torch.Tensor, method: str) -> torch.Tensor:
        lam, u = torch.linalg.eigh(cov)
        lam, u = lam.flip(-1).clamp_min(EPS), u.flip(-1)
        ctx.save_for_backward(u, lam)
        ctx.method = method
        return (u * lam.sqrt()[..., None, :]) @ u.mT

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, lam = ctx.saved_tensors
        s = u.mT @ (0.5 * (g + g.mT)) @ u
        return u @ (s * _weight(ctx.method, lam)) @ u.mT, None


def _ref_root(cov: torch.Tensor, method: str) -> torch.Tensor:
    if method == 'newton':
        # value: the exact root; gradient: that of √trΣ·NS₁₀(Σ/trΣ) at Σ, by autograd through the plain iteration
        lam, u = torch.linalg.eigh(cov)
        value = (u * lam.clamp_min(EPS).sqrt()[..., None, :]) @ u.mT
        ns = ns_reference(cov, 10)
        return ns + (value - ns).detach()
    return _RefRoot.apply(cov, method)


def _ref_logits(x: torch.Tensor, method: str, fc: torch.nn.Linear) -> torch.Tensor:
    """Head after the reduction, in float64: covariance → root → upper triangle → classifier."""
    x = x.flatten(2)
    xc = x - x.mean(-1, keepdim=True)
    q = _ref_root(xc @ xc.mT / x.shape[-1], method)
    r, c = torch.triu_indices(q.shape[-1], q.shape[-1])
    return F.linear(q[:, r, c], fc.weight.double(), fc.bias.double())


@pytest.fixture(scope='module')
def features():
    """Backbone features of a random-init float32 ResNet-18 on random images: 7×7 (M = 49) and 14×14 (M = 196)."""
    torch.manual_seed(0)
    backbone = timm.create_model('resnet18', num_classes=0, global_pool='')
    with torch.no_grad():
        return {m: backbone.forward_features(torch.randn(2, 3, px, px)) for m, px in ((49, 224), (196, 448))}


TARGET = torch.tensor([1, 3])


def _model_grads(method: str, feats: torch.Tensor, autocast: bool = False, path: str = 'auto', **options):
    """Run the model's head on ``feats``; return (X, ∂L/∂X, ∂L/∂feats, model)."""
    torch.manual_seed(1)
    model = timm.create_model(f'resnet18_gcp_{method}', num_classes=10, gcp_kwargs=options or None)
    model.global_pool.sqrtm.set_path(path)
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen['x'] = output

    model.global_pool.act.register_forward_hook(keep)
    f = feats.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        logits = model.forward_head(f)
    F.cross_entropy(logits.float(), TARGET).backward()
    return seen['x'], seen['x'].grad.double(), f.grad.double(), model


def _relerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def _ref_grad_x(x: torch.Tensor, method: str, model) -> torch.Tensor:
    x = x.detach().double().requires_grad_()
    F.cross_entropy(_ref_logits(x, method, model.fc), TARGET).backward()
    return x.grad


def _ref_grad_feats(feats: torch.Tensor, method: str, model) -> torch.Tensor:
    """The whole head in float64 (same weights; BN in training mode, as the model runs)."""
    f = feats.double().requires_grad_()
    gp = model.global_pool
    x = F.conv2d(f, gp.conv.weight.double())
    x = F.batch_norm(x, None, None, gp.bn.weight.double(), gp.bn.bias.double(), training=True, eps=gp.bn.eps)
    F.cross_entropy(_ref_logits(x.relu(), method, model.fc), TARGET).backward()
    return f.grad


# Tolerances. float32 features: the float32 1×1 conv and the float32 gradient returned to it limit agreement to
# ~1e-6 (measured 0.9e-7 to 1.2e-7 into X and 4.3e-7 to 6.0e-7 into the features, for every eigen-method); 1e-4 leaves
# room for BLAS differences and is 3-4 orders below what a float32 covariance costs (relative error 0.5-20, see
# test_float32_meta_layer_shows_the_documented_loss).
FP32_TOL = 1e-4


@pytest.mark.parametrize('m', [49, 196])
@pytest.mark.parametrize('method', EIGEN)
def test_float32_model_gradient_matches_float64_reference(features, method, m):
    x, gx, gf, model = _model_grads(method, features[m])
    assert x.dtype == torch.float32 and x.shape[1] == 256 and x[0].flatten(1).shape[1] == m
    assert _relerr(gx, _ref_grad_x(x, method, model)) < FP32_TOL
    assert _relerr(gf, _ref_grad_feats(features[m], method, model)) < FP32_TOL


@pytest.mark.parametrize('m', [49, 196])
@pytest.mark.parametrize('method', EIGEN)
def test_bf16_autocast_gradient_matches_float64_reference(features, method, m):
    # Under autocast the reduction conv runs in bf16, so X (the covariance input) is bf16 and its gradient is
    # returned in bf16: 2⁻⁸ relative rounding per entry bounds the agreement (measured 3.0e-3 to 3.5e-3). The
    # reference starts from the same bf16 X, so this checks that the covariance, root and backward ran in float64.
    x, gx, _, model = _model_grads(method, features[m], autocast=True)
    assert x.dtype == torch.bfloat16
    assert _relerr(gx, _ref_grad_x(x, method, model)) < 1e-2


@pytest.mark.parametrize('m', [49, 196])
@pytest.mark.parametrize('method', ['isqrt', 'mpa'])
def test_newton_schulz_heads_form_the_covariance_in_float32(features, method, m):
    # isqrt and mpa keep fast-MPN-COV's float32; their covariance is formed in float32 too (also from bf16 features)
    for autocast in (False, True):
        x, gx, _, model = _model_grads(method, features[m], autocast=autocast)
        seen = []
        model.global_pool.sqrtm.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            model.forward_head(features[m])
        assert seen == [torch.float32]
    # and the option raises the whole meta-layer to float64: then the gradient is the float64 function's
    x, gx, _, model = _model_grads('isqrt', features[m], dtype='float64')
    ref = x.detach().double().requires_grad_()
    xc = ref.flatten(2) - ref.flatten(2).mean(-1, keepdim=True)
    q = ns_reference(xc @ xc.mT / m, 5)
    r, c = torch.triu_indices(256, 256)
    F.cross_entropy(F.linear(q[:, r, c], model.fc.weight.double(), model.fc.bias.double()), TARGET).backward()
    assert _relerr(gx, ref.grad) < FP32_TOL


@pytest.mark.parametrize('m', [49, 196])
@pytest.mark.parametrize('method', K_METHODS)
def test_float32_meta_layer_shows_the_documented_loss(features, method, m):
    # dtype='float32' on the covariance path is the single-precision setting the paper shows failing: the zero
    # eigenvalues of the rank-deficient covariance become float32 noise and K weights them heavily. Measured relative
    # error of the gradient into X: 1.4-21 (cosine 0.04-0.57) for these methods at M = 49 and 196.
    x, gx, _, model = _model_grads(method, features[m], path='cov', dtype='float32')
    assert model.global_pool.sqrtm.compute_dtype == torch.float32
    assert _relerr(gx, _ref_grad_x(x, method, model)) > 0.5


@pytest.mark.parametrize('m', [49, 196])
@pytest.mark.parametrize('method', K_METHODS)
def test_float32_gram_path_keeps_the_gradient(features, method, m):
    # On the Gram path the null space of Σ is never decomposed: its eigenvalues are exact zeros (ε), not float32
    # noise, so the same float32 setting gives the float64 gradient to float32 rounding (measured 1.0e-6 to 1.2e-5;
    # 1e-4 as FP32_TOL). The float64 default is kept; this documents what the Gram path changes.
    x, gx, _, model = _model_grads(method, features[m], path='gram', dtype='float32')
    assert _relerr(gx, _ref_grad_x(x, method, model)) < FP32_TOL


@pytest.mark.parametrize('m', [49, 196])
def test_newton_backward_needs_no_float64(features, m):
    # newton's backward differentiates the Newton–Schulz map, never 1/(λi − λj): float32 loses nothing measurable
    x, gx, _, model = _model_grads('newton', features[m], dtype='float32')
    assert _relerr(gx, _ref_grad_x(x, 'newton', model)) < 1e-3


def test_a_float32_covariance_given_to_an_eigen_method_warns(features):
    x = torch.relu(features[49][:, :64])
    with pytest.warns(PrecisionWarning, match=r"'svd' computes in torch.float64 but was given a torch.float32"):
        sqrtm(covariance(x), 'svd')
    with pytest.warns(PrecisionWarning, match='torch.float32 but was given a torch.bfloat16'):
        sqrtm(covariance(x).bfloat16(), 'isqrt')
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        sqrtm(covariance(x, dtype=torch.float64), 'svd')
        sqrtm(covariance(x), 'svd', dtype='float32')
        sqrtm(covariance(x), 'isqrt')
        timm_gcp.functional.cov_pool(x, 'svd')


@pytest.mark.parametrize('method', EIGEN + ['isqrt', 'mpa'])
def test_cov_pool_runs_in_the_method_precision(features, method):
    x = torch.relu(features[49][:, :32]).bfloat16().requires_grad_()
    out = timm_gcp.functional.cov_pool(x, method)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 32 * 33 // 2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    dtype = timm_gcp.functional.method_dtype(method)
    assert dtype == (torch.float32 if method in ('isqrt', 'mpa') else torch.float64)
    ref = timm_gcp.functional.triu_vec(sqrtm(covariance(x.detach(), dtype=dtype), method)).bfloat16()
    assert torch.equal(out.detach(), ref)


def test_topn_gradient_on_full_rank_features_exceeds_float16():
    # documented in docs/methods.md: topn's backward keeps the 1/(2√ε) weight of the eigenvalues it sets to ε, and on
    # a full-rank covariance (M > d) those directions carry features, so the gradient reaches ~1e5-1e6: beyond
    # float16's 65504 (inf), within bfloat16's and float32's range. svd's stays O(0.1) on the same input.
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(2, 32, 196, generator=gen))
    grads = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xx = x.to(dtype).clone().requires_grad_()
        timm_gcp.functional.cov_pool(xx, 'topn').float().sum().backward()
        grads[dtype] = xx.grad
    assert float(grads[torch.float32].abs().max()) > 65504
    assert torch.isfinite(grads[torch.bfloat16]).all() and not torch.isfinite(grads[torch.float16]).all()
    xx = x.clone().requires_grad_()
    timm_gcp.functional.cov_pool(xx, 'svd').sum().backward()
    assert float(xx.grad.abs().max()) < 1.0

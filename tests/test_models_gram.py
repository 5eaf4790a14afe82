"""The Gram path inside the models: ``timm.create_model`` heads give the same logits and the same gradient into their
backbone on either path, on float32 features of a real (random-init) ResNet-18 at M = 16, 49 and 196 positions and
on ViT/Swin token heads; the path is not part of the weights; a map of one position is refused with a clear error.

Tolerances as in ``test_functional_gram``: 1e-6 relative for the float64 methods, 1e-4 for ``isqrt``; ``mpa``'s
float32 covariance path carries its own float32 rounding of the matrix Padé approximant (3e-4 to 1e-3 of the root),
so it is compared at 2e-3 (logits) and 5e-4 (gradient).
"""
import logging

import pytest
import timm
import torch

import timm_gcp
from timm_gcp import METHODS

TOL = {m: (2e-3, 5e-4) if m == 'mpa' else (1e-4, 1e-4) if m == 'isqrt' else (1e-6, 1e-6) for m in METHODS}


@pytest.fixture(scope='module')
def features():
    """Backbone features of a random-init float32 ResNet-18: 4×4, 7×7 and 14×14 maps of 512 channels."""
    torch.manual_seed(0)
    backbone = timm.create_model('resnet18', num_classes=0, global_pool='')
    with torch.no_grad():
        return {m: backbone.forward_features(torch.randn(2, 3, px, px)) for m, px in ((16, 128), (49, 224), (196, 448))}


def _head(model, feats, path):
    timm_gcp.set_gcp_path(model, path)
    f = feats.clone().requires_grad_()
    logits = model.forward_head(f)
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    model.zero_grad()
    return logits.detach(), f.grad


def _rel(a, ref):
    return float((a - ref).norm() / ref.norm())


@pytest.mark.parametrize('m', [16, 49, 196])
def test_resnet_heads_agree_on_both_paths(features, m):
    failures = []
    for method in METHODS:
        torch.manual_seed(1)
        model = timm.create_model(f'resnet18_gcp_{method}', num_classes=10)  # d = 256 > M: 'auto' is the Gram path
        assert model.global_pool.sqrtm.path == 'auto'
        lg, gg = _head(model, features[m], 'gram')
        lc, gc = _head(model, features[m], 'cov')
        tol_logits, tol_grad = TOL[method]
        err = (_rel(lg, lc), _rel(gg, gc))
        if not (err[0] < tol_logits and err[1] < tol_grad):
            failures.append(f'{method}: logits {err[0]:.1e}, backbone gradient {err[1]:.1e}')
    assert not failures, '; '.join(failures)


@pytest.mark.parametrize('name,tokens', [
    ('vit_small_patch16_224_gcp_svd', (2, 197, 384)),  # 196 patch tokens after the class token
    ('swin_tiny_patch4_window7_224_gcp_pade', (2, 7, 7, 768)),  # NHWC, 49 positions
    ('deit_small_patch16_224_gcp_isqrt', (2, 197, 384)),
])
def test_token_heads_agree_on_both_paths(name, tokens):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    feats = torch.randn(*tokens, generator=torch.Generator().manual_seed(3))
    lg, gg = _head(model, feats, 'gram')
    lc, gc = _head(model, feats, 'cov')
    tol = TOL[timm_gcp.get_gcp_method(model)[0]]
    assert _rel(lg, lc) < tol[0] and _rel(gg, gc) < tol[1]


def test_the_path_is_not_part_of_the_weights(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('resnet18_gcp_pade', num_classes=4).eval()
    x = torch.randn(2, 3, 128, 128)
    keys = list(model.state_dict())
    timm_gcp.set_gcp_path(model, 'cov')
    assert list(model.state_dict()) == keys
    torch.save(model.state_dict(), tmp_path / 'cov.pth')
    with torch.no_grad():
        ref = model(x)
    other = timm.create_model('resnet18_gcp_pade', num_classes=4).eval()  # 'auto': the Gram path at 4×4 maps
    other.load_state_dict(torch.load(tmp_path / 'cov.pth', weights_only=True))
    assert other.global_pool.sqrtm.path == 'auto'
    with torch.no_grad():
        torch.testing.assert_close(other(x), ref, rtol=1e-6, atol=1e-6)
    assert 'path' not in timm_gcp.get_gcp_method(other)[1]


def test_set_gcp_path_validates():
    model = timm.create_model('resnet18_gcp_isqrt', num_classes=2, gcp_dim=8)
    assert timm_gcp.set_gcp_path(model, 'gram') == 1 and model.global_pool.sqrtm.path == 'gram'
    with pytest.raises(ValueError, match='path must be one of'):
        timm_gcp.set_gcp_path(model, 'fastest')
    with pytest.raises(ValueError, match='contains no MatrixSqrt'):
        timm_gcp.set_gcp_path(torch.nn.Linear(2, 2), 'cov')


def test_a_single_position_is_refused_with_what_to_change(caplog):
    with caplog.at_level(logging.WARNING):
        model = timm.create_model('resnet18_gcp_isqrt', num_classes=2, gcp_dim=8,
            pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))
    assert 'needs at least 2' in caplog.text and '1 position' in caplog.text  # said at build time
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r'at least 2 positions.*\(2, 8, 1, 1\).*output_stride'):
        model(x)
    # the same input with a smaller output stride keeps 4×4 positions and trains: different inputs, different logits
    model = timm.create_model('resnet18_gcp_isqrt', num_classes=2, gcp_dim=8, output_stride=8).eval()
    out = model(x)
    assert out.shape == (2, 2) and not torch.allclose(out[0], out[1])

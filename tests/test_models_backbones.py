"""GCP heads on timm backbones (GcpNet): ConvNeXt, EfficientNet, RegNet, ViT, DeiT, Swin and the generic path.

Every family is built at full size on the meta device (layout, keys, parameter counts) and small for real (forward,
backward, the timm API). The values checked are computed independently from the backbone's own modules.
"""
import copy
import functools

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import create_feature_extractor
from timm.models import build_model_with_cfg, get_pretrained_cfg, group_parameters, register_model
from timm.optim import param_groups_layer_decay

import timm_gcp
from timm_gcp import METHODS, get_gcp_method, set_gcp_method
from timm_gcp.functional import covariance, triu_vec
from timm_gcp.layers import CovPool
from timm_gcp.models import GcpNet

from helpers.models import (BACKBONE_FAMILIES, BACKBONE_NAMES, EIGEN_METHOD, NS_METHOD, TINY_BACKBONE_KWARGS,
    family_of, tiny_kwargs)

IMG = 64
# family → (timm backbone at full size, channels reaching the head, layout, prefix tokens, final map at 224 px)
FULL = {
    'convnext_tiny_gcp': ('convnext_tiny', 768, 'NCHW', 0, (7, 7)),
    'convnext_small_gcp': ('convnext_small', 768, 'NCHW', 0, (7, 7)),
    'efficientnet_b0_gcp': ('efficientnet_b0', 1280, 'NCHW', 0, (7, 7)),
    'regnety_032_gcp': ('regnety_032', 1512, 'NCHW', 0, (7, 7)),
    'vit_small_patch16_224_gcp': ('vit_small_patch16_224', 384, 'NLC', 1, None),
    'deit_small_patch16_224_gcp': ('deit_small_patch16_224', 384, 'NLC', 1, None),
    'swin_tiny_patch4_window7_224_gcp': ('swin_tiny_patch4_window7_224', 768, 'NHWC', 0, (7, 7)),
    'generic_gcp': ('resnet50', 2048, 'NCHW', 0, (7, 7)),
}
# one method per family, every method used once (the methods share the head code; each has its own root)
PAIRS = [f'{f}_{list(METHODS)[i % len(METHODS)]}' for i, f in enumerate(BACKBONE_FAMILIES)]
PAIRS += [f'generic_gcp_{m}' for m in list(METHODS)[len(BACKBONE_FAMILIES):]]
HEAD_KEYS = ['global_pool.conv.weight', 'global_pool.bn.weight', 'global_pool.bn.bias', 'global_pool.bn.running_mean',
    'global_pool.bn.running_var', 'global_pool.bn.num_batches_tracked', 'fc.weight', 'fc.bias']


def _x(b=2, size=IMG, chans=3, seed=0):
    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **{**tiny_kwargs(name), **kwargs})


@functools.lru_cache(maxsize=None)
def _plain(backbone):
    """The timm backbone without its classifier, as the GCP model holds it: (state-dict keys, parameter count)."""
    model = timm.create_model(backbone, num_classes=0, device='meta')
    model.reset_classifier(0, '')
    return list(model.state_dict()), sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- every family at full size (meta device)

def test_every_family_and_method_is_registered_with_a_true_cfg():
    assert set(BACKBONE_NAMES) <= set(timm.list_models(module='backbone_gcp'))
    for name in BACKBONE_NAMES:
        cfg = get_pretrained_cfg(name)
        family = family_of(name)
        backbone = get_pretrained_cfg(FULL[family][0])
        assert cfg.architecture == name and cfg.classifier == 'fc' and cfg.num_classes == 1000
        assert cfg.first_conv == f'backbone.{backbone.first_conv}'
        assert cfg.input_size == backbone.input_size and cfg.pool_size == FULL[family][4]
        assert cfg.fixed_input_size == backbone.fixed_input_size
        assert cfg.paper_ids.startswith('arXiv:2105.02498')
        if family == 'generic_gcp':
            assert not cfg.has_weights  # the default backbone is only a default: no weights are claimed
        else:
            assert cfg.has_weights and cfg.hf_hub_id == f'timm/{FULL[family][0]}.{cfg.tag}'
            # the tag is the backbone's timm tag, its weights the backbone's
            assert cfg.mean == get_pretrained_cfg(f'{FULL[family][0]}.{cfg.tag}').mean


@pytest.mark.parametrize('family', BACKBONE_FAMILIES)
def test_full_size_layout_keys_and_parameter_count(family):
    """Built on the meta device at full size: the head sees the layout and width the backbone gives; the state dict
    is the backbone's (classifier removed) under ``backbone.`` plus the GCP head; nothing else is added."""
    backbone, chs, fmt, prefix, pool = FULL[family]
    name = f'{family}_{EIGEN_METHOD}'
    model = timm.create_model(name, device='meta')
    assert isinstance(model, GcpNet) and next(model.parameters()).device.type == 'meta'
    pool_layer = model.global_pool
    assert isinstance(pool_layer, CovPool) and (pool_layer.in_chs, pool_layer.input_fmt) == (chs, fmt)
    assert pool_layer.num_prefix_tokens == prefix and pool_layer.out_features == 32896
    assert model.head_hidden_size == 32896 and model.fc.weight.shape == (1000, 32896)
    keys, n_params = _plain(backbone)
    assert list(model.state_dict()) == [f'backbone.{k}' for k in keys] + HEAD_KEYS
    head = chs * 256 + 2 * 256 + 32896 * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) == n_params + head
    x = torch.empty(2, 3, 224, 224, device='meta')
    feats = model.forward_features(x)
    assert model(x).shape == (2, 1000)
    if fmt == 'NLC':
        assert feats.shape == (2, 197, model.num_features)
    else:
        spatial = feats.shape[1:3] if fmt == 'NHWC' else feats.shape[-2:]
        assert tuple(spatial) == pool and feats.shape[-1 if fmt == 'NHWC' else 1] == model.num_features
        assert getattr(model, 'output_fmt', 'NCHW') == fmt
    assert get_gcp_method(model) == (EIGEN_METHOD, {})


def test_head_norms_follow_the_family():
    """ConvNeXt's final LayerNorm stays (applied per position); ViT's final norm ends forward_features; a ViT that
    pools by average keeps its fc_norm, per token; register tokens are prefix tokens, not samples."""
    convnext = timm.create_model('convnext_tiny_gcp_svd', device='meta')
    assert isinstance(convnext.backbone.head.norm, nn.Module) and not isinstance(convnext.backbone.head.norm,
        nn.Identity)
    vit = timm.create_model('vit_small_patch16_224_gcp_svd', device='meta')
    assert isinstance(vit.backbone.norm, nn.LayerNorm) and isinstance(vit.backbone.fc_norm, nn.Identity)
    avg = timm_gcp.create_model('vit_betwixt_patch16_reg4_gap_256_gcp_svd', device='meta')
    assert isinstance(avg.backbone.fc_norm, nn.LayerNorm) and avg.global_pool.num_prefix_tokens == 4
    with pytest.raises(ValueError, match='needs a backbone with a class token'):
        timm_gcp.create_model('vit_betwixt_patch16_reg4_gap_256_gcp_svd', device='meta', gcp_cls_token=True)


# ---------------------------------------------------------------- small models, for real

@pytest.mark.parametrize('name', PAIRS)
def test_every_family_and_method_trains(name):
    """One SGD step: finite loss, a gradient for every parameter (timm's test_model_backward), finite weights."""
    model = _tiny(name, num_classes=3).train()
    x, y = _x(4), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    stem = model.get_parameter(model.pretrained_cfg['first_conv'] + '.weight')
    assert torch.isfinite(stem.grad).all() and stem.grad.abs().sum() > 0
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _reduce(pool, samples):
    """The reduction and the root of CovPool applied by hand to (B, C, N) samples."""
    y = torch.relu(pool.bn(pool.conv(samples.unsqueeze(-1))))
    return triu_vec(timm_gcp.sqrtm(covariance(y, dtype=pool.sqrtm.compute_dtype), pool.sqrtm.method)).to(
        samples.dtype)


@pytest.mark.parametrize('family', ['vit_small_patch16_224_gcp', 'deit_small_patch16_224_gcp'])
def test_tokens_covariance_is_over_the_patch_tokens(family):
    """The class token is no sample of the covariance; with gcp_cls_token it leads the pooled vector, and the
    classifier is the sum of a class-token classifier and a GCP classifier (So-ViT)."""
    model = _tiny(f'{family}_{EIGEN_METHOD}', num_classes=5).eval()
    x = _x()
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 17, 32)  # 16 patches at 64 px + the class token, after the final norm
    pooled = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(pooled, _reduce(model.global_pool, tokens[:, 1:].transpose(1, 2)))
    other = tokens.clone()
    other[:, 0] += 10.
    torch.testing.assert_close(model.forward_head(other, pre_logits=True), pooled, rtol=0, atol=0)

    both = _tiny(f'{family}_{EIGEN_METHOD}', num_classes=5, gcp_cls_token=True).eval()
    assert both.head_hidden_size == 32 + 36 and both.fc.in_features == 68
    tokens = both.forward_features(x)
    pre = both.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(pre[:, :32], tokens[:, 0], rtol=0, atol=0)
    w, b = both.fc.weight, both.fc.bias
    cls_logits = tokens[:, 0] @ w[:, :32].T
    gcp_logits = _reduce(both.global_pool, tokens[:, 1:].transpose(1, 2)) @ w[:, 32:].T
    torch.testing.assert_close(both(x), cls_logits + gcp_logits + b)
    with pytest.raises(ValueError, match='gcp_cls_token=True needs a backbone with a class token'):
        _tiny('convnext_tiny_gcp_svd', gcp_cls_token=True)


def test_nhwc_and_convnext_head_norm_values():
    """Swin's NHWC map is pooled position by position as the NCHW map would be; ConvNeXt's head.norm is applied to
    every position before the reduction."""
    swin = _tiny(f'swin_tiny_patch4_window7_224_gcp_{EIGEN_METHOD}').eval()
    x = _x()
    feats = swin.forward_features(x)
    assert feats.shape == (2, 2, 2, 128)
    torch.testing.assert_close(swin.forward_head(feats, pre_logits=True),
        _reduce(swin.global_pool, feats.permute(0, 3, 1, 2).flatten(2)))
    convnext = _tiny(f'convnext_tiny_gcp_{EIGEN_METHOD}').eval()
    convnext.backbone.head.norm.weight.data.uniform_(0.5, 2.)  # not the identity LayerNorm of a fresh model
    feats = convnext.forward_features(x)
    normed = convnext.backbone.head.norm(feats)
    torch.testing.assert_close(convnext.forward_head(feats, pre_logits=True),
        _reduce(convnext.global_pool, normed.flatten(2)))


@pytest.mark.parametrize('family', [
    'convnext_tiny_gcp', 'vit_small_patch16_224_gcp', 'swin_tiny_patch4_window7_224_gcp'])
def test_global_pool_empty_and_dense_classifier(family):
    """Without pooling, forward returns what the backbone hands its pooling (its own layout); with classes it
    classifies every position or token."""
    name = f'{family}_{NS_METHOD}'
    model = _tiny(name, num_classes=0, global_pool='').eval()
    x = _x()
    expected = model.backbone.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    dense = _tiny(name, num_classes=4, global_pool='').eval()
    feats = dense.backbone.forward_head(dense.forward_features(x), pre_logits=True)
    logits = dense(x)
    if FULL[family][2] == 'NCHW':
        ref = torch.einsum('bchw,kc->bkhw', feats, dense.fc.weight.flatten(1)) + dense.fc.bias[:, None, None]
    else:
        ref = feats @ dense.fc.weight.T + dense.fc.bias
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    dense.reset_classifier(3, 'gcp')  # pooling rebuilt, on the remembered method
    assert isinstance(dense.global_pool, CovPool) and dense(x).shape == (2, 3)
    assert get_gcp_method(dense) == (NS_METHOD, {})


@pytest.mark.parametrize('name', ['convnext_tiny_gcp_svd', 'swin_tiny_patch4_window7_224_gcp_isqrt',
    'vit_small_patch16_224_gcp_isqrt', pytest.param('regnety_032_gcp_svd', marks=pytest.mark.slow)])
def test_intermediates_features_only_and_prune(name):
    model = _tiny(name).eval()
    x = _x()
    final, inter = model.forward_intermediates(x)
    ref_final, ref_inter = model.backbone.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(inter, ref_inter, rtol=0, atol=0)
    assert [i['module'] for i in model.feature_info] == [f'backbone.{i["module"]}' for i in model.backbone.feature_info]
    last = len(model.feature_info) - 1
    taps = sorted({min(1, last), last})
    # hooks and FX give what the tapped module returns: tokens for a ViT, whose maps only the getter makes
    for cls in ('getter',) if FULL[family_of(name)][2] == 'NLC' else ('getter', 'fx', 'hook'):
        feat = _tiny(name, features_only=True, out_indices=taps, feature_cls=cls).eval()  # same seed and init
        # NCHW from the getter (forward_intermediates), the backbone's own layout from hooks and FX
        outs = [o.permute(0, 3, 1, 2) if getattr(feat, 'output_fmt', 'NCHW') == 'NHWC' else o for o in feat(x)]
        assert [o.shape[1] for o in outs] == feat.feature_info.channels() == [model.feature_info[i]['num_chs']
            for i in taps]
        for o, i in zip(outs, taps):
            torch.testing.assert_close(o, inter[i], rtol=0, atol=0)
    every = _tiny(name, features_only=True)  # default: every tap of the backbone
    assert len(every.feature_info) == len(model.feature_info)
    pruned = copy.deepcopy(model)
    kept = pruned.prune_intermediate_layers(indices=[taps[0]])
    assert list(kept) == [taps[0]] and isinstance(pruned.fc, nn.Identity) and pruned.global_pool.pool_type == ''
    torch.testing.assert_close(pruned.forward_intermediates(x, indices=[taps[0]], intermediates_only=True)[0],
        inter[taps[0]], rtol=0, atol=0)


def test_intermediates_pass_the_backbones_own_arguments():
    """Arguments beyond timm's common ones reach the backbone: a ViT's class tokens and its token layout."""
    model = _tiny('vit_small_patch16_224_gcp_isqrt').eval()
    x = _x()
    got = model.forward_intermediates(x, indices=1, output_fmt='NLC', return_prefix_tokens=True,
                                      intermediates_only=True)
    ref = model.backbone.forward_intermediates(x, indices=1, output_fmt='NLC', return_prefix_tokens=True,
                                               intermediates_only=True)
    assert isinstance(got[0], tuple) and got[0][1].shape[1] == model.backbone.num_prefix_tokens
    torch.testing.assert_close(got[0][0], ref[0][0], rtol=0, atol=0)
    torch.testing.assert_close(got[0][1], ref[0][1], rtol=0, atol=0)


@pytest.mark.parametrize('name', ['convnext_tiny_gcp_svd', 'vit_small_patch16_224_gcp_isqrt',
    pytest.param('swin_tiny_patch4_window7_224_gcp_pade', marks=pytest.mark.slow)])
def test_grad_checkpointing_gives_the_same_output_and_gradients(name):
    model = _tiny(name, num_classes=3).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = _x(4)
    torch.manual_seed(1)
    model(x).square().sum().backward()
    torch.manual_seed(1)
    ckpt(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize('family', BACKBONE_FAMILIES)
def test_group_matcher_and_layer_decay(family):
    """The backbone's groups, stem first; the GCP head in the last group at the full learning rate."""
    model = _tiny(f'{family}_{EIGEN_METHOD}')
    groups = group_parameters(model, model.group_matcher(coarse=False))
    head = [n for n, _ in model.named_parameters() if n.startswith(('global_pool.', 'fc.'))]
    assert set(head) <= set(groups[max(groups)]) and len(groups) > 2
    assert model.pretrained_cfg['first_conv'] + '.weight' in groups[0]
    scale = {}
    for g in param_groups_layer_decay(model, weight_decay=1e-4, layer_decay=0.5):
        scale.update({id(p): g['lr_scale'] for p in g['params']})
    named = dict(model.named_parameters())
    assert {scale[id(named[n])] for n in head} == {1.0}
    assert scale[id(named[model.pretrained_cfg['first_conv'] + '.weight'])] < 1.0
    for pattern in model.no_weight_decay():  # the backbone's exemptions, under backbone.
        assert pattern.startswith('backbone.')


def test_no_weight_decay_names_real_parameters():
    model = _tiny('vit_small_patch16_224_gcp_svd')
    names = set(dict(model.named_parameters()))
    assert {'backbone.pos_embed', 'backbone.cls_token'} <= model.no_weight_decay()
    assert {n for n in model.no_weight_decay() if n in names} >= {'backbone.pos_embed', 'backbone.cls_token'}


@pytest.mark.parametrize('name', ['convnext_tiny_gcp_svd', 'vit_small_patch16_224_gcp_isqrt'])
def test_in_chans_device_dtype_bf16_channels_last_autocast(name):
    model = _tiny(name, in_chans=1, num_classes=4, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.eval()(_x(chans=1).double()).shape == (2, 4)
    model = _tiny(name, num_classes=4).eval()
    x = _x()
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits through the backbone; allow 5% of the largest logit
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize('name', ['convnext_tiny_gcp_pade', 'vit_small_patch16_224_gcp_svd',
    'swin_tiny_patch4_window7_224_gcp_isqrt'])
def test_fx_graph_keeps_the_root_a_leaf_with_the_same_gradient(name):
    model = _tiny(name, num_classes=3).double().eval()
    fx = create_feature_extractor(model, {'global_pool.sqrtm': 'root', 'fc': 'out'})
    assert any(n.op == 'call_module' and n.target == 'global_pool.sqrtm' for n in fx.graph.nodes)
    x = _x().double()
    out_fx = fx(x)['out']
    torch.testing.assert_close(out_fx, model(x), rtol=0, atol=0)
    stem = model.pretrained_cfg['first_conv'] + '.weight'
    g_fx = torch.autograd.grad(out_fx.sum(), fx.get_parameter(stem))[0]
    g = torch.autograd.grad(model(x).sum(), model.get_parameter(stem))[0]
    torch.testing.assert_close(g_fx, g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('name', ['convnext_tiny_gcp_isqrt', 'vit_small_patch16_224_gcp_isqrt'])
def test_hybrid_switch_changes_the_function_not_the_weights(name):
    model = _tiny(name, num_classes=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x()
    out = model(x)
    assert set_gcp_method(model, EIGEN_METHOD, eps=1e-12) == 1
    assert get_gcp_method(model) == (EIGEN_METHOD, {'eps': 1e-12})
    assert (model.gcp_method, model.gcp_kwargs) == (EIGEN_METHOD, {'eps': 1e-12})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model._model_args['gcp_method'] == EIGEN_METHOD and model._model_args['gcp_kwargs'] == {'eps': 1e-12}
    assert not torch.equal(model(x), out)  # another function of the same weights


@pytest.mark.slow
def test_torch_compile_forward_and_backward():
    """On the token layout (the NCHW head is compiled by the ResNet test in test_models.py)."""
    model = _tiny('vit_small_patch16_224_gcp_isqrt', num_classes=3).eval()
    x = _x()
    ref = model(x)
    w = model.global_pool.conv.weight
    g = torch.autograd.grad(ref.sum(), w)[0]
    out = torch.compile(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), w)[0], g, rtol=1e-4, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError):
        timm.create_model('convnext_tiny_gcp_svd', device='meta', not_an_argument=1)
    with pytest.raises(TypeError, match='built on convnext_tiny'):
        timm.create_model('convnext_tiny_gcp_svd', backbone='resnet18')
    with pytest.raises(ValueError, match="unknown matrix square-root method 'nope'"):
        timm.create_model('generic_gcp_svd', gcp_method='nope')
    with pytest.raises(ValueError, match='not a timm model'):
        timm.create_model('generic_gcp_svd', backbone='no_such_net')
    with pytest.raises(ValueError, match='is a GCP model already'):
        timm.create_model('generic_gcp_svd', backbone='resnet18_gcp_isqrt', device='meta')
    with pytest.raises(ValueError, match="has no pretrained tag 'nope'"):
        timm.create_model('generic_gcp_svd.nope', backbone='resnet18', device='meta')


def test_tiny_kwargs_cover_every_family():
    assert set(TINY_BACKBONE_KWARGS) == set(BACKBONE_FAMILIES)


class _PoolsAnyway(nn.Module):
    """A timm-style model whose forward_head pools whatever global_pool says (no map or tokens to take)."""

    def __init__(self, num_classes=1000, in_chans=3, device=None, dtype=None):
        super().__init__()
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, 8, 8
        self.conv = nn.Conv2d(in_chans, 8, 3, stride=4, device=device, dtype=dtype)

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@register_model
def toy_pools_anyway(pretrained=False, **kwargs):
    return build_model_with_cfg(_PoolsAnyway, 'toy_pools_anyway', pretrained, **kwargs)


def test_a_backbone_without_a_map_or_tokens_is_refused_naming_what_it_gives():
    with pytest.raises(ValueError, match=r'needs a feature map .* gives a pooled vector of shape \(1, 8\)'):
        timm_gcp.create_model('toy_pools_anyway_gcp_svd')

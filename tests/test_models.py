"""timm API tests of the GCP models: every registered name cheaply (meta device), a representative subset for real."""
import argparse
import copy
import functools
import importlib

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg, group_parameters
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from timm.utils import ParseKwargs

import timm_gcp
from timm_gcp import METHODS, get_gcp_method
from timm_gcp.layers import CovPool
from timm_gcp.models.resnet_gcp import ResNetGcp

from helpers.models import (ALL_NAMES, BACKBONE_NAMES, EIGEN_METHOD, FAMILIES, NS_METHOD, OTHER_HEAD_NAMES,
    family_method_pairs, family_of, representative_names, small_kwargs)

REPR = representative_names()
IMG = 64  # ResNet 2×2 / ls1 4×4 / AlexNet 3×3 final maps: small but more than one spatial sample


def _x(name, b=2, size=IMG, chans=3, seed=0):
    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _small(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**small_kwargs(name), **kwargs})


@functools.lru_cache(maxsize=None)
def _plain_resnet_keys(arch):
    return [k for k in timm.create_model(arch, device='meta').state_dict() if not k.startswith('fc.')]


# ---------------------------------------------------------------- registry and cfgs (every name)

def test_named_methods_exist():
    """The methods the model tests name are registered and of the kind the tests rely on."""
    assert METHODS[EIGEN_METHOD].eigen and not METHODS[NS_METHOD].eigen


def test_every_family_and_method_is_registered():
    listed = set(timm.list_models('*_gcp_*'))
    assert set(ALL_NAMES) <= listed
    # what the model modules register, counted against the method registry (not against ALL_NAMES, built the same way)
    # every root method, and the DropCov head (no root), on each of the 7 ResNet families and on AlexNet
    assert len(timm.list_models(module='resnet_gcp')) == 7 * (len(METHODS) + 1)
    assert timm.list_models(module='alexnet_gcp') == sorted(f'alexnet_gcp_{m}' for m in [*METHODS, 'dropcov'])
    for name in ALL_NAMES:
        assert timm.is_model(name)
        assert timm.models.get_arch_name(name) == name
    ours = {n for module in ('resnet_gcp', 'alexnet_gcp', 'backbone_gcp') for n in timm.list_models(module=module)}
    assert ours == set(ALL_NAMES) | set(BACKBONE_NAMES) | set(OTHER_HEAD_NAMES)
    assert ours == {n for n in listed if not n.startswith('_')}


def test_list_pretrained_lists_only_weights_that_exist():
    for name in timm.list_pretrained('*_gcp_*'):
        cfg = get_pretrained_cfg(name)
        assert cfg.has_weights, name


@pytest.mark.parametrize('name', ALL_NAMES)
def test_pretrained_cfg_is_complete_and_true(name):
    cfg = get_pretrained_cfg(name)
    assert cfg is not None and cfg.architecture == name
    family = family_of(name)
    pool = {'alexnet_gcp': (13, 13), 'resnet50_ls1_gcp': (14, 14), 'resnet101_ls1_gcp': (14, 14)}.get(family, (7, 7))
    assert cfg.input_size == (3, 224, 224) and cfg.pool_size == pool
    assert cfg.crop_pct == 0.875 or cfg.has_weights
    assert cfg.interpolation in ('bilinear', 'bicubic')
    assert len(cfg.mean) == 3 and len(cfg.std) == 3
    assert cfg.first_conv == {'alexnet_gcp': 'features.0', 'resnet50d_gcp': 'conv1.0'}.get(family, 'conv1')
    assert cfg.classifier == 'fc' and cfg.num_classes == 1000
    assert cfg.license and cfg.origin_url.startswith('https://')
    assert 'arXiv:2105.02498' in cfg.paper_ids


@pytest.mark.parametrize('name', ALL_NAMES)
def test_meta_build_layout_and_keys(name):
    """Built on the meta device: final map size at 224 px equals the cfg's pool_size; head sizes; key layout."""
    model = timm.create_model(name, device='meta')
    assert next(model.parameters()).device.type == 'meta'
    cfg = model.pretrained_cfg
    feats = model.forward_features(torch.empty(1, 3, 224, 224, device='meta'))
    assert tuple(feats.shape[-2:]) == cfg['pool_size']
    assert feats.shape[1] == model.num_features == model.feature_info[-1]['num_chs']
    assert model(torch.empty(2, 3, 224, 224, device='meta')).shape == (2, 1000)
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
    assert isinstance(model.global_pool, CovPool) and model.global_pool.out_features == 32896
    assert model.get_classifier() is model.fc and model.fc.out_features == 1000
    if name.startswith('alexnet'):
        assert model.num_features == 256 and model.head_hidden_size == 4096
        assert model.pre_logits.fc1.in_features == 32896
        assert list(model.state_dict())[-12:] == ['global_pool.conv.weight', 'global_pool.bn.weight',
            'global_pool.bn.bias', 'global_pool.bn.running_mean', 'global_pool.bn.running_var',
            'global_pool.bn.num_batches_tracked', 'pre_logits.fc1.weight', 'pre_logits.fc1.bias',
            'pre_logits.fc2.weight', 'pre_logits.fc2.bias', 'fc.weight', 'fc.bias']
    else:
        assert model.head_hidden_size == 32896 == model.fc.in_features
        plain = _plain_resnet_keys(family_of(name).split('_')[0])
        ours = list(model.state_dict())
        assert ours == plain + ['global_pool.conv.weight', 'global_pool.bn.weight', 'global_pool.bn.bias',
            'global_pool.bn.running_mean', 'global_pool.bn.running_var', 'global_pool.bn.num_batches_tracked',
            'fc.weight', 'fc.bias']
    assert get_gcp_method(model) == (name.rsplit('_', 1)[1], {})
    model.reset_classifier(10)
    assert model.fc.weight.device.type == 'meta' and model.fc.weight.shape == (10, model.head_hidden_size)


@pytest.mark.parametrize('name', ALL_NAMES)
def test_unknown_kwarg_is_type_error(name):
    with pytest.raises(TypeError):
        timm.create_model(name, device='meta', not_an_argument=1)


def test_resnet50_isqrt_parameter_count_matches_fast_mpn_cov():
    # the published fast-MPN-COV iSQRT-COV ResNet-50 has 56,929,832 parameters
    for name in ('resnet50_ls1_gcp_isqrt', 'resnet50_gcp_isqrt'):
        model = timm.create_model(name, device='meta')
        assert sum(p.numel() for p in model.parameters()) == 56_929_832


def test_alexnet_parameter_count_matches_the_paper_layout():
    model = timm.create_model(f'alexnet_gcp_{EIGEN_METHOD}', device='meta')
    convs = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
    n = sum(i * o * k * k + o + 2 * o for i, o, k in convs)  # conv weight + bias, BN weight + bias
    n += 256 * 256 + 2 * 256  # 1×1 reduction (no bias) + BN
    n += 32896 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) == n
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


# ---------------------------------------------------------------- the timm API, for real on small models

@pytest.mark.parametrize('name', family_method_pairs())
def test_every_family_and_method_trains(name):
    """One SGD step in training mode: finite loss, finite non-zero gradients reaching the stem, finite weights after.

    (Whether the loss then falls depends on the method: SVD-TopN's biased gradient is known not to converge.)"""
    model = _small(name, num_classes=3).train()
    x, y = _x(name, b=4), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    stem = model.get_parameter(model.pretrained_cfg['first_conv'] + '.weight')
    assert torch.isfinite(loss) and torch.isfinite(stem.grad).all() and stem.grad.abs().sum() > 0
    assert torch.isfinite(model.global_pool.conv.weight.grad).all()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize('name', REPR)
def test_forward_shapes_num_classes_and_pre_logits(name):
    model = _small(name, num_classes=7).eval()
    x = _x(name)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(model.fc(pre), out, rtol=0, atol=0)
    if not name.startswith('alexnet'):
        assert model.head_hidden_size == 36  # gcp_dim 8: 8·9/2
    headless = _small(name, num_classes=0).eval()
    assert isinstance(headless.fc, nn.Identity)
    torch.testing.assert_close(headless(x), headless.forward_head(headless.forward_features(x), pre_logits=True))


@pytest.mark.parametrize('name', REPR)
def test_global_pool_empty_returns_the_feature_map(name):
    model = _small(name, num_classes=0, global_pool='').eval()
    x = _x(name)
    feats = model.forward_features(x)
    torch.testing.assert_close(model(x), feats, rtol=0, atol=0)
    assert model.head_hidden_size == model.num_features
    # with classes but no pooling, every position is classified (a 1×1 conv over the channels, as timm's heads do)
    dense = _small(name, num_classes=5, global_pool='').eval()
    logits = dense(x)
    assert logits.shape == (2, 5, *feats.shape[-2:])
    expected = torch.einsum('bchw,kc->bkhw', dense.forward_features(x), dense.fc.weight.flatten(1))
    expected = expected + dense.fc.bias[:, None, None]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='global_pool must be'):
        _small(name, global_pool='avg')


@pytest.mark.parametrize('name', REPR + ['convnext_tiny_gcp_svd', 'vit_small_patch16_224_gcp_isqrt'])
def test_reset_classifier_keeps_pool_device_dtype_and_frozen_state(name):
    """ResNet, AlexNet and GcpNet (NCHW and token backbones) share the head and its reset API."""
    model = _small(name, num_classes=5).double().eval()
    pool = model.global_pool
    pool.requires_grad_(False)
    model.reset_classifier(3)
    assert model.global_pool is pool and not any(p.requires_grad for p in pool.parameters())
    assert model.num_classes == 3 and model.fc.out_features == 3
    assert model.fc.weight.dtype == torch.float64 and model.fc.weight.requires_grad and not model.fc.training
    x = _x(name).double()
    assert model(x).shape == (2, 3) and model(x).dtype == torch.float64
    model.reset_classifier(0, '')
    if family_of(name) in FAMILIES:  # ResNet/AlexNet: no pooling and no classes give forward_features
        torch.testing.assert_close(model(x), model.forward_features(x), rtol=0, atol=0)
    model.reset_classifier(4, 'gcp')  # pooling rebuilt fresh, on the model's dtype
    assert isinstance(model.global_pool, CovPool) and model.global_pool is not pool
    assert model.global_pool.conv.weight.dtype == torch.float64 and not model.global_pool.training
    assert model(x).shape == (2, 4)
    with pytest.raises(ValueError, match='global_pool must be'):
        model.reset_classifier(5, 'avg')
    assert model.num_classes == 4 and isinstance(model.global_pool, CovPool)  # a refused reset changes nothing
    assert model.fc.out_features == 4
    # timm's contract helper: built without classifier and pooling, on meta, reset to 0 and then 2 classes: the
    # classifier's parameters are on the parent's device and dtype
    meta = timm.create_model(name, num_classes=0, global_pool='', device='meta', **small_kwargs(name))
    meta.to(dtype=torch.float64)
    meta.reset_classifier(0)
    meta.reset_classifier(2)
    params = list(meta.get_classifier().parameters())
    assert params and all(p.device.type == 'meta' and p.dtype == torch.float64 for p in params)
    if family_of(name) in FAMILIES:  # a classifier without pooling classifies every position of the map
        model.reset_classifier(0, '')
        model.reset_classifier(2)
        assert model.global_pool.pool_type == '' and model.num_classes == 2
        assert model(x).shape[:2] == (2, 2) and model(x).dim() == 4


@functools.lru_cache(maxsize=None)
def _timm_prune_resizes_num_features():
    """Whether the installed timm's own ResNet sets num_features to the last kept tap when pruned (timm >= 1.0.31;
    1.0.29 leaves it): the GCP ResNet inherits that behaviour and is checked against it."""
    ref = timm.create_model('resnet18', device='meta')
    ref.prune_intermediate_layers(indices=[1, 2])
    return ref.num_features == ref.feature_info[2]['num_chs']


@pytest.mark.parametrize('name', REPR)
def test_forward_intermediates_and_prune(name):
    model = _small(name).eval()
    x = _x(name)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    assert len(inter) == len(model.feature_info)
    for t, info in zip(inter, model.feature_info):
        assert t.shape[1] == info['num_chs']
        assert t.shape[-1] == -(-IMG // info['reduction']) or t.shape[-1] == IMG // info['reduction'] \
            or name.startswith('alexnet')
    only = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    torch.testing.assert_close(only, inter[1:3], rtol=0, atol=0)
    kept = model.prune_intermediate_layers(indices=[1, 2])
    assert list(kept) == [1, 2]
    if name.startswith('alexnet') or _timm_prune_resizes_num_features():
        assert model.num_features == model.feature_info[2]['num_chs']
    after = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    torch.testing.assert_close(after, inter[1:3], rtol=0, atol=0)


@pytest.mark.parametrize('name', REPR)
def test_grad_checkpointing_gives_the_same_output_and_gradients(name):
    model = _small(name, num_classes=3).eval()
    x = _x(name)
    out = model(x)
    g = torch.autograd.grad(out.sum(), model.global_pool.conv.weight)[0]
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    g_ckpt = torch.autograd.grad(out_ckpt.sum(), model.global_pool.conv.weight)[0]
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # a few training steps of two models; the output/gradient equality above runs by default
@pytest.mark.parametrize('name', REPR)
def test_grad_checkpointing_trains_with_the_same_gradients(name):
    """Training mode, every parameter: checkpointed segments must not start with an in-place op on their saved input
    (AlexNet's conv → BN → in-place ReLU sequence once failed in backward when checkpointed module by module)."""
    model = _small(name, num_classes=3).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = _x(name, b=4)
    model(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        # the same ops recomputed on the same data: only summation order may differ
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
    final, _ = ckpt.forward_intermediates(x)
    final.sum().backward()  # forward_intermediates honours checkpointing too


@pytest.mark.parametrize('family', FAMILIES)
def test_group_matcher_puts_the_head_in_its_own_last_group(family):
    model = timm.create_model(f'{family}_{EIGEN_METHOD}', device='meta')
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        last = groups[max(groups)]
        head = [n for n, _ in model.named_parameters() if n.startswith(('global_pool.', 'fc.', 'pre_logits.'))]
        assert sorted(last) == sorted(head)
        assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize('family', ['resnet18_gcp', 'alexnet_gcp'])
def test_layer_decay_scales_a_conv_and_its_norm_alike(family):
    """timm's layer-wise lr decay: a conv and the BN that normalises it are one layer (one lr scale); deeper layers
    get larger scales and the GCP head the full learning rate."""
    model = _small(f'{family}_{EIGEN_METHOD}')
    scale = {}
    for g in param_groups_layer_decay(model, weight_decay=1e-4, layer_decay=0.5):
        scale.update({id(p): g['lr_scale'] for p in g['params']})
    names = {id(p): n for n, p in model.named_parameters()}
    if family == 'alexnet_gcp':
        convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
        pairs = [(model.features[i], model.features[i + 1]) for i in convs]
    else:
        pairs = [(model.conv1, model.bn1)] + [(blk.conv1, blk.bn1) for blk in model.layer2]
    for conv, bn in pairs:
        assert scale[id(conv.weight)] == scale[id(bn.weight)] == scale[id(bn.bias)], names[id(conv.weight)]
    per_layer = [scale[id(conv.weight)] for conv, _ in pairs]
    assert per_layer == sorted(per_layer) and len(set(per_layer)) == len(per_layer)
    head = [p for n, p in model.named_parameters() if n.startswith(('global_pool.', 'pre_logits.', 'fc.'))]
    assert {scale[id(p)] for p in head} == {1.0} and max(per_layer) < 1.0


@pytest.mark.parametrize('family', ['resnet18_gcp', 'alexnet_gcp'])
def test_weight_decay_groups(family):
    model = _small(f'{family}_{EIGEN_METHOD}')
    assert model.no_weight_decay() == set()
    opt = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4)
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert id(model.global_pool.conv.weight) in decayed and id(model.fc.weight) in decayed
    assert id(model.global_pool.bn.weight) not in decayed and id(model.fc.bias) not in decayed


@pytest.mark.parametrize('name', REPR)
def test_features_only(name):
    x = _x(name)
    ref = _small(name).eval()
    _, inter = ref.forward_intermediates(x)
    for cls in ('list', 'fx'):
        feat = _small(name, features_only=True, out_indices=(1, 3), feature_cls=cls).eval()  # same seed, same init
        outs = feat(x)
        assert [o.shape[1] for o in outs] == feat.feature_info.channels() == [ref.feature_info[i]['num_chs']
            for i in (1, 3)]
        torch.testing.assert_close(outs, [inter[1], inter[3]], rtol=0, atol=0)


@pytest.mark.parametrize('name', REPR)
def test_in_chans_drop_rate_device_dtype(name):
    model = _small(name, in_chans=1, num_classes=4, dtype=torch.float64, device='cpu')
    assert model.conv1.weight.shape[1] == 1 if hasattr(model, 'conv1') else model.features[0].weight.shape[1] == 1
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = model.eval()(_x(name, chans=1).double())
    assert out.shape == (2, 4) and out.dtype == torch.float64
    dropped = _small(name, num_classes=4, drop_rate=0.5).train()
    x = _x(name)
    torch.manual_seed(1)
    a = dropped(x)
    torch.manual_seed(2)
    b = dropped(x)
    assert not torch.allclose(a, b)  # dropout active in training
    dropped.eval()
    torch.testing.assert_close(dropped(x), dropped(x), rtol=0, atol=0)


@pytest.mark.parametrize('name', REPR)
def test_bfloat16_and_channels_last(name):
    model = _small(name, num_classes=4).eval()
    x = _x(name)
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    # bf16 keeps ~3 significant digits through the backbone; measured ≤ 0.6% of max|logit| here, allow 3%
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.03 * ref.abs().max().item())


@pytest.mark.parametrize('name', REPR)
def test_cpu_autocast_bfloat16_train_step(name):
    """Under torch.autocast the backbone and classifier run in bf16, the head's covariance and root in fp32/fp64
    (autocast kept out): logits close to fp32, finite fp32 gradients on every parameter."""
    model = _small(name, num_classes=4).eval()
    x = _x(name)
    ref = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.03 * ref.abs().max().item())  # as bf16 weights
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x).float(), torch.tensor([0, 3]))
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


def test_gcp_kwargs_dim_and_last_stride():
    name = f'resnet18_gcp_{NS_METHOD}'
    model = _small(name, gcp_kwargs={'iters': 6})
    assert get_gcp_method(model) == (NS_METHOD, {'iters': 6})
    with pytest.raises(ValueError, match='does not take option'):
        _small(name, gcp_kwargs={'bogus': 1})
    with pytest.raises(TypeError, match='gcp_kwargs must be a dict'):
        _small(name, gcp_kwargs='iters=3')
    # gcp_dim=0 is "no reduction" (timm's create_model drops None-valued kwargs, so None cannot pass through it)
    model = _small(name, gcp_dim=0)
    assert isinstance(model.global_pool.conv, nn.Identity) and model.head_hidden_size == 512 * 513 // 2
    model = ResNetGcp(**dict(block=timm.models.resnet.BasicBlock, layers=(1, 1, 1, 1)), gcp_dim=None,
        gcp_method=NS_METHOD, device='meta')
    assert model.head_hidden_size == 512 * 513 // 2
    # last stride 1 doubles the final map and halves the final reduction, without dilation
    std, ls1 = _small(name), _small(name, last_stride=1)
    x = _x(name)
    assert ls1.forward_features(x).shape[-1] == 2 * std.forward_features(x).shape[-1]
    assert ls1.feature_info[-1]['reduction'] == 16 and all(
        m.dilation == (1, 1) for m in ls1.layer4.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match='last_stride'):
        _small(name, last_stride=3)
    with pytest.raises(ValueError, match='output_stride'):
        _small(name, last_stride=1, output_stride=16)


@pytest.mark.parametrize('bad, error, match', [
    (dict(gcp_method='nope'), ValueError, "unknown matrix square-root method 'nope'"),
    (dict(gcp_kwargs={'bogus': 1}), ValueError, 'does not take option'),
    (dict(gcp_kwargs='iters=3'), TypeError, 'gcp_kwargs must be a dict'),
    (dict(gcp_dim=-1), ValueError, 'gcp_dim must be a positive int'),
    (dict(gcp_dim=2.5), ValueError, 'gcp_dim must be a positive int'),
    (dict(global_pool='avg'), ValueError, 'global_pool must be'),
])
def test_bad_gcp_arguments_fail_before_the_backbone_is_built(bad, error, match, monkeypatch):
    """A typo in a GCP argument must not cost a full backbone build (seconds for a ResNet-101) before it is named."""
    def no_build(*args, **kwargs):
        raise AssertionError('backbone built before the GCP arguments were checked')
    monkeypatch.setattr(timm.models.resnet.ResNet, '__init__', no_build)
    monkeypatch.setattr(nn.Conv2d, '__init__', no_build)
    for name in (f'resnet101_gcp_{EIGEN_METHOD}', f'alexnet_gcp_{EIGEN_METHOD}'):
        with pytest.raises(error, match=match):
            timm.create_model(name, **bad)


def test_model_kwargs_from_the_command_line():
    """timm's train.py parses --model-kwargs with ParseKwargs; the values it produces build the model."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    args = parser.parse_args(
        ['--model-kwargs', 'gcp_dim=8', 'drop_rate=0.2', 'last_stride=1', 'gcp_kwargs={"iters": 2}'])
    model = timm.create_model(f'resnet18_gcp_{NS_METHOD}', **args.model_kwargs)
    assert model.global_pool.gcp_dim == 8 and model.drop_rate == 0.2 and model.last_stride == 1
    assert get_gcp_method(model) == (NS_METHOD, {'iters': 2})


def test_hybrid_switch_on_a_built_model():
    model = _small(f'resnet18_gcp_{NS_METHOD}', num_classes=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert timm_gcp.set_gcp_method(model, EIGEN_METHOD) == 1
    assert get_gcp_method(model) == (EIGEN_METHOD, {})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model._model_args['gcp_method'] == EIGEN_METHOD  # what timm exports in config.json


@pytest.mark.parametrize('name', [f'resnet18_gcp_{NS_METHOD}', f'alexnet_gcp_{NS_METHOD}'])
def test_gcp_method_attributes_follow_a_switch(name):
    """After the hybrid switch the model reports the method it runs, and a pooling rebuilt after removal (or a
    prune) uses that method, as the exported config says, not the one the model was built with."""
    model = _small(name, num_classes=3).eval()
    timm_gcp.set_gcp_method(model, EIGEN_METHOD, eps=1e-12)
    assert (model.gcp_method, model.gcp_kwargs) == (EIGEN_METHOD, {'eps': 1e-12})
    model.reset_classifier(0, '')
    assert (model.gcp_method, model.gcp_kwargs) == (EIGEN_METHOD, {'eps': 1e-12})
    model.reset_classifier(3, 'gcp')
    assert get_gcp_method(model) == (EIGEN_METHOD, {'eps': 1e-12})
    assert model._model_args['gcp_method'] == EIGEN_METHOD  # what save_for_hf exports agrees


# timm >= 1.0.31 records create_model's arguments and exports them in config.json; older timm exports only the
# model_args given to save_for_hf, as a user of those versions must pass them
_TIMM_RECORDS_MODEL_ARGS = hasattr(importlib.import_module('timm.models._hub'), 'get_model_args')


def _save_for_hf(model, path, **model_args):
    timm.models.save_for_hf(model, str(path), model_args=None if _TIMM_RECORDS_MODEL_ARGS else model_args)


def test_save_for_hf_and_local_dir_round_trip(tmp_path):
    """timm's own export/import (config.json + model.safetensors) rebuilds the model, after a method switch too."""
    model = _small(f'resnet18_gcp_{NS_METHOD}', num_classes=5).eval()
    timm_gcp.set_gcp_method(model, EIGEN_METHOD)
    _save_for_hf(model, tmp_path, gcp_method=EIGEN_METHOD, **small_kwargs('resnet18'))
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert isinstance(loaded, ResNetGcp) and get_gcp_method(loaded) == (EIGEN_METHOD, {})
    assert loaded.global_pool.gcp_dim == 8 and loaded.num_classes == 5
    x = _x('resnet18')
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.skipif(not _TIMM_RECORDS_MODEL_ARGS, reason='timm < 1.0.31 exports only the model_args it is given')
def test_save_for_hf_exports_dtype_and_device_options_by_name(tmp_path):
    """gcp_kwargs with a torch.dtype (at construction) or a torch.device (after a switch) still export as JSON, and
    the reloaded model computes the same."""
    model = _small(f'resnet18_gcp_{NS_METHOD}', num_classes=5, gcp_kwargs={'dtype': torch.float64}).eval()
    timm.models.save_for_hf(model, str(tmp_path / 'a'))
    loaded = timm.create_model(f'local-dir:{tmp_path / "a"}', pretrained=True).eval()
    assert get_gcp_method(loaded) == (NS_METHOD, {'dtype': 'float64'})
    x = _x('resnet18')
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    timm_gcp.set_gcp_method(model, EIGEN_METHOD, eig_device=torch.device('cpu'))
    timm.models.save_for_hf(model, str(tmp_path / 'b'))
    loaded = timm.create_model(f'local-dir:{tmp_path / "b"}', pretrained=True)
    assert get_gcp_method(loaded) == (EIGEN_METHOD, {'eig_device': 'cpu'})


def test_torchscript_refuses_with_the_reason():
    with pytest.raises(RuntimeError, match='TorchScript'):
        torch.jit.script(_small(f'resnet18_gcp_{EIGEN_METHOD}'))


@pytest.mark.slow
def test_torch_compile_forward_and_backward():
    model = _small(f'resnet18_gcp_{EIGEN_METHOD}', num_classes=3).eval()
    x = _x('resnet18', size=32 * 3)
    ref = model(x)
    g = torch.autograd.grad(ref.sum(), model.global_pool.conv.weight)[0]
    compiled = torch.compile(model)
    out = compiled(x)
    g_c = torch.autograd.grad(out.sum(), model.global_pool.conv.weight)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6)

"""The DropCov and SoT models (<family>_gcp_dropcov, <token family>_gcp_sot): names, published parameter counts, the
forward against hand-written references, and the timm API (reset_classifier, pre-logits, features, checkpoints, Hub
round trip, the refused method switch)."""
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_gcp
from timm_gcp.layers import CovPool, DropCovPool, SoTPool
from timm_gcp.models import parse_gcp_name

from helpers.models import (BACKBONE_FAMILIES, FAMILIES, OTHER_HEAD_NAMES, TOKEN_FAMILIES, small_kwargs,
    tiny_kwargs)


def _ref_triu(m):
    d = m.shape[-1]
    return torch.stack([m[:, i, j] for i in range(d) for j in range(i, d)], dim=1)


def _dropcov(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('resnet18_gcp_dropcov', num_classes=5, **{**small_kwargs('resnet18_gcp_dropcov'),
        **kwargs})


def _vit_sot(**kwargs):
    torch.manual_seed(0)
    name = 'vit_small_patch16_224_gcp_sot'
    return timm.create_model(name, num_classes=5, **{**tiny_kwargs(name), **kwargs})


def test_names_and_parsing():
    assert set(OTHER_HEAD_NAMES) <= set(timm.list_models('*_gcp_*'))
    assert set(timm.list_models('*_gcp_dropcov')) == {f'{f}_dropcov' for f in FAMILIES + BACKBONE_FAMILIES}
    assert set(timm.list_models('*_gcp_sot')) == {f'{f}_sot' for f in TOKEN_FAMILIES}
    parsed = parse_gcp_name('resnet50_ls1_gcp_dropcov.tv_in1k')
    assert (parsed.backbone, parsed.method, parsed.tag) == ('resnet50_ls1', 'dropcov', 'tv_in1k')
    assert parse_gcp_name('resnet50_gcp_isqrt').with_method('sot').arch == 'resnet50_gcp_sot'
    with pytest.raises(ValueError, match=r"unknown matrix square-root method 'sott' .*heads without a root: dropcov, sot"):
        parse_gcp_name('vit_small_patch16_224_gcp_sott')
    assert not timm.is_model('resnet50_gcp_sot')  # SoT is a token head: not registered on the CNN families
    assert 'DropCov' in timm.models.get_pretrained_cfg('resnet50_ls1_gcp_dropcov').paper_name  # a backbone-only tag
    assert timm.models.get_pretrained_cfg('alexnet_gcp_dropcov').origin_url == 'https://github.com/mingzeG/DropCov'
    assert timm.models.get_pretrained_cfg('deit_small_patch16_224_gcp_sot').paper_ids == 'arXiv:2104.10935'


def _reported_rows():
    from timm_gcp import zoo
    return [(h['name'], r) for h in zoo.load_registry()['heads'] for r in h['reported']]


def test_registry_reported_rows_name_our_models():
    rows = _reported_rows()
    assert {h for h, _ in rows} == {'dropcov', 'sot'}
    for head, r in rows:
        assert r['ours'] is None or (timm.is_model(r['ours']) and r['ours'].endswith(f'_gcp_{head}'))


@pytest.mark.parametrize('name, millions', [
    (r['ours'], r['params_m']) for _, r in _reported_rows() if r.get('params_m') is not None])
def test_parameter_counts_match_the_published_ones(name, millions):
    # DropCov's README: R34 29.6 M, R50 32.0 M, R101 51.0 M (zoo/registry.yaml), which is the 128-d reduction
    # (the default here)
    model = timm.create_model(name, device='meta')
    assert model.global_pool.gcp_dim == 128 and model.head_hidden_size == 128 * 129 // 2
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_dropcov_eval_is_reduce_covariance_triangle_fc():
    model = _dropcov().eval()
    assert isinstance(model.global_pool, DropCovPool) and model.global_pool.gcp_dim == 8  # the user's gcp_dim wins
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.forward_features(x)
        pool = model.global_pool
        y = F.relu(F.batch_norm(F.conv2d(f, pool.conv.weight), pool.bn.running_mean, pool.bn.running_var,
            pool.bn.weight, pool.bn.bias, eps=pool.bn.eps))
        s = y.flatten(2) - y.flatten(2).mean(dim=2, keepdim=True)
        ref = F.linear(_ref_triu(s @ s.transpose(1, 2) / s.shape[2]), model.fc.weight, model.fc.bias)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)  # float32 rounding


def test_dropcov_training_differs_from_eval_and_trains_every_head_parameter():
    model = _dropcov().train()
    x = torch.randn(4, 3, 64, 64)
    model(x).logsumexp(dim=1).sum().backward()
    head = dict(model.global_pool.named_parameters())
    assert set(head) == {'conv.weight', 'bn.weight', 'bn.bias', 'attn.weight'}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.values())
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(0)
        b = model(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the randomness is torch's RNG only
        model.eval()
        assert not torch.allclose(model(x), a)


def test_sot_logits_are_class_token_logits_plus_visual_logits():
    model = _vit_sot().eval()
    pool = model.global_pool
    assert isinstance(pool, SoTPool) and pool.cls_token and (pool.num_heads, pool.head_dim) == (6, 14)  # C = 32
    c = model.num_features
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.backbone.forward_head(model.forward_features(x), pre_logits=True)
        visual = pool(tokens)[:, c:]
        w = model.fc.weight
        ref = tokens[:, 0] @ w[:, :c].T + visual @ w[:, c:].T + model.fc.bias
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert model.head_hidden_size == c + 6 * 14 * 14


def test_sot_on_swin_is_visual_only():
    name = 'swin_tiny_patch4_window7_224_gcp_sot'
    model = timm.create_model(name, num_classes=3, **tiny_kwargs(name)).eval()
    pool = model.global_pool
    assert not pool.cls_token and pool.input_fmt == 'NHWC' and model.head_hidden_size == pool.out_features
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize('make', [_dropcov, _vit_sot])
def test_reset_classifier_and_pre_logits(make):
    model = make().eval()
    kind = type(model.global_pool)
    x = torch.randn(2, 3, 64, 64)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size)
    pool = model.global_pool
    model.reset_classifier(7)
    assert model.global_pool is pool and model(x).shape == (2, 7)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre)
    model.reset_classifier(0, '')
    assert not isinstance(model.global_pool, kind)
    model.reset_classifier(4, 'gcp')  # rebuilt: the same head kind and options
    assert type(model.global_pool) is kind and model(x).shape == (2, 4)
    assert model.gcp_method == kind.head_name


def test_features_only():
    feats = timm.create_model('resnet18_gcp_dropcov', features_only=True, **small_kwargs('resnet18_gcp_dropcov'))
    assert [f.shape[1] for f in feats(torch.randn(1, 3, 64, 64))] == feats.feature_info.channels()
    name = 'swin_tiny_patch4_window7_224_gcp_sot'
    feats = timm.create_model(name, features_only=True, **tiny_kwargs(name))
    assert len(feats(torch.randn(1, 3, 64, 64))) == len(feats.feature_info)


@pytest.mark.parametrize('make', [_dropcov, _vit_sot])
def test_checkpoint_and_hub_round_trip(tmp_path, make):
    from timm.models import save_for_hf
    model = make().eval()
    kind = type(model.global_pool)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    torch.save(model.state_dict(), tmp_path / 'ckpt.pth')
    other = make().eval()
    for p in other.parameters():
        torch.nn.init.zeros_(p)
    other.load_state_dict(torch.load(tmp_path / 'ckpt.pth', weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    assert model._model_args['gcp_method'] == kind.head_name  # what config.json records
    save_for_hf(model, str(tmp_path / 'hf'), safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    assert type(loaded.global_pool) is kind
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_method_switch_refuses_into_and_out_of_them():
    dropcov, sot = _dropcov(), _vit_sot(gcp_kwargs={'norm': 'svd'})  # SoT holding an exact root is still refused
    assert timm_gcp.get_gcp_method(dropcov) == ('dropcov', {})
    assert timm_gcp.get_gcp_method(sot) == ('sot', {'norm': 'svd'})
    for model, head in ((dropcov, 'dropcov'), (sot, 'sot')):
        with pytest.raises(ValueError, match=f"has a '{head}' head .*no matrix square root"):
            timm_gcp.set_gcp_method(model, 'isqrt')
    root = timm.create_model('resnet18_gcp_isqrt', num_classes=5, **small_kwargs('resnet18_gcp_isqrt'))
    for head in ('dropcov', 'sot'):
        with pytest.raises(ValueError, match=f"'{head}' is a head of its own"):
            timm_gcp.set_gcp_method(root, head)
    assert isinstance(root.global_pool, CovPool) and root.gcp_method == 'isqrt'  # nothing changed


def test_generic_path():
    torch.manual_seed(0)
    model = timm_gcp.create_model('mobilenetv3_small_050_gcp_dropcov', num_classes=3).eval()
    assert isinstance(model.global_pool, DropCovPool) and model.global_pool.gcp_dim == 128
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 3)
    vit = timm_gcp.create_model('vit_tiny_patch16_224_gcp_sot', num_classes=3, depth=1, img_size=64).eval()
    assert isinstance(vit.global_pool, SoTPool) and vit.global_pool.cls_token
    assert (vit.global_pool.num_heads, vit.global_pool.head_dim) == (6, 14)  # width 192: the Tiny preset (240)
    assert vit(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_bad_head_options_fail_before_the_backbone_is_built():
    with pytest.raises(ValueError, match=r'DropCov: unknown option\(s\) iters'):
        timm.create_model('resnet18_gcp_dropcov', gcp_kwargs={'iters': 3})
    with pytest.raises(ValueError, match='SoT: norm must be one of'):
        timm.create_model('deit_small_patch16_224_gcp_sot', gcp_kwargs={'norm': 'isqrt'})


def test_model_benchmark_lists_both_heads_beside_the_others():
    # a smoke run on small models: the rows exist with their head-to-backbone ratio (no timing is asserted)
    from timm_gcp.bench import models as bench
    assert 'dropcov' in bench.BenchConfig().methods

    def model_fn(name):
        kwargs = dict(num_classes=5)
        if name.startswith('vit'):
            kwargs.update(depth=1, embed_dim=32, num_heads=2, img_size=64)
        else:
            kwargs.update(layers=(1, 1, 1, 1))
        if '_gcp_' in name and not name.endswith('_sot'):
            kwargs['gcp_dim'] = 8
        return timm.create_model(name, **kwargs)

    cfg = bench.BenchConfig(methods=('isqrt', 'dropcov'), baseline='resnet18', batch_size=2, img_size=64,
        num_classes=5, rounds=1, warmup=1, models=('vit_small_patch16_224_gcp_isqrt', 'vit_small_patch16_224_gcp_sot'))
    rows = {r['model']: r for r in bench.run_benchmark(cfg, model_fn=model_fn)['rows']}
    assert all('error' not in r for r in rows.values()), rows
    for name in ('resnet18_gcp_dropcov', 'vit_small_patch16_224_gcp_sot'):
        assert rows[name]['head_ratio'] > 0 and rows[name]['head_ratio_pooled'] > 0
    assert rows['resnet18_gcp_dropcov']['cov64_ms'] > 0  # its covariance timed like the root heads'
    assert 'cov64_ms' not in rows['vit_small_patch16_224_gcp_sot']  # no reduction: cross-covariances of projections
    assert 'dropcov' in bench.format_markdown(dict(rows=list(rows.values()), checks=[], env=dict(
        device='cpu', torch='', threads=1, batch=2, img_size=64, rounds=1, amp='off', eigh_path='', memory='')))


@pytest.mark.parametrize('name, plain_arch, plain_kwargs', [
    ('resnet18_gcp_dropcov', 'resnet18', dict(layers=(1, 1, 1, 1))),
    ('vit_small_patch16_224_gcp_sot', 'vit_small_patch16_224', dict(depth=1, embed_dim=32, num_heads=2, img_size=64)),
])
def test_plain_backbone_checkpoint_loads_the_backbone_and_keeps_the_head_fresh(tmp_path, name, plain_arch,
        plain_kwargs):
    import safetensors.torch
    torch.manual_seed(3)
    plain = {k: v.clone().contiguous() for k, v in timm.create_model(plain_arch, **plain_kwargs).state_dict().items()}
    path = tmp_path / 'plain.safetensors'
    safetensors.torch.save_file(plain, str(path))
    kwargs = dict(plain_kwargs) if name.startswith('resnet') else tiny_kwargs(name)
    torch.manual_seed(0)
    fresh = timm.create_model(name, **kwargs).state_dict()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    sd = model.state_dict()
    head = [k for k in sd if k.startswith(('global_pool.', 'fc.'))]
    assert any('attn' in k or 'v0' in k for k in head)  # the head's own parameters are among the fresh ones
    for k in head:
        assert torch.equal(sd[k], fresh[k]), k
    prefix = '' if name.startswith('resnet') else 'backbone.'
    loaded = [k for k in sd if k not in head]
    assert loaded and all(torch.equal(sd[k], plain[k[len(prefix):]]) for k in loaded)


@pytest.mark.slow
def test_train_checkpoint_validate_and_the_refused_switch(tmp_path):
    """timm-gcp-train on a tiny DropCov model writes 'dropcov' as the checkpoint's method, timm-gcp-validate's model
    builder rebuilds the same head from it, and the hybrid switch is refused at setup (exit status 2, no run folder)."""
    from timm_gcp import train as tr
    from timm_gcp.checkpoint import read_checkpoint
    from timm_gcp.validate import create_model_from_checkpoint
    tiny = ['--builtin-train-samples', '48', '--builtin-val-samples', '32', '-b', '16', '--img-size', '32',
        '--baseline-model', '', '--warmup-epochs', '0', '--workers', '0', '--output', str(tmp_path),
        '--model', 'resnet18_gcp_dropcov', '--model-kwargs', 'gcp_dim=8', 'output_stride=8']
    assert tr.main(tiny + ['--epochs', '1', '--experiment', 'd']) == 0
    _, info = read_checkpoint(str(tmp_path / 'd' / 'last.pth.tar'))
    assert (info['gcp_method'], info['arch']) == ('dropcov', 'resnet18_gcp_dropcov')
    model, arch, _ = create_model_from_checkpoint(str(tmp_path / 'd' / 'last.pth.tar'))
    assert arch == 'resnet18_gcp_dropcov' and isinstance(model.global_pool, DropCovPool)
    assert model.global_pool.gcp_dim == 8
    with pytest.raises(SystemExit) as e:  # refused at setup (exit 2), before any epoch is spent
        tr.main(tiny + ['--epochs', '2', '--experiment', 's', '--gcp-switch-epoch', '1', '--gcp-switch-method', 'svd'])
    assert e.value.code == 2 and not (tmp_path / 's').exists()


@pytest.mark.parametrize('name', OTHER_HEAD_NAMES)
def test_every_name_builds_on_the_meta_device(name):
    model = timm.create_model(name, device='meta')
    kind = DropCovPool if name.endswith('_dropcov') else SoTPool
    assert type(model.global_pool) is kind and model.gcp_method == kind.head_name
    assert model.head_hidden_size == model.fc.in_features
    after_pool = model.pre_logits.fc1 if name.startswith('alexnet') else model.fc  # AlexNet: its two hidden FC layers
    assert after_pool.in_features == model.global_pool.out_features
    assert model.pretrained_cfg['classifier'] == 'fc'


@pytest.mark.parametrize('make, mode', [(_dropcov, 'train'), (_dropcov, 'eval'), (_vit_sot, 'train')])
def test_fx_graph_gives_the_model_output(make, mode):
    # FX (timm's features_only='fx', create_feature_extractor) keeps the rate, the covariance and svPN as leaves
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names
    model = getattr(make(), mode)()
    train_nodes, eval_nodes = get_graph_node_names(model)
    nodes = train_nodes if mode == 'train' else eval_nodes
    fx = create_feature_extractor(model, return_nodes=[nodes[-1]])
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    out = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(next(iter(fx(x).values())), out, rtol=0, atol=0)

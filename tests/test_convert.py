"""Converting the official fast-MPN-COV and DifferentiableSVD checkpoints (layouts built here, random values)."""
import json
import os
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from timm_gcp import convert
from timm_gcp.checkpoint import CheckpointError, unwrap_state_dict
from helpers.data import ROOT
D = 256
N_FEAT = D * (D + 1) // 2


def _tv_resnet(depth: int, num_classes: int, last_stride: int = 2, device='meta'):
    """torchvision ResNet (the official backbones), optionally with the fast-MPN-COV stride-1 last stage."""
    import torchvision
    with torch.device(device):
        model = getattr(torchvision.models, f'resnet{depth}')(num_classes=num_classes)
    if last_stride == 1:
        model.layer4[0].conv2.stride = (1, 1)
        model.layer4[0].downsample[0].stride = (1, 1)
    return model


def _head_shapes(num_classes: int):
    bn = {f'global_pool.bn.{s}': (D,) for s in ('weight', 'bias', 'running_mean', 'running_var')}
    return OrderedDict([('global_pool.conv.weight', (D, 2048, 1, 1)), *bn.items(),
                        ('global_pool.bn.num_batches_tracked', ()),
                        ('fc.weight', (num_classes, N_FEAT)), ('fc.bias', (num_classes,))])


def _timm_target_shapes(depth: int, num_classes: int):
    """The DESIGN.md contract, built without the models: timm ResNet keys + GCP head keys."""
    import timm
    with torch.device('meta'):
        m = timm.create_model(f'resnet{depth}', num_classes=0)
    shapes = OrderedDict((k, tuple(v.shape)) for k, v in m.state_dict().items())
    shapes.update(_head_shapes(num_classes))
    return shapes


def _random_backbone(depth: int, last_stride: int, seed: int = 0):
    """A torchvision ResNet state dict with distinct random values (BN statistics included)."""
    g = torch.Generator().manual_seed(seed)
    model = _tv_resnet(depth, 10, last_stride, device='cpu')
    sd = OrderedDict()
    for k, v in model.state_dict().items():
        if k.startswith('fc.'):
            continue
        if k.endswith('num_batches_tracked'):
            sd[k] = torch.randint(0, 1000, (), generator=g)
        elif k.endswith('running_var') or (k.endswith('.weight') and v.dim() == 1):
            sd[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.5
        elif k.endswith('running_mean') or k.endswith('.bias'):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        else:
            sd[k] = v.clone()  # kaiming-initialised conv weights keep activations in range
    return sd


def _random_head(num_classes: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([
        ('conv', torch.randn(D, 2048, 1, 1, generator=g) * (2.0 / 2048) ** 0.5),
        ('bn.weight', torch.rand(D, generator=g) + 0.5), ('bn.bias', torch.randn(D, generator=g) * 0.1),
        ('bn.running_mean', torch.randn(D, generator=g) * 0.1), ('bn.running_var', torch.rand(D, generator=g) + 0.5),
        ('bn.num_batches_tracked', torch.tensor(7)),
        ('fc.weight', torch.randn(num_classes, N_FEAT, generator=g) * 0.01),
        ('fc.bias', torch.randn(num_classes, generator=g)),
    ])


def fast_mpn_cov_checkpoint(depth=50, num_classes=10, seed=0):
    """fast-MPN-COV MPNCOVResNet layout: DataParallel ``module.`` prefix inside a ``state_dict`` entry."""
    sd = _random_backbone(depth, 1, seed)
    h = _random_head(num_classes, seed + 1)
    sd['layer_reduce.weight'] = h['conv']
    for s in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
        sd[f'layer_reduce_bn.{s}'] = h[f'bn.{s}']
    sd['fc.weight'], sd['fc.bias'] = h['fc.weight'], h['fc.bias']
    return {'epoch': 60, 'arch': f'mpncovresnet{depth}', 'state_dict': OrderedDict(('module.' + k, v)
                                                                                  for k, v in sd.items())}


_TV_TO_FEATURES = {'conv1': '0', 'bn1': '1', 'layer1': '4', 'layer2': '5', 'layer3': '6', 'layer4': '7'}


def differentiable_svd_checkpoint(depth=50, num_classes=10, seed=0):
    """DifferentiableSVD layout: bare state dict of features.module.<i>, representation.conv_dr_block, classifier."""
    sd = OrderedDict()
    for k, v in _random_backbone(depth, 2, seed).items():
        head, rest = k.split('.', 1)
        sd[f'features.module.{_TV_TO_FEATURES[head]}.{rest}'] = v
    h = _random_head(num_classes, seed + 1)
    sd['representation.conv_dr_block.0.weight'] = h['conv']
    for s in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
        sd[f'representation.conv_dr_block.1.{s}'] = h[f'bn.{s}']
    sd['classifier.weight'], sd['classifier.bias'] = h['fc.weight'], h['fc.bias']
    return sd


def _expected_name(layout, key):
    if layout == 'fast-mpn-cov':
        key = key[len('module.'):]
        return {'layer_reduce.weight': 'global_pool.conv.weight'}.get(
            key, key.replace('layer_reduce_bn.', 'global_pool.bn.'))
    inv = {v: k for k, v in _TV_TO_FEATURES.items()}
    if key.startswith('features.module.'):
        idx, rest = key[len('features.module.'):].split('.', 1)
        return f'{inv[idx]}.{rest}'
    return (key.replace('representation.conv_dr_block.0.', 'global_pool.conv.')
            .replace('representation.conv_dr_block.1.', 'global_pool.bn.').replace('classifier.', 'fc.'))


@pytest.fixture(scope='module')
def fmc_ckpt():
    return fast_mpn_cov_checkpoint()


@pytest.fixture(scope='module')
def dsvd_ckpt():
    return differentiable_svd_checkpoint()


def test_official_triu_order_is_ours():
    # Both official codes take torch.ones(d, d).triu().reshape(d*d).nonzero() as the selection index; ours is
    # torch.triu_indices(d, d) row-major. Equal orders mean fc.weight columns need no permutation.
    from timm_gcp.functional import triu_vec
    official_index = torch.ones(D, D).triu().reshape(D * D).nonzero().squeeze(1)
    rows, cols = torch.triu_indices(D, D)
    assert torch.equal(official_index, rows * D + cols)
    m = torch.randn(2, D, D)
    assert torch.equal(triu_vec(m), m.reshape(2, D * D)[:, official_index])


@pytest.mark.parametrize('layout', ['fast-mpn-cov', 'differentiable-svd'])
def test_every_tensor_lands_in_place(layout, fmc_ckpt, dsvd_ckpt):
    raw = fmc_ckpt if layout == 'fast-mpn-cov' else dsvd_ckpt
    src = raw['state_dict'] if layout == 'fast-mpn-cov' else raw
    sd = unwrap_state_dict(raw)
    shapes = _timm_target_shapes(50, 10)
    out, arch, found = convert.convert_state_dict(sd, shapes=shapes)
    assert found == layout
    assert arch == ('resnet50_ls1_gcp_isqrt' if layout == 'fast-mpn-cov' else 'resnet50_gcp_pade')
    assert list(out) == list(shapes)  # every target filled, in target order, nothing else
    for k, v in src.items():
        assert torch.equal(out[_expected_name(layout, k)], v), k
    assert len(src) == len(out)


def test_missing_num_batches_tracked_filled_with_zero(fmc_ckpt):
    # Checkpoints written before torch 0.4.1 have no num_batches_tracked counters.
    sd = {k: v for k, v in unwrap_state_dict(fmc_ckpt).items() if not k.endswith('num_batches_tracked')}
    out, _, _ = convert.convert_state_dict(sd, shapes=_timm_target_shapes(50, 10))
    assert out['layer1.0.bn1.num_batches_tracked'].item() == 0
    assert out['global_pool.bn.num_batches_tracked'].item() == 0


def test_errors_name_the_keys(fmc_ckpt, dsvd_ckpt):
    shapes = _timm_target_shapes(50, 10)
    sd = dict(unwrap_state_dict(fmc_ckpt))
    with pytest.raises(CheckpointError, match=r'layer_reduce_relu\.bogus'):
        convert.convert_state_dict({**sd, 'layer_reduce_relu.bogus': torch.zeros(1)}, shapes=shapes)
    with pytest.raises(CheckpointError, match=r'not filled: layer4\.2\.bn3\.weight'):
        convert.convert_state_dict({k: v for k, v in sd.items() if k != 'layer4.2.bn3.weight'}, shapes=shapes)
    with pytest.raises(CheckpointError, match=r'fc\.weight: source \(10, 32895\)'):
        convert.convert_state_dict({**sd, 'fc.weight': torch.zeros(10, N_FEAT - 1)}, shapes=shapes)
    with pytest.raises(CheckpointError, match='unrecognised checkpoint layout'):
        convert.convert_state_dict({'head.weight': torch.zeros(1)}, shapes=shapes)
    dsvd = {**dsvd_ckpt, 'features.module.3.weight': torch.zeros(1)}  # maxpool has no parameters
    with pytest.raises(CheckpointError, match=r'features\.module\.3\.weight'):
        convert.convert_state_dict(dsvd, shapes=shapes)


def test_pick_arch_from_layer3_depth():
    names101 = [f'layer3.{i}.conv1.weight' for i in range(23)]
    assert convert.pick_arch('fast-mpn-cov', names101) == 'resnet101_ls1_gcp_isqrt'
    assert convert.pick_arch('differentiable-svd', names101) == 'resnet101_gcp_pade'
    assert convert.pick_arch('fast-mpn-cov', [f'layer3.{i}.bn1.weight' for i in range(6)]) == 'resnet50_ls1_gcp_isqrt'
    with pytest.raises(CheckpointError, match='layer3 has 4 blocks'):
        convert.pick_arch('fast-mpn-cov', [f'layer3.{i}.conv1.weight' for i in range(4)])


def test_convert_file_never_overwrites(tmp_path):
    out = tmp_path / 'out.safetensors'
    out.write_bytes(b'precious')
    with pytest.raises(CheckpointError, match='refusing to overwrite'):
        convert.convert_file(str(tmp_path / 'in.pth'), str(out))
    with pytest.raises(CheckpointError, match='must be a .safetensors'):
        convert.convert_file(str(tmp_path / 'in.pth'), str(tmp_path / 'out.pth'))
    assert out.read_bytes() == b'precious'


@pytest.mark.parametrize('kind', ['empty', 'safetensors'])
def test_unreadable_input_is_a_clear_error(tmp_path, capsys, kind):
    """scripts/convert_official.py reads through timm_gcp.checkpoint: a clear message and exit status 2."""
    import importlib.util
    if kind == 'empty':
        src, words = tmp_path / 'official.pth', 'is empty (0 bytes)'
        src.write_bytes(b'')
    else:
        from safetensors.torch import save_file
        src, words = tmp_path / 'official.safetensors', 'is not a readable .safetensors file'
        save_file({'a': torch.ones(64)}, str(src))
        src.write_bytes(src.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=re.escape(words)):
        convert.convert_file(str(src), str(tmp_path / 'out.safetensors'))
    spec = importlib.util.spec_from_file_location('convert_official', os.path.join(ROOT, 'scripts',
                                                                                   'convert_official.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(src), '--output', str(tmp_path / 'out.safetensors')]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / 'out.safetensors').exists()


def _script():
    import importlib.util
    spec = importlib.util.spec_from_file_location('convert_official', os.path.join(ROOT, 'scripts',
                                                                                   'convert_official.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _tiny_fast_mpn_cov(**changes):
    """The keys that identify the fast-MPN-COV layout, small; ``changes`` replace or add tensors."""
    sd = {'conv1.weight': torch.randn(4, 3, 3, 3), 'layer_reduce.weight': torch.randn(8, 4, 1, 1),
          'layer_reduce_bn.num_batches_tracked': torch.tensor(3), 'fc.weight': torch.randn(5, 36)}
    sd.update({k.replace('_', '.'): v for k, v in changes.items()})
    return {'state_dict': sd}


@pytest.mark.parametrize('changes, words', [
    (dict(fc_weight=float('nan')), 'NaN/inf values in 1 tensor(s): fc.weight'),
    (dict(conv1_weight=float('inf'), fc_weight=float('nan')), 'NaN/inf values in 2 tensor(s): conv1.weight, fc.weight'),
    (dict(fc_weight=torch.tensor(1.0)), 'fc.weight must be a 2-D [classes x features] matrix, got shape ()'),
    (dict(conv1_weight=torch.ones(4, 3, 3, 3, dtype=torch.int64)), 'wrong dtype'),
    (dict(layer_reduce_bn_num_batches_tracked=torch.tensor(3.0)),
     'layer_reduce_bn.num_batches_tracked (torch.float32)'),
    (dict(fc_bias='not a tensor'), "'fc.bias' is a str, not a tensor"),
])
def test_refused_checkpoints_name_the_tensors(tmp_path, capsys, changes, words):
    """Non-finite values, wrong ranks and dtypes: exit status 2, the tensors named, nothing written."""
    ckpt = _tiny_fast_mpn_cov()
    for name, value in changes.items():
        key = name.replace('_weight', '.weight').replace('_bias', '.bias').replace('_bn_', '_bn.')
        if isinstance(value, float):
            ckpt['state_dict'][key][0] = value
        else:
            ckpt['state_dict'][key] = value
    src, out = tmp_path / 'official.pth', tmp_path / 'out.safetensors'
    torch.save(ckpt, src)
    assert _script().main([str(src), '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and 'Traceback' not in err
    assert os.listdir(tmp_path) == ['official.pth']


def test_state_dict_level_refusals():
    sd = _tiny_fast_mpn_cov(fc_bias=[1.0])['state_dict']
    with pytest.raises(CheckpointError, match='entries that are not tensors: fc.bias'):
        convert.convert_state_dict(sd, shapes={})


@pytest.mark.slow
def test_script_refuses_nan_weights_as_the_user_runs_it(tmp_path):
    ckpt = _tiny_fast_mpn_cov()
    ckpt['state_dict']['fc.weight'][1, 2] = float('nan')
    src = tmp_path / 'official.pth'
    torch.save(ckpt, src)
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'convert_official.py'), str(src),
                          '--output', str(tmp_path / 'out.safetensors')], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 2
    assert res.stderr.startswith('error: refusing to convert') and 'fc.weight' in res.stderr, res.stderr
    assert os.listdir(tmp_path) == ['official.pth']


def test_written_file_has_the_umask_mode_and_never_replaces(tmp_path):
    """safetensors creates files 0600; the converted file gets what the user's umask gives (0640 under 027)."""
    out = tmp_path / 'out.safetensors'
    old = os.umask(0o027)
    try:
        convert._write_safetensors({'a': torch.ones(3)}, str(out), {'format': 'pt'}, overwrite=False)
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o640
    with pytest.raises(CheckpointError, match='refusing to overwrite'):
        convert._write_safetensors({'a': torch.zeros(3)}, str(out), {'format': 'pt'}, overwrite=False)
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(out))['a'], torch.ones(3)) and os.listdir(tmp_path) == ['out.safetensors']


def test_failed_write_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(tensors, path, metadata=None):
        with open(path, 'wb') as f:
            f.write(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(safetensors.torch, 'save_file', disk_full)
    out = tmp_path / 'out.safetensors'
    with pytest.raises(CheckpointError, match=r'could not write .*out\.safetensors: .*No space left on device'):
        convert._write_safetensors({'a': torch.ones(3)}, str(out), {}, overwrite=False)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# End to end with the real models: converted logits = a forward written from the official layouts' semantics.

def _official_head(feat, h, sqrt_fn):
    """reduce conv -> BN -> ReLU -> covariance (centring matrix, as the official codes) -> sqrt -> triu -> fc."""
    x = F.conv2d(feat, h['conv'])
    x = F.batch_norm(x, h['bn.running_mean'], h['bn.running_var'], h['bn.weight'], h['bn.bias'], False, 0.0, 1e-5)
    x = F.relu(x)
    b, d, hh, ww = x.shape
    m = hh * ww
    x = x.reshape(b, d, m)
    i_hat = (-1.0 / m / m) * torch.ones(m, m, dtype=x.dtype) + (1.0 / m) * torch.eye(m, dtype=x.dtype)
    cov = x @ i_hat @ x.transpose(1, 2)
    q = sqrt_fn(cov)
    index = torch.ones(d, d).triu().reshape(d * d).nonzero().squeeze(1)
    return F.linear(q.reshape(b, d * d)[:, index], h['fc.weight'], h['fc.bias'])


def _ns_sqrt_fast_mpn_cov(cov, iters=5):
    """iSQRT-COV: A = cov / tr(cov); Y0 = A, Z0 = I; T = (3I - Z Y)/2, Y <- Y T, Z <- T Z; output sqrt(tr) * Y_N."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
    tr = cov.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1)
    y, z = cov / tr, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * tr.sqrt()


def _eig_sqrt_dsvd(cov):
    """SVD-Pade forward: eigendecomposition in float64, eigenvalues <= eps set to eps, U diag(sqrt) U^T."""
    lam, u = torch.linalg.eigh(cov.double())
    eps = torch.finfo(torch.float64).eps
    lam = torch.where(lam <= eps, torch.full_like(lam, eps), lam)
    return (u * lam.sqrt().unsqueeze(1)) @ u.transpose(1, 2)


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['fast-mpn-cov', 'differentiable-svd'])
def test_converted_logits_match_official_semantics(layout, tmp_path, fmc_ckpt, dsvd_ckpt):
    import timm
    arch = 'resnet50_ls1_gcp_isqrt' if layout == 'fast-mpn-cov' else 'resnet50_gcp_pade'
    raw = fmc_ckpt if layout == 'fast-mpn-cov' else dsvd_ckpt
    ckpt = tmp_path / 'official.pth.tar'
    torch.save(raw, ckpt)
    out = tmp_path / 'converted.safetensors'
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'convert_official.py'), str(ckpt),
                          '--output', str(out)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                         preexec_fn=lambda: os.umask(0o022))
    assert res.returncode == 0, res.stderr
    assert os.stat(out).st_mode & 0o777 == 0o644  # the user's umask, not safetensors' 0600
    assert res.stdout.strip().splitlines()[-1] == f'arch: {arch}'
    # The contract the placement tests assume (timm ResNet keys + GCP head keys) is what the model really has.
    assert convert.target_shapes(arch, 10) == dict(_timm_target_shapes(50, 10))

    kwargs = dict(gcp_kwargs=dict(dtype=torch.float64)) if layout == 'fast-mpn-cov' else {}
    model = timm.create_model(arch, pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=10), **kwargs)
    model = model.double().eval()

    sd = unwrap_state_dict(raw)
    if layout == 'fast-mpn-cov':
        backbone = {k: v for k, v in sd.items() if not k.startswith(('layer_reduce', 'fc.'))}
        h = {'conv': sd['layer_reduce.weight'], 'fc.weight': sd['fc.weight'], 'fc.bias': sd['fc.bias'],
             **{f'bn.{s}': sd[f'layer_reduce_bn.{s}'] for s in ('weight', 'bias', 'running_mean', 'running_var')}}
        tv, sqrt_fn = _tv_resnet(50, 10, last_stride=1, device='cpu'), _ns_sqrt_fast_mpn_cov
    else:
        backbone = {_expected_name(layout, k): v for k, v in sd.items() if k.startswith('features.')}
        h = {'conv': sd['representation.conv_dr_block.0.weight'], 'fc.weight': sd['classifier.weight'],
             'fc.bias': sd['classifier.bias'],
             **{f'bn.{s}': sd[f'representation.conv_dr_block.1.{s}']
                for s in ('weight', 'bias', 'running_mean', 'running_var')}}
        tv, sqrt_fn = _tv_resnet(50, 10, last_stride=2, device='cpu'), _eig_sqrt_dsvd
    missing, unexpected = tv.load_state_dict(backbone, strict=False)
    assert set(missing) == {'fc.weight', 'fc.bias'} and not unexpected
    tv = tv.double().eval()
    h = {k: v.double() for k, v in h.items()}

    x = torch.randn(2, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feat = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        expected = _official_head(feat, h, sqrt_fn)
        got = model(x)
    # float64 throughout. The covariances are rank-deficient (36 or 9 samples, d = 256): eigenvalues at the noise
    # floor differ between the centring-matrix and mean-subtraction covariances by ~1e-16 * |cov| and enter through
    # their square roots, so agreement is to ~1e-7 relative, not to machine precision.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())

    if layout == 'fast-mpn-cov':
        # The converted file is what timm-gcp-publish takes: the arch comes from the safetensors metadata.
        from timm_gcp import publish
        rc = publish.main([str(out), '--repo-id', 'tester/r50-isqrt', '--tag', 'in1k', '--source-kind', 'converted',
                       '--dry-run', '--output-dir', str(tmp_path / 'export')])
        assert rc == 0
        cfg = json.loads((tmp_path / 'export' / 'config.json').read_text())
        assert (cfg['architecture'], cfg['num_classes'], cfg['model_args']['gcp_method']) == (arch, 10, 'isqrt')

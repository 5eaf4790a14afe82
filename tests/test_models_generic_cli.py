"""The generic path end to end: ``<any timm model>_gcp_<method>`` through timm-gcp-train (with the hybrid switch),
timm-gcp-validate and timm-gcp-publish, and ``generic_gcp_<method>`` through the model kwargs of timm's own
train.py/validate.py (parsed with timm's ParseKwargs, as those scripts parse ``--model-kwargs``)."""
import argparse
import json

import pytest
import timm
import torch
from timm.utils import ParseKwargs

import timm_gcp
from timm_gcp import get_gcp_method, publish, train, validate
from timm_gcp.models import GcpNet, fixed_input_size, resolve_model_name

from helpers.data import write_image_folder


@pytest.mark.parametrize('name, expected', [
    ('resnet50_gcp_pade', ('resnet50_gcp_pade', {})),
    ('convnext_tiny_gcp_isqrt.fb_in1k', ('convnext_tiny_gcp_isqrt.fb_in1k', {})),
    ('resnet18', ('resnet18', {})),
    ('hf-hub:org/mobilenetv3_large_100_gcp_pade', ('hf-hub:org/mobilenetv3_large_100_gcp_pade', {})),
    ('mobilenetv3_large_100_gcp_pade', ('generic_gcp_pade', {'backbone': 'mobilenetv3_large_100'})),
    ('test_vit_gcp_mpa.r160_in1k', ('generic_gcp_mpa.r160_in1k', {'backbone': 'test_vit'})),
])
def test_resolve_model_name(name, expected):
    assert resolve_model_name(name, {}) == expected


def test_resolve_model_name_errors_name_the_problem():
    with pytest.raises(ValueError, match="'no_such_net' is not a timm model"):
        resolve_model_name('no_such_net_gcp_pade')
    with pytest.raises(ValueError, match="unknown matrix square-root method 'nope'"):
        resolve_model_name('resnet18_gcp_nope')
    with pytest.raises(ValueError, match="but backbone='resnet18' was given too"):
        resolve_model_name('test_vit_gcp_pade', {'backbone': 'resnet18'})
    assert fixed_input_size('test_vit_gcp_pade') and not fixed_input_size('test_convnext_gcp_pade')


def test_timm_scripts_model_kwargs_build_a_generic_model():
    """``train.py --model generic_gcp_pade --model-kwargs backbone=test_convnext gcp_dim=8`` (after import timm_gcp:
    ``--device-modules timm_gcp`` or ``python -m timm_gcp.run_timm_script``) builds this model."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    args = parser.parse_args(['--model-kwargs', 'backbone=test_convnext', 'gcp_dim=8', 'gcp_kwargs={"iters": 3}'])
    model = timm.create_model('generic_gcp_isqrt', num_classes=5, **args.model_kwargs)
    assert isinstance(model, GcpNet) and model.backbone_name == 'test_convnext' and model.global_pool.dim == 8
    assert get_gcp_method(model) == ('isqrt', {'iters': 3})
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    same = timm_gcp.create_model('test_convnext_gcp_isqrt', num_classes=5, gcp_dim=8, gcp_kwargs={'iters': 3})
    assert list(same.state_dict()) == list(model.state_dict())


@pytest.mark.slow
def test_train_validate_publish_a_generic_model(tmp_path, capsys):
    data = write_image_folder(tmp_path / 'data', classes=3, per_class=4, size=40)
    out = tmp_path / 'out'
    rc = train.main(['--model', 'test_convnext_gcp_isqrt', '--data-dir', str(data), '--num-classes', '3',
        '--model-kwargs', 'gcp_dim=8', '--img-size', '64', '--epochs', '2', '--gcp-switch-epoch', '1',
        '--gcp-switch-method', 'svd', '-b', '4', '--workers', '0', '--lr', '0.01', '--sched', 'none',
        '--output', str(out), '--experiment', 'g', '--val-split', 'validation'])
    assert rc == 0, capsys.readouterr().err[-3000:]
    ckpt = out / 'g' / 'last.pth.tar'
    saved = torch.load(str(ckpt), map_location='cpu', weights_only=False)
    # the checkpoint names what timm builds: the generic architecture, its backbone and the method in use
    assert saved['arch'] == 'generic_gcp_isqrt' and saved['gcp_method'] == 'svd'
    assert saved['args'].model_kwargs == {'gcp_dim': 8, 'backbone': 'test_convnext'}

    capsys.readouterr()
    assert validate.main(['--checkpoint', str(ckpt), '--data-dir', str(data), '--workers', '0',
        '--img-size', '64']) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith('result: model=generic_gcp_svd top1=')

    export = tmp_path / 'export'
    assert publish.main([str(ckpt), '--repo-id', 'tester/generic', '--tag', 'cli', '--dry-run', '--output-dir',
        str(export), '--img-size', '64']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == 'arch: generic_gcp_svd'
    cfg = json.loads((export / 'config.json').read_text())
    assert cfg['architecture'] == 'generic_gcp_svd' and cfg['num_classes'] == 3
    assert cfg['model_args']['backbone'] == 'test_convnext' and cfg['model_args']['gcp_method'] == 'svd'
    reloaded = timm.create_model(f'local-dir:{export}', pretrained=True).eval()
    from timm_gcp.checkpoint_model import create_model_from_checkpoint
    model, _, _ = create_model_from_checkpoint(str(ckpt))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_demo_takes_any_gcp_model_name(tmp_path, capsys):
    """The built-in demo with a ViT (fixed input size: built for the demo's 32 px) and a generic backbone; the
    demo's output_stride is dropped for the models that do not take it. MobileNetV3 has stride 32, so at the demo's
    32 px its last map is 1×1 (covariance 0 for every image): refused at setup (exit 2, nothing written) with the
    input size named; at 64 px (a 2×2 map) it trains."""
    name = 'mobilenetv3_small_050_gcp_pade'
    common = ['--epochs', '1', '--builtin-train-samples', '64', '--builtin-val-samples', '32', '-b', '16',
              '--baseline-model', '', '--output', str(tmp_path)]
    assert train.main(['--model', name, '--experiment', 'small'] + common) == 2
    err = capsys.readouterr().err
    assert 'at input size 32×32' in err and 'covariance pooling needs at least 2 positions' in err, err[-2000:]
    assert '1/32 of the input, so --img-size 64 gives a 2×2 map and 128 a 4×4 one' in err
    assert not (tmp_path / 'small').exists()
    for name, extra in (('test_vit_gcp_isqrt', []), (name, ['--img-size', '64'])):
        rc = train.main(['--model', name, '--experiment', name] + common + extra)
        assert rc == 0, capsys.readouterr().err[-3000:]
        assert capsys.readouterr().out.strip().splitlines()[-1].split()[0].startswith('generic_gcp_')

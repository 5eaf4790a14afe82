"""timm-gcp-validate on a tiny ImageFolder written here; checkpoint reading."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from timm_gcp import validate
from timm_gcp.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {'ant': 2, 'bee': 3, 'cat': 5}  # unbalanced, so top-1 tells which class a constant model predicts


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp('data')
    for c, n in COUNTS.items():
        os.makedirs(root / 'validation' / c)
        for i in range(n):
            Image.new('RGB', (40, 30), color=(20 * i, 80, 160)).save(root / 'validation' / c / f'{i}.png')
    return root


def _constant_checkpoint(path, order, **extra):
    """A plain timm resnet18 (3 classes) whose fc ignores the image: logits = bias, so the ranking is ``order``."""
    import timm
    model = timm.create_model('resnet18', num_classes=3, pretrained=False)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([3.0 - order.index(c) for c in sorted(COUNTS)]))
    args = argparse.Namespace(model='resnet18', model_kwargs={}, lr=0.1)
    torch.save({'epoch': 3, 'arch': 'resnet18', 'state_dict': model.state_dict(), 'args': args, **extra}, path)


def test_cli_reports_top1_top5(image_folder, tmp_path):
    ckpt = tmp_path / 'checkpoint-3.pth.tar'
    _constant_checkpoint(ckpt, order=['cat', 'ant', 'bee'])  # predicts cat (5 of 10) first, ant second
    cmd = [sys.executable, '-m', 'timm_gcp.validate', '--checkpoint', str(ckpt), '--data-dir', str(image_folder),
           '--batch-size', '4', '--workers', '0', '--img-size', '64', '--results-file', str(tmp_path / 'r.json')]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith('result: model=resnet18 top1=50.000 top5=100.000 images=10 input=64x64')
    assert '--checkpoint' in last


def test_library_top5_counts_rank(image_folder, tmp_path):
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['ant', 'bee', 'cat'])
    r = validate.validate(None, str(image_folder), checkpoint=str(ckpt), batch_size=3, workers=0, device='cpu',
                          img_size=48, crop_pct=1.0)
    assert (r['top1'], r['top5'], r['images']) == (20.0, 100.0, 10)
    assert (r['input_size'], r['crop_pct']) == ([3, 48, 48], 1.0)


def test_checkpoint_must_load_strictly(tmp_path):
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['ant', 'bee', 'cat'])
    with pytest.raises(CheckpointError, match='does not load strictly into resnet34'):
        validate.create_model_from_checkpoint(str(ckpt), 'resnet34')


def test_ema_and_gcp_method_metadata(tmp_path):
    ckpt = tmp_path / 'c.pth.tar'
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'state_dict_ema': {'a': torch.ones(1)},
                'arch': 'resnet50_gcp_isqrt', 'gcp_method': 'pade', 'args': argparse.Namespace(model='x')}, ckpt)
    sd, info = validate.read_checkpoint(str(ckpt), use_ema=True)
    assert sd['a'].item() == 1.0 and info['ema'] and info['args'] == {'model': 'x'}
    assert validate.resolve_arch(None, info) == ('resnet50_gcp_pade', {})
    assert validate.resolve_arch('resnet50_gcp_svd', info)[0] == 'resnet50_gcp_svd'
    # timm-gcp-train keeps the method in args (gcp_method, gcp_method_kwargs); a stale one in model_kwargs is dropped.
    args = argparse.Namespace(model='resnet50_gcp_isqrt', gcp_method='taylor', gcp_method_kwargs={'degree': 50},
                              model_kwargs={'gcp_dim': 64, 'gcp_method': 'isqrt'})
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'arch': 'resnet50_gcp_isqrt', 'args': args}, ckpt)
    assert validate.resolve_arch(None, validate.read_checkpoint(str(ckpt))[1]) == (
        'resnet50_gcp_taylor', {'gcp_dim': 64, 'gcp_kwargs': {'degree': 50}})
    with pytest.raises(CheckpointError, match="the checkpoint's gcp_method: .*unknown matrix square-root method 'bogus'"):
        validate.resolve_arch(None, dict(arch='resnet50_gcp_isqrt', gcp_method='bogus'))
    torch.save({'state_dict': {'a': torch.zeros(1)}}, ckpt)
    with pytest.raises(CheckpointError, match='no state_dict_ema'):
        validate.read_checkpoint(str(ckpt), use_ema=True)
    with pytest.raises(CheckpointError, match='pass --model'):
        validate.resolve_arch(None, validate.read_checkpoint(str(ckpt))[1])


def test_gcp_model_checkpoint(image_folder, tmp_path):
    import timm
    import timm_gcp  # noqa: F401
    if not timm.list_models('resnet18_gcp_isqrt'):
        pytest.skip('resnet18_gcp_isqrt has not landed on this branch yet')
    model = timm.create_model('resnet18_gcp_isqrt', num_classes=3, gcp_dim=16)
    ckpt = tmp_path / 'gcp.pth.tar'
    torch.save({'arch': 'resnet18_gcp_isqrt', 'gcp_method': 'svd', 'state_dict': model.state_dict(),
                'args': argparse.Namespace(model='resnet18_gcp_isqrt', model_kwargs={'gcp_dim': 16})}, ckpt)
    r = validate.validate(None, str(image_folder), checkpoint=str(ckpt), batch_size=5, workers=0, device='cpu',
                          img_size=64)
    assert r['model'] == 'resnet18_gcp_svd' and r['images'] == 10 and r['top5'] == 100.0


def test_construction_options_of_another_method_are_dropped(tmp_path):
    """Trained as isqrt with iters=3 (``--model-kwargs gcp_kwargs=...``), switched to svd: the svd model must not get
    isqrt's options; the same method keeps them."""
    ckpt = tmp_path / 'c.pth.tar'
    args = argparse.Namespace(model='resnet50_gcp_isqrt', gcp_method='svd', gcp_method_kwargs={},
                              model_kwargs={'gcp_dim': 64, 'gcp_kwargs': {'iters': 3}})
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'arch': 'resnet50_gcp_isqrt', 'gcp_method': 'svd',
                'gcp_kwargs': {}, 'args': args}, ckpt)
    info = validate.read_checkpoint(str(ckpt))[1]
    assert validate.resolve_arch(None, info) == ('resnet50_gcp_svd', {'gcp_dim': 64})
    args.gcp_method, args.gcp_method_kwargs = 'isqrt', {'iters': 3}
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'arch': 'resnet50_gcp_isqrt', 'gcp_method': 'isqrt',
                'gcp_kwargs': {'iters': 3}, 'args': args}, ckpt)
    info = validate.read_checkpoint(str(ckpt))[1]
    assert validate.resolve_arch(None, info) == ('resnet50_gcp_isqrt', {'gcp_dim': 64, 'gcp_kwargs': {'iters': 3}})


def test_evaluate_reads_the_device_once(monkeypatch):
    """Hits stay on the device: one host read at the end, not two per batch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 7)
    batches = [(torch.randn(5, 6), torch.randint(0, 7, (5,))) for _ in range(6)]
    with torch.no_grad():
        expected = [(model(x).argmax(-1) == y).sum().item() for x, y in batches]
    reads = []
    for name in ('item', 'tolist', '__float__', '__int__'):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (reads.append(_n), _o(self))[1])
    r = validate.evaluate(model, batches, torch.device('cpu'), log_every=0)
    monkeypatch.undo()
    assert len(reads) == 1, reads
    assert r['images'] == 30 and r['top1'] == round(100.0 * sum(expected) / 30, 3)


def test_missing_data_dir_is_a_clear_error(capsys):
    assert validate.main(['--model', 'resnet18', '--data-dir', '/nonexistent/imagenet']) == 2
    assert 'no such directory: /nonexistent/imagenet' in capsys.readouterr().err


def test_use_ema_with_safetensors_is_refused(tmp_path):
    """A .safetensors file has one state dict: --use-ema must not silently evaluate (or publish as 'EMA weights')
    the plain weights."""
    from safetensors.torch import save_file
    path = str(tmp_path / 'w.safetensors')
    save_file({'a': torch.zeros(1)}, path, metadata={'arch': 'resnet18'})
    assert validate.read_checkpoint(path)[1] == {'arch': 'resnet18'}
    with pytest.raises(CheckpointError, match='no separate EMA'):
        validate.read_checkpoint(path, use_ema=True)

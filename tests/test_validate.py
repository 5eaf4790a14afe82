"""timm-gcp-validate on tiny ImageFolders written here: results, the checks that keep it from measuring the wrong
images or labels, checkpoint metadata that must not reach the network."""
import argparse
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from timm_gcp import validate
from timm_gcp.checkpoint import CheckpointError, read_checkpoint
from timm_gcp.checkpoint_model import create_model_from_checkpoint, resolve_arch
from timm_gcp.evaluation import evaluate
from helpers.data import EVAL_COUNTS as COUNTS, ROOT, write_class_folders


def _constant_checkpoint(path, order, args=None, **extra):
    """A plain timm resnet18 (3 classes) whose fc ignores the image: logits = bias, so the ranking is ``order``."""
    import timm
    model = timm.create_model('resnet18', num_classes=3, pretrained=False)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([3.0 - order.index(c) for c in sorted(COUNTS)]))
    args = argparse.Namespace(**{**dict(model='resnet18', model_kwargs={}, lr=0.1), **(args or {})})
    torch.save({'epoch': 3, 'arch': 'resnet18', 'state_dict': model.state_dict(), 'args': args, **extra}, path)


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_cli_reports_top1_top5(eval_folder, tmp_path):
    ckpt = tmp_path / 'checkpoint-3.pth.tar'
    _constant_checkpoint(ckpt, order=['cat', 'ant', 'bee'])  # predicts cat (5 of 10) first, ant second
    cmd = [sys.executable, '-m', 'timm_gcp.validate', '--checkpoint', str(ckpt), '--data-dir', str(eval_folder),
           '--batch-size', '4', '--workers', '0', '--img-size', '64', '--results-file', str(tmp_path / 'r.json')]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith('result: model=resnet18 top1=50.000 top5=100.000 images=10 input=64x64')
    assert '--checkpoint' in last


def test_library_top5_counts_rank(eval_folder, tmp_path):
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['ant', 'bee', 'cat'])
    r = validate.validate(None, str(eval_folder), checkpoint=str(ckpt), batch_size=3, workers=0, device='cpu',
                          img_size=48, crop_pct=1.0)
    assert (r['top1'], r['top5'], r['images']) == (20.0, 100.0, 10)
    assert (r['input_size'], r['crop_pct']) == ([3, 48, 48], 1.0)


def test_checkpoint_must_load_strictly(tmp_path):
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['ant', 'bee', 'cat'])
    with pytest.raises(CheckpointError, match='does not load strictly into resnet34'):
        create_model_from_checkpoint(str(ckpt), 'resnet34')


def test_ema_and_gcp_method_metadata(tmp_path):
    ckpt = tmp_path / 'c.pth.tar'
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'state_dict_ema': {'a': torch.ones(1)},
                'arch': 'resnet50_gcp_isqrt', 'gcp_method': 'pade', 'args': argparse.Namespace(model='x')}, ckpt)
    sd, info = read_checkpoint(str(ckpt), use_ema=True)
    assert sd['a'].item() == 1.0 and info['ema'] and info['args'] == {'model': 'x'}
    assert resolve_arch(None, info) == ('resnet50_gcp_pade', {})
    assert resolve_arch('resnet50_gcp_svd', info)[0] == 'resnet50_gcp_svd'
    # timm-gcp-train keeps the method in args (gcp_method, gcp_method_kwargs); a stale one in model_kwargs is dropped.
    args = argparse.Namespace(model='resnet50_gcp_isqrt', gcp_method='taylor', gcp_method_kwargs={'degree': 50},
                              model_kwargs={'gcp_dim': 64, 'gcp_method': 'isqrt'})
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'arch': 'resnet50_gcp_isqrt', 'args': args}, ckpt)
    assert resolve_arch(None, read_checkpoint(str(ckpt))[1]) == (
        'resnet50_gcp_taylor', {'gcp_dim': 64, 'gcp_kwargs': {'degree': 50}})
    with pytest.raises(CheckpointError, match="the checkpoint's gcp_method: .*unknown matrix square-root method 'bogus'"):
        resolve_arch(None, dict(arch='resnet50_gcp_isqrt', gcp_method='bogus'))
    torch.save({'state_dict': {'a': torch.zeros(1)}}, ckpt)
    with pytest.raises(CheckpointError, match='no state_dict_ema'):
        read_checkpoint(str(ckpt), use_ema=True)
    with pytest.raises(CheckpointError, match='pass --model'):
        resolve_arch(None, read_checkpoint(str(ckpt))[1])


def test_gcp_model_checkpoint(eval_folder, tmp_path):
    import timm
    model = timm.create_model('resnet18_gcp_isqrt', num_classes=3, gcp_dim=16)
    ckpt = tmp_path / 'gcp.pth.tar'
    torch.save({'arch': 'resnet18_gcp_isqrt', 'gcp_method': 'svd', 'state_dict': model.state_dict(),
                'args': argparse.Namespace(model='resnet18_gcp_isqrt', model_kwargs={'gcp_dim': 16})}, ckpt)
    r = validate.validate(None, str(eval_folder), checkpoint=str(ckpt), batch_size=5, workers=0, device='cpu',
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
    info = read_checkpoint(str(ckpt))[1]
    assert resolve_arch(None, info) == ('resnet50_gcp_svd', {'gcp_dim': 64})
    args.gcp_method, args.gcp_method_kwargs = 'isqrt', {'iters': 3}
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'arch': 'resnet50_gcp_isqrt', 'gcp_method': 'isqrt',
                'gcp_kwargs': {'iters': 3}, 'args': args}, ckpt)
    info = read_checkpoint(str(ckpt))[1]
    assert resolve_arch(None, info) == ('resnet50_gcp_isqrt', {'gcp_dim': 64, 'gcp_kwargs': {'iters': 3}})


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
    r = evaluate(model, batches, torch.device('cpu'))
    monkeypatch.undo()
    assert len(reads) == 1, reads
    assert r['images'] == 30 and r['top1'] == pytest.approx(100.0 * sum(expected) / 30)


def test_missing_data_dir_is_a_clear_error(capsys):
    assert validate.main(['--model', 'resnet18', '--data-dir', '/nonexistent/imagenet']) == 2
    assert 'no such directory: /nonexistent/imagenet' in capsys.readouterr().err


def test_use_ema_with_safetensors_is_refused(tmp_path):
    """A .safetensors file has one state dict: --use-ema must not silently evaluate (or publish as 'EMA weights')
    the plain weights."""
    from safetensors.torch import save_file
    path = str(tmp_path / 'w.safetensors')
    save_file({'a': torch.zeros(1)}, path, metadata={'arch': 'resnet18'})
    assert read_checkpoint(path)[1] == {'arch': 'resnet18'}
    with pytest.raises(CheckpointError, match='no separate EMA'):
        read_checkpoint(path, use_ema=True)


# --- data that would give the wrong number ---------------------------------------------------------------------------


def _main(argv, capsys):
    capsys.readouterr()
    rc = validate.main([str(a) for a in argv] + ['--workers', '0', '--device', 'cpu'])
    out, err = capsys.readouterr()
    return rc, out, err


def test_missing_split_is_refused(tmp_path, capsys):
    """A root with train/ and test/ but no validation/: timm would read the whole root (training images included,
    the split folders taken as 2 classes); the split must exist. --split '' evaluates the class folders under the
    root on purpose."""
    root = write_class_folders(tmp_path / 'd', dict(ant=1, bee=1, cat=1), split='train')
    write_class_folders(root, dict(ant=1, bee=1, cat=1), split='test')
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['cat', 'ant', 'bee'])
    rc, out, err = _main(['--checkpoint', ckpt, '--data-dir', root, '--img-size', '32'], capsys)
    assert rc == 2 and not out
    assert f"error: --data-dir {root} has no 'validation' split folder (it holds test, train): timm would evaluate " \
           'every image under it, training images included' in err
    rc, out, err = _main(['--checkpoint', ckpt, '--data-dir', root / 'test', '--split', '', '--img-size', '32'],
                         capsys)
    assert rc == 0 and 'top1=33.333' in out, err


def test_class_count_and_names_must_match_the_checkpoint(tmp_path, capsys):
    two = write_class_folders(tmp_path / 'two', dict(ant=2, bee=2))
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['ant', 'bee', 'cat'])
    rc, out, err = _main(['--checkpoint', ckpt, '--data-dir', two, '--img-size', '32'], capsys)
    assert rc == 2 and not out
    assert f"the model has 3 classes but {two / 'validation'} has 2 (ant, bee): its labels are not the model's" in err
    # Same count, other names: the checkpoint's class names (timm-gcp-train records them) are checked in order.
    other = write_class_folders(tmp_path / 'other', dict(ant=1, bee=1, dog=1))
    _constant_checkpoint(ckpt, order=['ant', 'bee', 'cat'], class_names=['ant', 'bee', 'cat'])
    rc, out, err = _main(['--checkpoint', ckpt, '--data-dir', other, '--img-size', '32'], capsys)
    assert rc == 2 and "label 2 is 'dog' here but 'cat' in the checkpoint" in err


def test_input_size_comes_from_the_checkpoint(eval_folder, tmp_path):
    """A checkpoint trained at 48 px with crop 1.0 is evaluated that way (not at the cfg's 224 px); flags win."""
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['ant', 'bee', 'cat'], args=dict(img_size=48, crop_pct=1.0,
                                                                         interpolation='bilinear'))
    r = validate.validate(None, str(eval_folder), checkpoint=str(ckpt), batch_size=5, workers=0, device='cpu')
    assert (r['input_size'], r['crop_pct'], r['interpolation']) == ([3, 48, 48], 1.0, 'bilinear')
    r = validate.validate(None, str(eval_folder), checkpoint=str(ckpt), batch_size=5, workers=0, device='cpu',
                          img_size=40)
    assert r['input_size'] == [3, 40, 40] and r['crop_pct'] == 1.0


def test_results_file_is_never_overwritten(eval_folder, tmp_path, capsys):
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['cat', 'ant', 'bee'])
    results = tmp_path / 'r.json'
    rc, out, err = _main(['--checkpoint', ckpt, '--data-dir', eval_folder, '--img-size', '32', '--results-file',
                          results], capsys)
    assert rc == 0 and json.loads(results.read_text())['top1'] == 50.0
    results.write_text('mine')
    rc, out, err = _main(['--checkpoint', ckpt, '--data-dir', eval_folder, '--img-size', '32', '--results-file',
                          results], capsys)
    assert rc == 2 and f'--results-file {results} already exists' in err and results.read_text() == 'mine'


def test_corrupt_safetensors_is_a_clear_error(eval_folder, tmp_path, capsys):
    from safetensors.torch import save_file
    path = tmp_path / 'w.safetensors'
    save_file({'a': torch.ones(64)}, str(path), metadata={'arch': 'resnet18'})
    path.write_bytes(path.read_bytes()[:-40])
    rc, out, err = _main(['--checkpoint', path, '--data-dir', eval_folder], capsys)
    assert rc == 2 and f'error: {path} is not a readable .safetensors file (truncated or corrupt' in err


# --- checkpoint metadata never reaches the network -------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every outgoing connection and Hub download."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError('network access in a test')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', refuse)
    return attempts


@pytest.mark.parametrize('arch, words', [
    ('hf-hub:someone/repo', 'a Hub repository, URL or folder'),
    ('local-dir:/tmp/somewhere', 'a Hub repository, URL or folder'),
    ('https://example.com/model.pth', 'a Hub repository, URL or folder'),
    ('resnet9000', 'not a registered timm or timm-gcp model'),
])
def test_recorded_architecture_must_be_registered(eval_folder, tmp_path, capsys, no_network, arch, words):
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['cat', 'ant', 'bee'], arch=arch, args=dict(model=arch))
    rc, out, err = _main(['--checkpoint', ckpt, '--data-dir', eval_folder, '--img-size', '32'], capsys)
    assert rc == 2 and f"the checkpoint names the architecture '{arch}'" in err and words in err
    assert 'pass --model' in err.lower() and no_network == []
    # The user's own --model builds it.
    rc, out, err = _main(['--checkpoint', ckpt, '--model', 'resnet18', '--data-dir', eval_folder, '--img-size', '32'],
                         capsys)
    assert rc == 0 and 'top1=50.000' in out and no_network == []


def test_model_kwargs_that_load_from_elsewhere_are_ignored(eval_folder, tmp_path, caplog, no_network):
    ckpt = tmp_path / 'c.pth.tar'
    _constant_checkpoint(ckpt, order=['cat', 'ant', 'bee'], args=dict(model_kwargs=dict(
        pretrained_cfg_overlay=dict(hf_hub_id='someone/repo'), checkpoint_path='/elsewhere/w.pth')))
    with caplog.at_level('WARNING'):
        r = validate.validate(None, str(eval_folder), checkpoint=str(ckpt), batch_size=5, workers=0, device='cpu',
                              img_size=32)
    assert r['top1'] == 50.0 and no_network == []
    assert "ignoring model_kwargs ['checkpoint_path', 'pretrained_cfg_overlay']" in caplog.text

"""timm-gcp-train: parsing, parameter groups, ImageFolder runs, resume equivalence, the guards of a run (non-finite
values, unreadable checkpoints, the run-folder lock), the hybrid switch, the built-in demo and a 2-process torchrun
run."""
import csv
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

import timm
from timm_gcp import train as tr
from timm_gcp.train import params as tr_params, run as tr_run, run_dir as tr_run_dir
from helpers.data import (
    finite_checkpoint, free_port, load_checkpoint as _load, subprocess_env, write_image_folder)

# Tiny built-in runs: 48 training images of 32 px, 3 steps per epoch, a plain ResNet-18 (no GCP head needed).
TINY = ['--builtin-train-samples', '48', '--builtin-val-samples', '32', '-b', '16', '--img-size', '32',
        '--baseline-model', '', '--warmup-epochs', '0', '--log-interval', '2', '--workers', '0', '--model-kwargs']
GCP_TINY = TINY + ['--model', 'resnet18_gcp_isqrt', '--model-kwargs', 'gcp_dim=8', 'output_stride=8']


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# --- parsing ----------------------------------------------------------------------------------------------------------

def test_demo_defaults_only_without_data(tmp_path):
    args, text = tr.parse_args([])
    assert args.model == tr.DEMO_DEFAULTS['model'] and args.baseline_model == 'resnet18'
    assert yaml.safe_load(text)['epochs'] == tr.DEMO_DEFAULTS['epochs']
    args, _ = tr.parse_args(['--data-dir', str(tmp_path)])
    assert args.model == 'resnet50_gcp_isqrt' and args.baseline_model == '' and args.epochs == 300


@pytest.mark.parametrize('model, baseline', [
    ('efficientnet_b0_gcp_isqrt', 'efficientnet_b0'),  # the demo compares a GCP model with its own backbone
    ('resnet50_ls1_gcp_pade', 'resnet50'),  # a layout variant: the timm model it is built on
    ('mobilenetv3_large_100_gcp_pade', 'mobilenetv3_large_100'),  # generic path
    ('alexnet_gcp_isqrt', ''),  # timm has no alexnet: no baseline
    ('resnet18', ''),  # not a GCP model
])
def test_demo_baseline_is_the_models_own_backbone(model, baseline):
    args, text = tr.parse_args(['--model', model])
    assert args.baseline_model == baseline and yaml.safe_load(text)['baseline_model'] == baseline
    args, _ = tr.parse_args(['--model', model, '--baseline-model', 'resnet34'])
    assert args.baseline_model == 'resnet34'


def test_config_sets_defaults_and_cli_wins(tmp_path, caplog):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(yaml.safe_dump(dict(lr=0.0794, epochs=60, gcp_switch_epoch=45, gcp_switch_method='svd',
                                       clip_grad=5.0, aa='rand-m9', model_kwargs=dict(gcp_dim=64))))
    with caplog.at_level('WARNING'):
        args, _ = tr.parse_args(['--config', str(cfg), '--data-dir', str(tmp_path), '--epochs', '3'])
    assert (args.lr, args.epochs, args.gcp_switch_epoch, args.clip_grad) == (0.0794, 3, 45, 5.0)
    assert args.model_kwargs == dict(gcp_dim=64) and args.aa == 'rand-m9'
    assert 'ignoring keys' not in caplog.text  # every key is known (the switch-after-the-end warning is expected)
    assert '--gcp-switch-epoch 45 >= --epochs 3' in caplog.text
    cfg.write_text(yaml.safe_dump(dict(lr=0.1, mixup=0.8)))
    with caplog.at_level('WARNING'):
        tr.parse_args(['--config', str(cfg), '--data-dir', str(tmp_path)])
    assert 'mixup' in caplog.text


@pytest.mark.parametrize('argv, match', [
    (['--head-lr-mult', '0'], 'head-lr-mult'),
    (['--gcp-switch-epoch', '2', '--gcp-switch-method', 'nope'], 'nope'),
    (['--gcp-switch-epoch', '-1'], 'gcp-switch-epoch'),
    (['--epochs', '0'], 'epochs'),
    (['--amp-dtype', 'float8'], 'amp-dtype'),
    (['--resume', '/nonexistent/last.pth.tar'], 'no such file: /nonexistent/last.pth.tar'),
    (['--initial-checkpoint', '/nonexistent/w.pth'], 'no such file: /nonexistent/w.pth'),
    (['--data-dir', '/nonexistent/imagenet'], 'no such directory: /nonexistent/imagenet'),
    (['--config', '/nonexistent/recipe.yaml'], 'cannot read /nonexistent/recipe.yaml'),
])
def test_bad_flags(argv, match, capsys):
    with pytest.raises(SystemExit):
        tr.parse_args(argv)
    assert match in capsys.readouterr().err


def test_head_param_groups_carry_lr_scale():
    model = timm.create_model('resnet18', num_classes=3)
    names = tr.head_param_names(model)
    assert names == ['fc.weight', 'fc.bias']
    groups = tr.head_param_groups(model, weight_decay=1e-4, head_lr_mult=10.)
    head = [g for g in groups if 'lr_scale' in g]
    assert {id(p) for g in head for p in g['params']} == {id(model.fc.weight), id(model.fc.bias)}
    assert all(g['lr_scale'] == 10. for g in head)
    assert {g['weight_decay'] for g in head} == {1e-4, 0.}
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    opt = timm.optim.create_optimizer_v2(groups, opt='sgd', lr=0.1, weight_decay=1e-4)
    sched, _ = timm.scheduler.create_scheduler_v2(opt, sched='step', num_epochs=2, warmup_epochs=0)
    assert sorted({g['lr'] for g in opt.param_groups}) == pytest.approx([0.1, 1.0])


def test_head_params_include_a_gcp_pooling_wherever_it_sits():
    """A GCP model is any model holding a MatrixSqrt: its pooling's parameters are head parameters under any name."""
    from timm_gcp import CovPool

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3)
            self.neck = CovPool(8, gcp_dim=4, method='isqrt')
            self.classifier = torch.nn.Linear(10, 2)
    names = tr.head_param_names(Net())
    assert names == ['neck.conv.weight', 'neck.bn.weight', 'neck.bn.bias']


# --- runs -------------------------------------------------------------------------------------------------------------

def test_one_epoch_on_image_folder(tmp_path, capsys, image_folder):
    rc = tr.main(['--data-dir', str(image_folder), '--model', 'resnet18', '--num-classes', '2', '--img-size', '32', '-b', '4',
                  '--epochs', '1', '--workers', '0', '--output', str(tmp_path / 'out'), '--experiment', 'e',
                  '--warmup-epochs', '0', '--log-interval', '1', '--head-lr-mult', '5'])
    assert rc == 0
    out = tmp_path / 'out' / 'e'
    rows = _rows(out / 'summary.csv')
    assert len(rows) == 1 and rows[0]['epoch'] == '0'
    assert {'train_loss', 'train_head_grad_norm', 'eval_top1', 'eval_loss', 'lr'} <= set(rows[0])
    assert yaml.safe_load((out / 'args.yaml').read_text())['head_lr_mult'] == 5
    ckpt = _load(out / 'last.pth.tar')
    assert ckpt['epoch'] == 0 and ckpt['arch'] == 'resnet18'
    log = capsys.readouterr()
    assert 'ETA' in log.err + log.out and 'resnet18' in log.out


def _final_weights(out):
    ckpt = _load(out / 'last.pth.tar')
    return ckpt['state_dict'], ckpt.get('state_dict_ema')


@pytest.mark.slow
def test_progress_line_average_is_the_epoch_mean(tmp_path, caplog):
    import re
    with caplog.at_level('INFO', logger='timm_gcp.train'):
        assert tr.main(TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path), '--experiment', 'e',
                               '--log-interval', '100', '--diag-interval', '0']) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Train: 0 [   3/3')]
    assert len(lines) == 1  # 48 images / batch 16: logged at the last of 3 steps only
    last, avg = map(float, re.search(r'Loss: (\S+) \((\S+)\)', lines[0]).groups())
    mean = float(_rows(tmp_path / 'e' / 'summary.csv')[0]['train_loss'])
    assert avg == pytest.approx(mean, rel=2e-3) and last != pytest.approx(mean, rel=2e-3)


@pytest.mark.parametrize('clip_grad', [None, 1.0])
def test_head_grad_norm_is_unscaled_under_the_amp_loss_scaler(clip_grad):
    """With timm's NativeScaler and gradient accumulation, the gradients between optimizer steps stay multiplied by
    the loss scale (65536 at first; the scaler unscales them only when it steps); the recorded head gradient norm
    must be the true one."""
    import argparse
    from timm.utils import NativeScaler
    from timm_gcp.diagnostics import CovStatsCollector
    args = argparse.Namespace(train_batches_per_epoch=None, grad_accum_steps=2, distributed=False,
                              channels_last=False, clip_grad=clip_grad, clip_mode='norm', log_interval=100, rank=0,
                              world_size=1)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    norms = []
    for scaler in (None, NativeScaler(device='cpu')):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        collector = CovStatsCollector(model, list(model.parameters()), interval=1, module_types=())
        m = tr.train_one_epoch(0, model, batches, opt, torch.nn.CrossEntropyLoss(), args, torch.device('cpu'),
                               loss_scaler=scaler, collector=collector)
        norms.append(m['head_grad_norm'])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


@pytest.mark.slow
def test_resume_ends_with_the_same_weights(tmp_path):
    common = TINY + ['--model', 'resnet18', '--epochs', '3', '--model-ema', '--model-ema-decay', '0.9', '--sched',
                     'cosine', '--drop', '0.2', '--diag-interval', '1', '--output', str(tmp_path)]
    assert tr.main(common + ['--experiment', 'full']) == 0
    # The interrupted run: its state after epoch 0 is checkpoint-0; resume it into a new directory.
    interrupted = str(tmp_path / 'full' / 'checkpoint-0.pth.tar')
    assert tr.main(common + ['--experiment', 'resumed', '--resume', interrupted]) == 0
    full, full_ema = _final_weights(tmp_path / 'full')
    res, res_ema = _final_weights(tmp_path / 'resumed')
    assert full.keys() == res.keys()
    for k in full:  # bitwise: same seed per epoch, same optimizer/scheduler/EMA state, same single process
        assert torch.equal(full[k], res[k]), k
        assert torch.equal(full_ema[k], res_ema[k]), k
    assert [r['epoch'] for r in _rows(tmp_path / 'resumed' / 'summary.csv')] == ['1', '2']


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    common = TINY + ['--model', 'resnet18', '--output', str(tmp_path), '--experiment', 'e', '--sched', 'step',
                     '--smoothing', '0']
    assert tr.main(common + ['--epochs', '1']) == 0
    last = tmp_path / 'e' / 'last.pth.tar'
    before = _load(last)['state_dict']
    # --no-resume-opt: a fresh optimizer takes the new learning rate (a resumed one keeps the checkpoint's).
    rc = tr.main(common + ['--epochs', '2', '--lr', '1e30', '--no-resume-opt', '--resume', str(last)])
    err = capsys.readouterr().err
    assert rc == 2
    assert 'timm-gcp-train: error: non-finite values at epoch 1, step' in err
    assert 'the training loss is NaN or infinite; stopping. The last good checkpoint is ' \
           f'{last} (epoch 0); nothing was saved after it' in err
    after = _load(last)
    assert after['epoch'] == 0 and all(torch.equal(before[k], after['state_dict'][k]) for k in before)
    # Resuming a finished run without raising --epochs trains nothing: an error, not a silent exit 0.
    rc = tr.main(common + ['--epochs', '1', '--resume', str(last)])
    assert rc == 2 and 'starts at epoch 1, but the run has 1 epochs' in capsys.readouterr().err


@pytest.mark.slow
def test_fresh_run_never_overwrites_an_existing_run(tmp_path, caplog):
    common = TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path), '--experiment', 'e',
                     '--diag-interval', '0']
    assert tr.main(common) == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / 'e').iterdir()}
    with caplog.at_level('WARNING'):
        assert tr.main(common + ['--seed', '7']) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / 'e').iterdir()} == first  # untouched
    assert 'already holds a training run' in caplog.text
    assert [r['epoch'] for r in _rows(tmp_path / 'e-1' / 'summary.csv')] == ['0']
    assert _load(tmp_path / 'e-1' / 'last.pth.tar')['args'].seed == 7


@pytest.mark.parametrize('flag', ['--resume', '--initial-checkpoint'])
def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, capsys, flag):
    ckpt = tmp_path / 'r34.pth.tar'
    torch.save(dict(epoch=0, version=2, arch='resnet34', state_dict=timm.create_model('resnet34', num_classes=4)
                    .state_dict()), ckpt)
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '2', '--output', str(tmp_path), '--experiment', 'x',
                         flag, str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f'timm-gcp-train: error: {flag} {ckpt} does not fit resnet18' in err and 'Unexpected key(s)' in err
    assert not (tmp_path / 'x').exists()


def _split_folder(root, train_classes, val_classes):
    from PIL import Image
    for split, classes in (('train', train_classes), ('validation', val_classes)):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(2):
                Image.new('RGB', (36, 36), color=(40 * i, 90, 150)).save(root / split / c / f'{i}.png')
    return root


@pytest.mark.parametrize('layout, extra, match', [
    # no validation/ folder: timm would evaluate on the training images
    (dict(train_classes=['a', 'b'], val_classes=[]), [], "validation would see training images"),
    # 'a' has no validation folder: timm would number validation 'b' as 0, training 'b' as 1
    (dict(train_classes=['a', 'b'], val_classes=['b']), [], "['b']"),
    (dict(train_classes=['a', 'b', 'c'], val_classes=['a', 'b', 'c']), ['--num-classes', '2'],
     '3 training classes but the model has 2 outputs'),
])
def test_image_folder_splits_that_would_give_wrong_numbers(tmp_path, capsys, layout, extra, match):
    data = _split_folder(tmp_path / 'data', **layout)
    rc = tr.main(['--data-dir', str(data), '--model', 'resnet18', '--img-size', '32', '-b', '2', '--epochs', '1',
                  '--workers', '0', '--output', str(tmp_path / 'out'), '--experiment', 'e'] + extra)
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / 'out' / 'e').exists()


@pytest.mark.slow
def test_two_process_torchrun(tmp_path):
    r = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', free_port(),
        '-m', 'timm_gcp.train', *TINY, '--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path),
        '--experiment', 'ddp', '--builtin-val-samples', '33'], env=subprocess_env(), capture_output=True, text=True,
        timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Process 1 of 2' in r.stderr
    rows = _rows(tmp_path / 'ddp' / 'summary.csv')
    assert len(rows) == 1
    # 1 step per process (48 samples / 2 ranks / batch 16). The reduced eval covers the 33 validation samples once
    # each: the sampler pads rank 1's 16 samples with a repeat of sample 0, which is not counted.
    assert rows[0]['eval_images'] == '33'
    assert float(rows[0]['eval_top1']) * 33 / 100 == pytest.approx(round(float(rows[0]['eval_top1']) * 33 / 100))


# --- GCP models ------------------------------------------------------------------------------------------------------

def test_switch_changes_function_not_weights():
    from timm_gcp.layers import get_gcp_method
    model = timm.create_model('resnet18_gcp_isqrt', num_classes=3, gcp_dim=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = tr_params.set_gcp_method_all([model], 'svd', {})
    assert n >= 1 and get_gcp_method(model)[0] == 'svd'
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_hybrid_switch_at_epoch_and_resume_restores_method(tmp_path):
    common = GCP_TINY + ['--output', str(tmp_path), '--model-ema', '--diag-interval', '1']
    assert tr.main(common + ['--epochs', '3', '--experiment', 'h', '--gcp-switch-epoch', '1',
                             '--gcp-switch-method', 'svd']) == 0
    rows = _rows(tmp_path / 'h' / 'summary.csv')
    assert [r['train_gcp_method'] for r in rows] == ['isqrt', 'svd', 'svd']
    assert float(rows[0]['train_cond_median']) >= 1 and 0 <= float(rows[0]['train_floor_frac']) <= 1
    c0, c1 = _load(tmp_path / 'h' / 'checkpoint-0.pth.tar'), _load(tmp_path / 'h' / 'checkpoint-1.pth.tar')
    assert (c0['gcp_method'], c1['gcp_method'], c1['gcp_kwargs']) == ('isqrt', 'svd', {})
    assert 'state_dict_ema' in c1
    # The method is read from the model when a checkpoint is written; the arguments hold no second copy of it.
    assert not hasattr(c1['args'], 'gcp_method') and not hasattr(c1['args'], 'gcp_method_kwargs')
    # Resume after the switch without the switch flags: the method comes back from the checkpoint.
    assert tr.main(common + ['--epochs', '3', '--experiment', 'r', '--resume',
                             str(tmp_path / 'h' / 'checkpoint-1.pth.tar')]) == 0
    assert [r['train_gcp_method'] for r in _rows(tmp_path / 'r' / 'summary.csv')] == ['svd']
    a, b = _final_weights(tmp_path / 'h'), _final_weights(tmp_path / 'r')
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.mark.slow
def test_method_options_recorded_and_restored_on_resume(tmp_path):
    common = ['--model', 'resnet18_gcp_isqrt', '--output', str(tmp_path), '--diag-interval', '0']
    assert tr.main(TINY + ['gcp_dim=8', 'output_stride=8', "gcp_kwargs={'iters': 3}"] + common + [
        '--epochs', '1', '--experiment', 'a']) == 0
    c0 = _load(tmp_path / 'a' / 'last.pth.tar')
    assert (c0['gcp_method'], c0['gcp_kwargs']) == ('isqrt', {'iters': 3})
    # Resumed into a model built with the default options: the checkpoint's options come back.
    assert tr.main(TINY + ['gcp_dim=8', 'output_stride=8'] + common + [
        '--epochs', '2', '--experiment', 'b', '--resume', str(tmp_path / 'a' / 'last.pth.tar')]) == 0
    c1 = _load(tmp_path / 'b' / 'last.pth.tar')
    assert (c1['epoch'], c1['gcp_method'], c1['gcp_kwargs']) == (1, 'isqrt', {'iters': 3})


@pytest.mark.slow
def test_demo_prints_both_models(tmp_path, capsys):
    rc = tr.main(['--builtin-train-samples', '64', '--builtin-val-samples', '32', '--epochs', '1', '--output',
                  str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(('resnet18_gcp_isqrt', 'resnet18 '))]
    assert len(lines) == 2 and 'GCP (isqrt)' in lines[0] and 'average' in lines[1]
    assert (tmp_path / 'demo' / 'summary.csv').exists() and (tmp_path / 'demo-baseline' / 'summary.csv').exists()


# --- a diverging run ----------------------------------------------------------------------------------------------


def _assert_no_bad_checkpoint(folder, err):
    """No checkpoint with NaN/inf was written, and the one the message names as the last good one (if any) is good:
    finite weights and a finite evaluation (its summary.csv row)."""
    for name in os.listdir(folder):
        if name.endswith('.pth.tar'):
            assert finite_checkpoint(folder / name), name
    if 'The last good checkpoint is ' in err:
        path = err.split('The last good checkpoint is ')[1].split(' (epoch ')[0]
        epoch = int(err.split(' (epoch ')[1].split(')')[0])
        assert finite_checkpoint(path) and _load(path)['epoch'] == epoch
        row = [r for r in _rows(folder / 'summary.csv') if int(r['epoch']) == epoch][0]
        assert all(float(row[k]) == float(row[k]) for k in ('eval_loss', 'eval_top1'))  # not NaN


@pytest.mark.parametrize('lr, noticed', [
    ('1e3', "evaluation: a GCP layer's input: x holds non-finite values"),  # finite weights, the features overflow
    ('1e4', "at the end of epoch 0: the model's parameters/buffers"),  # BN running_var inf, training loss finite
])
@pytest.mark.slow
def test_diverging_gcp_run_stops_whichever_layer_notices(tmp_path, capsys, lr, noticed):
    """With a huge learning rate a GCP model's training loss can stay finite while BatchNorm buffers overflow, or the
    evaluation's covariances become NaN/inf with finite weights (the matrix square root's finite check notices).
    Either way the run stops with the documented message (exit status 2), not a traceback, and writes nothing
    non-finite."""
    rc = tr.main(GCP_TINY + ['--epochs', '3', '--lr', lr, '--output', str(tmp_path), '--experiment', 'e',
                             '--log-interval', '1'])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert 'timm-gcp-train: error: non-finite values ' in err and noticed in err
    assert 'Traceback' not in err
    _assert_no_bad_checkpoint(tmp_path / 'e', err)


def _corrupt_after(monkeypatch, epoch, fn):
    """Run ``fn(model)`` after training epoch ``epoch``, as if that epoch had diverged this way."""
    original = tr.train_one_epoch

    def train_one_epoch(e, model, *args, **kwargs):
        metrics = original(e, model, *args, **kwargs)
        if e == epoch:
            with torch.no_grad():
                fn(model)
        return metrics
    monkeypatch.setattr(tr_run, 'train_one_epoch', train_one_epoch)


@pytest.mark.slow
def test_non_finite_buffer_with_finite_loss_is_never_saved(tmp_path, capsys, monkeypatch):
    _corrupt_after(monkeypatch, 1, lambda model: model.layer1[0].bn1.running_var.fill_(float('inf')))
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '3', '--output', str(tmp_path), '--experiment', 'e'])
    err = capsys.readouterr().err
    assert rc == 2
    assert "non-finite values at the end of epoch 1: the model's parameters/buffers: 1 tensor(s) hold NaN/inf " \
           '(layer1.0.bn1.running_var)' in err
    assert f'The last good checkpoint is {tmp_path / "e" / "last.pth.tar"} (epoch 0)' in err
    assert sorted(p.name for p in (tmp_path / 'e').glob('*.pth.tar')) == [
        'checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    _assert_no_bad_checkpoint(tmp_path / 'e', err)


@pytest.mark.slow
def test_non_finite_evaluation_is_not_a_good_checkpoint(tmp_path, capsys, monkeypatch):
    """An epoch whose evaluation loss is NaN is not saved, and the message names the epoch before it."""
    original = tr_run.evaluate

    def validate(model, loader, *args, **kwargs):
        metrics = original(model, loader, *args, **kwargs)
        return dict(metrics, loss=float('nan')) if validate.calls == 1 else metrics
    validate.calls = 0

    def counted(*args, **kwargs):
        out = validate(*args, **kwargs)
        validate.calls += 1
        return out
    monkeypatch.setattr(tr_run, 'evaluate', counted)
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '3', '--output', str(tmp_path), '--experiment', 'e',
                         '--train-batches-per-epoch', '2'])
    err = capsys.readouterr().err
    assert rc == 2
    assert 'non-finite values at epoch 1, evaluation: the evaluation loss of the model is NaN or infinite' in err
    assert f'last good checkpoint is {tmp_path / "e" / "last.pth.tar"} (epoch 0)' in err
    assert _load(tmp_path / 'e' / 'last.pth.tar')['epoch'] == 0
    assert [r['epoch'] for r in _rows(tmp_path / 'e' / 'summary.csv')] == ['0']


@pytest.mark.slow
def test_divergence_in_the_first_epoch_names_no_checkpoint(tmp_path, capsys, monkeypatch):
    _corrupt_after(monkeypatch, 0, lambda model: model.fc.weight.fill_(float('nan')))
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '2', '--output', str(tmp_path), '--experiment', 'e'])
    err = capsys.readouterr().err
    assert rc == 2 and "the model's parameters/buffers: 1 tensor(s) hold NaN/inf (fc.weight)" in err
    assert 'No good checkpoint was written before it' in err
    assert not list((tmp_path / 'e').glob('*.pth.tar'))


@pytest.mark.slow
def test_a_non_finite_checkpoint_is_not_resumed(tmp_path, capsys):
    common = TINY + ['--model', 'resnet18', '--output', str(tmp_path), '--diag-interval', '0']
    assert tr.main(common + ['--epochs', '1', '--experiment', 'e']) == 0
    ckpt = _load(tmp_path / 'e' / 'last.pth.tar')
    ckpt['state_dict']['bn1.running_var'][0] = float('inf')
    bad = tmp_path / 'bad.pth.tar'
    torch.save(ckpt, bad)
    for flag in ('--resume', '--initial-checkpoint'):
        rc = tr.main(common + ['--epochs', '2', '--experiment', 'r', flag, str(bad)])
        assert rc == 2
        assert f'{flag} {bad} is not a good checkpoint: 1 tensor(s) hold NaN/inf (bn1.running_var)' in \
            capsys.readouterr().err
    assert not (tmp_path / 'r').exists()


# --- unreadable checkpoints, the output folder ---------------------------------------------------------------------


class _RunsCode:
    """Unpickling this would run ``os.system``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _bad_file(kind, tmp_path):
    """A checkpoint file that cannot be used, and the words the error must contain."""
    good = tmp_path / 'good.pth.tar'
    torch.save({'state_dict': timm.create_model('resnet18', num_classes=4).state_dict(), 'epoch': 0}, good)
    path = tmp_path / f'{kind}.pth.tar'
    data = good.read_bytes()
    if kind == 'empty':
        path.write_bytes(b'')
        return path, 'is empty (0 bytes)'
    if kind == 'truncated':
        path.write_bytes(data[:len(data) // 2])
        return path, 'is truncated or corrupt'
    if kind == 'random':
        path.write_bytes(os.urandom(4096).replace(b'\x80', b'\x00'))
        return path, 'is not a PyTorch checkpoint'
    if kind == 'pickled-code':
        path.write_bytes(pickle.dumps({'state_dict': _RunsCode(tmp_path / 'ran')}))
        return path, 'refusing to load'
    if kind == 'safetensors':
        from safetensors.torch import save_file
        path = tmp_path / 'w.safetensors'
        save_file({'a': torch.ones(64)}, str(path))
        path.write_bytes(path.read_bytes()[:-40])
        return path, 'is not a readable .safetensors file'
    raise ValueError(kind)


BAD_KINDS = ['empty', 'truncated', 'random', 'pickled-code', 'safetensors']


@pytest.mark.parametrize('flag, kind', [('--initial-checkpoint', k) for k in BAD_KINDS] + [
    ('--pretrained-path', 'safetensors'), ('--pretrained-path', 'pickled-code')])
def test_unreadable_initial_checkpoint_is_a_clear_error(tmp_path, capsys, flag, kind):
    path, words = _bad_file(kind, tmp_path)
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path), '--experiment', 'x',
                         flag, str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and f'timm-gcp-train: error: {flag}: ' in err and words in err, err[-1500:]
    assert 'Traceback' not in err and not (tmp_path / 'x').exists() and not (tmp_path / 'ran').exists()


@pytest.mark.parametrize('kind', ['truncated', 'safetensors'])
def test_unreadable_resume_is_not_called_another_architecture(tmp_path, capsys, kind):
    path, words = _bad_file(kind, tmp_path)
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path), '--experiment', 'x',
                         '--resume', str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and '--resume: ' in err and words in err and 'does not fit' not in err


@pytest.mark.slow
def test_interrupted_save_is_cleaned_up_and_not_resumed(tmp_path, capsys, caplog):
    """A kill during a save leaves an empty tmp.pth.tar: resuming it is a clear error, and the next run in that
    folder removes it before it trains (here a run that stops before it saves anything)."""
    common = TINY + ['--model', 'resnet18', '--output', str(tmp_path), '--experiment', 'e', '--smoothing', '0']
    assert tr.main(common + ['--epochs', '1']) == 0
    tmp = tmp_path / 'e' / 'tmp.pth.tar'
    tmp.write_bytes(b'')
    assert tr.main(common + ['--epochs', '2', '--resume', str(tmp)]) == 2
    err = capsys.readouterr().err
    assert f'--resume: checkpoint {tmp} is empty (0 bytes) (an interrupted save leaves an empty tmp.pth.tar: use ' \
           'last.pth.tar)' in err
    with caplog.at_level(logging.WARNING, logger='timm_gcp.train'):
        rc = tr.main(common + ['--epochs', '2', '--lr', '1e30', '--no-resume-opt', '--resume',
                               str(tmp_path / 'e' / 'last.pth.tar')])
    assert rc == 2 and 'non-finite values at epoch 1' in capsys.readouterr().err
    assert not tmp.exists() and f'removing {tmp} (0 bytes)' in caplog.text


def test_output_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / 'out'
    out.write_text('not a folder')
    with pytest.raises(SystemExit):
        tr.parse_args(['--output', str(out)])
    assert f'--output {out} is a file' in capsys.readouterr().err
    assert out.read_text() == 'not a folder'


@pytest.mark.slow
def test_num_classes_from_the_training_data(tmp_path, caplog):
    """Without --num-classes a 3-class folder gets a 3-class head (not timm's 1000) and a log line saying so; the
    checkpoint records the class names in label order."""
    data = write_image_folder(tmp_path / 'data', classes=3, per_class=2, size=36)
    with caplog.at_level(logging.INFO, logger='timm_gcp.train'):
        rc = tr.main(['--data-dir', str(data), '--model', 'resnet18', '--img-size', '32', '-b', '3', '--epochs', '1',
                      '--workers', '0', '--output', str(tmp_path / 'out'), '--experiment', 'e', '--warmup-epochs', '0'])
    assert rc == 0
    ckpt = _load(tmp_path / 'out' / 'e' / 'last.pth.tar')
    assert ckpt['state_dict']['fc.weight'].shape[0] == 3
    assert ckpt['class_names'] == ['class0', 'class1', 'class2']
    assert '--num-classes not given: 3 outputs for the 3 classes of the training data' in caplog.text


# --- concurrent runs -------------------------------------------------------------------------------------------------


def test_second_writer_of_a_run_folder_is_refused(tmp_path, capsys):
    """A run resuming into a folder that another run holds stops before it writes anything (exit status 2)."""
    common = TINY + ['--model', 'resnet18', '--output', str(tmp_path), '--experiment', 'e', '--diag-interval', '0']
    assert tr.main(common + ['--epochs', '1']) == 0
    folder = tmp_path / 'e'
    before = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith('.')}
    held = tr_run_dir.RunLock.try_acquire(str(folder))  # as the first run would, while it trains
    try:
        rc = tr.main(common + ['--epochs', '2', '--resume', str(folder / 'last.pth.tar')])
    finally:
        held.release()
    err = capsys.readouterr().err
    assert rc == 2
    assert f'timm-gcp-train: error: {folder} is in use by pid {os.getpid()} (another timm-gcp-train run holds its ' \
           'lock)' in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith('.')} == before
    assert tr.main(common + ['--epochs', '2', '--resume', str(folder / 'last.pth.tar')]) == 0  # once released


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_a_run_folder_locked_by_another_process_is_refused(tmp_path, capsys):
    """The lock holds across processes: a second process resuming into a folder that a live process holds stops with
    exit status 2 naming that process, and writes nothing."""
    common = TINY + ['--model', 'resnet18', '--output', str(tmp_path), '--experiment', 'e', '--diag-interval', '0']
    assert tr.main(common + ['--epochs', '1']) == 0
    folder = tmp_path / 'e'
    before = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith('.')}
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, timm_gcp.train.run_dir as rd; lock = rd.RunLock.try_acquire(sys.argv[1]); '
         'print("held" if lock else "busy", flush=True); sys.stdin.read()', str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        rc = tr.main(common + ['--epochs', '2', '--resume', str(folder / 'last.pth.tar')])
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    err = capsys.readouterr().err
    assert rc == 2 and f'{folder} is in use by pid {holder.pid}' in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith('.')} == before


@pytest.mark.slow
def test_fresh_runs_with_one_name_get_separate_folders(tmp_path, caplog):
    """A run that has created (and locked) its folder but written nothing yet keeps it: a second fresh run with the
    same --experiment writes to NAME-1."""
    folder = tmp_path / 'e'
    folder.mkdir()
    held = tr_run_dir.RunLock.try_acquire(str(folder))
    try:
        with caplog.at_level(logging.WARNING, logger='timm_gcp.train'):
            assert tr.main(TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path), '--experiment',
                                   'e', '--diag-interval', '0']) == 0
    finally:
        held.release()
    assert sorted(p.name for p in folder.iterdir()) == ['.timm-gcp-train.lock']
    assert (tmp_path / 'e-1' / 'last.pth.tar').exists() and 'writing to' in caplog.text


@pytest.mark.parametrize('model, head', [('resnet18_gcp_dropcov', 'dropcov'), ('deit_small_patch16_224_gcp_sot', 'sot')])
def test_hybrid_switch_of_a_head_without_a_root_is_refused_at_setup(tmp_path, capsys, model, head):
    # refused with exit 2 before any run folder is made, not when the switch epoch arrives
    with pytest.raises(SystemExit) as e:
        tr.main(['--model', model, '--gcp-switch-epoch', '1', '--gcp-switch-method', 'pade',
                 '--output', str(tmp_path / 'out')])
    assert e.value.code == 2 and f"'{head}' head" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()

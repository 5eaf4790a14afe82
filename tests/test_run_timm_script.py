"""The launcher that runs timm's scripts with timm_gcp imported.

CI uses small stand-in scripts written to a temporary directory; the real train.py / validate.py run only when
TIMM_SCRIPTS_DIR points at a checkout of timm's repository.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

from timm_gcp.run_timm_script import check_script_args
from helpers.data import ROOT, free_port, load_checkpoint, subprocess_env, write_image_folder

STANDIN = textwrap.dedent('''
    import json, os, sys
    out = {"argv": sys.argv, "name": __name__, "gcp_imported": "timm_gcp" in sys.modules,
           "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE")}
    with open(os.environ["STANDIN_OUT"] + "." + str(os.environ.get("RANK", "x")), "w") as f:
        json.dump(out, f)
''')


def _write_script(tmp_path, version=None):
    script = tmp_path / 'train.py'
    script.write_text(STANDIN)
    if version is not None:
        (tmp_path / 'timm').mkdir()
        (tmp_path / 'timm' / 'version.py').write_text(f"__version__ = '{version}'\n")
    return script


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_runs_script_as_main_with_plugin_imported(tmp_path):
    script = _write_script(tmp_path, version=timm.__version__)
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, '-m', 'timm_gcp.run_timm_script', str(script), '--model', 'x', '-b', '2'],
                       env=subprocess_env(STANDIN_OUT=str(out)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / 'out.x').read_text())
    assert got['argv'] == [str(script), '--model', 'x', '-b', '2']
    assert got['name'] == '__main__' and got['gcp_imported']
    assert 'differ' not in r.stderr  # same version: no warning


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_warns_on_version_mismatch(tmp_path):
    script = _write_script(tmp_path, version='0.0.1.dev0')
    r = subprocess.run([sys.executable, '-m', 'timm_gcp.run_timm_script', str(script)],
                       env=subprocess_env(STANDIN_OUT=str(tmp_path / 'out')), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'TimmVersionWarning' in r.stderr and '0.0.1.dev0' in r.stderr and timm.__version__ in r.stderr


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_missing_script_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'timm_gcp.run_timm_script', str(tmp_path / 'nope.py')],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'timm script not found' in r.stderr and 'nope.py' in r.stderr


def test_checkout_version(tmp_path):
    from timm_gcp.run_timm_script import checkout_version
    assert checkout_version(str(_write_script(tmp_path))) is None
    (tmp_path / 'timm').mkdir()
    (tmp_path / 'timm' / 'version.py').write_text('__version__ = "1.2.3"\n')
    assert checkout_version(str(tmp_path / 'train.py')) == '1.2.3'


@pytest.mark.slow
def test_under_torchrun(tmp_path):
    script = _write_script(tmp_path)
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                        '--master_port', free_port(), '-m', 'timm_gcp.run_timm_script', str(script), '--flag'],
                       env=subprocess_env(STANDIN_OUT=str(out)), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    for rank in ('0', '1'):
        got = json.loads((tmp_path / f'out.{rank}').read_text())
        assert got['argv'] == [str(script), '--flag'] and got['gcp_imported'] and got['world'] == '2'


SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR')


def _image_folder(root):
    return write_image_folder(root, classes=2, per_class=4, size=40)


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPTS_DIR, reason='set TIMM_SCRIPTS_DIR to a timm checkout to run its real scripts')
def test_real_train_and_validate(tmp_path):
    data = _image_folder(tmp_path / 'data')
    out = tmp_path / 'out'
    r = subprocess.run([
        sys.executable, '-m', 'timm_gcp.run_timm_script', os.path.join(SCRIPTS_DIR, 'train.py'),
        '--data-dir', str(data), '--model', 'resnet18_gcp_isqrt', '--model-kwargs', 'gcp_dim=8', 'output_stride=8',
        '--num-classes', '2', '--img-size', '32', '-b', '4', '--epochs', '1', '--device', 'cpu', '--workers', '0',
        '--output', str(out), '--experiment', 'e', '--warmup-epochs', '0', '--sched', 'step'],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = out / 'e' / 'last.pth.tar'
    assert ckpt.exists() and (out / 'e' / 'summary.csv').exists()
    r = subprocess.run([
        sys.executable, '-m', 'timm_gcp.run_timm_script', os.path.join(SCRIPTS_DIR, 'validate.py'),
        str(data / 'validation'), '--model', 'resnet18_gcp_isqrt', '--model-kwargs', 'gcp_dim=8', 'output_stride=8',
        '--num-classes', '2', '--img-size', '32', '-b', '4', '--checkpoint', str(ckpt), '--device', 'cpu',
        '--workers', '0'],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'top1' in r.stdout + r.stderr


def test_hybrid_stage_commands():
    from timm_gcp.run_timm_script import hybrid_stage_commands
    s1, s2 = hybrid_stage_commands('/x/train.py', 'resnet50_gcp_isqrt', 45, 60, 'out', 'exp',
                                   train_args=['--lr', '0.0794'], launcher=['torchrun', '-m'])
    # stage 1: the whole run's arguments (60 epochs: its schedule), stopped by the launcher after epoch 45
    assert s1[:6] == ['torchrun', '-m', 'timm_gcp.run_timm_script', '--stop-epoch', '45', '/x/train.py']
    assert s1[s1.index('--model') + 1] == 'resnet50_gcp_isqrt' and s1[s1.index('--epochs') + 1] == '60'
    assert s2[:4] == ['torchrun', '-m', 'timm_gcp.run_timm_script', '/x/train.py'] and '--stop-epoch' not in s2
    assert s2[s2.index('--model') + 1] == 'resnet50_gcp_pade' and s2[s2.index('--epochs') + 1] == '60'
    assert s2[s2.index('--resume') + 1] == os.path.join('out', 'exp', 'last.pth.tar') and '--resume' not in s1
    assert '0.0794' in s1 and '0.0794' in s2
    with pytest.raises(ValueError, match='switch_epoch'):
        hybrid_stage_commands('t.py', 'resnet50_gcp', 60, 60, 'o', 'e')
    with pytest.raises(ValueError, match='not a GCP model'):
        hybrid_stage_commands('t.py', 'resnet50', 10, 60, 'o', 'e')
    with pytest.raises(ValueError, match='--epochs'):
        hybrid_stage_commands('t.py', 'resnet50_gcp', 10, 60, 'o', 'e', train_args=['--epochs', '3'])
    with pytest.raises(ValueError, match='--resume'):  # the --flag=value spelling too
        hybrid_stage_commands('t.py', 'resnet50_gcp', 10, 60, 'o', 'e', train_args=['--resume=old/last.pth.tar'])
    with pytest.raises(ValueError, match='--start-epoch'):  # it would override the resumed epoch
        hybrid_stage_commands('t.py', 'resnet50_gcp', 10, 60, 'o', 'e', train_args=['--start-epoch', '3'])
    # Any backbone's GCP name (one parser of <backbone>_gcp_<method>); an unknown method names the valid ones.
    s1, s2 = hybrid_stage_commands('t.py', 'convnext_tiny_gcp_svd', 10, 60, 'o', 'e', to_method='lyap')
    assert s1[s1.index('--model') + 1] == 'convnext_tiny_gcp_isqrt' and s2[s2.index('--model') + 1] == \
        'convnext_tiny_gcp_lyap'
    with pytest.raises(ValueError, match='valid methods: isqrt'):
        hybrid_stage_commands('t.py', 'resnet50_gcp', 10, 60, 'o', 'e', to_method='sqrt')


def test_hybrid_refuses_the_plateau_schedule_up_front(tmp_path):
    from timm_gcp.run_timm_script import hybrid_stage_commands, schedule_name
    for args in (['--sched', 'plateau'], ['--sched=plateau'], ['--sched', 'cosine', '--sched', 'plateau']):
        with pytest.raises(ValueError, match="'plateau' learning-rate schedule cannot be split.*eval-metric history"):
            hybrid_stage_commands('t.py', 'resnet50_gcp', 10, 60, 'o', 'e', train_args=args)
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text('sched: plateau\nlr: 0.1\n')  # train.py takes its defaults from --config
    with pytest.raises(ValueError, match="'plateau'"):
        hybrid_stage_commands('t.py', 'resnet50_gcp', 10, 60, 'o', 'e', train_args=['--config', str(cfg)])
    assert schedule_name(['--config', str(cfg), '--sched', 'step']) == 'step'  # the command line wins
    assert schedule_name(['-c', str(cfg)]) == 'plateau'
    assert schedule_name([]) == 'cosine'  # train.py's default
    cfg.write_text('lr: 0.1\n')
    assert schedule_name(['--config', str(cfg)]) == 'cosine'
    with pytest.raises(ValueError, match='cannot read the train.py config'):
        schedule_name(['--config', str(tmp_path / 'missing.yaml')])


# train.py's learning-rate schedule arguments and defaults (timm's train.py, 'Learning rate schedule parameters'):
# the no-checkout test below drives timm.scheduler exactly as train.py does with them.
def _train_py_sched_parser():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument('--sched', default='cosine')
    p.add_argument('--sched-on-updates', action='store_true')
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--lr-noise', type=float, nargs='+', default=None)
    p.add_argument('--lr-noise-pct', type=float, default=0.67)
    p.add_argument('--lr-noise-std', type=float, default=1.0)
    p.add_argument('--lr-cycle-mul', type=float, default=1.0)
    p.add_argument('--lr-cycle-decay', type=float, default=0.5)
    p.add_argument('--lr-cycle-limit', type=int, default=1)
    p.add_argument('--lr-k-decay', type=float, default=1.0)
    p.add_argument('--warmup-lr', type=float, default=1e-5)
    p.add_argument('--min-lr', type=float, default=0)
    p.add_argument('--epochs', type=int, default=300)
    p.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    p.add_argument('--decay-epochs', type=float, default=90)
    p.add_argument('--warmup-epochs', type=int, default=5)
    p.add_argument('--warmup-prefix', action='store_true')
    p.add_argument('--cooldown-epochs', type=int, default=0)
    p.add_argument('--patience-epochs', type=int, default=10)
    p.add_argument('--decay-rate', type=float, default=0.1)
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--resume', default='')
    return p


UPDATES_PER_EPOCH = 3


def _run_train_py_schedule(cmd, train_py, checkpoints):
    """What train.py does with its schedule for the command ``cmd`` (a stage of hybrid_stage_commands, or a single
    run): resume from ``checkpoints`` (the optimizer state and epoch train.py's checkpoint holds), build the scheduler
    with create_scheduler_v2 (wrapped by the launcher's --stop-epoch as run_timm_script wraps it), step it to the start
    epoch, and per epoch: step_update after each optimizer update, record the lr summary.csv gets, step(epoch + 1).

    Returns: {epoch: lr}; writes this run's last checkpoint into ``checkpoints``.
    """
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm_gcp.run_timm_script import stop_after_epochs
    i = cmd.index(train_py)
    launcher_opts, script_args = cmd[:i], cmd[i + 1:]
    args, _ = _train_py_sched_parser().parse_known_args(script_args)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{'params': [param]}, {'params': [torch.nn.Parameter(torch.zeros(1))],
                                                        'lr': args.lr * 0.5}], lr=args.lr, momentum=0.9)
    start_epoch = 0
    if args.resume:
        state = checkpoints[args.resume]
        optimizer.load_state_dict(state['optimizer'])
        start_epoch = state['epoch'] + 1
    create = create_scheduler_v2
    if '--stop-epoch' in launcher_opts:
        create = stop_after_epochs(create, int(launcher_opts[launcher_opts.index('--stop-epoch') + 1]))
    scheduler, num_epochs = create(optimizer, **scheduler_kwargs(args, decreasing_metric=False),
                                   updates_per_epoch=UPDATES_PER_EPOCH)
    if start_epoch > 0:
        if args.sched_on_updates:
            scheduler.step_update(start_epoch * UPDATES_PER_EPOCH)
        else:
            scheduler.step(start_epoch)
    lrs = {}
    for epoch in range(start_epoch, num_epochs):
        num_updates = epoch * UPDATES_PER_EPOCH
        for _ in range(UPDATES_PER_EPOCH):
            param.grad = torch.ones(1)
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
        groups = optimizer.param_groups
        lrs[epoch] = sum(g['lr'] for g in groups) / len(groups)
        scheduler.step(epoch + 1, 50.0)
    out_dir = script_args[script_args.index('--output') + 1]
    exp = script_args[script_args.index('--experiment') + 1]
    checkpoints[os.path.join(out_dir, exp, 'last.pth.tar')] = {'epoch': epoch, 'optimizer': optimizer.state_dict()}
    return lrs


SCHEDULES = {
    'cosine': ['--sched', 'cosine', '--warmup-epochs', '2', '--cooldown-epochs', '2', '--min-lr', '1e-4'],
    'cosine_prefix_updates': ['--sched', 'cosine', '--warmup-epochs', '2', '--warmup-prefix', '--sched-on-updates',
                              '--lr-k-decay', '0.5'],
    'step': ['--sched', 'step', '--decay-epochs', '3', '--warmup-epochs', '1'],
    'multistep': ['--sched', 'multistep', '--decay-milestones', '4', '7', '--warmup-epochs', '2'],
    'tanh': ['--sched', 'tanh', '--warmup-epochs', '2', '--cooldown-epochs', '1', '--lr-noise', '0.3', '0.8'],
    'poly': ['--sched', 'poly', '--decay-rate', '2', '--warmup-epochs', '1'],
}


@pytest.mark.parametrize('sched', list(SCHEDULES))
def test_hybrid_stages_follow_the_single_run_schedule_without_a_timm_checkout(sched):
    """Every epoch's lr of the two stages, driven through timm.scheduler as train.py drives it, equals a single
    uninterrupted run's: warmup, decay points, cooldown and noise included, for a switch in the warmup, in the
    middle and just before the end."""
    from timm_gcp.run_timm_script import hybrid_stage_commands
    train_args = ['--lr', '0.2', *SCHEDULES[sched]]
    epochs = 10
    single = _run_train_py_schedule(['t.py', *train_args, '--output', 'o', '--experiment', 's', '--epochs',
                                     str(epochs)], 't.py', {})
    total = epochs + (2 if sched in ('cosine', 'cosine_prefix_updates') else 1 if sched == 'tanh' else 0)
    assert sorted(single) == list(range(total))
    assert len({round(v, 12) for v in single.values()}) > 3  # a schedule that moves
    for switch in (1, 5, epochs - 1):
        checkpoints = {}
        s1, s2 = hybrid_stage_commands('t.py', 'resnet18_gcp', switch, epochs, 'o', 'h', train_args=train_args)
        first = _run_train_py_schedule(s1, 't.py', checkpoints)
        assert sorted(first) == list(range(switch))  # stage 1 stops at the switch epoch
        second = _run_train_py_schedule(s2, 't.py', checkpoints)
        assert sorted(second) == list(range(switch, total))
        assert {**first, **second} == pytest.approx(single, rel=1e-12, abs=0)


def test_a_stage_one_shortened_to_the_switch_epoch_would_change_the_cosine_schedule():
    """Why stage 1 keeps --epochs of the whole run: run for the switch epoch only, the cosine schedule (the default
    of train.py) ends there, and every later epoch's lr differs from a single run's."""
    args = ['t.py', '--lr', '0.2', '--warmup-epochs', '1', '--output', 'o', '--experiment', 'x']
    single = _run_train_py_schedule([*args, '--epochs', '10'], 't.py', {})
    short = _run_train_py_schedule([*args, '--epochs', '5'], 't.py', {})
    assert short[4] < 0.5 * single[4]


def test_stop_epoch_launcher_option(tmp_path, monkeypatch, capsys):
    """--stop-epoch before the script caps the epochs create_scheduler_v2 returns while the script runs (in this
    process: main() is what ``python -m timm_gcp.run_timm_script`` runs)."""
    import timm.scheduler
    from timm_gcp.run_timm_script import main
    script = tmp_path / 'train.py'
    script.write_text(textwrap.dedent('''
        import json, os, torch
        from timm.scheduler import create_scheduler_v2
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched, n = create_scheduler_v2(opt, sched='cosine', num_epochs=10, warmup_epochs=0)
        with open(os.environ["STANDIN_OUT"], "w") as f:
            json.dump({"epochs": n, "t_initial": sched.t_initial}, f)
    '''))
    out = tmp_path / 'out.json'
    monkeypatch.setenv('STANDIN_OUT', str(out))
    original = timm.scheduler.create_scheduler_v2
    for opts, expect in (([], 10), (['--stop-epoch', '4'], 4), (['--stop-epoch=20'], 10)):
        assert main([*opts, str(script)]) == 0
        assert json.loads(out.read_text()) == {'epochs': expect, 't_initial': 10}  # the schedule is the whole run's
        assert timm.scheduler.create_scheduler_v2 is original  # restored after the run
    (tmp_path / 'plain').mkdir()
    plain = _write_script(tmp_path / 'plain')  # a script that builds no schedule
    for argv, msg in ((['--stop-epoch', '0', str(script)], 'stop_epoch must be an int >= 1'),
                      (['--stop-epoch', 'x', str(script)], '--stop-epoch must be an int'),
                      (['--stop-epoch'], '--stop-epoch needs a value'),
                      (['--stop-epoch', '3', str(plain)], 'create_scheduler_v2')):
        out.unlink(missing_ok=True)
        assert main(argv) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPTS_DIR, reason='set TIMM_SCRIPTS_DIR to a timm checkout to run its real train.py')
def test_hybrid_script_with_real_train_py(tmp_path):
    data = _image_folder(tmp_path / 'data')
    r = subprocess.run([
        sys.executable, os.path.join(ROOT, 'scripts', 'hybrid_timm_train.py'), '--train-py',
        os.path.join(SCRIPTS_DIR, 'train.py'), '--model', 'resnet18_gcp', '--switch-epoch', '1', '--epochs', '2',
        '--method', 'svd', '--output', str(tmp_path / 'out'), '--experiment', 'h', '--',
        '--data-dir', str(data), '--model-kwargs', 'gcp_dim=8', 'output_stride=8', '--num-classes', '2',
        '--img-size', '32', '-b', '4', '--device', 'cpu', '--workers', '0', '--sched', 'step', '--warmup-epochs', '0'],
        env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / 'out' / 'h' / 'last.pth.tar')
    assert ckpt['epoch'] == 1 and ckpt['arch'] == 'resnet18_gcp_svd'
    first = load_checkpoint(tmp_path / 'out' / 'h' / 'checkpoint-0.pth.tar')
    assert first['arch'] == 'resnet18_gcp_isqrt' and first['state_dict'].keys() == ckpt['state_dict'].keys()


def _summary_lrs(path):
    """{epoch: lr} from train.py's summary.csv (a resumed run appends a second header)."""
    import csv
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r['epoch'] != 'epoch']
    epochs = [int(r['epoch']) for r in rows]
    assert len(epochs) == len(set(epochs)), epochs  # no epoch trained twice
    return {int(r['epoch']): float(r['lr']) for r in rows}


REAL_SCHEDULES = {
    'cosine': ['--sched', 'cosine', '--warmup-epochs', '1', '--cooldown-epochs', '1', '--min-lr', '1e-3'],
    'step': ['--sched', 'step', '--decay-epochs', '2', '--warmup-epochs', '1'],
    'multistep': ['--sched', 'multistep', '--decay-milestones', '1', '3', '--warmup-epochs', '0'],
    'tanh': ['--sched', 'tanh', '--warmup-epochs', '1', '--cooldown-epochs', '1'],
}


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPTS_DIR, reason='set TIMM_SCRIPTS_DIR to a timm checkout to run its real train.py')
@pytest.mark.parametrize('sched', list(REAL_SCHEDULES))
def test_hybrid_lr_per_epoch_equals_a_single_run_with_real_train_py(tmp_path, sched):
    """The lr column of summary.csv: the hybrid run's two stages against one uninterrupted train.py run, the switch
    after epoch 2 of 4 (plus cooldown)."""
    data = _image_folder(tmp_path / 'data')
    common = ['--data-dir', str(data), '--model-kwargs', 'gcp_dim=8', 'output_stride=8', '--num-classes', '2',
              '--img-size', '32', '-b', '4', '--device', 'cpu', '--workers', '0', '--lr', '0.1', '--seed', '0',
              *REAL_SCHEDULES[sched]]
    train_py = os.path.join(SCRIPTS_DIR, 'train.py')
    r = subprocess.run([sys.executable, '-m', 'timm_gcp.run_timm_script', train_py, *common, '--model',
                        'resnet18_gcp_isqrt', '--epochs', '4', '--output', str(tmp_path / 'out'), '--experiment',
                        'single'], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([
        sys.executable, os.path.join(ROOT, 'scripts', 'hybrid_timm_train.py'), '--train-py', train_py, '--model',
        'resnet18_gcp', '--switch-epoch', '2', '--epochs', '4', '--method', 'svd', '--output', str(tmp_path / 'out'),
        '--experiment', 'hybrid', '--', *common], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    single = _summary_lrs(tmp_path / 'out' / 'single' / 'summary.csv')
    hybrid = _summary_lrs(tmp_path / 'out' / 'hybrid' / 'summary.csv')
    cooldown = 1 if '--cooldown-epochs' in REAL_SCHEDULES[sched] else 0
    assert sorted(single) == list(range(4 + cooldown))
    assert hybrid == pytest.approx(single, rel=1e-9, abs=0)
    assert len(set(single.values())) > 2  # the schedule moves
    stage1 = load_checkpoint(tmp_path / 'out' / 'hybrid' / 'checkpoint-1.pth.tar')
    assert stage1['arch'] == 'resnet18_gcp_isqrt' and stage1['epoch'] == 1  # stage 1 stopped at the switch
    assert load_checkpoint(tmp_path / 'out' / 'hybrid' / 'last.pth.tar')['arch'] == 'resnet18_gcp_svd'


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_hybrid_script_refuses_plateau_before_running(tmp_path):
    """Refused before either stage starts (train.py is never run, so any path will do)."""
    r = subprocess.run([
        sys.executable, os.path.join(ROOT, 'scripts', 'hybrid_timm_train.py'), '--train-py',
        str(tmp_path / 'train.py'), '--model', 'resnet18_gcp', '--switch-epoch', '1', '--epochs', '2',
        '--output', str(tmp_path / 'out'), '--', '--sched', 'plateau'], env=subprocess_env(), capture_output=True,
        text=True, timeout=120)
    assert r.returncode == 2 and "'plateau' learning-rate schedule cannot be split" in r.stderr, r.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_test_pool_with_a_gcp_model_is_refused_before_the_script_runs(tmp_path):
    script = _write_script(tmp_path)
    for model_args in (['--model', 'resnet50_gcp_pade'], ['--model=resnet50_gcp_pade'], ['-m', 'resnet50_gcp_pade']):
        r = subprocess.run([sys.executable, '-m', 'timm_gcp.run_timm_script', str(script), *model_args,
                            '--test-pool'], env=subprocess_env(STANDIN_OUT=str(tmp_path / 'out')), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and '--test-pool does not apply to resnet50_gcp_pade' in r.stderr, r.stderr
        assert not (tmp_path / 'out.x').exists()  # the script never ran
    check_script_args(['--model', 'resnet50', '--test-pool'])  # a plain model keeps timm's behaviour
    check_script_args(['--model', 'resnet50_gcp_pade', '--img-size', '448'])


def test_timm_test_time_pool_cannot_wrap_a_gcp_model():
    """Why --test-pool is refused: timm's TestTimePoolHead re-applies fc over an average-pooled 2048-channel map,
    which the GCP classifier (in_features d(d+1)/2) cannot take."""
    from timm.layers import apply_test_time_pool
    model = timm.create_model('resnet18_gcp_isqrt', gcp_dim=8, num_classes=3).eval()
    with pytest.raises(RuntimeError):
        wrapped, used = apply_test_time_pool(model, dict(input_size=(3, 448, 448)))
        assert used
        wrapped(torch.randn(1, 3, 448, 448))

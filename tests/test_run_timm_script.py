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


def test_warns_on_version_mismatch(tmp_path):
    script = _write_script(tmp_path, version='0.0.1.dev0')
    r = subprocess.run([sys.executable, '-m', 'timm_gcp.run_timm_script', str(script)],
                       env=subprocess_env(STANDIN_OUT=str(tmp_path / 'out')), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'TimmVersionWarning' in r.stderr and '0.0.1.dev0' in r.stderr and timm.__version__ in r.stderr


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
        '--data-dir', str(data), '--model', 'resnet18_gcp_isqrt', '--model-kwargs', 'gcp_dim=8',
        '--num-classes', '2', '--img-size', '32', '-b', '4', '--epochs', '1', '--device', 'cpu', '--workers', '0',
        '--output', str(out), '--experiment', 'e', '--warmup-epochs', '0', '--sched', 'step'],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = out / 'e' / 'last.pth.tar'
    assert ckpt.exists() and (out / 'e' / 'summary.csv').exists()
    r = subprocess.run([
        sys.executable, '-m', 'timm_gcp.run_timm_script', os.path.join(SCRIPTS_DIR, 'validate.py'),
        str(data / 'validation'), '--model', 'resnet18_gcp_isqrt', '--model-kwargs', 'gcp_dim=8', '--num-classes',
        '2', '--img-size', '32', '-b', '4', '--checkpoint', str(ckpt), '--device', 'cpu', '--workers', '0'],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'top1' in r.stdout + r.stderr


def test_hybrid_stage_commands():
    from timm_gcp.run_timm_script import hybrid_stage_commands
    s1, s2 = hybrid_stage_commands('/x/train.py', 'resnet50_gcp_isqrt', 45, 60, 'out', 'exp',
                                   train_args=['--lr', '0.0794'], launcher=['torchrun', '-m'])
    assert s1[:4] == ['torchrun', '-m', 'timm_gcp.run_timm_script', '/x/train.py']
    assert s1[s1.index('--model') + 1] == 'resnet50_gcp_isqrt' and s1[s1.index('--epochs') + 1] == '45'
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
    # Any backbone's GCP name (one parser of <backbone>_gcp_<method>); an unknown method names the valid ones.
    s1, s2 = hybrid_stage_commands('t.py', 'convnext_tiny_gcp_svd', 10, 60, 'o', 'e', to_method='lyap')
    assert s1[s1.index('--model') + 1] == 'convnext_tiny_gcp_isqrt' and s2[s2.index('--model') + 1] == \
        'convnext_tiny_gcp_lyap'
    with pytest.raises(ValueError, match='valid methods: isqrt'):
        hybrid_stage_commands('t.py', 'resnet50_gcp', 10, 60, 'o', 'e', to_method='sqrt')


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

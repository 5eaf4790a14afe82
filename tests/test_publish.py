"""Publishing and downloading: local Hub folders, timm-gcp-publish, and a loopback Hub server (tests/hub_server.py).

The loopback tests run huggingface_hub's real upload code (``HfApi.create_repo`` + ``upload_folder``) and
real download code (``hf-hub:`` and a registered tag, then ``HF_HUB_OFFLINE=1`` from the cache) in subprocesses whose
``HF_ENDPOINT`` points at the server before huggingface_hub is imported. They do NOT cover the LFS/Xet upload path of
the real Hub (the server answers "regular" upload mode, so files travel base64 inside the commit), authentication, or
the Hub's own README/metadata validation. ``test_real_hub_roundtrip`` covers the real Hub, opt-in only.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from timm_gcp import publish, zoo
from helpers.data import ROOT, write_class_folders
from helpers.hub_server import HubServer

ARCH = 'resnet18_gcp_svd'
KW = dict(gcp_dim=16, num_classes=3)  # small head: 136 features


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A timm-saver-style checkpoint of a hybrid run: trained as resnet18_gcp_isqrt, switched to svd."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(ARCH, **KW).eval()
    with torch.no_grad():  # non-trivial BN statistics so that eval logits depend on every tensor
        for name, buf in model.named_buffers():
            if name.endswith('running_var'):
                buf.uniform_(0.5, 1.5)
            elif name.endswith('running_mean'):
                buf.normal_(0, 0.1)
    d = tmp_path_factory.mktemp('ckpt')
    path = d / 'model_best.pth.tar'
    args = argparse.Namespace(model='resnet18_gcp_isqrt', model_kwargs={'gcp_dim': 16}, lr=0.1, epochs=2)
    torch.save({'epoch': 1, 'arch': 'resnet18_gcp_isqrt', 'gcp_method': 'svd', 'state_dict': model.state_dict(),
                'optimizer': {'state': {}, 'param_groups': []}, 'args': args, 'version': 2, 'metric': 33.3}, path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    torch.save({'x': x, 'expected': expected}, d / 'io.pt')
    return dict(path=str(path), io=str(d / 'io.pt'), model=model, x=x, expected=expected)


def test_save_for_hf_local_dir_roundtrip(tmp_path, trained):
    import timm
    from timm.models import save_for_hf
    save_for_hf(trained['model'], str(tmp_path / 'm'), model_args={'gcp_method': 'svd', 'gcp_dim': 16},
                safe_serialization=True)  # gcp_dim given: timm < 1.0.31 does not record factory arguments
    loaded = timm.create_model(f'local-dir:{tmp_path / "m"}', pretrained=True).eval()
    assert type(loaded).__name__ == type(trained['model']).__name__ and loaded.num_classes == 3
    with torch.no_grad():
        assert torch.equal(loaded(trained['x']), trained['expected'])


@pytest.mark.parametrize('field, value, error, match', [
    ('gcp_method', 'bogus', ValueError, 'bogus'),
    ('gcp_kwargs', {'iters': 3, 'rm_rf': True}, ValueError, 'rm_rf'),
    ('not_an_arg', 1, TypeError, 'not_an_arg'),
])
def test_config_json_values_are_validated(tmp_path, trained, field, value, error, match):
    # What a downloaded config.json feeds into the model: bad values stop with an error naming them.
    import timm
    from timm.models import save_for_hf
    save_for_hf(trained['model'], str(tmp_path / 'm'), model_args={'gcp_method': 'svd', 'gcp_dim': 16},
                safe_serialization=True)  # gcp_dim given: timm < 1.0.31 does not record factory arguments
    cfg_path = tmp_path / 'm' / 'config.json'
    cfg = json.loads(cfg_path.read_text())
    cfg['model_args'][field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        timm.create_model(f'local-dir:{tmp_path / "m"}', pretrained=True)


def _publish(argv):
    return subprocess.run([sys.executable, '-m', 'timm_gcp.publish', *argv], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)


def _publish_here(argv, capsys):
    """The CLI in this process (no interpreter start-up): (exit code, stderr)."""
    capsys.readouterr()
    rc = publish.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.slow  # a subprocess or an end-to-end CLI run
def test_publish_dry_run_writes_checked_folder(tmp_path, trained, eval_folder, capsys):
    out = tmp_path / 'export'
    res = _publish([trained['path'], '--repo-id', 'tester/r18-gcp', '--tag', 'test3c', '--dry-run',
                    '--output-dir', str(out), '--data-dir', str(eval_folder), '--workers', '0', '--batch-size', '3',
                    '--img-size', '64'])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f'arch: {ARCH}'  # gcp_method in the checkpoint picked svd
    assert sorted(os.listdir(out)) == sorted(['model.safetensors', 'config.json', 'README.md', publish.MARKER])
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == ARCH and cfg['num_classes'] == 3
    assert cfg['model_args']['gcp_method'] == 'svd' and cfg['model_args']['gcp_dim'] == 16
    assert cfg['pretrained_cfg']['tag'] == 'test3c' and cfg['pretrained_cfg']['license'] == 'apache-2.0'
    assert 'Backbone-only' not in json.dumps(cfg)  # the default tag's fields were replaced
    readme = (out / 'README.md').read_text()
    assert readme.index('import timm_gcp') < readme.index("timm.create_model('hf-hub:tester/r18-gcp'")
    metric_line = [ln for ln in res.stdout.splitlines() if ln.startswith('metrics:')][0]
    command = metric_line.split('(', 1)[1].rstrip(')')
    assert command.startswith('timm-gcp-validate --model resnet18_gcp_svd --checkpoint')
    assert command in readme and '@inproceedings{song2021' in readme
    # The quoted command, run, prints the same numbers.
    top1, top5 = metric_line.split('top1=')[1].split()[0], metric_line.split('top5=')[1].split()[0]
    from timm_gcp import validate
    capsys.readouterr()
    assert validate.main(command.split()[1:] + ['--workers', '0']) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f'top1={top1} top5={top5}' in last

    # A second run may reuse the folder it wrote ...
    base = [trained['path'], '--repo-id', 'tester/r18-gcp', '--tag', 'test3c', '--dry-run', '--output-dir']
    rc, err = _publish_here(base + [str(out)], capsys)
    assert rc == 0 and 'error' not in err  # (stderr holds the CLI's progress log lines)
    # ... but never one with a file it did not write, nor a foreign non-empty folder.
    (out / 'notes.txt').write_text('mine')
    rc, err = _publish_here(base + [str(out)], capsys)
    assert rc == 2 and 'did not write: notes.txt' in err
    assert (out / 'notes.txt').read_text() == 'mine' and (out / 'model.safetensors').exists()
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'model.safetensors').write_text('not ours')
    rc, err = _publish_here(base + [str(foreign)], capsys)
    assert rc == 2 and 'not created by timm-gcp-publish' in err
    assert (foreign / 'model.safetensors').read_text() == 'not ours'


def test_publish_refuses_unsafe_and_mismatched_checkpoints(tmp_path, trained, capsys):
    rc, err = _publish_here([trained['path'], '--repo-id', 'a/b', '--tag', 't', '--dry-run', '--output-dir',
                             str(tmp_path / 'o0'), '--data-dir', str(tmp_path / 'no_such_data')], capsys)
    assert rc == 2 and 'no such directory' in err and not (tmp_path / 'o0').exists()
    bad = tmp_path / 'bad.pth.tar'
    torch.save({'state_dict': {}, 'payload': shutil.Error('x')}, bad)  # an arbitrary class instance
    rc, err = _publish_here([str(bad), '--repo-id', 'a/b', '--tag', 't', '--dry-run', '--output-dir',
                             str(tmp_path / 'o')], capsys)
    assert rc == 2 and 'weights_only=True' in err
    rc, err = _publish_here([trained['path'], '--model', 'resnet34_gcp_svd', '--repo-id', 'a/b', '--tag', 't',
                             '--dry-run', '--output-dir', str(tmp_path / 'o2')], capsys)
    assert rc == 2 and 'does not load strictly into resnet34_gcp_svd' in err
    assert not os.path.exists(tmp_path / 'o2' / 'model.safetensors')


_PULL = textwrap.dedent('''
    import os, sys, json, importlib.util
    import torch
    tmp, repo_id, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    # Use the _zoo_cfgs.py that the publish regenerated (in the temporary checkout), as a fresh install would.
    spec = importlib.util.spec_from_file_location('timm_gcp.models._zoo_cfgs',
                                                  os.path.join(tmp, 'timm_gcp', 'models', '_zoo_cfgs.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules['timm_gcp.models._zoo_cfgs'] = mod
    import timm_gcp, timm
    io = torch.load(os.path.join(tmp, 'io.pt'), weights_only=True)
    out = {}
    m = timm.create_model('hf-hub:' + repo_id, pretrained=True).eval()
    with torch.no_grad():
        out['hf_hub'] = torch.equal(m(io['x']), io['expected'])
    name = 'resnet18_gcp_svd.' + tag
    out['listed'] = name in timm.list_pretrained('resnet18_gcp_svd*')
    m = timm.create_model(name, pretrained=True, gcp_dim=16).eval()
    with torch.no_grad():
        out['tag'] = torch.equal(m(io['x']), io['expected'])
    out['hf_hub_id'] = m.pretrained_cfg['hf_hub_id']
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_push_and_pull_through_loopback_hub(tmp_path, trained):
    # A throw-away checkout holding a copy of the registry: the publish updates it, not the real one.
    os.makedirs(tmp_path / 'zoo')
    shutil.copy(os.path.join(ROOT, 'zoo', 'registry.yaml'), tmp_path / 'zoo' / 'registry.yaml')
    shutil.copy(trained['io'], tmp_path / 'io.pt')
    server = HubServer().start()
    try:
        env = dict(os.environ, PYTHONPATH=ROOT, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / 'hf'),
                   HF_TOKEN='loopback-test-token', HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_OFFLINE='0')
        env.pop('HF_HUB_CACHE', None)
        res = subprocess.run([sys.executable, '-m', 'timm_gcp.publish', trained['path'], '--repo-id', 'tester/r18-gcp',
                              '--tag', 'hubtest', '--output-dir', str(tmp_path / 'export'), '--recipe',
                              'zoo/recipes/example.yaml', '--registry',
                              str(tmp_path / 'zoo' / 'registry.yaml')], capture_output=True, text=True, env=env,
                             timeout=600)
        assert res.returncode == 0, res.stderr
        repo = server.repos['tester/r18-gcp']
        assert len(repo.history) == 1 and sorted(repo.commits[repo.main]) == ['README.md', 'config.json',
                                                                              'model.safetensors']
        assert f'pushed: tester/r18-gcp@{repo.main}' in res.stdout
        assert ('POST', '/api/models/tester/r18-gcp/commit/main') in server.requests

        # The registry entry is pinned to the pushed commit and the generated files follow.
        reg = zoo.load_registry(str(tmp_path / 'zoo' / 'registry.yaml'))
        entry = [e for e in reg['pretrained'] if e['applies_to'] == ARCH][0]
        assert entry['weights'] == 'full' and entry['cfg']['hf_hub_id'] == f'tester/r18-gcp@{repo.main}'
        assert entry['source']['model_args'] == {'gcp_dim': 16}
        assert entry['source']['recipe'] == 'zoo/recipes/example.yaml'
        assert 'zoo/recipes/example.yaml' in repo.commits[repo.main]['README.md'].decode()
        assert f'tester/r18-gcp@{repo.main}' in (tmp_path / 'timm_gcp' / 'models' / '_zoo_cfgs.py').read_text()
        assert 'resnet18_gcp_svd.hubtest' in (tmp_path / 'MODEL_CARDS.md').read_text()

        n_before = len(server.requests)
        res = subprocess.run([sys.executable, '-c', _PULL, str(tmp_path), 'tester/r18-gcp', 'hubtest'],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out == dict(hf_hub=True, listed=True, tag=True, hf_hub_id=f'tester/r18-gcp@{repo.main}')
        assert any(p.endswith('/resolve/main/config.json') for _, p in server.requests[n_before:])
        # (the pinned tag then finds the same commit's files in the cache and needs no download)
        assert any(p.endswith('/resolve/main/model.safetensors') for _, p in server.requests[n_before:])
    finally:
        server.stop()

    # The server is gone: a fresh offline process loads both ways from the cache.
    res = subprocess.run([sys.executable, '-c', _PULL, str(tmp_path), 'tester/r18-gcp', 'hubtest'],
                         capture_output=True, text=True, env=dict(env, HF_HUB_OFFLINE='1'), timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])['hf_hub'] is True


@pytest.mark.network
@pytest.mark.skipif(os.environ.get('TIMM_GCP_NETWORK_TESTS') != '1', reason='set TIMM_GCP_NETWORK_TESTS=1')
def test_real_hub_published_weights(tmp_path):
    """Every published tag of the registry downloads from the real Hub and produces finite logits."""
    import timm
    import timm_gcp  # noqa: F401
    reg = zoo.load_registry()
    names = []
    for key, tags in zoo.pretrained_tags(reg).items():
        arch = key if zoo.arch_family(key, reg) else zoo.family_archs(key, reg)[0]
        names += [f'{arch}.{t}' for t in tags]
    assert names
    for name in names:
        model = timm.create_model(name, pretrained=True, cache_dir=str(tmp_path)).eval()
        size = model.pretrained_cfg['input_size']
        with torch.no_grad():
            assert torch.isfinite(model(torch.randn(1, *size))).all(), name


@pytest.mark.slow
def test_publish_a_timm_gcp_train_checkpoint(tmp_path, capsys):
    """End to end: a tiny hybrid timm-gcp-train run (isqrt, switched to svd) is published (dry run) from its EMA."""
    from timm_gcp import train
    argv = ['--builtin-train-samples', '16', '--builtin-val-samples', '16', '-b', '16', '--img-size', '32',
            '--baseline-model', '', '--warmup-epochs', '0', '--workers', '0', '--model', 'resnet18_gcp_isqrt',
            '--model-kwargs', 'gcp_dim=8', '--epochs', '2', '--gcp-switch-epoch', '1', '--gcp-switch-method', 'svd',
            '--model-ema', '--output', str(tmp_path), '--experiment', 'run']
    assert train.main(argv) == 0
    ckpt = tmp_path / 'run' / 'last.pth.tar'
    assert ckpt.exists(), sorted(os.listdir(tmp_path / 'run'))
    capsys.readouterr()
    rc = publish.main([str(ckpt), '--use-ema', '--repo-id', 'tester/tiny', '--tag', 'builtin', '--dry-run',
                   '--output-dir', str(tmp_path / 'export')])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == 'arch: resnet18_gcp_svd'
    cfg = json.loads((tmp_path / 'export' / 'config.json').read_text())
    assert cfg['model_args']['gcp_method'] == 'svd' and cfg['model_args']['gcp_dim'] == 8
    assert 'EMA weights' in (tmp_path / 'export' / 'README.md').read_text()


@pytest.mark.slow
def test_republish_updates_the_model_card(tmp_path, trained):
    """A second publish to the same repository uploads the folder it checked, model card included (timm's
    push_to_hf_hub writes a README only when the repository has none, which would leave the first card's
    source and metrics describing the new weights)."""
    server = HubServer().start()
    try:
        env = dict(os.environ, PYTHONPATH=ROOT, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / 'hf'),
                   HF_TOKEN='loopback-test-token', HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_OFFLINE='0')
        env.pop('HF_HUB_CACHE', None)
        for i, source in enumerate(('first weights', 'second weights')):
            res = subprocess.run([sys.executable, '-m', 'timm_gcp.publish', trained['path'], '--repo-id', 'tester/again',
                                  '--tag', 'again', '--output-dir', str(tmp_path / f'export{i}'), '--source', source,
                                  '--no-registry'], capture_output=True, text=True, env=env, timeout=600)
            assert res.returncode == 0, res.stderr
        repo = server.repos['tester/again']
        assert len(repo.history) == 2
        files = repo.commits[repo.main]
        assert sorted(files) == ['README.md', 'config.json', 'model.safetensors']
        assert 'second weights' in files['README.md'].decode() and 'first weights' not in files['README.md'].decode()
        for name in files:  # exactly the checked folder
            assert files[name] == (tmp_path / 'export1' / name).read_bytes(), name
    finally:
        server.stop()


def test_exported_config_keeps_the_evaluated_preprocessing(tmp_path, trained, eval_folder, capsys):
    """A model fine-tuned at another resolution (the 448 px recipes) must not be published with the backbone tag's
    224 px preprocessing: the checkpoint's training img_size/crop_pct/interpolation (or --img-size/--crop-pct)
    go into config.json and into the quoted evaluation command."""
    ckpt = torch.load(trained['path'], weights_only=False)
    ckpt['args'] = argparse.Namespace(**vars(ckpt['args']), img_size=48, input_size=None, crop_pct=1.0,
                                      interpolation='bilinear')
    path = tmp_path / 'ft.pth.tar'
    torch.save(ckpt, path)
    base = [str(path), '--repo-id', 'a/b', '--tag', 't', '--dry-run', '--workers', '0']
    rc, err = _publish_here(base + ['--output-dir', str(tmp_path / 'o1'), '--data-dir', str(eval_folder)], capsys)
    assert rc == 0, err
    pcfg = json.loads((tmp_path / 'o1' / 'config.json').read_text())['pretrained_cfg']
    assert (pcfg['input_size'], pcfg['crop_pct'], pcfg['interpolation']) == ([3, 48, 48], 1.0, 'bilinear')
    readme = (tmp_path / 'o1' / 'README.md').read_text()
    assert '--img-size 48 --crop-pct 1.0 --interpolation bilinear' in readme
    rc, err = _publish_here(base + ['--output-dir', str(tmp_path / 'o2'), '--img-size', '40'], capsys)
    assert rc == 0, err
    pcfg = json.loads((tmp_path / 'o2' / 'config.json').read_text())['pretrained_cfg']
    assert (pcfg['input_size'], pcfg['crop_pct']) == ([3, 40, 40], 1.0)


def test_publish_method_options_with_a_dtype(tmp_path, capsys):
    """Method options go into config.json by name (JSON holds no torch.dtype) and rebuild the same model."""
    import timm
    model = timm.create_model('resnet18_gcp_isqrt', num_classes=3, gcp_dim=8,
                              gcp_kwargs=dict(iters=3, dtype=torch.float64)).eval()
    path = tmp_path / 'c.pth.tar'
    args = argparse.Namespace(model='resnet18_gcp_isqrt', model_kwargs={'gcp_dim': 8})
    torch.save({'arch': 'resnet18_gcp_isqrt', 'gcp_method': 'isqrt', 'gcp_kwargs': dict(iters=3, dtype=torch.float64),
                'state_dict': model.state_dict(), 'args': args}, path)
    rc, err = _publish_here([str(path), '--repo-id', 'a/b', '--tag', 't', '--dry-run', '--output-dir',
                             str(tmp_path / 'o')], capsys)
    assert rc == 0, err
    cfg = json.loads((tmp_path / 'o' / 'config.json').read_text())
    assert cfg['model_args']['gcp_kwargs'] == {'iters': 3, 'dtype': 'float64'} and cfg['model_args']['gcp_dim'] == 8


def test_publish_refuses_data_that_would_give_the_wrong_number(tmp_path, trained, capsys):
    """The model card quotes the evaluation: a root without the split folder, or other classes than the model's,
    stop the publish before anything is written."""
    root = write_class_folders(tmp_path / 'd', dict(ant=1, bee=1, cat=1), split='train')
    write_class_folders(root, dict(ant=1, bee=1), split='test')
    base = [trained['path'], '--repo-id', 'a/b', '--tag', 't', '--dry-run', '--workers', '0', '--img-size', '32']
    rc, err = _publish_here(base + ['--output-dir', str(tmp_path / 'o1'), '--data-dir', str(root)], capsys)
    assert rc == 2 and f"--data-dir {root} has no 'validation' split folder (it holds test, train)" in err
    rc, err = _publish_here(base + ['--output-dir', str(tmp_path / 'o2'), '--data-dir', str(root), '--split', 'test'],
                            capsys)
    assert rc == 2 and 'the model has 3 classes but' in err and '(ant, bee)' in err
    assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()


def test_publish_never_follows_recorded_hub_names(tmp_path, trained, capsys, monkeypatch):
    """A checkpoint whose arch is hf-hub:... is refused before any request (the publish used to fetch that repo's
    config, then fail offline with a traceback); --model gives the architecture."""
    import socket
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError('network access in a test')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    ckpt = torch.load(trained['path'], weights_only=False)
    ckpt.update(arch='hf-hub:someone/repo', args=argparse.Namespace(model='hf-hub:someone/repo',
                                                                  model_kwargs={'gcp_dim': 16}))
    path = tmp_path / 'c.pth.tar'
    torch.save(ckpt, path)
    base = [str(path), '--repo-id', 'a/b', '--tag', 't', '--dry-run']
    rc, err = _publish_here(base + ['--output-dir', str(tmp_path / 'o1')], capsys)
    assert rc == 2 and "the checkpoint names the architecture 'hf-hub:someone/repo'" in err and attempts == []
    rc, err = _publish_here(base + ['--output-dir', str(tmp_path / 'o2'), '--model', ARCH], capsys)
    assert rc == 0 and attempts == [], err


def test_publish_corrupt_safetensors_is_a_clear_error(tmp_path, capsys):
    from safetensors.torch import save_file
    path = tmp_path / 'w.safetensors'
    save_file({'a': torch.ones(64)}, str(path), metadata={'arch': ARCH})
    path.write_bytes(path.read_bytes()[:-40])
    rc, err = _publish_here([str(path), '--repo-id', 'a/b', '--tag', 't', '--dry-run', '--output-dir',
                             str(tmp_path / 'o')], capsys)
    assert rc == 2 and 'is not a readable .safetensors file' in err and not (tmp_path / 'o').exists()


def _nan_checkpoint(tmp_path, trained):
    sd = {k: v.clone() for k, v in trained['model'].state_dict().items()}
    sd['fc.weight'][0, 0] = float('nan')
    path = tmp_path / 'nan.pth.tar'
    torch.save({'arch': ARCH, 'state_dict': sd, 'args': argparse.Namespace(model=ARCH, model_kwargs={'gcp_dim': 16})},
               path)
    return path


def test_publish_refuses_non_finite_weights_and_writes_nothing(tmp_path, trained, capsys):
    out = tmp_path / 'export'
    rc, err = _publish_here([str(_nan_checkpoint(tmp_path, trained)), '--repo-id', 'tester/nan', '--tag', 't',
                             '--dry-run', '--output-dir', str(out)], capsys)
    assert rc == 2 and 'holds NaN/inf in 1 tensor(s): fc.weight' in err and not out.exists()


def test_validate_refuses_non_finite_weights(tmp_path, trained, eval_folder, capsys):
    from timm_gcp import validate
    rc = validate.main(['--checkpoint', str(_nan_checkpoint(tmp_path, trained)), '--data-dir', str(eval_folder),
                        '--workers', '0', '--img-size', '64'])
    err = capsys.readouterr().err
    assert rc == 2 and 'holds NaN/inf in 1 tensor(s): fc.weight' in err and 'result:' not in err


def test_failed_publish_removes_its_partial_export(tmp_path, trained, capsys, monkeypatch):
    def broken(model, out_dir):
        raise RuntimeError(f'{out_dir} does not reload to the same model (simulated)')
    monkeypatch.setattr(publish, 'check_folder_loads', broken)
    out = tmp_path / 'export'
    rc, err = _publish_here([trained['path'], '--repo-id', 'tester/r18-gcp', '--tag', 't', '--dry-run',
                             '--output-dir', str(out)], capsys)
    assert rc == 2 and 'does not reload to the same model (simulated)' in err and not out.exists()
    # A folder of an earlier export stays, emptied of the files this export wrote; nothing else is touched.
    monkeypatch.undo()
    assert _publish_here([trained['path'], '--repo-id', 'tester/r18-gcp', '--tag', 't', '--dry-run',
                          '--output-dir', str(out)], capsys)[0] == 0
    monkeypatch.setattr(publish, 'check_folder_loads', broken)
    assert _publish_here([trained['path'], '--repo-id', 'tester/r18-gcp', '--tag', 't', '--dry-run',
                          '--output-dir', str(out)], capsys)[0] == 2
    assert out.is_dir() and os.listdir(out) == []


def test_exported_files_get_the_users_umask(tmp_path, trained, capsys):
    out = tmp_path / 'export'
    old = os.umask(0o022)
    try:
        rc, err = _publish_here([trained['path'], '--repo-id', 'tester/r18-gcp', '--tag', 't', '--dry-run',
                                 '--output-dir', str(out)], capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        name: '0o644' for name in ('model.safetensors', 'config.json', 'README.md', publish.MARKER)}


def test_model_cards_cite_the_heads_own_papers():
    card = publish.build_model_card('org/m', 'resnet50_gcp_dropcov', 'dropcov', 10, 'apache-2.0', 'x', [], {})
    text = str(card)
    assert 'wang2022dropcov' in text and 'song2021approximate' not in text
    text = str(publish.build_model_card('org/m', 'deit_small_patch16_224_gcp_sot', 'sot', 10, 'apache-2.0', 'x', [], {}))
    assert 'xie2021sot' in text
    assert 'song2021approximate' in str(publish.build_model_card('org/m', 'resnet50_gcp_pade', 'pade', 10, 'mit', 'x',
        [], {}))

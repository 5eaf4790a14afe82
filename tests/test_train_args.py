"""timm-gcp-train's flags and YAML config: every size and config value is checked before anything is written (exit 2,
a message naming the flag or key and the expected type, no traceback), and model kwargs merge with the demo's."""
import pytest
import yaml

from timm_gcp import train as tr

TINY = ['--builtin-train-samples', '16', '--builtin-val-samples', '8', '-b', '8', '--img-size', '32',
        '--baseline-model', '', '--warmup-epochs', '0', '--workers', '0', '--epochs', '1', '--diag-interval', '0']


def _run(argv, tmp_path, capsys):
    """``timm-gcp-train ARGV --output TMP``: exit status, stderr, and what was written under the output folder."""
    out = tmp_path / 'out'
    try:
        rc = tr.main(argv + ['--output', str(out)])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return rc, err, sorted(p.name for p in out.rglob('*')) if out.exists() else []


@pytest.mark.parametrize('flags, phrase', [
    (['-b', '-3'], '--batch-size must be >= 1, got -3'),
    (['-b', '0'], '--batch-size must be >= 1, got 0'),
    (['--img-size', '0'], '--img-size must be >= 1, got 0'),
    (['--img-size', '-32'], '--img-size must be >= 1, got -32'),
    (['-vb', '0'], '--validation-batch-size must be >= 1'),
    (['--workers', '-1'], '--workers must be >= 0'),
    (['--input-size', '3', '0', '32'], '--input-size must be 3 positive integers'),
    (['--model-kwargs', 'gcp_dim'], "--model-kwargs: expected KEY=VALUE items (e.g. gcp_dim=64), got 'gcp_dim'"),
    (['--gcp-switch-kwargs', '=3'], '--gcp-switch-kwargs: expected KEY=VALUE items'),
])
def test_bad_flag_values_exit_2_before_anything_is_written(flags, phrase, tmp_path, capsys):
    rc, err, written = _run(TINY + flags, tmp_path, capsys)
    assert rc == 2 and phrase in err and written == []


@pytest.mark.parametrize('cfg, phrase', [
    (dict(batch_size=4.5), 'batch_size must be an integer (as --batch-size), got 4.5'),
    (dict(img_size=[32, 32]), 'img_size must be an integer (as --img-size), got [32, 32]'),
    (dict(model_kwargs='gcp_dim=16'), "model_kwargs must be a mapping of names to values (as --model-kwargs "
                                      "KEY=VALUE ...), got 'gcp_dim=16'"),
    (dict(lr='fast'), "lr must be a number (as --lr), got 'fast'"),
    (dict(mean=0.5), 'mean must be a list of numbers (as --mean), got 0.5'),
    (dict(amp='yes'), "amp must be true or false (as --amp), got 'yes'"),
    (dict(builtin_classes=1), '--builtin-classes must be >= 2, got 1'),
])
def test_bad_config_values_exit_2_naming_the_key(cfg, phrase, tmp_path, capsys):
    path = tmp_path / 'c.yaml'
    path.write_text(yaml.safe_dump(cfg))
    rc, err, written = _run(TINY + ['--config', str(path)], tmp_path, capsys)
    assert rc == 2 and phrase in err and written == []


@pytest.mark.parametrize('flags, phrase', [
    (['--model', 'resnet18_gcp_bogus'], 'bogus'),
    (['--model', 'no_such_model'], 'no_such_model'),
    (['--model', 'generic_gcp_svd', '--model-kwargs', 'backbone=no_such_backbone'], 'no_such_backbone'),
    (['--model', 'resnet18_gcp_isqrt', '--model-kwargs', "gcp_kwargs={'iters': -1}"], 'iters'),
    (['--model', 'resnet18_gcp_isqrt', '--model-kwargs', 'gcp_dim=16', 'no_such_kwarg=1'], 'no_such_kwarg'),
])
def test_unknown_model_method_backbone_or_kwarg_exit_2(flags, phrase, tmp_path, capsys):
    rc, err, written = _run(TINY + flags, tmp_path, capsys)
    assert rc == 2 and 'timm-gcp-train: error:' in err and phrase in err and written == []


def test_model_kwargs_merge_with_the_demos():
    args, _ = tr.parse_args(['--model', 'resnet18_gcp_svd', '--model-kwargs', "gcp_kwargs={'dtype': 'float32'}"])
    assert args.model_kwargs == dict(tr.DEMO_DEFAULTS['model_kwargs'], gcp_kwargs={'dtype': 'float32'})
    args, _ = tr.parse_args(['--model-kwargs', 'gcp_dim=8'])  # a given key wins
    assert args.model_kwargs == dict(gcp_dim=8, output_stride=8)
    args, _ = tr.parse_args(['--model-kwargs'])  # the flag alone clears them
    assert args.model_kwargs == {}


def test_config_model_kwargs_merge_with_the_demos(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text(yaml.safe_dump(dict(model_kwargs=dict(gcp_dim=32))))
    args, _ = tr.parse_args(['--config', str(path)])
    assert args.model_kwargs == dict(gcp_dim=32, output_stride=8)
    args, _ = tr.parse_args(['--config', str(path), '--model-kwargs', 'drop_rate=0.1'])
    assert args.model_kwargs == dict(gcp_dim=32, output_stride=8, drop_rate=0.1)
    args, _ = tr.parse_args(['--config', str(path), '--data-dir', str(tmp_path)])  # no demo: the config's only
    assert args.model_kwargs == dict(gcp_dim=32)

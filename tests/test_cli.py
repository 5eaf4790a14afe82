"""timm_gcp.cli: logging set-up of the entry points and the checks of command-line paths, shared by the CLIs."""
import os

import pytest

from timm_gcp import cli


def test_cli_logging_is_set_up_once_and_follows_stderr(capsys):
    import logging
    cli.setup_cli_logging()
    cli.setup_cli_logging()  # a second main() in the same process (API use, notebooks, tests)
    logging.getLogger('timm_gcp.test').warning('one line')
    assert capsys.readouterr().err.count('one line') == 1
    import contextlib
    import io
    swapped = io.StringIO()
    with contextlib.redirect_stderr(swapped):  # the handler writes to the sys.stderr of the moment
        logging.getLogger('timm_gcp.test').warning('another line')
    assert swapped.getvalue().count('another line') == 1 and 'another line' not in capsys.readouterr().err
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == '_CurrentStderrHandler']
    assert len(ours) == 1


def test_path_checks_name_the_flag(tmp_path):
    assert cli.data_dir_error(str(tmp_path)) is None
    assert cli.data_dir_error('/nonexistent/d') == '--data-dir: no such directory: /nonexistent/d'
    assert cli.data_dir_error('/nonexistent/d', dataset='torch/cifar10') is None  # may be downloaded into
    f = tmp_path / 'r.json'
    assert cli.existing_file_error(str(f), '--results-file') is None
    f.write_text('{}')
    assert cli.existing_file_error(str(f), '--results-file').startswith(f'--results-file {f} already exists')
    assert os.path.exists(f)


def test_validate_and_publish_share_the_eval_flags():
    """One definition of the flags both CLIs take (model, EMA, data, preprocessing, device)."""
    from timm_gcp import publish, validate
    shared = {'model', 'use_ema', 'data_dir', 'dataset', 'split', 'batch_size', 'workers', 'img_size', 'crop_pct',
              'interpolation', 'device'}
    for parser in (validate.build_parser(), publish.build_parser()):
        assert shared <= {a.dest for a in parser._actions}


@pytest.mark.parametrize('flags, phrase', [
    (['--batch-size', '0'], '--batch-size must be >= 1, got 0'),
    (['--workers', '-1'], '--workers must be >= 0, got -1'),
    (['--img-size', '-32'], '--img-size must be >= 1, got -32'),
    (['--crop-pct', '1.5'], '--crop-pct must be in (0, 1], got 1.5'),
])
@pytest.mark.parametrize('tool', ['validate', 'publish'])
def test_validate_and_publish_refuse_bad_sizes(tool, flags, phrase, tmp_path, capsys):
    from timm_gcp import publish, validate
    ckpt = tmp_path / 'c.pth.tar'
    ckpt.write_bytes(b'never read')
    if tool == 'validate':
        rc = validate.main(['--checkpoint', str(ckpt), '--data-dir', str(tmp_path), *flags])
    else:
        rc = publish.main([str(ckpt), '--repo-id', 'o/n', '--tag', 't', '--dry-run', '--output-dir',
                           str(tmp_path / 'out'), '--data-dir', str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and phrase in err and not (tmp_path / 'out').exists()


def test_kwargs_flag_needs_key_value_items(capsys):
    from timm_gcp import validate
    with pytest.raises(SystemExit) as e:
        validate.build_parser().parse_args(['--data-dir', '.', '--model-kwargs', 'gcp_dim'])
    assert e.value.code == 2
    assert "--model-kwargs: expected KEY=VALUE items (e.g. gcp_dim=64), got 'gcp_dim'" in capsys.readouterr().err
    args = validate.build_parser().parse_args(['--data-dir', '.', '--model-kwargs', 'gcp_dim=8', "gcp_method=pade"])
    assert args.model_kwargs == dict(gcp_dim=8, gcp_method='pade')


def test_error_message_of_a_dataloader_worker_is_its_last_line():
    wrapped = RuntimeError('Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback (most '
                           'recent call last):\n  File "x.py", line 1, in f\ntimm_gcp.data.folder.UnreadableImageError: '
                           'cannot read the image /d/a.png: truncated\n')
    assert cli.error_message(wrapped) == 'cannot read the image /d/a.png: truncated'
    assert cli.error_message(ValueError('plain')) == 'plain'

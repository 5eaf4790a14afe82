"""timm_gcp.cli: logging set-up of the entry points and the checks of command-line paths, shared by the CLIs."""
import os

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
    from timm_gcp import hub, validate
    shared = {'model', 'use_ema', 'data_dir', 'dataset', 'split', 'batch_size', 'workers', 'img_size', 'crop_pct',
              'interpolation', 'device'}
    for parser in (validate.build_parser(), hub.build_parser()):
        assert shared <= {a.dest for a in parser._actions}

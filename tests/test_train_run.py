"""timm-gcp-train's run phases as a user meets them: a failed checkpoint write (no space, I/O error), --resume with
another GCP method than the checkpoint's, --resume without --output."""
import csv
import errno
import logging

import pytest
import torch

from timm_gcp import train as tr
from helpers.data import load_checkpoint

TINY = ['--builtin-train-samples', '16', '--builtin-val-samples', '8', '-b', '8', '--img-size', '32',
        '--baseline-model', '', '--warmup-epochs', '0', '--workers', '0', '--diag-interval', '0', '--model-kwargs']
GCP_TINY = TINY + ['--model-kwargs', 'gcp_dim=8', 'output_stride=8']

pytestmark = pytest.mark.slow  # every test here trains (end to end)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _failing_save(monkeypatch, error, after=1):
    """torch.save writes part of the file, then fails, from its ``after + 1``-th call on."""
    original, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) <= after:
            return original(obj, f, *args, **kwargs)
        with open(f, 'wb') as fh:
            fh.write(b'PK\x03\x04' + b'\0' * 1000)
        raise error
    monkeypatch.setattr(torch, 'save', save)


def test_no_space_while_saving_is_exit_2_naming_cause_path_and_last_good(tmp_path, capsys, monkeypatch):
    _failing_save(monkeypatch, OSError(errno.ENOSPC, 'No space left on device'))
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '2', '--output', str(tmp_path), '--experiment', 'e'])
    err = capsys.readouterr().err
    folder = tmp_path / 'e'
    assert rc == 2 and 'Traceback' not in err
    assert f'cannot write the checkpoint of epoch 1 to {folder / "tmp.pth.tar"}: No space left on device (ENOSPC)' \
        in err
    assert f'The last good checkpoint is {folder / "last.pth.tar"} (epoch 0)' in err
    assert not (folder / 'tmp.pth.tar').exists() and load_checkpoint(folder / 'last.pth.tar')['epoch'] == 0


def test_torch_zip_writer_failure_on_a_full_disk_says_so(tmp_path, capsys, monkeypatch):
    """torch's zip writer reports a full disk as 'unexpected pos' (a RuntimeError without errno)."""
    import shutil
    from collections import namedtuple
    _failing_save(monkeypatch, RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64'), after=0)
    usage = namedtuple('usage', 'total used free')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10 ** 9, 10 ** 9 - 4096, 4096))
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path), '--experiment', 'e'])
    err = capsys.readouterr().err
    assert rc == 2 and 'unexpected pos' in err and 'no space left?' in err
    assert 'No good checkpoint was written before it' in err and not (tmp_path / 'e' / 'tmp.pth.tar').exists()


def test_resume_with_another_method_switches_explicitly(tmp_path, caplog):
    common = GCP_TINY + ['--output', str(tmp_path)]
    assert tr.main(common + ['--model', 'resnet18_gcp_isqrt', '--epochs', '1', '--experiment', 'a']) == 0
    with caplog.at_level(logging.WARNING):
        assert tr.main(common + ['--model', 'resnet18_gcp_pade', '--epochs', '2', '--experiment', 'b', '--resume',
                                 str(tmp_path / 'a' / 'last.pth.tar')]) == 0
    assert "names 'pade': switching to 'pade'" in caplog.text
    assert [r['train_gcp_method'] for r in _rows(tmp_path / 'b' / 'summary.csv')] == ['pade']
    assert load_checkpoint(tmp_path / 'b' / 'last.pth.tar')['gcp_method'] == 'pade'


def test_resume_without_output_continues_in_the_checkpoints_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tr.main(TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path / 'runs'),
                           '--experiment', 'e']) == 0
    assert tr.main(TINY + ['--model', 'resnet18', '--epochs', '2', '--resume',
                           str(tmp_path / 'runs' / 'e' / 'last.pth.tar')]) == 0
    assert [r['epoch'] for r in _rows(tmp_path / 'runs' / 'e' / 'summary.csv')] == ['0', '1']
    assert sorted(p.name for p in (tmp_path / 'runs').iterdir()) == ['e'] and not (tmp_path / 'output').exists()


def test_resume_with_the_same_name_restores_the_checkpoints_method(tmp_path):
    """A hybrid run resumed after its switch, with the name it started with: the method switched to continues."""
    common = GCP_TINY + ['--output', str(tmp_path), '--model', 'resnet18_gcp_isqrt']
    assert tr.main(common + ['--epochs', '1', '--experiment', 'a', '--gcp-switch-epoch', '0',
                             '--gcp-switch-method', 'svd']) == 0
    assert tr.main(common + ['--epochs', '2', '--experiment', 'b', '--resume',
                             str(tmp_path / 'a' / 'last.pth.tar')]) == 0
    assert [r['train_gcp_method'] for r in _rows(tmp_path / 'b' / 'summary.csv')] == ['svd']


def test_resume_of_a_checkpoint_outside_a_run_folder_does_not_write_there(tmp_path, monkeypatch):
    """A checkpoint copied elsewhere (no args.yaml/summary.csv beside it): that folder is the user's, not a run's."""
    import shutil
    monkeypatch.chdir(tmp_path)
    assert tr.main(TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path / 'runs'),
                           '--experiment', 'e']) == 0
    mine = tmp_path / 'mine'
    mine.mkdir()
    shutil.copy(tmp_path / 'runs' / 'e' / 'last.pth.tar', mine / 'weights.pth.tar')
    assert tr.main(TINY + ['--model', 'resnet18', '--epochs', '2', '--resume', str(mine / 'weights.pth.tar')]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ['weights.pth.tar']
    assert [r['epoch'] for r in _rows(tmp_path / 'output' / 'train' / 'demo' / 'summary.csv')] == ['1']


def test_summary_that_cannot_be_written_is_exit_2_naming_it(tmp_path, capsys, monkeypatch):
    from timm_gcp.train import run as tr_run

    def update_summary(*args, **kwargs):
        raise PermissionError(errno.EACCES, 'Permission denied')
    monkeypatch.setattr(tr_run, 'update_summary', update_summary)
    rc = tr.main(TINY + ['--model', 'resnet18', '--epochs', '1', '--output', str(tmp_path), '--experiment', 'e'])
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    assert f'cannot write {tmp_path / "e" / "summary.csv"} (epoch 0): Permission denied (EACCES)' in err
    assert 'No good checkpoint was written before it' in err

"""timm_gcp.data.folder: no substituted samples (evaluation stops naming the file, training skips and counts), no
symlink loops, 16-bit images scaled; and the same through timm-gcp-validate and timm-gcp-train."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from timm_gcp import train as tr
from timm_gcp import validate
from timm_gcp.data.folder import CheckedImageDataset, FolderReader, UnreadableImageError, create_checked_dataset
from helpers.data import EVAL_COUNTS, write_class_folders


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


def _checkpoint(path):
    """A plain timm resnet18 with the 3 classes of ``EVAL_COUNTS``."""
    import timm
    model = timm.create_model('resnet18', num_classes=3)
    torch.save({'arch': 'resnet18', 'state_dict': model.state_dict()}, path)


def test_unreadable_image_is_an_error_naming_the_file(tmp_path):
    root = write_class_folders(tmp_path / 'data', EVAL_COUNTS)
    bad = root / 'validation' / 'bee' / '1.png'
    _truncate(bad)
    ds = create_checked_dataset('', str(root), 'validation', on_error='raise')
    assert len(ds) == 10
    ds[0]  # readable
    index = [os.path.basename(os.path.dirname(p)) + '/' + os.path.basename(p) for p, _ in ds.reader.samples].index(
        'bee/1.png')
    with pytest.raises(UnreadableImageError, match=f'cannot read the image {bad}'):
        ds[index]


def test_skip_mode_warns_naming_the_file_and_counts(tmp_path, caplog):
    root = write_class_folders(tmp_path / 'data', EVAL_COUNTS)
    bad = root / 'validation' / 'ant' / '0.png'
    _truncate(bad)
    ds = create_checked_dataset('', str(root), 'validation', on_error='skip')
    with caplog.at_level(logging.WARNING, logger='timm_gcp.data.folder'):
        labels = [ds[i][1] for i in range(len(ds))]
    assert f'skipping the unreadable image {bad}' in caplog.text
    assert labels == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]  # ant/0 skipped: the next image (ant/1) took its place
    assert ds.take_skipped() == 1 and ds.take_skipped() == 0


def test_validate_cli_refuses_an_unreadable_image(tmp_path, capsys):
    root = write_class_folders(tmp_path / 'data', EVAL_COUNTS)
    bad = root / 'validation' / 'cat' / '3.png'
    _truncate(bad)
    _checkpoint(tmp_path / 'c.pth.tar')
    rc = validate.main(['--checkpoint', str(tmp_path / 'c.pth.tar'), '--data-dir', str(root), '--workers', '0',
                        '--img-size', '32', '--batch-size', '4'])
    err = capsys.readouterr().err
    assert rc == 2 and f'cannot read the image {bad}' in err and 'Traceback' not in err


@pytest.mark.slow
def test_validate_cli_names_the_file_when_a_loader_worker_fails(tmp_path, capsys):
    """In a DataLoader worker the error comes back wrapped in the worker's traceback; the user gets its message."""
    root = write_class_folders(tmp_path / 'data', EVAL_COUNTS)
    bad = root / 'validation' / 'ant' / '1.png'
    _truncate(bad)
    _checkpoint(tmp_path / 'c.pth.tar')
    rc = validate.main(['--checkpoint', str(tmp_path / 'c.pth.tar'), '--data-dir', str(root), '--workers', '1',
                        '--img-size', '32', '--batch-size', '4'])
    err = capsys.readouterr().err
    assert rc == 2 and f'error: cannot read the image {bad}' in err and 'Traceback' not in err


def test_symlink_back_into_the_tree_is_not_followed(tmp_path, caplog):
    root = write_class_folders(tmp_path / 'data', EVAL_COUNTS)
    link = root / 'validation' / 'ant' / 'loop'
    os.symlink('..', link)  # validation/ant/loop -> validation/
    with caplog.at_level(logging.WARNING, logger='timm_gcp.data.folder'):
        reader = FolderReader(str(root / 'validation'))
    assert len(reader) == 10 and sorted(reader.class_to_idx) == ['ant', 'bee', 'cat']
    assert f'not following the link {link}' in caplog.text


def test_symlink_to_outside_the_tree_is_followed(tmp_path):
    root = write_class_folders(tmp_path / 'data', EVAL_COUNTS)
    extra = write_class_folders(tmp_path / 'extra', {'dog': 2})
    os.symlink(extra / 'validation' / 'dog', root / 'validation' / 'dog')
    reader = FolderReader(str(root / 'validation'))
    assert len(reader) == 12 and sorted(reader.class_to_idx) == ['ant', 'bee', 'cat', 'dog']


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    d = tmp_path / 'split' / 'gray16'
    d.mkdir(parents=True)
    levels = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(d / 'a.png')
    assert Image.open(d / 'a.png').mode.startswith('I')  # what PIL opens a 16-bit PNG as
    ds = CheckedImageDataset(str(tmp_path / 'split'), FolderReader(str(tmp_path / 'split')))
    img, label = ds[0]
    assert label == 0 and img.mode == 'RGB'
    assert np.asarray(img)[..., 0].tolist() == [[0, 64], [128, 255]]


@pytest.mark.slow
def test_training_skips_an_unreadable_image_and_counts_it(tmp_path, image_folder, caplog):
    bad = image_folder / 'train' / 'class1' / '2.png'
    _truncate(bad)
    with caplog.at_level(logging.WARNING):
        rc = tr.main(['--data-dir', str(image_folder), '--model', 'resnet18', '--img-size', '32', '-b', '4',
                      '--epochs', '1', '--workers', '0', '--output', str(tmp_path / 'out'), '--experiment', 'e',
                      '--warmup-epochs', '0', '--diag-interval', '0'])
    assert rc == 0
    assert f'skipping the unreadable image {bad}' in caplog.text
    assert 'epoch 0: skipped 1 unreadable training image(s)' in caplog.text


@pytest.mark.slow
def test_training_stops_on_an_unreadable_validation_image(tmp_path, image_folder, capsys):
    bad = image_folder / 'validation' / 'class0' / '4.png'
    _truncate(bad)
    rc = tr.main(['--data-dir', str(image_folder), '--model', 'resnet18', '--img-size', '32', '-b', '4',
                  '--epochs', '1', '--workers', '0', '--output', str(tmp_path / 'out'), '--experiment', 'e',
                  '--warmup-epochs', '0', '--diag-interval', '0'])
    err = capsys.readouterr().err
    assert rc == 2 and f'cannot read the image {bad}' in err


def test_validate_can_exclude_unreadable_images_and_lists_them(tmp_path, capsys):
    import json
    root = write_class_folders(tmp_path / 'data', EVAL_COUNTS)
    bad = root / 'validation' / 'cat' / '3.png'
    _truncate(bad)
    _checkpoint(tmp_path / 'c.pth.tar')
    rc = validate.main(['--checkpoint', str(tmp_path / 'c.pth.tar'), '--data-dir', str(root), '--workers', '0',
                        '--img-size', '32', '--batch-size', '4', '--exclude-unreadable', '--results-file',
                        str(tmp_path / 'r.json')])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and f'excluded (unreadable): {bad}' in out
    assert ' images=9 ' in out[-1] and ' excluded=1 ' in out[-1]
    assert json.loads((tmp_path / 'r.json').read_text())['excluded'] == [str(bad)]

"""timm_gcp.data.checks: the one class-list helper and the split/class checks that training and evaluation share."""
import pytest

from timm_gcp.data.checks import check_eval_data, check_train_splits, dataset_class_names, outputs_needed
from timm_gcp.data.folder import create_checked_dataset
from helpers.data import write_class_folders


def _ds(root, split):
    return create_checked_dataset('', str(root), split, on_error='raise')


def test_class_names_in_label_order_and_outputs_needed(tmp_path):
    root = write_class_folders(tmp_path, {'cat': 1, 'ant': 1, 'bee': 1})
    ds = _ds(root, 'validation')
    assert dataset_class_names(ds) == ['ant', 'bee', 'cat'] and outputs_needed(ds) == 3

    class Plain:
        classes = ['x', 'y']
    assert dataset_class_names(Plain()) == ['x', 'y'] and outputs_needed(Plain(), ['x', 'y']) == 2
    assert dataset_class_names(object()) is None and outputs_needed(object()) is None


def test_training_splits_that_would_give_wrong_numbers(tmp_path):
    root = write_class_folders(tmp_path, {'ant': 1, 'bee': 1}, split='train')
    write_class_folders(tmp_path, {'ant': 1, 'cat': 1}, split='validation')
    train, val = _ds(root, 'train'), _ds(root, 'validation')
    with pytest.raises(ValueError, match=r"validation classes do not match the training classes .*\['cat'\]"):
        check_train_splits(str(root), 'train', 'validation', train, val, None)
    with pytest.raises(ValueError, match='no separate split folders'):  # no holdout/ folder: it reads the root
        check_train_splits(str(root), 'train', 'holdout', train, _ds(root, 'holdout'), None)
    with pytest.raises(ValueError, match='2 training classes but the model has 1 outputs; set --num-classes 2'):
        check_train_splits(str(root), 'train', 'validation', train, _ds(write_class_folders(
            tmp_path / 'other', {'ant': 1, 'bee': 1}), 'validation'), 1)


def test_eval_classes_that_differ_from_the_checkpoints(tmp_path):
    root = write_class_folders(tmp_path, {'ant': 1, 'bee': 1, 'cat': 1})
    ds = _ds(root, 'validation')
    check_eval_data(ds, str(root), 'validation', 3, ['ant', 'bee', 'cat'])
    with pytest.raises(ValueError, match="label 2 is 'cat' here but 'dog' in the checkpoint"):
        check_eval_data(ds, str(root), 'validation', 3, ['ant', 'bee', 'dog'])
    with pytest.raises(ValueError, match="label 2 is 'cat' here but missing in the checkpoint"):
        check_eval_data(ds, str(root), 'validation', None, ['ant', 'bee'])
    with pytest.raises(ValueError, match='the model has 4 classes but'):
        check_eval_data(ds, str(root), 'validation', 4)
    with pytest.raises(ValueError, match="has no 'holdout' split folder"):
        check_eval_data(_ds(root, 'holdout'), str(root), 'holdout', None)

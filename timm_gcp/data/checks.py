"""The class list of a dataset and the checks that refuse data which would silently give wrong numbers.

timm's ``create_dataset`` falls back to the root folder when a split folder is missing (searched recursively, so
evaluation would read the training images), and numbers the classes of each split folder on its own (so a class
folder missing from one split shifts the labels of the others). Training (:func:`check_train_splits`) and evaluation
(:func:`check_eval_data`) refuse both with a ``ValueError`` naming the folders and the classes.
"""
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ['class_to_idx', 'dataset_class_names', 'outputs_needed', 'check_train_splits', 'check_eval_data']


def class_to_idx(ds: Any) -> Dict[str, int]:
    """The ``{class name: label}`` map of a timm/torchvision dataset, empty when it has none."""
    mapping = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    return dict(mapping) if isinstance(mapping, Mapping) else {}


def dataset_class_names(ds: Any) -> Optional[List[str]]:
    """Class names of a timm/torchvision dataset in label order, or None when the dataset does not name them."""
    mapping = class_to_idx(ds)
    if mapping:
        return [str(name) for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    classes = getattr(ds, 'classes', None)
    if isinstance(classes, (list, tuple)) and classes:
        return [str(c) for c in classes]
    return None


def outputs_needed(ds: Any, class_names: Optional[Sequence[str]] = None) -> Optional[int]:
    """The classifier outputs the labels of ``ds`` need: the largest label + 1 (a class map may skip labels)."""
    index = class_to_idx(ds)
    if index:
        return max(index.values()) + 1
    return len(class_names) if class_names else None


def _list(names: Sequence[str], n: int = 10) -> str:
    return ', '.join(names[:n]) + (f', ... ({len(names)} in all)' if len(names) > n else '')


def _reader_root(ds: Any) -> Optional[str]:
    return getattr(getattr(ds, 'reader', None), 'root', None)


def check_train_splits(
        root: str,
        train_split: str,
        val_split: str,
        ds_train: Any,
        ds_eval: Any,
        num_classes: Optional[int],
) -> None:
    """Refuse training and validation datasets that read the same folder (or one inside the other), whose classes
    are numbered differently, or whose labels do not fit ``num_classes`` outputs.

    Raises:
        ValueError: naming ``root``, the split folders and the classes.
    """
    root_train, root_eval = _reader_root(ds_train), _reader_root(ds_eval)
    if root_train is not None and root_eval is not None:
        a, b = os.path.abspath(root_train), os.path.abspath(root_eval)
        if os.path.commonpath([a, b]) in (a, b):  # the same folder, or one inside the other
            raise ValueError(
                f'--data-dir {root}: no separate split folders: training ({train_split!r}) reads {root_train} '
                f'and validation ({val_split!r}) reads {root_eval}, so validation would see training images; '
                f'give a root with separate split folders (e.g. train/ and validation/) or set '
                f'--train-split/--val-split')
    index_train, index_eval = class_to_idx(ds_train), class_to_idx(ds_eval)
    if index_train and index_eval:
        bad = sorted(k for k, v in index_eval.items() if index_train.get(k) != v)
        if bad:
            raise ValueError(
                f'--data-dir {root}: the validation classes do not match the training classes (missing from '
                f'training or numbered differently: {bad[:10]}); give both splits the same class folders or a '
                f'--class-map')
    needed = outputs_needed(ds_train, dataset_class_names(ds_train))
    if needed and num_classes is not None and needed > num_classes:
        raise ValueError(f'--data-dir {root}: {needed} training classes but the model has {num_classes} outputs; '
                         f'set --num-classes {needed}')


def check_eval_data(
        ds: Any,
        data_dir: str,
        split: str,
        num_classes: Optional[int],
        class_names: Optional[Sequence[str]] = None,
) -> None:
    """Refuse evaluation data that would give a number for the wrong images or the wrong labels.

    * An image-folder root without the split folder: the dataset then reads the root itself (training images
      included, its split folders taken as classes). ``split=''`` asks for the root on purpose.
    * A class count other than the model's, or class names other than those the checkpoint was trained on (in label
      order), where the data name their classes.

    Raises:
        ValueError: naming the folder, the split and the classes.
    """
    from timm.data import ImageDataset
    root = _reader_root(ds)
    if isinstance(ds, ImageDataset) and split and root and os.path.abspath(root) == os.path.abspath(data_dir):
        found = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
        raise ValueError(
            f'--data-dir {data_dir} has no {split!r} split folder (it holds {_list(found) or "no folders"}): timm '
            f'would evaluate every image under it, training images included. Give --split the evaluation folder\'s '
            f'name, or --split \'\' to evaluate the class folders directly under --data-dir')
    names = dataset_class_names(ds)
    if names is None:
        return
    where = root or data_dir
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f'the model has {num_classes} classes but {where} has {len(names)} ({_list(names)}): its '
                         f'labels are not the model\'s')
    if class_names is not None and list(class_names) != names:
        i = next((i for i, (a, b) in enumerate(zip(class_names, names)) if a != b),
                 min(len(class_names), len(names)))  # one list is a prefix of the other
        here = repr(names[i]) if i < len(names) else 'missing'
        there = repr(class_names[i]) if i < len(class_names) else 'missing'
        raise ValueError(f'{where} holds other classes than the checkpoint was trained on: label {i} is {here} here '
                         f'but {there} in the checkpoint (checkpoint: {_list(list(class_names))}; data: '
                         f'{_list(names)})')

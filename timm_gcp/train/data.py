"""Training and validation data: timm datasets and loaders (or the built-in second-order data) and the checks that
refuse splits which would silently give wrong numbers."""
import logging
from typing import Any, List, Optional, Tuple

from timm.data import create_loader

from ..data.checks import check_train_splits, dataset_class_names, outputs_needed
from ..data.folder import create_checked_dataset
from .errors import TrainSetupError, first_lines

__all__ = ['create_datasets', 'create_loaders']

_logger = logging.getLogger(__name__)


def create_datasets(args) -> Tuple[Any, Any, Optional[List[str]]]:
    """The training and validation datasets of a folder or timm dataset, checked, and the training class names.

    Sets ``args.num_classes`` from the training data when it was not given and the data name their classes.
    """
    root = args.data_dir or args.data
    class_map = args.class_map or None
    try:  # unreadable training images are skipped (and counted); an unreadable validation image stops the run
        ds_train = create_checked_dataset(
            args.dataset, root, args.train_split, 'skip', class_map=class_map, is_training=True,
            download=args.dataset_download, batch_size=args.batch_size, seed=args.seed,
            num_samples=args.train_num_samples)
        ds_eval = create_checked_dataset(
            args.dataset, root, args.val_split, 'raise', class_map=class_map, is_training=False,
            download=args.dataset_download, batch_size=args.batch_size, num_samples=args.val_num_samples)
    except (ValueError, RuntimeError, OSError) as e:
        raise TrainSetupError(f'--data-dir {root}: {first_lines(e)}') from e
    class_names = dataset_class_names(ds_train)
    needed = outputs_needed(ds_train, class_names)
    if args.num_classes is None and needed:
        args.num_classes = needed
        if args.rank == 0:
            _logger.info(f'--num-classes not given: {needed} outputs for the {len(class_names)} classes of the '
                         f'training data ({", ".join(class_names[:5])}{", ..." if len(class_names) > 5 else ""})')
    try:
        check_train_splits(root, args.train_split, args.val_split, ds_train, ds_eval, args.num_classes)
    except ValueError as e:
        raise TrainSetupError(str(e)) from e
    return ds_train, ds_eval, class_names


def _builtin_datasets(args, data_config):
    from ..data import SecondOrderDataset
    size = data_config['input_size'][-1]
    common = dict(num_classes=args.builtin_classes, img_size=size, channels=data_config['input_size'][0],
                  strength=args.builtin_strength, offset_std=args.builtin_offset_std, seed=args.seed)
    return (SecondOrderDataset('train', args.builtin_train_samples, **common),
            SecondOrderDataset('validation', args.builtin_val_samples, **common))


def create_loaders(args, data_config, device, datasets=None):
    if datasets is None:  # the built-in data
        from torch.utils.data import DataLoader, DistributedSampler
        ds_train, ds_eval = _builtin_datasets(args, data_config)
        if args.distributed:
            s_train = DistributedSampler(ds_train, shuffle=True, seed=args.seed)
            s_eval = DistributedSampler(ds_eval, shuffle=False)
        else:
            s_train, s_eval = None, None
        loader_train = DataLoader(
            ds_train, batch_size=args.batch_size, shuffle=s_train is None, sampler=s_train,
            num_workers=args.workers, drop_last=True, pin_memory=args.pin_mem)
        loader_eval = DataLoader(
            ds_eval, batch_size=args.validation_batch_size or args.batch_size, sampler=s_eval,
            num_workers=args.workers, pin_memory=args.pin_mem)
        return loader_train, loader_eval

    ds_train, ds_eval = datasets
    common = dict(
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, use_prefetcher=False, persistent_workers=False)
    loader_train = create_loader(
        ds_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=args.train_interpolation, **common)
    loader_eval = create_loader(
        ds_eval, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    return loader_train, loader_eval


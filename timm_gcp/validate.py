"""Top-1/top-5 evaluation of timm-gcp (or any timm) models: ``timm-gcp-validate``.

Data come through timm's own pipeline (``create_dataset`` / ``resolve_data_config`` / ``create_loader``), so an
ImageFolder tree or any timm dataset (``--dataset torch/cifar10``, ``hfds/...``) works. The eval transform (resize,
centre crop, mean/std) is the one the checkpoint was trained with, else the pretrained cfg's; flags override it. Data
that would give a number for the wrong images or labels are refused: a missing split folder, another class count,
other class names than the checkpoint's; an unreadable image is an error naming the file (timm's dataset would count
the next image in its place; ``--exclude-unreadable`` leaves such images out and lists them), and weights holding
NaN/inf are not evaluated. The last line printed is the result line
that model cards quote::

    timm-gcp-validate --model resnet50_gcp_pade --checkpoint model_best.pth.tar --data-dir /data/imagenet
    ...
    result: model=resnet50_gcp_pade top1=77.310 top5=93.520 images=50000 ...
"""
import argparse
import json
import logging
import shlex
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from . import models  # noqa: F401  (registers the *_gcp_* entrypoints)
from .checkpoint import CheckpointError
from .checkpoint_model import checkpoint_data_config, create_model_from_checkpoint
from .cli import (
    KwargsAction, add_eval_args, data_dir_error, error_message, eval_args_error, existing_file_error,
    setup_cli_logging)
from .data.checks import check_eval_data
from .data.folder import CheckedImageDataset, create_checked_dataset
from .evaluation import evaluate
from .models import resolve_model_name

__all__ = ['validate', 'result_line', 'build_parser', 'main']

_logger = logging.getLogger(__name__)


def _build_or_take_model(
        model: Optional[torch.nn.Module],
        model_name: Optional[str],
        checkpoint: Optional[str],
        pretrained: bool,
        num_classes: Optional[int],
        use_ema: bool,
        model_kwargs: Dict[str, Any],
) -> Tuple[torch.nn.Module, Optional[str], Dict[str, Any]]:
    import timm
    if model is not None:
        return model, model_name, {}
    if checkpoint and pretrained:
        raise ValueError('give either a checkpoint or pretrained=True, not both')
    if checkpoint:
        return create_model_from_checkpoint(
            checkpoint, model_name, use_ema=use_ema, num_classes=num_classes, **model_kwargs)
    if not model_name:
        raise ValueError('a model name is needed without a checkpoint')
    if num_classes is not None:
        model_kwargs['num_classes'] = num_classes
    name, model_kwargs = resolve_model_name(model_name, model_kwargs)  # <any timm model>_gcp_<method> too
    return timm.create_model(name, pretrained=pretrained, **model_kwargs), model_name, {}


def validate(
        model_name: Optional[str],
        data_dir: str,
        checkpoint: Optional[str] = None,
        pretrained: bool = False,
        dataset: str = '',
        split: str = 'validation',
        batch_size: int = 64,
        workers: int = 2,
        num_classes: Optional[int] = None,
        use_ema: bool = False,
        use_test_size: bool = False,
        device: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        model: Optional[torch.nn.Module] = None,
        img_size: Optional[int] = None,
        crop_pct: Optional[float] = None,
        interpolation: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        exclude_unreadable: bool = False,
) -> Dict[str, Any]:
    """Build (or take) a model and evaluate it on ``data_dir``.

    The eval transform is the checkpoint's training preprocessing (:func:`checkpoint_data_config`) where it records
    one, else the pretrained cfg's; ``img_size``/``crop_pct``/``interpolation``/``mean``/``std`` override both (as
    timm's validate.py flags of those names do). The data are checked first (:func:`check_eval_data`): the split must
    exist, and the class count (and the checkpoint's class names, or ``class_names``) must match. An unreadable image
    stops the evaluation (:class:`timm_gcp.data.folder.UnreadableImageError`), unless ``exclude_unreadable``: then
    every image is read once first, the unreadable ones are left out and listed in the result (``excluded``).

    Returns:
        ``dict(model, top1, top5, images, dataset, split, input_size, crop_pct, interpolation)``, and ``excluded``
        (paths) with ``exclude_unreadable``.
    """
    from timm.data import create_loader, resolve_data_config

    model, model_name, info = _build_or_take_model(
        model, model_name, checkpoint, pretrained, num_classes, use_ema, dict(model_kwargs or {}))
    ds = create_checked_dataset(dataset, data_dir, split, on_error='raise', is_training=False)
    excluded = None
    if exclude_unreadable:
        if not isinstance(ds, CheckedImageDataset):
            raise ValueError(f'--exclude-unreadable needs an image folder; {dataset} is read by timm')
        excluded = ds.exclude_unreadable()
    check_eval_data(ds, data_dir, split, getattr(model, 'num_classes', None),
                    class_names if class_names is not None else info.get('class_names'))
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model = model.to(dev).eval()
    given = dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    overrides = {**checkpoint_data_config(info), **{k: v for k, v in given.items() if v is not None}}
    data_config = resolve_data_config(args=overrides, model=model, use_test_size=use_test_size)
    loader = create_loader(
        ds, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=workers,
        use_prefetcher=False, device=dev, persistent_workers=False)
    result = evaluate(model, loader, dev, log_every=50)
    if not result['images']:
        raise ValueError(f'the evaluation data set {data_dir} ({split or "root"}) is empty')
    result.update(top1=round(result['top1'], 3), top5=round(result['top5'], 3))
    out = dict(model=model_name, **result, dataset=dataset or 'folder', split=split,
               input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'],
               interpolation=data_config['interpolation'])
    if excluded is not None:
        out['excluded'] = excluded
    return out


def result_line(result: Mapping[str, Any], command: str) -> str:
    """The one line model cards quote."""
    return (f'result: model={result["model"]} top1={result["top1"]:.3f} top5={result["top5"]:.3f} '
            f'images={result["images"]} input={"x".join(map(str, result["input_size"][1:]))} '
            f'crop_pct={result["crop_pct"]}'
            + (f' excluded={len(result["excluded"])}' if 'excluded' in result else '') + f' command="{command}"')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='timm-gcp-validate', description='Top-1/top-5 evaluation of a timm-gcp model.')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help='load the model\'s pretrained tag (timm/Hub)')
    src.add_argument('--checkpoint', default=None, help='training checkpoint (.pth.tar) or .safetensors weights')
    add_eval_args(p, 'ImageFolder root holding the --split folder (or a timm dataset root)', data_dir_required=True)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--use-test-size', action='store_true', help='use the cfg\'s test_input_size/test_crop_pct')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=KwargsAction)
    p.add_argument('--results-file', default=None, help='also write the result as JSON (a new file)')
    p.add_argument('--exclude-unreadable', action='store_true',
                   help='leave unreadable images out (each listed, and counted in the result line) instead of '
                        'stopping; reads every image once more before evaluating')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of ``timm-gcp-validate``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    problem = (None if args.checkpoint or args.model else 'give --model (and --pretrained) or --checkpoint') or \
        eval_args_error(args) or data_dir_error(args.data_dir, args.dataset) or \
        existing_file_error(args.results_file, '--results-file')
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    try:
        result = validate(
            args.model, args.data_dir, checkpoint=args.checkpoint, pretrained=args.pretrained, dataset=args.dataset,
            split=args.split, batch_size=args.batch_size, workers=args.workers, num_classes=args.num_classes,
            use_ema=args.use_ema, use_test_size=args.use_test_size, device=args.device,
            model_kwargs=args.model_kwargs, img_size=args.img_size, crop_pct=args.crop_pct,
            interpolation=args.interpolation, exclude_unreadable=args.exclude_unreadable)
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        print(f'error: {error_message(e)}', file=sys.stderr)
        return 2
    command = 'timm-gcp-validate ' + ' '.join(shlex.quote(a) for a in argv)
    result['command'] = command
    if args.results_file:
        try:
            with open(args.results_file, 'x', encoding='utf-8') as f:  # 'x': a file made meanwhile is not replaced
                json.dump(result, f, indent=2)
        except OSError as e:
            print(f'error: --results-file {args.results_file}: {e.strerror or e}', file=sys.stderr)
            return 2
    for path in result.get('excluded', []):
        print(f'excluded (unreadable): {path}')
    print(result_line(result, command))
    return 0


if __name__ == '__main__':
    sys.exit(main())


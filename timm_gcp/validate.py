"""Top-1/top-5 evaluation of timm-gcp (or any timm) models: ``timm-gcp-validate``.

Data come through timm's own pipeline (``create_dataset`` / ``resolve_data_config`` / ``create_loader``), so an
ImageFolder tree or any timm dataset (``--dataset torch/cifar10``, ``hfds/...``) works. The eval transform (resize,
centre crop, mean/std) is the one the checkpoint was trained with, else the pretrained cfg's; flags override it. Data
that would give a number for the wrong images or labels are refused: a missing split folder, another class count,
other class names than the checkpoint's. The last line printed is the result line that model cards quote::

    timm-gcp-validate --model resnet50_gcp_pade --checkpoint model_best.pth.tar --data-dir /data/imagenet
    ...
    result: model=resnet50_gcp_pade top1=77.310 top5=93.520 images=50000 ...
"""
import argparse
import json
import logging
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import models  # noqa: F401  (registers the *_gcp_* entrypoints)
from .checkpoint import CheckpointError, checkpoint_gcp_method, read_checkpoint
from .cli import add_eval_args, data_dir_error, existing_file_error, setup_cli_logging
from .models import resolve_model_name
from .models.naming import parse_gcp_name

__all__ = [
    'read_checkpoint', 'resolve_arch', 'create_model_from_checkpoint', 'checkpoint_data_config',
    'dataset_class_names', 'check_eval_data', 'evaluate', 'validate', 'setup_cli_logging', 'main']

_logger = logging.getLogger(__name__)

# Model kwargs that load weights or configs from a file, a URL or the Hub: never taken from checkpoint metadata.
_UNTRUSTED_KWARGS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir')
_REMOTE_PREFIXES = ('hf-hub:', 'hf_hub:', 'local-dir:')


def _registered_arch(name: str, source: str) -> str:
    """``name`` if it is a registered timm (or timm-gcp) architecture; a name recorded in checkpoint metadata is never
    followed to the Hub, a URL or a folder.

    Raises:
        CheckpointError: anything else, asking for ``--model``.
    """
    import timm
    if name.startswith(_REMOTE_PREFIXES) or '://' in name:
        raise CheckpointError(
            f'{source} names the architecture {name!r}, a Hub repository, URL or folder: architectures recorded in '
            f'a checkpoint are never fetched or read from elsewhere. Pass --model NAME (a registered timm or '
            f'timm-gcp architecture) to build the model')
    if not timm.is_model(name):
        raise CheckpointError(f'{source} names the architecture {name!r}, which is not a registered timm or timm-gcp '
                              f'model; pass --model NAME')
    return name


def _checked(fn, what: str) -> Any:
    try:
        return fn()
    except ValueError as e:  # an unknown method in a name or in the metadata
        raise CheckpointError(f'{what}: {e}') from e


def _gcp_name(name: str, what: str):
    """``name`` parsed as ``<backbone>_gcp_<method>[.<tag>]`` (None when it is not a GCP name)."""
    return _checked(lambda: parse_gcp_name(name), what)


def _metadata_model_kwargs(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The training ``model_kwargs`` of a checkpoint, without those that would load something from elsewhere."""
    kwargs = args.get('model_kwargs')
    if not isinstance(kwargs, Mapping):
        return {}
    dropped = sorted(k for k in kwargs if k in _UNTRUSTED_KWARGS)
    if dropped:
        _logger.warning('ignoring model_kwargs %s recorded in the checkpoint: they would load weights or configs '
                        'from elsewhere', dropped)
    return {k: v for k, v in kwargs.items() if k not in _UNTRUSTED_KWARGS}


def resolve_arch(model_name: Optional[str], info: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """Architecture to build and extra model kwargs, from ``--model`` and the checkpoint's metadata.

    The GCP method in effect when the checkpoint was written (:func:`timm_gcp.checkpoint.checkpoint_gcp_method`)
    selects the entrypoint of the same family: ``arch='resnet50_gcp_isqrt', gcp_method='pade'`` builds
    ``resnet50_gcp_pade``, and a stale ``gcp_method`` in the training ``model_kwargs`` is dropped, as are its
    ``gcp_kwargs`` (options of the method switched from) when the method changed; the options recorded with the method
    apply. The other training ``model_kwargs`` (e.g. ``gcp_dim``) are kept: they shape the architecture. An explicit
    ``model_name`` wins over the checkpoint's names.

    Nothing recorded in the checkpoint reaches the network or another file: the architecture it names must be a
    registered timm or timm-gcp model (not ``hf-hub:``, ``local-dir:`` or a URL), and training ``model_kwargs`` that
    load weights or configs (``pretrained_cfg_overlay``, ``checkpoint_path``, ...) are dropped.

    Raises:
        CheckpointError: no architecture recorded and none given, or a recorded one that is not registered.
    """
    args = info.get('args') or {}
    kwargs = _metadata_model_kwargs(args)
    built = _gcp_name(info.get('arch') or args.get('model') or '', 'the checkpoint\'s arch')
    built_method = kwargs.get('gcp_method') or (built.method if built else None)
    recorded = checkpoint_gcp_method(info)
    method = recorded[0] if recorded else kwargs.get('gcp_method')
    kwargs.pop('gcp_method', None)
    if method != built_method:  # switched (hybrid): the construction options belonged to the method switched from
        kwargs.pop('gcp_kwargs', None)
    if recorded and recorded[1]:
        kwargs['gcp_kwargs'] = dict(recorded[1])
    if model_name:
        given = _gcp_name(model_name, '--model')
        if method and given and given.method != method:
            _logger.warning('checkpoint says gcp_method=%r but --model %s was given; using --model', method, model_name)
        return resolve_model_name(model_name, kwargs)
    arch = info.get('arch') or args.get('model')
    if not arch or not isinstance(arch, str):
        raise CheckpointError('the checkpoint names no architecture (arch); pass --model')
    if method and built:
        arch = _checked(lambda: built.with_method(method).arch, 'the checkpoint\'s gcp_method')
    # <any timm model>_gcp_<method> is built as generic_gcp_<method> with that backbone, which must be registered too
    arch, kwargs = _checked(lambda: resolve_model_name(arch, kwargs), 'the checkpoint\'s arch')
    if 'backbone' in kwargs:
        _registered_arch(str(kwargs['backbone']), 'the checkpoint\'s backbone')
    return _registered_arch(arch, 'the checkpoint'), kwargs


def create_model_from_checkpoint(
        checkpoint: str,
        model_name: Optional[str] = None,
        use_ema: bool = False,
        num_classes: Optional[int] = None,
        **model_kwargs: Any,
) -> Tuple[torch.nn.Module, str, Dict[str, Any]]:
    """Build the named architecture and load the checkpoint into it strictly.

    The number of classes is taken from the checkpoint's classifier (the one the architecture's pretrained cfg names,
    e.g. ``fc`` or ``head.fc``) unless given.

    Returns:
        (model in eval mode, architecture name, checkpoint info).

    Raises:
        CheckpointError: the checkpoint cannot be read, names no usable architecture, or does not load strictly (the
            message names missing/unexpected keys or the shapes that differ).
    """
    import timm

    sd, info = read_checkpoint(checkpoint, use_ema=use_ema)
    arch, extra = resolve_arch(model_name, info)
    if num_classes is None:
        num_classes = _classifier_rows(sd, arch)
    if num_classes is not None:
        model_kwargs['num_classes'] = num_classes
    model = timm.create_model(arch, pretrained=False, **{**extra, **model_kwargs})
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes differ
        raise CheckpointError(f'{checkpoint} does not fit {arch}: {" ".join(str(e).split())[:600]}') from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f'{checkpoint} does not load strictly into {arch}: missing {result.missing_keys[:10]}, unexpected '
            f'{result.unexpected_keys[:10]}')
    return model.eval(), arch, info


def _classifier_rows(sd: Mapping[str, torch.Tensor], arch: str) -> Optional[int]:
    """Output count of the checkpoint's classifier, found under the name the architecture's pretrained cfg gives."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch)
    names = getattr(cfg, 'classifier', None) or 'fc'
    for name in ([names] if isinstance(names, str) else list(names)):
        weight = sd.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, log_every: int = 50) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and sample count over a loader of (images, targets).

    Hits are summed on the device; the host reads them only at log steps and at the end (no sync per batch).
    """
    from timm.utils import accuracy
    model.eval()
    n = 0
    hits = torch.zeros(2, dtype=torch.float64, device=device)  # top-1, top-5 hits
    start = time.time()
    for i, (images, target) in enumerate(loader):
        images, target = images.to(device), target.to(device)
        output = model(images)
        if isinstance(output, (tuple, list)):
            output = output[0]
        b = target.shape[0]
        hits += torch.stack(accuracy(output, target, topk=(1, 5))).double() * (b / 100.0)
        n += b
        if log_every and (i + 1) % log_every == 0:
            c1, c5 = hits.tolist()
            _logger.info('batch %d: %d images, top1 %.3f, top5 %.3f, %.1f img/s', i + 1, n, 100.0 * c1 / n,
                         100.0 * c5 / n, n / (time.time() - start))
    if n == 0:
        raise ValueError('the evaluation data set is empty')
    c1, c5 = hits.tolist()
    return dict(top1=round(100.0 * c1 / n, 3), top5=round(100.0 * c5 / n, 3), images=n)


def checkpoint_data_config(info: Mapping[str, Any]) -> Dict[str, Any]:
    """The preprocessing a checkpoint was trained and evaluated with, from its training arguments.

    Returns:
        Those of ``img_size`` (from ``img_size`` or ``input_size``), ``crop_pct``, ``interpolation``, ``mean``, ``std``
        the training run set; empty for files that record none (the pretrained cfg's then apply).
    """
    args = info.get('args') or {}
    out: Dict[str, Any] = {}
    input_size = args.get('input_size')
    size = args.get('img_size') or (input_size[-1] if input_size else None)
    if size:
        out['img_size'] = int(size)
    if args.get('crop_pct'):
        out['crop_pct'] = float(args['crop_pct'])
    if args.get('interpolation'):
        out['interpolation'] = str(args['interpolation'])
    for key in ('mean', 'std'):
        if args.get(key):
            out[key] = tuple(float(v) for v in args[key])
    return out


def dataset_class_names(ds: Any) -> Optional[List[str]]:
    """Class names of a timm/torchvision dataset in label order, or None when the dataset does not name them."""
    mapping = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    if isinstance(mapping, Mapping) and mapping:
        return [str(name) for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    classes = getattr(ds, 'classes', None)
    if isinstance(classes, (list, tuple)) and classes:
        return [str(c) for c in classes]
    return None


def _list(names: Sequence[str], n: int = 10) -> str:
    return ', '.join(names[:n]) + (f', ... ({len(names)} in all)' if len(names) > n else '')


def check_eval_data(
        ds: Any,
        data_dir: str,
        split: str,
        num_classes: Optional[int],
        class_names: Optional[Sequence[str]] = None,
) -> None:
    """Refuse evaluation data that would give a number for the wrong images or the wrong labels.

    * An ImageFolder root without the split folder: timm's ``create_dataset`` then reads the root itself (training
      images included, its split folders taken as classes). ``split=''`` asks for the root on purpose.
    * A class count other than the model's, or class names other than those the checkpoint was trained on (in label
      order), where the data name their classes.

    Raises:
        ValueError: naming the folder, the split and the classes.
    """
    from timm.data import ImageDataset
    root = getattr(getattr(ds, 'reader', None), 'root', None)
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
        i = next(i for i, (a, b) in enumerate(zip(class_names, names)) if a != b)
        raise ValueError(f'{where} holds other classes than the checkpoint was trained on: label {i} is {names[i]!r} '
                         f'here but {class_names[i]!r} in the checkpoint (checkpoint: {_list(list(class_names))}; '
                         f'data: {_list(names)})')


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
) -> Dict[str, Any]:
    """Build (or take) a model and evaluate it on ``data_dir``.

    The eval transform is the checkpoint's training preprocessing (:func:`checkpoint_data_config`) where it records
    one, else the pretrained cfg's; ``img_size``/``crop_pct``/``interpolation``/``mean``/``std`` override both (as
    timm's validate.py flags of those names do). The data are checked first (:func:`check_eval_data`): the split must
    exist, and the class count (and the checkpoint's class names, or ``class_names``) must match.

    Returns:
        ``dict(model, top1, top5, images, dataset, split, input_size, crop_pct, interpolation)``.
    """
    from timm.data import create_dataset, create_loader, resolve_data_config

    model, model_name, info = _build_or_take_model(
        model, model_name, checkpoint, pretrained, num_classes, use_ema, dict(model_kwargs or {}))
    ds = create_dataset(dataset, root=data_dir, split=split, is_training=False)
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
    result = evaluate(model, loader, dev)
    return dict(model=model_name, **result, dataset=dataset or 'folder', split=split,
                input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'],
                interpolation=data_config['interpolation'])


def result_line(result: Mapping[str, Any], command: str) -> str:
    """The one line model cards quote."""
    return (f'result: model={result["model"]} top1={result["top1"]:.3f} top5={result["top5"]:.3f} '
            f'images={result["images"]} input={"x".join(map(str, result["input_size"][1:]))} '
            f'crop_pct={result["crop_pct"]} command="{command}"')


def build_parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs
    p = argparse.ArgumentParser(prog='timm-gcp-validate', description='Top-1/top-5 evaluation of a timm-gcp model.')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help='load the model\'s pretrained tag (timm/Hub)')
    src.add_argument('--checkpoint', default=None, help='training checkpoint (.pth.tar) or .safetensors weights')
    add_eval_args(p, 'ImageFolder root holding the --split folder (or a timm dataset root)', data_dir_required=True)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--use-test-size', action='store_true', help='use the cfg\'s test_input_size/test_crop_pct')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    p.add_argument('--results-file', default=None, help='also write the result as JSON (a new file)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of ``timm-gcp-validate``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    problem = (None if args.checkpoint or args.model else 'give --model (and --pretrained) or --checkpoint') or \
        data_dir_error(args.data_dir, args.dataset) or existing_file_error(args.results_file, '--results-file')
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    try:
        result = validate(
            args.model, args.data_dir, checkpoint=args.checkpoint, pretrained=args.pretrained, dataset=args.dataset,
            split=args.split, batch_size=args.batch_size, workers=args.workers, num_classes=args.num_classes,
            use_ema=args.use_ema, use_test_size=args.use_test_size, device=args.device,
            model_kwargs=args.model_kwargs, img_size=args.img_size, crop_pct=args.crop_pct,
            interpolation=args.interpolation)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
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
    print(result_line(result, command))
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Top-1/top-5 evaluation of timm-gcp (or any timm) models: ``timm-gcp-validate``.

Data come through timm's own pipeline (``create_dataset`` / ``resolve_data_config`` / ``create_loader``), so an
ImageFolder tree or any timm dataset (``--dataset torch/cifar10``, ``hfds/...``) works and the eval transform is the
pretrained cfg's (resize, centre crop, mean/std). The last line printed is the result line that model cards quote::

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
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .convert import CheckpointError, load_state_dict_safely, unwrap_state_dict
from .models import resolve_model_name

__all__ = [
    'read_checkpoint', 'resolve_arch', 'create_model_from_checkpoint', 'evaluate', 'validate', 'setup_cli_logging',
    'main']

_logger = logging.getLogger(__name__)


class _CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted.

    ``logging.StreamHandler()`` keeps the stream it was created with; a CLI ``main()`` called again in the same
    process after ``sys.stderr`` was swapped (notebooks, test runners) would then write to a stale or closed stream.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_cli_logging(formatter: Optional[logging.Formatter] = None, level: int = logging.INFO) -> None:
    """Log to stderr at ``level`` for a command-line entry point; idempotent (one handler however often called).

    Replaces ``logging.basicConfig``/timm's ``setup_default_logging`` in our ``main()`` functions: those add a new
    handler bound to the current ``sys.stderr`` on every call (or none at all when the root already has one).
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _CurrentStderrHandler)), None)
    if handler is None:
        handler = _CurrentStderrHandler()
        root.addHandler(handler)
    handler.setFormatter(formatter or logging.Formatter('%(message)s'))
    root.setLevel(level)


def read_checkpoint(path: str, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """State dict and metadata of a training checkpoint or weights file, loaded without arbitrary unpickling.

    Understands timm's ``CheckpointSaver`` files (``state_dict``, ``state_dict_ema``, ``arch``, ``args``),
    ``timm-gcp-train`` checkpoints (same saver, optionally ``gcp_method``/``gcp_kwargs``), bare state dicts and
    ``.safetensors`` files (architecture from their metadata when present).

    Returns:
        (flat state dict, info) where info may hold ``arch``, ``gcp_method``, ``gcp_kwargs``, ``epoch``, ``metric``,
        ``ema`` (whether EMA weights were taken) and ``args`` (a dict of the training arguments).
    """
    obj = load_state_dict_safely(path)
    info: Dict[str, Any] = {}
    if path.endswith('.safetensors'):
        if use_ema:
            raise CheckpointError(f'{path} is a single set of weights (safetensors), it holds no separate EMA '
                                  f'weights; drop --use-ema')
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
        if meta.get('arch'):
            info['arch'] = meta['arch']
    elif isinstance(obj, Mapping):
        for key in ('arch', 'gcp_method', 'epoch', 'metric'):
            if key in obj and isinstance(obj[key], (str, int, float)):
                info[key] = obj[key]
        if isinstance(obj.get('gcp_kwargs'), Mapping):
            info['gcp_kwargs'] = dict(obj['gcp_kwargs'])
        args = obj.get('args')
        if isinstance(args, argparse.Namespace):
            info['args'] = vars(args)
        elif isinstance(args, Mapping):
            info['args'] = dict(args)
        if use_ema and 'state_dict_ema' not in obj:
            raise CheckpointError(f'{path} holds no state_dict_ema (EMA weights were requested)')
        info['ema'] = bool(use_ema)
    return unwrap_state_dict(obj, prefer_ema=use_ema), info


def resolve_arch(model_name: Optional[str], info: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """Architecture to build and extra model kwargs, from ``--model`` and the checkpoint's metadata.

    The GCP method in effect when the checkpoint was written (``gcp_method`` at the top level, or
    ``args.gcp_method`` as ``timm-gcp-train`` stores it after a hybrid switch) selects the entrypoint of the same
    family: ``arch='resnet50_gcp_isqrt', gcp_method='pade'`` builds ``resnet50_gcp_pade``, and a stale
    ``gcp_method`` in the training ``model_kwargs`` is dropped, as are its ``gcp_kwargs`` (options of the method
    switched from) when the method changed; the options recorded with the method apply. The other training
    ``model_kwargs`` (e.g. ``gcp_dim``) are kept: they shape the architecture. An explicit ``model_name`` wins over
    the checkpoint's names.
    """
    args = info.get('args') or {}
    kwargs: Dict[str, Any] = {}
    train_kwargs = args.get('model_kwargs')
    if isinstance(train_kwargs, Mapping):
        kwargs.update(train_kwargs)
    built_arch = info.get('arch') or args.get('model') or ''
    built_method = kwargs.get('gcp_method') or (
        built_arch.rsplit('_gcp_', 1)[1] if '_gcp_' in built_arch else None)
    method = info.get('gcp_method') or args.get('gcp_method') or kwargs.get('gcp_method')
    kwargs.pop('gcp_method', None)
    if method != built_method:  # switched (hybrid): the construction options belonged to the method switched from
        kwargs.pop('gcp_kwargs', None)
    method_kwargs = info.get('gcp_kwargs') or args.get('gcp_method_kwargs')
    if isinstance(method_kwargs, Mapping) and method_kwargs:
        kwargs['gcp_kwargs'] = dict(method_kwargs)
    if model_name:
        if method and '_gcp_' in model_name and not model_name.endswith('_' + method):
            _logger.warning('checkpoint says gcp_method=%r but --model %s was given; using --model', method, model_name)
        return resolve_model_name(model_name, kwargs)
    arch = info.get('arch') or args.get('model')
    if not arch:
        raise CheckpointError('the checkpoint names no architecture (arch); pass --model')
    if method and '_gcp_' in arch:
        arch = arch.rsplit('_gcp_', 1)[0] + '_gcp_' + method
    # <any timm model>_gcp_<method> is built as generic_gcp_<method> with that backbone
    return resolve_model_name(arch, kwargs)


def create_model_from_checkpoint(
        checkpoint: str,
        model_name: Optional[str] = None,
        use_ema: bool = False,
        num_classes: Optional[int] = None,
        **model_kwargs: Any,
) -> Tuple[torch.nn.Module, str, Dict[str, Any]]:
    """Build the named architecture and load the checkpoint into it strictly.

    The number of classes is taken from the checkpoint's ``fc.weight`` unless given.

    Returns:
        (model in eval mode, architecture name, checkpoint info).

    Raises:
        CheckpointError: the checkpoint does not load strictly (the message names missing/unexpected keys).
    """
    import timm
    import timm_gcp  # noqa: F401  (registers the *_gcp_* entrypoints)

    sd, info = read_checkpoint(checkpoint, use_ema=use_ema)
    arch, extra = resolve_arch(model_name, info)
    if num_classes is None:
        fc = sd.get('fc.weight')
        num_classes = int(fc.shape[0]) if fc is not None else None
    if num_classes is not None:
        model_kwargs['num_classes'] = num_classes
    model = timm.create_model(arch, pretrained=False, **{**extra, **model_kwargs})
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f'{checkpoint} does not load strictly into {arch}: missing {result.missing_keys[:10]}, unexpected '
            f'{result.unexpected_keys[:10]}')
    return model.eval(), arch, info


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
) -> Dict[str, Any]:
    """Build (or take) a model, evaluate it on ``data_dir`` with its pretrained cfg's eval transform.

    ``img_size``/``crop_pct``/``interpolation`` override the cfg's (as timm's validate.py flags of those names do).

    Returns:
        ``dict(model, top1, top5, images, dataset, split, input_size, crop_pct, interpolation)``.
    """
    import timm
    import timm_gcp  # noqa: F401
    from timm.data import create_dataset, create_loader, resolve_data_config

    model_kwargs = dict(model_kwargs or {})
    if model is None:
        if checkpoint and pretrained:
            raise ValueError('give either a checkpoint or pretrained=True, not both')
        if checkpoint:
            model, model_name, _ = create_model_from_checkpoint(
                checkpoint, model_name, use_ema=use_ema, num_classes=num_classes, **model_kwargs)
        else:
            if not model_name:
                raise ValueError('a model name is needed without a checkpoint')
            if num_classes is not None:
                model_kwargs['num_classes'] = num_classes
            model_name, model_kwargs = resolve_model_name(model_name, model_kwargs)
            model = timm.create_model(model_name, pretrained=pretrained, **model_kwargs)
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model = model.to(dev).eval()
    overrides = {k: v for k, v in dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation).items()
                 if v is not None}
    data_config = resolve_data_config(args=overrides, model=model, use_test_size=use_test_size)
    ds = create_dataset(dataset, root=data_dir, split=split, is_training=False)
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
    p.add_argument('--model', default=None, help='architecture (default: the checkpoint\'s arch)')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help='load the model\'s pretrained tag (timm/Hub)')
    src.add_argument('--checkpoint', default=None, help='training checkpoint (.pth.tar) or .safetensors weights')
    p.add_argument('--data-dir', required=True, help='ImageFolder root (or a timm dataset root)')
    p.add_argument('--dataset', default='', help='timm dataset name, e.g. torch/cifar10 (default: ImageFolder)')
    p.add_argument('--split', default='validation')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--use-ema', action='store_true', help='evaluate the checkpoint\'s state_dict_ema')
    p.add_argument('--use-test-size', action='store_true', help='use the cfg\'s test_input_size/test_crop_pct')
    p.add_argument('--img-size', type=int, default=None, help='eval image size (default: the pretrained cfg\'s)')
    p.add_argument('--crop-pct', type=float, default=None, help='centre-crop fraction (default: the cfg\'s)')
    p.add_argument('--interpolation', default=None, help='resize interpolation, e.g. bilinear (default: the cfg\'s)')
    p.add_argument('--device', default=None)
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    p.add_argument('--results-file', default=None, help='also write the result as JSON')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    if not args.checkpoint and not args.model:
        print('error: give --model (and --pretrained) or --checkpoint', file=sys.stderr)
        return 2
    if not args.dataset and not os.path.isdir(args.data_dir):
        print(f'error: --data-dir: no such directory: {args.data_dir}', file=sys.stderr)
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
        with open(args.results_file, 'w', encoding='utf-8') as f:
            json.dump(result, f, indent=2)
    print(result_line(result, command))
    return 0


if __name__ == '__main__':
    sys.exit(main())

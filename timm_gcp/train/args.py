"""Command-line flags and YAML ``--config`` of ``timm-gcp-train``: parsing, defaults and the checks of their values.

Flags and config keys are named as in timm's ``train.py`` where they overlap, so one recipe file serves both trainers.
Precedence: parser defaults < demo defaults (no data arguments) < YAML config < command line.
"""
import argparse
import logging
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from timm.models import is_model

from ..cli import KwargsAction, data_dir_error
from ..models.naming import is_gcp_name, parse_gcp_name

__all__ = ['DEMO_DEFAULTS', 'EXTRA_KEYS', 'build_parsers', 'is_builtin', 'parse_args']

_logger = logging.getLogger(__name__)

_DESCRIPTION = ('Train and fine-tune GCP models with timm\'s components, including the hybrid NS→SVD protocol '
                '(--gcp-switch-epoch). Without data arguments: the built-in demo.')

_logger = logging.getLogger('timm_gcp.train')

# Defaults of the built-in demo (no data arguments); measured results and timings in docs/training.md.
DEMO_DEFAULTS = dict(
    model='resnet18_gcp_isqrt',
    model_kwargs=dict(gcp_dim=16, output_stride=8),
    baseline_model='auto',  # the GCP model's own backbone with its default pooling
    img_size=32,
    batch_size=64,
    validation_batch_size=256,
    epochs=3,
    lr=0.05,
    sched='cosine',
    warmup_epochs=0,
    weight_decay=1e-4,
    workers=0,
    log_interval=8,
    experiment='demo',
)

# Our flags that timm's train.py does not have (it keeps them as unused attributes when they come from a config).
EXTRA_KEYS = (
    'head_lr_mult', 'gcp_switch_epoch', 'gcp_switch_method', 'gcp_switch_kwargs', 'baseline_model', 'diag_interval',
    'builtin_classes', 'builtin_train_samples', 'builtin_val_samples', 'builtin_strength', 'builtin_offset_std',
    'val_batches_per_epoch')



def build_parsers() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file; its keys are argparse dests (as for timm train.py)')

    parser = argparse.ArgumentParser(
        prog='timm-gcp-train', description=_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional, deprecated)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir); none → built-in dataset')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>") as for timm create_dataset; "" → ImageFolder')
    group.add_argument('--train-split', metavar='NAME', default='train')
    group.add_argument('--val-split', metavar='NAME', default='validation')
    group.add_argument('--train-num-samples', default=None, type=int, metavar='N')
    group.add_argument('--val-num-samples', default=None, type=int, metavar='N')
    group.add_argument('--dataset-download', action='store_true', default=False)
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    group.add_argument('--builtin-classes', type=int, default=4, help='built-in dataset: number of classes')
    group.add_argument('--builtin-train-samples', type=int, default=1024, help='built-in dataset: training samples')
    group.add_argument('--builtin-val-samples', type=int, default=512, help='built-in dataset: validation samples')
    group.add_argument('--builtin-strength', type=float, default=0.6,
                       help='built-in dataset: distance of the class correlations from the identity, [0, 1)')
    group.add_argument('--builtin-offset-std', type=float, default=0.0,
                       help='built-in dataset: std of a per-image colour cast (first-order nuisance)')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50_gcp_isqrt', type=str, metavar='MODEL')
    group.add_argument('--pretrained', action='store_true', default=False)
    group.add_argument('--pretrained-path', default=None, type=str, help='load this checkpoint as pretrained weights')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume model, optimizer, scheduler, EMA, epoch and GCP method from a checkpoint')
    group.add_argument('--no-resume-opt', action='store_true', default=False)
    group.add_argument('--num-classes', type=int, default=None, metavar='N')
    group.add_argument('--gp', default=None, type=str, metavar='POOL')
    group.add_argument('--img-size', type=int, default=None, metavar='N')
    group.add_argument('--in-chans', type=int, default=None, metavar='N')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    group.add_argument('--channels-last', action='store_true', default=False)
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=KwargsAction,
                       help='model kwargs, e.g. gcp_dim=64 gcp_method=pade; merged into those of --config (or of the '
                            'demo), a given key winning; the flag alone clears them')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str)
    group.add_argument('--amp', action='store_true', default=False, help='mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', default='float16', type=str)
    group.add_argument('--no-ddp-bb', action='store_true', default=False)

    group = parser.add_argument_group('GCP parameters')
    group.add_argument('--head-lr-mult', type=float, default=1.0,
                       help='learning-rate multiplier of the head (global_pool + classifier parameters)')
    group.add_argument('--gcp-switch-epoch', type=int, default=None, metavar='E',
                       help='hybrid protocol: switch the matrix square root at the start of epoch E')
    group.add_argument('--gcp-switch-method', type=str, default='pade', metavar='METHOD',
                       help='method to switch to at --gcp-switch-epoch')
    group.add_argument('--gcp-switch-kwargs', nargs='*', default={}, action=KwargsAction,
                       help='options of the method switched to, e.g. eps=1e-12')
    group.add_argument('--diag-interval', type=int, default=20, metavar='N',
                       help='covariance diagnostics: sample every N-th training step (0 disables)')
    group.add_argument('--baseline-model', type=str, default='', metavar='MODEL',
                       help='also train this model the same way and print both accuracies (demo: the GCP model\'s own '
                            'timm backbone with its default pooling)')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M')
    group.add_argument('--weight-decay', type=float, default=2e-5)
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    group.add_argument('--clip-mode', type=str, default='norm')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=KwargsAction)

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    group.add_argument('--sched-on-updates', action='store_true', default=False)
    group.add_argument('--lr', type=float, default=None, metavar='LR')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N')
    group.add_argument('--lr-k-decay', type=float, default=1.0)
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR')
    group.add_argument('--epochs', type=int, default=300, metavar='N')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    group.add_argument('--warmup-prefix', action='store_true', default=False)
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False)
    group.add_argument('--train-crop-mode', type=str, default=None)
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.)
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    group.add_argument('--aa', type=str, default=None, metavar='NAME')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT')
    group.add_argument('--remode', type=str, default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--smoothing', type=float, default=0.1)
    group.add_argument('--train-interpolation', type=str, default='random')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT')
    group.add_argument('--model-ema', action='store_true', default=False)
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--model-ema-warmup', action='store_true')
    group.add_argument('--dist-bn', type=str, default='reduce', help='"broadcast", "reduce", or "" (none)')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S')
    group.add_argument('--log-interval', type=int, default=50, metavar='N')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N')
    group.add_argument('--pin-mem', action='store_true', default=False)
    group.add_argument('--output', default='', type=str, metavar='PATH')
    group.add_argument('--experiment', default='', type=str, metavar='NAME')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC')
    group.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None, metavar='N',
                       help='limit the number of training batches per epoch')
    group.add_argument('--val-batches-per-epoch', type=int, default=None, metavar='N',
                       help='limit the number of validation batches')
    return config_parser, parser


def is_builtin(ns: argparse.Namespace) -> bool:
    return not (ns.data or ns.data_dir or ns.dataset)


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse like timm's train.py: parser defaults < demo defaults (no data arguments) < YAML config < command line.

    Returns:
        (args, args_text): the namespace and its YAML dump (the resolved config written as ``args.yaml``).
    """
    config_parser, parser = build_parsers()
    argv = list(sys.argv[1:] if argv is None else argv)
    args_config, remaining = config_parser.parse_known_args(argv)
    cfg: Dict[str, Any] = {}
    if args_config.config:
        try:
            with open(args_config.config) as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as e:
            parser.error(f'--config: cannot read {args_config.config}: {e.strerror or e}')
        except yaml.YAMLError as e:
            parser.error(f'--config {args_config.config} is not valid YAML: {e}')
        if not isinstance(cfg, dict):
            parser.error(f'config {args_config.config} must be a mapping of argparse dests to values')
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            _logger.warning(f'config {args_config.config}: ignoring keys timm-gcp-train does not use: {unknown}')
        problem = _config_type_error(parser, cfg)
        if problem:
            parser.error(f'--config {args_config.config}: {problem}')
    probe = parser.parse_args(remaining)
    if is_builtin(argparse.Namespace(**{**vars(probe), **{k: v for k, v in cfg.items() if k in vars(probe)}})):
        parser.set_defaults(**DEMO_DEFAULTS)
        if isinstance(cfg.get('model_kwargs'), dict):  # merged with the demo's, a key of the config winning
            cfg = dict(cfg, model_kwargs={**DEMO_DEFAULTS['model_kwargs'], **cfg['model_kwargs']})
    parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    if is_builtin(args) and not is_gcp_name(args.model) and any(k.startswith('gcp_') for k in args.model_kwargs):
        # The demo's GCP kwargs do not apply to a model without a GCP head (e.g. `--model resnet18`).
        args.model_kwargs = {k: v for k, v in args.model_kwargs.items() if not k.startswith('gcp_')}
    if args.baseline_model == 'auto':
        args.baseline_model = _backbone_of(args.model, args.model_kwargs)
    _validate_args(parser, args)
    args_text = yaml.safe_dump(vars(args), default_flow_style=False)
    return args, args_text


_TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a string'}


def _config_type_error(parser: argparse.ArgumentParser, cfg: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with the type of a config value, or None. Config values become defaults, which argparse does not
    convert or check, so a YAML ``batch_size: 4.5`` or ``img_size: [32, 32]`` would fail late, inside timm."""
    for action in parser._actions:
        if action.dest not in cfg or cfg[action.dest] is None:
            continue
        key, value, flag = action.dest, cfg[action.dest], action.option_strings[-1] if action.option_strings else ''
        if isinstance(action, KwargsAction):
            if not isinstance(value, dict):
                return f'{key} must be a mapping of names to values (as {flag} KEY=VALUE ...), got {value!r}'
            continue
        if action.const is True and action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                return f'{key} must be true or false (as {flag}), got {value!r}'
            continue
        if action.type not in _TYPE_NAMES:
            continue
        many = action.nargs not in (None, '?')
        if many and not isinstance(value, list):
            return f'{key} must be a list of {_TYPE_NAMES[action.type][2:]}s (as {flag}), got {value!r}'
        for v in (value if many else [value]):
            ok = isinstance(v, str) if action.type is str else (
                isinstance(v, (int, float) if action.type is float else int) and not isinstance(v, bool))
            if not ok:
                what = f'a list of {_TYPE_NAMES[action.type][2:]}s' if many else _TYPE_NAMES[action.type]
                return f'{key} must be {what} (as {flag}), got {value!r}'
    return None


def _backbone_of(model: str, model_kwargs: Mapping[str, Any]) -> str:
    """The timm model a GCP model is built on (``resnet50_ls1_gcp_pade`` → ``resnet50``, ``generic_gcp_pade`` with
    ``backbone=X`` → ``X``), '' when there is none (not a GCP model, or a backbone timm does not have)."""
    parsed = parse_gcp_name(model)
    if parsed is None:
        return ''
    name = model_kwargs.get('backbone') or parsed.backbone
    while name and not is_model(name):  # a layout variant of a timm model: resnet50_ls1 → resnet50
        name = name.rpartition('_')[0]
    return name


# Flags that count something or give a size: each must be >= its minimum (None: not given).
_MINIMUMS = dict(batch_size=1, validation_batch_size=1, img_size=1, in_chans=1, num_classes=1, grad_accum_steps=1,
                 epochs=1, log_interval=1, checkpoint_hist=1, workers=0, diag_interval=0, train_batches_per_epoch=1,
                 val_batches_per_epoch=1, builtin_classes=2, builtin_train_samples=1, builtin_val_samples=1,
                 train_num_samples=1, val_num_samples=1)


def _size_error(args: argparse.Namespace) -> Optional[str]:
    for key, low in _MINIMUMS.items():
        value = getattr(args, key)
        if value is not None and value < low:
            return f'--{key.replace("_", "-")} must be >= {low}, got {value}'
    if args.input_size is not None and min(args.input_size) < 1:
        return f'--input-size must be 3 positive integers (C H W), got {args.input_size}'
    return None


def _validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problem = _size_error(args)
    if problem:
        parser.error(problem)
    if args.head_lr_mult <= 0:
        parser.error(f'--head-lr-mult must be > 0, got {args.head_lr_mult}')
    if args.gcp_switch_epoch is not None and args.gcp_switch_epoch < 0:
        parser.error(f'--gcp-switch-epoch must be >= 0, got {args.gcp_switch_epoch}')
    if args.gcp_switch_epoch is not None:
        from ..functional import METHODS, resolve_method
        try:
            resolve_method(args.gcp_switch_method, **args.gcp_switch_kwargs)
        except ValueError as e:
            parser.error(f'--gcp-switch-method/--gcp-switch-kwargs: {e}')
        try:
            name = parse_gcp_name(args.model)
        except ValueError:
            name = None
        if name is not None and name.method not in METHODS:  # a head of its own (DropCov, SoT): no root
            parser.error(f'--gcp-switch-epoch: {args.model} has a {name.method!r} head, which has no matrix square '
                         f'root to switch (the hybrid protocol switches the root of a covariance-pooling model)')
    if args.amp_dtype not in ('float16', 'bfloat16'):
        parser.error(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype!r}')
    for flag in ('resume', 'initial_checkpoint', 'pretrained_path'):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            parser.error(f'--{flag.replace("_", "-")}: no such file: {path}')
    problem = data_dir_error(args.data_dir or args.data, args.dataset, hint=f' (an ImageFolder root with '
                             f'{args.train_split}/ and {args.val_split}/ class folders)')
    if problem:
        parser.error(problem)
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f'--output {args.output} is a file; give the folder that run folders are created in')
    if args.gcp_switch_epoch is not None and args.gcp_switch_epoch >= args.epochs:
        _logger.warning(f'--gcp-switch-epoch {args.gcp_switch_epoch} >= --epochs {args.epochs}: the run ends before '
                        f'the switch to {args.gcp_switch_method!r}')


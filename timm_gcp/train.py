"""``timm-gcp-train``: train and fine-tune GCP models with timm's components, including the hybrid NS→SVD protocol.

The paper (ICCV 2021, https://arxiv.org/abs/2105.02498) trains with Newton–Schulz (``isqrt``) and switches the same
weights to an eigen-method (e.g. SVD-Padé) for the last stage. Here that is one flag pair, ``--gcp-switch-epoch E
--gcp-switch-method pade``: at epoch E the matrix square root of every GCP head (and of the EMA copy) is switched in
place; the method the model uses is written into every checkpoint (``gcp_method``, ``gcp_kwargs``) and restored by
``--resume``.

A run guards its output: a checkpoint is written only when every parameter and buffer is finite and its evaluation
was finite, a diverging run stops with a message naming the last good checkpoint (exit status 2), and the run folder is
locked for the run's lifetime so that a second process cannot write into it. docs/training.md states these guarantees.

Flags and YAML ``--config`` keys are named as in timm's ``train.py`` where they overlap, so one recipe file serves both
trainers. With no data arguments the command trains a small GCP ResNet-18 and the same backbone with average pooling on
a built-in dataset whose classes differ only in channel covariance, and prints both accuracies side by side.

Examples::

    timm-gcp-train                                       # the built-in demo (GCP vs average pooling)
    timm-gcp-train --data-dir /data/imagenet --config zoo/recipes/resnet50_gcp_imagenet_hybrid.yaml
    torchrun --nproc_per_node 2 -m timm_gcp.train --data-dir DIR --model resnet50_gcp_isqrt ...
"""
import argparse
import copy
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

from timm.data import create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import create_model, is_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    CheckpointSaver, FormatterNoInfo, ModelEmaV3, NativeScaler, ParseKwargs, accuracy, dispatch_clip_grad,
    distribute_bn, get_state_dict, init_distributed_device, random_seed, unwrap_model, update_summary)

from . import models  # noqa: F401  (registers the *_gcp_* models with timm)
from .checkpoint import (
    CheckpointError, checkpoint_gcp_method, checkpoint_info, finite_metric, load_state_dict_safely, non_finite_entries,
    unwrap_state_dict)
from .cli import data_dir_error, setup_cli_logging
from .diagnostics import CovStatsCollector
from .functional import NonFiniteError
from .layers import MatrixSqrt, get_gcp_method, set_gcp_method
from .models import fixed_input_size, resolve_model_name
from .models.naming import is_gcp_name, parse_gcp_name
from .validate import dataset_class_names

try:
    import fcntl
except ImportError:  # not on Windows: run folders are then not locked (a warning says so)
    fcntl = None

try:
    from timm.utils import trim_summary
except ImportError:  # timm < 1.0.31 (pyproject allows >= 1.0.29)
    def trim_summary(filename: str, start_epoch: int) -> None:
        """Drop the rows of epochs >= ``start_epoch`` from a summary CSV (timm 1.0.31's helper)."""
        import csv
        if not os.path.exists(filename):
            return
        with open(filename, newline='') as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        keep = [r for r in rows[1:] if r and int(float(r[0])) < start_epoch]
        with open(filename, 'w', newline='') as f:
            if keep:
                csv.writer(f).writerows([rows[0]] + keep)

__all__ = [
    'main', 'parse_args', 'train_model', 'NonFiniteLossError', 'TrainSetupError', 'head_param_groups', 'DEMO_DEFAULTS']

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


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss, a parameter or buffer, an evaluation or the input of a GCP layer became NaN or
    infinite. The message says where and names the last good checkpoint."""


class TrainSetupError(ValueError):
    """The data, a checkpoint or the output folder does not fit the run (missing split, class mismatch, other
    architecture, unreadable file, a folder another run is writing to)."""


def _build_parsers() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file; its keys are argparse dests (as for timm train.py)')

    parser = argparse.ArgumentParser(
        prog='timm-gcp-train', description=__doc__.split('\n\n')[0],
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
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='model kwargs, e.g. gcp_dim=64 gcp_method=pade')
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
    group.add_argument('--gcp-switch-kwargs', nargs='*', default={}, action=ParseKwargs,
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
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)

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


def _is_builtin(ns: argparse.Namespace) -> bool:
    return not (ns.data or ns.data_dir or ns.dataset)


def _first_lines(e: BaseException, n: int = 3) -> str:
    lines = str(e).strip().splitlines()
    return ' '.join(ln.strip() for ln in lines[:n])[:600] or type(e).__name__


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse like timm's train.py: parser defaults < demo defaults (no data arguments) < YAML config < command line.

    Returns:
        (args, args_text): the namespace and its YAML dump (the resolved config written as ``args.yaml``).
    """
    config_parser, parser = _build_parsers()
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
    probe = parser.parse_args(remaining)
    if _is_builtin(argparse.Namespace(**{**vars(probe), **{k: v for k, v in cfg.items() if k in vars(probe)}})):
        parser.set_defaults(**DEMO_DEFAULTS)
    parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    if _is_builtin(args) and not is_gcp_name(args.model) and any(k.startswith('gcp_') for k in args.model_kwargs):
        # The demo's GCP kwargs do not apply to a model without a GCP head (e.g. `--model resnet18`).
        args.model_kwargs = {k: v for k, v in args.model_kwargs.items() if not k.startswith('gcp_')}
    if args.baseline_model == 'auto':
        args.baseline_model = _backbone_of(args.model, args.model_kwargs)
    _validate_args(parser, args)
    args_text = yaml.safe_dump(vars(args), default_flow_style=False)
    return args, args_text


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


def _validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.head_lr_mult <= 0:
        parser.error(f'--head-lr-mult must be > 0, got {args.head_lr_mult}')
    if args.gcp_switch_epoch is not None and args.gcp_switch_epoch < 0:
        parser.error(f'--gcp-switch-epoch must be >= 0, got {args.gcp_switch_epoch}')
    if args.gcp_switch_epoch is not None:
        from .functional import resolve_method
        try:
            resolve_method(args.gcp_switch_method, **args.gcp_switch_kwargs)
        except ValueError as e:
            parser.error(f'--gcp-switch-method/--gcp-switch-kwargs: {e}')
    if args.grad_accum_steps < 1:
        parser.error(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    if args.diag_interval < 0:
        parser.error(f'--diag-interval must be >= 0, got {args.diag_interval}')
    if args.epochs < 1:
        parser.error(f'--epochs must be >= 1, got {args.epochs}')
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


# ---------------------------------------------------------------------------------------------------------------------
# Model pieces


def head_param_names(model: nn.Module) -> List[str]:
    """Names of the head parameters: the global pool, the GCP pooling (any module holding a ``MatrixSqrt``, wherever
    the model keeps it), ``head.*`` and the classifier of ``pretrained_cfg``."""
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'fc'
    gcp_pools = tuple(f'{name}.' for name, m in model.named_modules()
                      if name and any(isinstance(c, MatrixSqrt) for c in m.children()))
    prefixes = ('global_pool.', 'head.') + gcp_pools + tuple(
        f'{c}.' for c in ([classifier] if isinstance(classifier, str) else classifier))
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def head_param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """Parameter groups for ``create_optimizer_v2``: backbone and head, each split into decay / no-decay.

    Biases and normalisation parameters (ndim <= 1) and ``model.no_weight_decay()`` get no weight decay; the head
    groups carry ``lr_scale = head_lr_mult``, which timm's schedulers apply to the scheduled learning rate.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    head = set(head_param_names(model))
    groups: Dict[Tuple[bool, bool], List[torch.Tensor]] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith('.bias') or name in skip)
        groups[(name in head, decay)].append(p)
    out = []
    for (is_head, decay), params in groups.items():
        if not params:
            continue
        g: Dict[str, Any] = dict(params=params, weight_decay=weight_decay if decay else 0.)
        if is_head and head_lr_mult != 1.0:
            g['lr_scale'] = head_lr_mult
        out.append(g)
    return out


def _gcp_method(model: nn.Module) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The method and options of the model's GCP layers (``MatrixSqrt``), or None for a model without one."""
    try:
        return get_gcp_method(unwrap_model(model))
    except ValueError:  # no MatrixSqrt in this model
        return None


def _set_gcp_method(targets: Sequence[nn.Module], method: str, options: Dict[str, Any]) -> int:
    return sum(set_gcp_method(m, method, **options) for m in targets)


class _CheckpointState:
    """What ``CheckpointSaver`` writes besides optimizer/args/epoch, through its ``task`` hook.

    The weights as timm's saver saves them without a task, after checking that every tensor is finite (a non-finite
    checkpoint is never written); the model's current matrix square-root method at the top level (``gcp_method``,
    ``gcp_kwargs``, read from the model's ``MatrixSqrt`` modules when the checkpoint is written); the class names of
    the training data (``class_names``, in label order), which ``timm-gcp-validate`` checks evaluation data against.
    """

    def __init__(self, model: nn.Module, model_ema: Optional[nn.Module], class_names: Optional[List[str]]):
        self.model, self.model_ema, self.class_names = model, model_ema, class_names

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=unwrap_model) -> Dict[str, Any]:
        if ema:
            if self.model_ema is None:
                return {}
            return dict(state_dict_ema=_finite_state(get_state_dict(self.model_ema, unwrap_fn), 'the EMA model'))
        state: Dict[str, Any] = dict(state_dict=_finite_state(get_state_dict(self.model, unwrap_fn), 'the model'))
        current = _gcp_method(self.model)
        if current is not None:
            state.update(gcp_method=current[0], gcp_kwargs=dict(current[1]))
        if self.class_names:
            state['class_names'] = list(self.class_names)
        return state


def _finite_state(state_dict: Dict[str, torch.Tensor], whose: str) -> Dict[str, torch.Tensor]:
    bad = non_finite_entries(state_dict)
    if bad:
        raise NonFiniteLossError(f'non-finite values in {whose} when saving: {_named(bad)}')
    return state_dict


def _named(names: Sequence[str], n: int = 5) -> str:
    return f'{len(names)} tensor(s) hold NaN/inf ({", ".join(names[:n])}{", ..." if len(names) > n else ""})'


class _DivergenceWatch:
    """Tells a diverging run apart from a bug when a forward or backward raises, and checks the models' state.

    An error is a divergence when a parameter or buffer of a watched model holds NaN/inf, or when it is a GCP
    layer's ``NonFiniteError`` (its input, the batch covariance, holds NaN/inf: often the first sign of a divergence,
    before any loss is NaN).
    """

    def __init__(self, named_models: Sequence[Tuple[str, Optional[nn.Module]]]):
        self.models = [(label, unwrap_model(m)) for label, m in named_models if m is not None]

    def non_finite_state(self) -> Optional[str]:
        """Which model holds NaN/inf in its parameters or buffers, or None."""
        for label, model in self.models:
            bad = non_finite_entries(model.state_dict())
            if bad:
                return f'the {label}\'s parameters/buffers: {_named(bad)}'
        return None

    def explain(self, error: BaseException) -> Optional[str]:
        """Why ``error``, just raised, is a divergence, or None when nothing is non-finite (then it is a bug)."""
        reason = self.non_finite_state()
        if reason is None and isinstance(error, NonFiniteError):
            reason = f'a GCP layer\'s input: {_first_lines(error, 1)}'
        return reason


# ---------------------------------------------------------------------------------------------------------------------
# Data


def _check_splits(args, root, ds_train, ds_eval, classes_train: Optional[List[str]]) -> None:
    """Refuse folder datasets whose splits would silently give wrong numbers.

    timm's ``create_dataset`` falls back to the root folder when a split folder is missing (searched recursively,
    so evaluation would read the training images), and numbers the classes of each split folder on its own (so a class
    folder missing from one split shifts the labels of the others).
    """
    reader_train, reader_eval = getattr(ds_train, 'reader', None), getattr(ds_eval, 'reader', None)
    root_train, root_eval = getattr(reader_train, 'root', None), getattr(reader_eval, 'root', None)
    if root_train is not None and root_eval is not None:
        a, b = os.path.abspath(root_train), os.path.abspath(root_eval)
        if os.path.commonpath([a, b]) in (a, b):  # the same folder, or one inside the other
            raise TrainSetupError(
                f'--data-dir {root}: no separate split folders: training ({args.train_split!r}) reads {root_train} '
                f'and validation ({args.val_split!r}) reads {root_eval}, so validation would see training images; '
                f'give a root with separate split folders (e.g. train/ and validation/) or set '
                f'--train-split/--val-split')
    index_train, index_eval = _class_to_idx(ds_train), _class_to_idx(ds_eval)
    if index_train and index_eval:
        bad = sorted(k for k, v in index_eval.items() if index_train.get(k) != v)
        if bad:
            raise TrainSetupError(
                f'--data-dir {root}: the validation classes do not match the training classes (missing from '
                f'training or numbered differently: {bad[:10]}); give both splits the same class folders or a '
                f'--class-map')
    needed = _outputs_needed(ds_train, classes_train)
    if needed and args.num_classes is not None and needed > args.num_classes:
        raise TrainSetupError(f'--data-dir {root}: {needed} training classes but the model has {args.num_classes} '
                              f'outputs; set --num-classes {needed}')


def _class_to_idx(ds) -> Dict[str, int]:
    mapping = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    return dict(mapping) if isinstance(mapping, Mapping) else {}


def _outputs_needed(ds, class_names: Optional[List[str]]) -> Optional[int]:
    """The classifier outputs the training labels need: the largest label + 1 (a --class-map may skip labels)."""
    index = _class_to_idx(ds)
    if index:
        return max(index.values()) + 1
    return len(class_names) if class_names else None


def _create_datasets(args) -> Tuple[Any, Any, Optional[List[str]]]:
    """The training and validation datasets of a folder or timm dataset, checked, and the training class names.

    Sets ``args.num_classes`` from the training data when it was not given and the data name their classes.
    """
    root = args.data_dir or args.data
    class_map = args.class_map or None
    ds_train = create_dataset(
        args.dataset, root=root, split=args.train_split, is_training=True, class_map=class_map,
        download=args.dataset_download, batch_size=args.batch_size, seed=args.seed, num_samples=args.train_num_samples)
    ds_eval = create_dataset(
        args.dataset, root=root, split=args.val_split, is_training=False, class_map=class_map,
        download=args.dataset_download, batch_size=args.batch_size, num_samples=args.val_num_samples)
    class_names = dataset_class_names(ds_train)
    needed = _outputs_needed(ds_train, class_names)
    if args.num_classes is None and needed:
        args.num_classes = needed
        if args.rank == 0:
            _logger.info(f'--num-classes not given: {needed} outputs for the {len(class_names)} classes of the '
                         f'training data ({", ".join(class_names[:5])}{", ..." if len(class_names) > 5 else ""})')
    _check_splits(args, root, ds_train, ds_eval, class_names)
    return ds_train, ds_eval, class_names


def _builtin_datasets(args, data_config):
    from .data import SecondOrderDataset
    size = data_config['input_size'][-1]
    common = dict(num_classes=args.builtin_classes, img_size=size, channels=data_config['input_size'][0],
                  strength=args.builtin_strength, offset_std=args.builtin_offset_std, seed=args.seed)
    return (SecondOrderDataset('train', args.builtin_train_samples, **common),
            SecondOrderDataset('validation', args.builtin_val_samples, **common))


def _create_loaders(args, data_config, device, datasets=None):
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


# ---------------------------------------------------------------------------------------------------------------------
# Loops


def _amp_context(args, device):
    if not args.amp:
        return nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(
        epoch: int, model, loader, optimizer, loss_fn, args, device, lr_scheduler=None, model_ema=None,
        loss_scaler=None, amp_autocast=nullcontext, collector: Optional[CovStatsCollector] = None,
        head_params: Sequence[torch.Tensor] = (), num_epochs: int = 1,
        watch: Optional[_DivergenceWatch] = None) -> Dict[str, float]:
    """One training epoch; returns the epoch's metrics (loss, diagnostics).

    Non-finite losses are recorded on the device (no per-step host sync) and checked at each log step and at the
    end of the epoch; the first one raises ``NonFiniteLossError`` naming its epoch and step. So does an error raised
    in a forward or backward that ``watch`` explains as a divergence (e.g. the finite check of a GCP layer).
    """
    model.train()
    num_batches = len(loader)
    if args.train_batches_per_epoch:
        num_batches = min(num_batches, args.train_batches_per_epoch)
    accum = args.grad_accum_steps
    num_updates = epoch * ((num_batches + accum - 1) // accum)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    progress = _Progress(epoch, num_batches, args)
    optimizer.zero_grad()

    def check():
        if args.distributed:  # every process stops together, whichever saw the non-finite loss
            torch.distributed.all_reduce(bad_step, op=torch.distributed.ReduceOp.MAX)
        s = int(bad_step.item())
        if s >= 0:
            raise NonFiniteLossError(f'non-finite values at epoch {epoch}, step {s} (of {num_batches}): the training '
                                     f'loss is NaN or infinite')

    for step, (x, y) in enumerate(loader):
        if step >= num_batches:
            break
        last_accum = (step + 1) % accum == 0 or step + 1 == num_batches
        try:
            loss = _train_step(x, y, step, last_accum, model, optimizer, loss_fn, args, device, loss_scaler,
                               amp_autocast, collector)
        except (ValueError, RuntimeError) as e:
            reason = watch.explain(e) if watch is not None else None
            if reason is None:
                raise
            raise NonFiniteLossError(f'non-finite values at epoch {epoch}, step {step} (of {num_batches}): '
                                     f'{reason}') from e
        bad_step.copy_(torch.where((bad_step < 0) & ~torch.isfinite(loss), torch.full_like(bad_step, step), bad_step))
        loss_sum += loss.double()
        if last_accum:
            num_updates += 1
            if model_ema is not None:
                model_ema.update(model, step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
        progress.seen += x.shape[0]
        if (step + 1) % args.log_interval == 0 or step + 1 == num_batches:
            check()
            progress.log(step, loss.item(), loss_sum.item() / (step + 1), optimizer.param_groups[0]['lr'])
    check()
    metrics: Dict[str, float] = dict(loss=loss_sum.item() / max(num_batches, 1))
    if collector is not None:
        metrics.update(collector.summary())
    return metrics


def _train_step(x, y, step, last_accum, model, optimizer, loss_fn, args, device, loss_scaler, amp_autocast,
                collector) -> torch.Tensor:
    """Forward, backward and (at the end of an accumulation) the optimizer step; returns the detached batch loss."""
    x, y = x.to(device), y.to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    accum = args.grad_accum_steps
    sampled = collector is not None and collector.step(step)
    with amp_autocast():
        loss = loss_fn(model(x), y)
    if accum > 1:
        loss = loss / accum
    no_sync = getattr(model, 'no_sync', None)
    ctx = no_sync() if (no_sync is not None and not last_accum) else nullcontext()
    # The AMP loss scaler unscales the gradients in place when it steps; between accumulation steps they stay
    # multiplied by its scale.
    grad_scale = _loss_scale(loss_scaler) if sampled and loss_scaler is not None and not last_accum else None
    with ctx:
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        parameters=model.parameters(), need_update=last_accum)
        else:
            loss.backward()
            if last_accum and args.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
    if collector is not None:
        collector.after_backward(grad_scale=grad_scale)
    if last_accum:
        if loss_scaler is None:
            optimizer.step()
        optimizer.zero_grad()
    return loss.detach() * accum


class _Progress:
    """The timm-style progress line of a training epoch (process 0 only)."""

    def __init__(self, epoch: int, num_batches: int, args):
        self.epoch, self.num_batches, self.args = epoch, num_batches, args
        self.t_start = self.t_last = time.time()
        self.seen = 0

    def log(self, step: int, loss: float, loss_avg: float, lr: float) -> None:
        """``loss``: the step's; ``loss_avg``: the mean over every step of the epoch so far (this process)."""
        if self.args.rank != 0:
            return
        now = time.time()
        rate = self.seen * self.args.world_size / max(now - self.t_start, 1e-9)
        eta = (now - self.t_start) / (step + 1) * (self.num_batches - step - 1)
        _logger.info(
            f'Train: {self.epoch} [{step + 1:>4d}/{self.num_batches} ({100. * (step + 1) / self.num_batches:>3.0f}%)]  '
            f'Loss: {loss:#.3g} ({loss_avg:#.3g})  Time: {now - self.t_last:.2f}s, {rate:>6.1f}/s  '
            f'LR: {lr:.3e}  ETA: {timedelta(seconds=int(eta))}')
        self.t_last = now


def _loss_scale(loss_scaler) -> Optional[Any]:
    """The scale the next ``loss_scaler(...)`` call multiplies the gradients by, without a host sync.

    Read before the call: the scaler updates its scale tensor in place after the step. timm's ``NativeScaler``
    keeps torch's ``GradScaler`` as ``_scaler`` (no public accessor); ``get_scale()`` would sync the device.
    """
    scaler = getattr(loss_scaler, '_scaler', None)
    scale = getattr(scaler, '_scale', None)
    if scale is not None:
        return scale.detach().clone()
    return scaler.get_scale() if scaler is not None else None  # before its first step: the initial scale, no sync


@torch.no_grad()
def validate(model, loader, loss_fn, args, device, amp_autocast=nullcontext) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%), loss and image count on ``loader``, reduced over processes.

    Distributed evaluation samplers (torch's ``DistributedSampler``, timm's ``OrderedDistributedSampler``) pad the
    last shard with repeated images so every process runs as many batches; those repeats are left out of the sums.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1 hits, top5 hits, count
    remaining = _unpadded_shard_size(loader, args)
    for step, (x, y) in enumerate(loader):
        if args.val_batches_per_epoch and step >= args.val_batches_per_epoch:
            break
        x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            out = model(x)
        out = out.float()
        if remaining is not None:  # forward the whole batch (DDP's collectives), count only real samples
            keep = max(0, min(x.shape[0], remaining))
            remaining -= x.shape[0]
            if keep == 0:
                continue
            out, y, x = out[:keep], y[:keep], x[:keep]
        loss = loss_fn(out, y)
        k = min(5, out.shape[-1])
        acc1, acc5 = accuracy(out, y, topk=(1, k))
        n = x.shape[0]
        totals += torch.stack([loss.double() * n, acc1.double() * n / 100, acc5.double() * n / 100,
                               torch.tensor(float(n), dtype=torch.float64, device=device)])
    if args.distributed:
        torch.distributed.all_reduce(totals)
    loss_sum, top1, top5, count = totals.tolist()
    images = int(count)
    count = max(count, 1.)
    return dict(loss=loss_sum / count, top1=100. * top1 / count, top5=100. * top5 / count, images=images)


def _unpadded_shard_size(loader, args) -> Optional[int]:
    """Number of this process's evaluation samples that are not padding, or None when nothing is padded.

    Both padding samplers give rank r the dataset positions r, r + W, r + 2W, ... and wrap around past the end.
    """
    from torch.utils.data import DistributedSampler
    from timm.data.distributed_sampler import OrderedDistributedSampler
    if not args.distributed or not isinstance(getattr(loader, 'sampler', None),
                                              (DistributedSampler, OrderedDistributedSampler)):
        return None
    return len(range(args.rank, len(loader.dataset), args.world_size))


# ---------------------------------------------------------------------------------------------------------------------
# The run folder: atomic creation, an exclusive lock for the run's lifetime


_LOCK_FILE = '.timm-gcp-train.lock'
_INTERRUPTED_SAVE = 'tmp.pth.tar'  # CheckpointSaver writes here, then renames to last.pth.tar


def _holds_run(path: str) -> bool:
    return os.path.isdir(path) and any(
        f.endswith('.pth.tar') or f in ('summary.csv', 'args.yaml') for f in os.listdir(path))


class _RunLock:
    """An exclusive ``fcntl.flock`` on ``FOLDER/.timm-gcp-train.lock``, held while a run writes into the folder.

    The lock belongs to the open file, so the operating system releases it when the process ends, however it ends;
    the file itself stays (removing it would open a race) and records the pid of the last holder.
    """

    def __init__(self, folder: str, fd: Optional[int]):
        self.folder, self._fd = folder, fd

    @classmethod
    def try_acquire(cls, folder: str) -> Optional['_RunLock']:
        """The lock of ``folder``, or None while another process holds it."""
        if fcntl is None:
            _logger.warning(f'cannot lock {folder}: this platform has no fcntl; make sure no other run writes into it')
            return cls(folder, None)
        fd = os.open(os.path.join(folder, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another open file (another process)
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        return cls(folder, fd)

    @staticmethod
    def holder(folder: str) -> str:
        try:
            with open(os.path.join(folder, _LOCK_FILE)) as f:
                return f'pid {int(f.read().strip())}'
        except (OSError, ValueError):
            return 'another process'

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _claim_run_folder(root: str, exp_name: str, resume: str = '') -> _RunLock:
    """Create (or, to continue a run, reopen) the run's output folder and lock it; returns the held lock.

    A run resumed from a checkpoint inside ``root/exp_name`` continues there (later summary rows are trimmed,
    checkpoints replaced); while another process holds that folder it stops with :class:`TrainSetupError`. Any other
    run takes ``root/exp_name``, or ``exp_name-1``, ``-2``, ... when that folder holds a run or another process is
    writing there. New folders are made with ``mkdir`` (atomic: two runs cannot both create one) and locked before
    anything is written.
    """
    path = os.path.join(root, exp_name)
    try:
        os.makedirs(root, exist_ok=True)
        if resume and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(path):
            lock = _RunLock.try_acquire(path)
            if lock is None:
                raise TrainSetupError(
                    f'{path} is in use by {_RunLock.holder(path)} (another timm-gcp-train run holds its lock): two '
                    f'runs must not write one folder. Wait for that run to end, or resume into another --experiment')
            return lock
        for i in range(10000):
            candidate = path if i == 0 else f'{path}-{i}'
            lock = _try_fresh_folder(candidate)
            if lock is not None:
                if i:
                    _logger.warning(f'{path} already holds a training run (or another run is writing there); writing '
                                    f'to {candidate} instead (to continue that run, --resume one of its checkpoints)')
                return lock
    except OSError as e:
        raise TrainSetupError(f'cannot create the run folder {path}: {e.strerror or e}') from e
    raise TrainSetupError(f'no free run folder {path}-N')


def _try_fresh_folder(path: str) -> Optional[_RunLock]:
    """The lock of ``path`` when a fresh run may write there (a folder made now, or an empty one nobody holds)."""
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        created = False
    if not os.path.isdir(path):
        raise TrainSetupError(f'the run folder {path} exists and is not a folder')
    if not created and _holds_run(path):
        return None
    lock = _RunLock.try_acquire(path)
    if lock is not None and not created and _holds_run(path):  # a run wrote there between the check and the lock
        lock.release()
        return None
    return lock


def _remove_interrupted_save(folder: str) -> None:
    """Remove the ``tmp.pth.tar`` a kill during a checkpoint save leaves behind (only ever a partial copy: the saver
    writes it, then renames it to ``last.pth.tar``). Called with the folder's lock held, so no save is under way."""
    path = os.path.join(folder, _INTERRUPTED_SAVE)
    if os.path.isfile(path):
        _logger.warning(f'removing {path} ({os.path.getsize(path)} bytes), left by a save that was interrupted')
        os.remove(path)


# ---------------------------------------------------------------------------------------------------------------------
# One training run, in phases


class _Run:
    """The state one training run's phases share."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.primary = args, device, args.rank == 0
        self.model: Any = None
        self.model_ema: Optional[ModelEmaV3] = None
        self.optimizer: Any = None
        self.loss_scaler: Optional[NativeScaler] = None
        self.amp_autocast: Any = nullcontext
        self.data_config: Dict[str, Any] = {}
        self.datasets: Optional[Tuple[Any, Any]] = None
        self.class_names: Optional[List[str]] = None
        self.loader_train: Any = None
        self.loader_eval: Any = None
        self.lr_scheduler: Any = None
        self.num_epochs = args.epochs
        self.num_batches = 0
        self.start_epoch = 0
        self.resumed: Optional[Mapping[str, Any]] = None  # the --resume checkpoint as loaded
        self.head_params: List[torch.Tensor] = []
        self.output_dir: Optional[str] = None
        self.lock: Optional[_RunLock] = None
        self.saver: Optional[CheckpointSaver] = None
        self.watch: Optional[_DivergenceWatch] = None
        self.last_good: Optional[Tuple[str, int]] = None  # (path, epoch) of the last checkpoint known to be good

    def gcp_targets(self) -> List[nn.Module]:
        return [unwrap_model(self.model)] + ([self.model_ema.module] if self.model_ema is not None else [])


def _read_for_training(path: str, flag: str) -> Any:
    try:
        return load_state_dict_safely(path)
    except CheckpointError as e:
        raise TrainSetupError(f'{flag}: {e}') from e


def _weights(obj: Any, flag: str, path: str, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict of a loaded checkpoint, which must be finite."""
    try:
        sd = unwrap_state_dict(obj, prefer_ema=prefer_ema)
    except CheckpointError as e:
        raise TrainSetupError(f'{flag} {path}: {e}') from e
    bad = non_finite_entries(sd)
    if bad:
        raise TrainSetupError(f'{flag} {path} is not a good checkpoint: {_named(bad)}; start from an earlier one')
    return sd


def _load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], flag: str, path: str, args) -> None:
    try:
        model.load_state_dict(sd)
    except (RuntimeError, ValueError, KeyError) as e:  # other architecture/num_classes/head
        raise TrainSetupError(f'{flag} {path} does not fit {args.model} ({args.num_classes} classes): '
                              f'{_first_lines(e)}') from e


def _build_model(run: _Run) -> None:
    """The model (weights from --pretrained/--pretrained-path/--initial-checkpoint), on its device, and its data
    config."""
    args = run.args
    model_kwargs = dict(args.model_kwargs or {})
    if args.in_chans is not None:
        model_kwargs.setdefault('in_chans', args.in_chans)
    if args.img_size and fixed_input_size(args.model, model_kwargs):  # a ViT/Swin is built for the training size
        model_kwargs.setdefault('img_size', args.img_size)
    if _is_builtin(args) and 'output_stride' in model_kwargs:  # the demo's output_stride=8, for the models taking it
        try:
            create_model(args.model, device='meta', **model_kwargs)
        except TypeError:
            del model_kwargs['output_stride']
    if args.pretrained_path:  # timm loads it (its pretrained filter maps backbone-only weights): refuse a bad file now
        _weights(_read_for_training(args.pretrained_path, '--pretrained-path'), '--pretrained-path',
                 args.pretrained_path, prefer_ema=True)
    overlay = dict(file=args.pretrained_path, num_classes=-1) if args.pretrained_path else None
    try:
        model = create_model(
            args.model, pretrained=args.pretrained or bool(args.pretrained_path), num_classes=args.num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp, pretrained_cfg_overlay=overlay,
            **{k: v for k, v in model_kwargs.items() if v is not None})
    except RuntimeError as e:
        if not args.pretrained_path or 'state_dict' not in str(e):
            raise
        raise TrainSetupError(f'--pretrained-path {args.pretrained_path} does not fit {args.model} '
                              f'({args.num_classes} classes): {_first_lines(e)}') from e
    if args.initial_checkpoint:  # as timm's create_model(checkpoint_path=...): EMA weights when the file has them
        obj = _read_for_training(args.initial_checkpoint, '--initial-checkpoint')
        sd = _weights(obj, '--initial-checkpoint', args.initial_checkpoint, prefer_ema=True)
        _load_weights(model, sd, '--initial-checkpoint', args.initial_checkpoint, args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    run.data_config = resolve_data_config(vars(args), model=model, verbose=run.primary and not _is_builtin(args))
    if _is_builtin(args):
        run.data_config.update(mean=(0., 0., 0.), std=(1., 1., 1.))  # the built-in data is already normalised
    model.to(run.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    run.model = model


def _setup_optimizer(run: _Run) -> None:
    """Learning rate (from --lr-base when --lr is not given), parameter groups, optimizer, AMP."""
    args = run.args
    if args.lr is None:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        scale = global_batch / args.lr_base_size
        if args.lr_base_scale == 'sqrt' or (not args.lr_base_scale and 'ada' in args.opt.lower()):
            scale = math.sqrt(scale)
        args.lr = args.lr_base * scale
        if run.primary:
            _logger.info(f'Learning rate ({args.lr}) from base {args.lr_base} and effective batch {global_batch}.')
    names = set(head_param_names(run.model))
    run.head_params = [p for n, p in run.model.named_parameters() if n in names]
    run.optimizer = create_optimizer_v2(
        head_param_groups(run.model, args.weight_decay, args.head_lr_mult), opt=args.opt, lr=args.lr,
        weight_decay=args.weight_decay, momentum=args.momentum,
        **{k: v for k, v in dict(eps=args.opt_eps, betas=args.opt_betas).items() if v is not None},
        **args.opt_kwargs)
    run.amp_autocast = _amp_context(args, run.device)
    if args.amp and args.amp_dtype == 'float16' and run.device.type == 'cuda':
        run.loss_scaler = NativeScaler(device=run.device.type)


def _resume(run: _Run) -> None:
    """--resume: weights, optimizer, AMP scaler and epoch from one read of the checkpoint, which must be good."""
    args = run.args
    if not args.resume:
        run.start_epoch = args.start_epoch or 0
        return
    obj = _read_for_training(args.resume, '--resume')
    if not isinstance(obj, Mapping) or not isinstance(obj.get('state_dict'), Mapping):
        raise TrainSetupError(f'--resume {args.resume} is not a training checkpoint (it has no state_dict, optimizer '
                              f'and epoch); start from its weights with --initial-checkpoint')
    _load_weights(run.model, _weights(obj, '--resume', args.resume), '--resume', args.resume, args)
    if not args.no_resume_opt and 'optimizer' in obj:
        try:
            run.optimizer.load_state_dict(obj['optimizer'])
        except (ValueError, KeyError) as e:
            raise TrainSetupError(f'--resume {args.resume}: its optimizer state does not fit this run\'s parameter '
                                  f'groups ({_first_lines(e)}); use --no-resume-opt') from e
    if run.loss_scaler is not None and run.loss_scaler.state_dict_key in obj:
        run.loss_scaler.load_state_dict(obj[run.loss_scaler.state_dict_key])
    epoch = obj.get('epoch')
    run.start_epoch = 0 if epoch is None else int(epoch) + (1 if obj.get('version', 1) > 1 else 0)
    if args.start_epoch is not None:
        run.start_epoch = args.start_epoch
    run.resumed = obj
    if epoch is not None and finite_metric(obj.get('metric', 0.0)):
        run.last_good = (args.resume, int(epoch))
    if run.primary:
        _logger.info(f'Resumed {args.resume} (epoch {epoch}); training from epoch {run.start_epoch}.')


def _setup_ema_and_method(run: _Run) -> None:
    """The EMA copy (its weights from the resumed checkpoint), and the GCP method restored from that checkpoint."""
    args = run.args
    if args.model_ema:
        run.model_ema = ModelEmaV3(run.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if run.resumed is not None:
            sd = _weights(run.resumed, '--resume', args.resume, prefer_ema=True)
            try:
                run.model_ema.module.load_state_dict(sd)
            except (RuntimeError, ValueError, KeyError) as e:
                raise TrainSetupError(f'--resume {args.resume}: EMA weights do not fit {args.model}: '
                                      f'{_first_lines(e)}') from e
    current = _gcp_method(run.model)
    resumed = checkpoint_gcp_method(checkpoint_info(run.resumed)) if run.resumed is not None else None
    if resumed is not None and current is not None and resumed != current:
        _set_gcp_method(run.gcp_targets(), resumed[0], resumed[1])
        if run.primary:
            _logger.info(f'Restored GCP method {resumed[0]!r} {resumed[1]} from the checkpoint.')
    if args.gcp_switch_epoch is not None and current is None:
        raise TrainSetupError(f'--gcp-switch-epoch needs a model with a GCP head; {args.model} has none')


def _setup_data_and_schedule(run: _Run) -> None:
    """DDP wrapping, loaders, the learning-rate schedule stepped to the start epoch."""
    args = run.args
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        run.model = DDP(run.model, device_ids=[run.device] if run.device.type == 'cuda' else None,
                        broadcast_buffers=not args.no_ddp_bb)
    run.loader_train, run.loader_eval = _create_loaders(args, run.data_config, run.device, run.datasets)
    run.num_batches = len(run.loader_train)
    if args.train_batches_per_epoch:
        run.num_batches = min(run.num_batches, args.train_batches_per_epoch)
    updates_per_epoch = (run.num_batches + args.grad_accum_steps - 1) // args.grad_accum_steps
    run.num_epochs = args.epochs
    if args.sched and args.sched != 'none':
        run.lr_scheduler, run.num_epochs = create_scheduler_v2(
            run.optimizer, **scheduler_kwargs(args, decreasing_metric='loss' in args.eval_metric),
            updates_per_epoch=updates_per_epoch)
        if run.start_epoch > 0:
            if args.sched_on_updates:
                run.lr_scheduler.step_update(run.start_epoch * updates_per_epoch)
            else:
                run.lr_scheduler.step(run.start_epoch)
    else:
        for g in run.optimizer.param_groups:
            g['lr'] = args.lr * g.get('lr_scale', 1.0)
    if run.start_epoch >= run.num_epochs:
        raise TrainSetupError(
            f'{"--resume " + args.resume if args.resume else "--start-epoch"} starts at epoch {run.start_epoch}, '
            f'but the run has {run.num_epochs} epochs: nothing to train (raise --epochs)')


def _open_output(run: _Run, args_text: Optional[str]) -> None:
    """Claim and lock the run folder (process 0), clean up an interrupted save, write args.yaml, set up the saver."""
    args = run.args
    if not run.primary:
        return
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'), str(run.data_config['input_size'][-1])])
    run.lock = _claim_run_folder(args.output or './output/train', exp_name, args.resume)
    run.output_dir = output_dir = run.lock.folder
    _remove_interrupted_save(output_dir)
    run.saver = CheckpointSaver(
        model=run.model, optimizer=run.optimizer, args=args, model_ema=run.model_ema, amp_scaler=run.loss_scaler,
        checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing='loss' in args.eval_metric,
        max_history=args.checkpoint_hist, task=_CheckpointState(run.model, run.model_ema, run.class_names))
    history = run.resumed.get('saver') if run.resumed is not None else None
    if isinstance(history, Mapping) and hasattr(run.saver, 'load_state_dict'):  # timm >= 1.0.31
        run.saver.load_state_dict(history)  # the checkpoint history and best metric continue
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        f.write(args_text if args_text is not None else yaml.safe_dump(
            {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}))
    summary_path = os.path.join(output_dir, 'summary.csv')
    if run.start_epoch > 0 and os.path.exists(summary_path):
        trim_summary(summary_path, run.start_epoch)
    current = _gcp_method(run.model)
    _logger.info(f'Model {args.model} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.2f} M params), '
                 f'GCP method {current[0] if current else None}, {run.num_epochs} epochs of {run.num_batches} steps; '
                 f'output {output_dir}')


def _hybrid_switch(run: _Run, epoch: int) -> None:
    args = run.args
    current = _gcp_method(run.model)
    if args.gcp_switch_epoch is None or epoch < args.gcp_switch_epoch or current[0] == args.gcp_switch_method:
        return
    n = _set_gcp_method(run.gcp_targets(), args.gcp_switch_method, dict(args.gcp_switch_kwargs))
    if run.primary:
        _logger.info(f'Hybrid protocol: epoch {epoch}: switched {n} matrix square root(s) from {current[0]!r} to '
                     f'{args.gcp_switch_method!r} (same weights).')


def _evaluate(run: _Run, epoch: int, loss_eval: nn.Module) -> Dict[str, float]:
    """Evaluate the model (and the EMA model); the evaluation must be finite."""
    args = run.args
    try:
        metrics = validate(run.model, run.loader_eval, loss_eval, args, run.device, run.amp_autocast)
        if run.model_ema is not None:
            ema = validate(run.model_ema, run.loader_eval, loss_eval, args, run.device, run.amp_autocast)
            metrics = dict(**ema, **{f'raw_{k}': v for k, v in metrics.items()})
    except (ValueError, RuntimeError) as e:
        reason = run.watch.explain(e)
        if reason is None:
            raise
        raise NonFiniteLossError(f'non-finite values at epoch {epoch}, evaluation: {reason}') from e
    for key, whose in (('loss', 'EMA model' if run.model_ema is not None else 'model'), ('raw_loss', 'model')):
        if key in metrics and not math.isfinite(metrics[key]):
            raise NonFiniteLossError(f'non-finite values at epoch {epoch}, evaluation: the evaluation loss of the '
                                     f'{whose} is NaN or infinite')
    return metrics


def _end_epoch(run: _Run, epoch: int, train_metrics: Dict[str, Any], eval_metrics: Dict[str, float]) -> Any:
    """Log the epoch, append summary.csv and save the (checked) checkpoint; returns (best metric, best epoch)."""
    args = run.args
    _logger.info(f'Epoch {epoch}: train loss {train_metrics["loss"]:.4f}, eval top1 {eval_metrics["top1"]:.2f}'
                 f', top5 {eval_metrics["top5"]:.2f}, loss {eval_metrics["loss"]:.4f}'
                 + (f', cond median {train_metrics["cond_median"]:.3g}' if 'cond_median' in train_metrics else ''))
    lrs = [g['lr'] for g in run.optimizer.param_groups]
    current = _gcp_method(run.model)
    train_metrics['gcp_method'] = current[0] if current else ''
    summary_path = os.path.join(run.output_dir, 'summary.csv')
    update_summary(epoch, train_metrics, eval_metrics, summary_path, lr=sum(lrs) / len(lrs),
                   write_header=not os.path.exists(summary_path) or os.path.getsize(summary_path) == 0)
    best = run.saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
    run.last_good = (os.path.join(run.output_dir, 'last.pth.tar'), epoch)
    return best


def _train_epochs(run: _Run) -> Dict[str, Any]:
    """The epoch loop: hybrid switch, train, check the state, evaluate, save only what is finite."""
    args = run.args
    loss_train = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
    loss_eval = nn.CrossEntropyLoss()
    collector = None
    if args.diag_interval:
        collector = CovStatsCollector(unwrap_model(run.model), run.head_params, interval=args.diag_interval)
    best_metric, best_epoch, eval_metrics = None, None, {}
    try:
        for epoch in range(run.start_epoch, run.num_epochs):
            _hybrid_switch(run, epoch)
            random_seed(args.seed + epoch, args.rank)
            sampler = getattr(run.loader_train, 'sampler', None)
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(epoch)
            train_metrics = train_one_epoch(
                epoch, run.model, run.loader_train, run.optimizer, loss_train, args, run.device,
                lr_scheduler=run.lr_scheduler, model_ema=run.model_ema, loss_scaler=run.loss_scaler,
                amp_autocast=run.amp_autocast, collector=collector, head_params=run.head_params,
                num_epochs=run.num_epochs, watch=run.watch)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(run.model, args.world_size, args.dist_bn == 'reduce')
            reason = run.watch.non_finite_state()
            if reason is not None:
                raise NonFiniteLossError(f'non-finite values at the end of epoch {epoch}: {reason}')
            eval_metrics = _evaluate(run, epoch, loss_eval)
            if run.primary:
                best_metric, best_epoch = _end_epoch(run, epoch, train_metrics, eval_metrics)
            if run.lr_scheduler is not None:
                run.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
    finally:
        if collector is not None:
            collector.remove()
    current = _gcp_method(run.model)
    return dict(model=args.model, output_dir=run.output_dir, eval=eval_metrics, best_metric=best_metric,
                best_epoch=best_epoch, gcp_method=current[0] if current else None)


def _stop_message(run: _Run, error: NonFiniteLossError) -> str:
    if run.last_good is None:
        return f'{error}; stopping. No good checkpoint was written before it'
    path, epoch = run.last_good
    return f'{error}; stopping. The last good checkpoint is {path} (epoch {epoch}); nothing was saved after it'


def train_model(args: argparse.Namespace, device: torch.device, args_text: Optional[str] = None) -> Dict[str, Any]:
    """Train ``args.model`` as configured; returns the final and best evaluation metrics and the output directory.

    Raises:
        TrainSetupError: data, checkpoints or the output folder do not fit the run (nothing is written).
        NonFiniteLossError: the run diverged; the message names where and the last good checkpoint.
    """
    run = _Run(args, device)
    random_seed(args.seed, args.rank)
    # '<any timm model>_gcp_<method>' is generic_gcp_<method> with that backbone: checkpoints and args.yaml then name
    # what timm itself (and timm-gcp-validate) can rebuild
    args.model, args.model_kwargs = resolve_model_name(args.model, args.model_kwargs)
    if _is_builtin(args):
        args.num_classes = args.builtin_classes
    else:  # before the model: the class count comes from the data when --num-classes is not given
        *run.datasets, run.class_names = _create_datasets(args)
    _build_model(run)
    _setup_optimizer(run)
    _resume(run)
    _setup_ema_and_method(run)
    _setup_data_and_schedule(run)
    _open_output(run, args_text)
    run.watch = _DivergenceWatch([('model', run.model), ('EMA model', run.model_ema and run.model_ema.module)])
    try:
        return _train_epochs(run)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(_stop_message(run, e)) from e
    finally:
        if run.lock is not None:
            run.lock.release()


def _baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    base = copy.deepcopy(args)
    base.model = args.baseline_model
    base.model_kwargs = {k: v for k, v in (args.model_kwargs or {}).items()
                         if not k.startswith('gcp_') and k != 'backbone'}
    base.gcp_switch_epoch = None
    base.experiment = f'{args.experiment}-baseline' if args.experiment else ''
    base.resume = ''
    base.baseline_model = ''
    return base


def _print_comparison(results: List[Tuple[str, Dict[str, Any], float]]) -> None:
    print('\nResult (built-in second-order dataset, validation split):' if len(results) > 1 else '\nResult:')
    print(f'  {"model":<28} {"pooling":<18} {"top-1 %":>8} {"best %":>8} {"time s":>8}')
    for pooling, r, secs in results:
        best = r['best_metric'] if r['best_metric'] is not None else float('nan')
        print(f'  {r["model"]:<28} {pooling:<18} {r["eval"].get("top1", float("nan")):>8.2f} {best:>8.2f} '
              f'{secs:>8.1f}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of ``timm-gcp-train``; returns the process exit status."""
    setup_cli_logging(FormatterNoInfo())  # timm's console format; one handler however often main() runs
    args, args_text = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device}.')
    results = []
    try:
        t0 = time.time()
        res = train_model(args, device, args_text)
        results.append((f'GCP ({res["gcp_method"]})' if res['gcp_method'] else 'model', res, time.time() - t0))
        if args.baseline_model:
            base = _baseline_args(args)
            t0 = time.time()
            res_b = train_model(base, device, yaml.safe_dump(yaml.safe_load(args_text) | dict(
                model=base.model, model_kwargs=base.model_kwargs, experiment=base.experiment))
                if args_text else None)
            results.append(('average', res_b, time.time() - t0))
    except (NonFiniteLossError, TrainSetupError) as e:
        if args.rank == 0:
            print(f'timm-gcp-train: error: {e}', file=sys.stderr)
        return 2
    finally:
        if args.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if args.rank == 0:
        _print_comparison(results)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Preparing a training run, in phases: the model (checked on the meta device, then built with its weights), the
optimizer, ``--resume``, the EMA copy and the GCP method, the loaders and the learning-rate schedule."""
import argparse
import logging
import math
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler

from ..checkpoint import (
    CheckpointError, checkpoint_gcp_method, checkpoint_info, finite_metric, load_state_dict_safely, non_finite_entries,
    unwrap_state_dict)
from ..checkpoint_model import model_gcp_method
from ..layers import TooFewPositionsError
from ..models import fixed_input_size
from ..models.naming import parse_gcp_name
from .args import is_builtin
from .data import create_loaders
from .errors import TrainSetupError, describe_non_finite, first_lines
from .loop import amp_context
from .params import head_param_groups, head_param_names, set_gcp_method_all
from .state import RunState

__all__ = ['build_model', 'setup_optimizer', 'resume', 'setup_ema_and_method', 'setup_data_and_schedule']

_logger = logging.getLogger(__name__)


def _read_for_training(path: str, flag: str) -> Any:
    try:
        return load_state_dict_safely(path)
    except CheckpointError as e:
        raise TrainSetupError(f'{flag}: {e}') from e


def _checked_weights(obj: Any, flag: str, path: str, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict of a loaded checkpoint, which must be finite."""
    try:
        sd = unwrap_state_dict(obj, prefer_ema=prefer_ema)
    except CheckpointError as e:
        raise TrainSetupError(f'{flag} {path}: {e}') from e
    bad = non_finite_entries(sd)
    if bad:
        raise TrainSetupError(f'{flag} {path} is not a good checkpoint: {describe_non_finite(bad)}; start from an '
                              f'earlier one')
    return sd


def _load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], flag: str, path: str, args) -> None:
    try:
        model.load_state_dict(sd)
    except (RuntimeError, ValueError, KeyError) as e:  # other architecture/num_classes/head
        raise TrainSetupError(f'{flag} {path} does not fit {args.model} ({args.num_classes} classes): '
                              f'{first_lines(e)}') from e


def _check_model_builds(args: argparse.Namespace, model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Build the model on the meta device (no weights, no memory) before anything is loaded or written: an unknown
    model, method or backbone or a bad model kwarg is a :class:`TrainSetupError` naming it. Returns the model kwargs
    (without the demo's ``output_stride`` for a model that does not take it)."""
    common = dict(num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  global_pool=args.gp)
    for attempt in range(2):
        kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
        try:
            meta = create_model(args.model, device='meta', **common, **kwargs)
        except TypeError as e:
            if attempt == 0 and is_builtin(args) and 'output_stride' in model_kwargs:  # the demo's output_stride=8
                model_kwargs = {k: v for k, v in model_kwargs.items() if k != 'output_stride'}
                continue
            error: Exception = e
        except (RuntimeError, ValueError, KeyError, AssertionError) as e:  # unknown model/method, a bad value
            error = e
        else:
            _check_input_size(args, meta)
            return model_kwargs
        raise TrainSetupError(f'--model {args.model} with --model-kwargs {kwargs or "{}"} cannot be built: '
                              f'{first_lines(error)}') from error
    return model_kwargs


def _check_input_size(args: argparse.Namespace, meta_model: nn.Module) -> None:
    """One forward of the meta-device model at the training input size (no data, no memory): an input too small for
    covariance pooling (a 1×1 last feature map, whose covariance is 0 for every image) is a :class:`TrainSetupError`
    before anything is written, not a run that trains at chance. Operators without a meta kernel skip the check."""
    size = resolve_data_config(vars(args), model=meta_model, verbose=False)['input_size']
    try:
        with torch.no_grad():
            meta_model.eval()(torch.empty(1, *size, device='meta'))
    except TooFewPositionsError as e:
        info = getattr(meta_model, 'feature_info', None)
        reduction = info[-1].get('reduction') if isinstance(info, list) and info else None
        hint = (f'; its last feature map is 1/{reduction} of the input, so --img-size {2 * reduction} gives a 2×2 map '
                f'and {4 * reduction} a 4×4 one' if isinstance(reduction, int) else '')
        raise TrainSetupError(f'--model {args.model} at input size {size[1]}×{size[2]} (--img-size/--input-size): '
                              f'{first_lines(e)}{hint}') from e
    except Exception as e:  # noqa: BLE001 - the meta device lacks an operator: the first real forward checks the map
        _logger.debug(f'input-size check skipped: the meta-device forward of {args.model} failed ({first_lines(e)})')


def build_model(run: RunState) -> None:
    """The model (weights from --pretrained/--pretrained-path/--initial-checkpoint), on its device, and its data
    config."""
    args = run.args
    model_kwargs = dict(args.model_kwargs or {})
    if args.in_chans is not None:
        model_kwargs.setdefault('in_chans', args.in_chans)
    if args.img_size and fixed_input_size(args.model, model_kwargs):  # a ViT/Swin is built for the training size
        model_kwargs.setdefault('img_size', args.img_size)
    model_kwargs = _check_model_builds(args, model_kwargs)
    if args.pretrained_path:  # timm loads it (its pretrained filter maps backbone-only weights): refuse a bad file now
        _checked_weights(_read_for_training(args.pretrained_path, '--pretrained-path'), '--pretrained-path',
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
                              f'({args.num_classes} classes): {first_lines(e)}') from e
    if args.initial_checkpoint:  # as timm's create_model(checkpoint_path=...): EMA weights when the file has them
        obj = _read_for_training(args.initial_checkpoint, '--initial-checkpoint')
        sd = _checked_weights(obj, '--initial-checkpoint', args.initial_checkpoint, prefer_ema=True)
        _load_weights(model, sd, '--initial-checkpoint', args.initial_checkpoint, args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    run.data_config = resolve_data_config(vars(args), model=model, verbose=run.primary and not is_builtin(args))
    if is_builtin(args):
        run.data_config.update(mean=(0., 0., 0.), std=(1., 1., 1.))  # the built-in data is already normalised
    model.to(run.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    run.model = model


def setup_optimizer(run: RunState) -> None:
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
    run.amp_autocast = amp_context(args, run.device)
    if args.amp and args.amp_dtype == 'float16' and run.device.type == 'cuda':
        run.loss_scaler = NativeScaler(device=run.device.type)


def resume(run: RunState) -> None:
    """--resume: weights, optimizer, AMP scaler and epoch from one read of the checkpoint, which must be good."""
    args = run.args
    if not args.resume:
        run.start_epoch = args.start_epoch or 0
        return
    obj = _read_for_training(args.resume, '--resume')
    if not isinstance(obj, Mapping) or not isinstance(obj.get('state_dict'), Mapping):
        raise TrainSetupError(f'--resume {args.resume} is not a training checkpoint (it has no state_dict, optimizer '
                              f'and epoch); start from its weights with --initial-checkpoint')
    _load_weights(run.model, _checked_weights(obj, '--resume', args.resume), '--resume', args.resume, args)
    if not args.no_resume_opt and 'optimizer' in obj:
        try:
            run.optimizer.load_state_dict(obj['optimizer'])
        except (ValueError, KeyError) as e:
            raise TrainSetupError(f'--resume {args.resume}: its optimizer state does not fit this run\'s parameter '
                                  f'groups ({first_lines(e)}); use --no-resume-opt') from e
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


def setup_ema_and_method(run: RunState) -> None:
    """The EMA copy (its weights from the resumed checkpoint), and the GCP method restored from that checkpoint."""
    args = run.args
    if args.model_ema:
        run.model_ema = ModelEmaV3(run.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if run.resumed is not None:
            sd = _checked_weights(run.resumed, '--resume', args.resume, prefer_ema=True)
            try:
                run.model_ema.module.load_state_dict(sd)
            except (RuntimeError, ValueError, KeyError) as e:
                raise TrainSetupError(f'--resume {args.resume}: EMA weights do not fit {args.model}: '
                                      f'{first_lines(e)}') from e
    current = model_gcp_method(run.model)
    if run.resumed is not None and current is not None:
        _resume_method(run, current)
    if args.gcp_switch_epoch is not None and current is None:
        raise TrainSetupError(f'--gcp-switch-epoch needs a model with a GCP head; {args.model} has none')


def _resume_method(run: RunState, current: Tuple[str, Dict[str, Any]]) -> None:
    """The GCP method a resumed run continues with.

    The checkpoint's method (the one in use when it was written) is restored when ``--model`` names the method the
    checkpoint's run was built with: a hybrid run resumed after its switch continues with the method switched to. When
    ``--model`` (or ``gcp_method`` in ``--model-kwargs``) names another method than that run was built with, the
    user's method runs: an explicit switch of the same weights, logged, and recorded in every checkpoint and
    ``summary.csv`` row of this run.
    """
    args = run.args
    info = checkpoint_info(run.resumed)
    resumed = checkpoint_gcp_method(info)
    if resumed is None or resumed == current:
        return
    ckpt_args = info.get('args') or {}
    built = parse_gcp_name(str(ckpt_args.get('model') or ''))
    kwargs = ckpt_args.get('model_kwargs') if isinstance(ckpt_args.get('model_kwargs'), Mapping) else {}
    built_method = kwargs.get('gcp_method') or (built.method if built else None)
    if built_method is not None and built_method != current[0]:
        if run.primary:
            _logger.warning(f'--resume {args.resume} was written with GCP method {resumed[0]!r} {resumed[1]}; --model '
                            f'{args.model} names {current[0]!r}: switching to {current[0]!r} {current[1]} (same '
                            f'weights; the checkpoints of this run record it)')
        return
    set_gcp_method_all(run.gcp_targets(), resumed[0], resumed[1])
    if run.primary:
        _logger.info(f'Restored GCP method {resumed[0]!r} {resumed[1]} from the checkpoint.')


def setup_data_and_schedule(run: RunState) -> None:
    """DDP wrapping, loaders, the learning-rate schedule stepped to the start epoch."""
    args = run.args
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        run.model = DDP(run.model, device_ids=[run.device] if run.device.type == 'cuda' else None,
                        broadcast_buffers=not args.no_ddp_bb)
    run.loader_train, run.loader_eval = create_loaders(args, run.data_config, run.device, run.datasets)
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

"""One training run, in phases: model, optimizer, resume, EMA and GCP method, data and schedule, output folder, then
the epochs (hybrid switch, train, check, evaluate, save only what is finite)."""
import argparse
import errno
import logging
import math
import os
import shutil
from contextlib import nullcontext
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import yaml
from timm.data import resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, distribute_bn, random_seed, unwrap_model, \
    update_summary

from .._compat import saver_load_state_dict, trim_summary
from ..checkpoint import (
    CheckpointError, checkpoint_gcp_method, checkpoint_info, finite_metric, load_state_dict_safely, non_finite_entries,
    unwrap_state_dict)
from ..checkpoint_model import model_gcp_method
from ..diagnostics import CovStatsCollector
from ..evaluation import evaluate
from ..models import fixed_input_size, resolve_model_name
from ..models.naming import parse_gcp_name
from .args import is_builtin
from .data import create_datasets, create_loaders
from .errors import CheckpointWriteError, NonFiniteLossError, TrainSetupError, describe_non_finite, first_lines
from .guard import CheckpointState, DivergenceWatch
from .loop import amp_context, train_one_epoch
from .params import head_param_groups, head_param_names, set_gcp_method_all
from .run_dir import RunLock, claim_run_folder, is_run_folder, remove_interrupted_save

__all__ = ['train_model']

_logger = logging.getLogger(__name__)


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
        self.lock: Optional[RunLock] = None
        self.saver: Optional[CheckpointSaver] = None
        self.watch: Optional[DivergenceWatch] = None
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
            create_model(args.model, device='meta', **common, **kwargs)
            return model_kwargs
        except TypeError as e:
            if attempt == 0 and is_builtin(args) and 'output_stride' in model_kwargs:  # the demo's output_stride=8
                model_kwargs = {k: v for k, v in model_kwargs.items() if k != 'output_stride'}
                continue
            error: Exception = e
        except (RuntimeError, ValueError, KeyError, AssertionError) as e:  # unknown model/method, a bad value
            error = e
        raise TrainSetupError(f'--model {args.model} with --model-kwargs {kwargs or "{}"} cannot be built: '
                              f'{first_lines(error)}') from error
    return model_kwargs


def _build_model(run: _Run) -> None:
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
                              f'({args.num_classes} classes): {first_lines(e)}') from e
    if args.initial_checkpoint:  # as timm's create_model(checkpoint_path=...): EMA weights when the file has them
        obj = _read_for_training(args.initial_checkpoint, '--initial-checkpoint')
        sd = _weights(obj, '--initial-checkpoint', args.initial_checkpoint, prefer_ema=True)
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
    run.amp_autocast = amp_context(args, run.device)
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
                                      f'{first_lines(e)}') from e
    current = model_gcp_method(run.model)
    if run.resumed is not None and current is not None:
        _resume_method(run, current)
    if args.gcp_switch_epoch is not None and current is None:
        raise TrainSetupError(f'--gcp-switch-epoch needs a model with a GCP head; {args.model} has none')


def _resume_method(run: _Run, current: Tuple[str, Dict[str, Any]]) -> None:
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


def _setup_data_and_schedule(run: _Run) -> None:
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


def _open_output(run: _Run, args_text: Optional[str]) -> None:
    """Claim and lock the run folder (process 0), clean up an interrupted save, write args.yaml, set up the saver."""
    args = run.args
    if not run.primary:
        return
    root = args.output or './output/train'
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'), str(run.data_config['input_size'][-1])])
    resume_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else ''
    if resume_dir and not args.output and is_run_folder(resume_dir):  # continue in the checkpoint's own run folder
        root, exp_name = os.path.split(resume_dir)
    run.lock = claim_run_folder(root, exp_name, args.resume)
    run.output_dir = output_dir = run.lock.folder
    remove_interrupted_save(output_dir)
    run.saver = CheckpointSaver(
        model=run.model, optimizer=run.optimizer, args=args, model_ema=run.model_ema, amp_scaler=run.loss_scaler,
        checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing='loss' in args.eval_metric,
        max_history=args.checkpoint_hist, task=CheckpointState(run.model, run.model_ema, run.class_names))
    history = run.resumed.get('saver') if run.resumed is not None else None
    if isinstance(history, Mapping):
        saver_load_state_dict(run.saver, history)  # the checkpoint history and best metric continue
    args_path = os.path.join(output_dir, 'args.yaml')
    try:
        with open(args_path, 'w') as f:
            f.write(args_text if args_text is not None else yaml.safe_dump({
                k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}))
    except OSError as e:
        run.lock.release()
        raise TrainSetupError(f'cannot write {args_path}: {e.strerror or e}') from e
    summary_path = os.path.join(output_dir, 'summary.csv')
    if run.start_epoch > 0 and os.path.exists(summary_path):
        trim_summary(summary_path, run.start_epoch)
    current = model_gcp_method(run.model)
    _logger.info(f'Model {args.model} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.2f} M params), '
                 f'GCP method {current[0] if current else None}, {run.num_epochs} epochs of {run.num_batches} steps; '
                 f'output {output_dir}')


def _hybrid_switch(run: _Run, epoch: int) -> None:
    args = run.args
    current = model_gcp_method(run.model)
    if args.gcp_switch_epoch is None or epoch < args.gcp_switch_epoch or current[0] == args.gcp_switch_method:
        return
    n = set_gcp_method_all(run.gcp_targets(), args.gcp_switch_method, dict(args.gcp_switch_kwargs))
    if run.primary:
        _logger.info(f'Hybrid protocol: epoch {epoch}: switched {n} matrix square root(s) from {current[0]!r} to '
                     f'{args.gcp_switch_method!r} (same weights).')


def _report_skipped(run: _Run, epoch: int) -> None:
    """Warn how many unreadable training images the epoch skipped (each was named in a warning when skipped)."""
    take = getattr(run.datasets[0] if run.datasets else None, 'take_skipped', None)
    skipped = take() if take is not None else 0
    if skipped and run.primary:
        _logger.warning(f'epoch {epoch}: skipped {skipped} unreadable training image(s) (named in the warnings above)')


def _evaluate(run: _Run, epoch: int, loss_eval: nn.Module) -> Dict[str, float]:
    """Evaluate the model (and the EMA model); the evaluation must be finite."""
    args = run.args
    common = dict(loss_fn=loss_eval, amp_autocast=run.amp_autocast, channels_last=args.channels_last,
                  max_batches=args.val_batches_per_epoch, distributed=args.distributed)
    try:
        metrics = evaluate(run.model, run.loader_eval, run.device, **common)
        if run.model_ema is not None:
            ema = evaluate(run.model_ema, run.loader_eval, run.device, **common)
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
    current = model_gcp_method(run.model)
    train_metrics['gcp_method'] = current[0] if current else ''
    summary_path = os.path.join(run.output_dir, 'summary.csv')
    try:
        update_summary(epoch, train_metrics, eval_metrics, summary_path, lr=sum(lrs) / len(lrs),
                       write_header=not os.path.exists(summary_path) or os.path.getsize(summary_path) == 0)
    except OSError as e:
        raise CheckpointWriteError(f'cannot write {summary_path} (epoch {epoch}): {_write_cause(e, run)}. '
                                   f'{_last_good(run)}') from e
    best = _save(run, epoch, eval_metrics[args.eval_metric])
    run.last_good = (os.path.join(run.output_dir, 'last.pth.tar'), epoch)
    return best


def _save(run: _Run, epoch: int, metric: float) -> Any:
    """``CheckpointSaver.save_checkpoint``; a failed write (no space, permissions, I/O error) removes the partial
    file at once and stops the run with :class:`CheckpointWriteError` naming the cause, the path and the last good
    checkpoint."""
    try:
        return run.saver.save_checkpoint(epoch, metric=metric)
    except NonFiniteLossError:  # the state to save is not finite: nothing was written (see CheckpointState)
        raise
    except (OSError, RuntimeError) as e:
        # The saver writes tmp.pth.tar, renames it to last.pth.tar (atomic), then copies that to checkpoint-N and
        # model_best.pth.tar: a failure leaves either tmp.pth.tar or a partial copy.
        last, tmp = os.path.join(run.output_dir, 'last.pth.tar'), os.path.join(run.output_dir, 'tmp.pth.tar')
        if os.path.exists(tmp):
            failed, partial = tmp, [tmp]
        else:
            run.last_good = (last, epoch)
            failed = os.path.join(run.output_dir, f'checkpoint-{epoch}.pth.tar')
            partial = [p for p in (failed, os.path.join(run.output_dir, 'model_best.pth.tar'))
                       if os.path.exists(p) and os.path.getsize(p) != os.path.getsize(last)]
        for p in partial:
            os.remove(p)
        raise CheckpointWriteError(
            f'cannot write the checkpoint of epoch {epoch} to {failed}: {_write_cause(e, run)}; '
            f'{"removed the partial file " + ", ".join(partial) if partial else "no partial file was left"}. '
            f'{_last_good(run)}') from e


def _write_cause(e: BaseException, run: _Run) -> str:
    """Why a write failed, in the system's words where it gave some (``No space left on device (ENOSPC)``)."""
    if isinstance(e, OSError) and e.errno is not None:
        return f'{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})'
    free = shutil.disk_usage(run.output_dir).free
    if free < 256 * 2 ** 20:  # torch's zip writer reports a full disk as 'unexpected pos'
        return f'{first_lines(e, 1)} (the disk holding it has {free / 2 ** 20:.0f} MiB free: no space left?)'
    return first_lines(e, 1)


def _last_good(run: _Run) -> str:
    """The sentence naming the last good checkpoint of the run (or saying there is none)."""
    if run.last_good is None:
        return 'No good checkpoint was written before it'
    path, epoch = run.last_good
    return f'The last good checkpoint is {path} (epoch {epoch})'


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
                amp_autocast=run.amp_autocast, collector=collector, watch=run.watch)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(run.model, args.world_size, args.dist_bn == 'reduce')
            reason = run.watch.non_finite_state()
            if reason is not None:
                raise NonFiniteLossError(f'non-finite values at the end of epoch {epoch}: {reason}')
            _report_skipped(run, epoch)
            eval_metrics = _evaluate(run, epoch, loss_eval)
            if run.primary:
                best_metric, best_epoch = _end_epoch(run, epoch, train_metrics, eval_metrics)
            if run.lr_scheduler is not None:
                run.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
    finally:
        if collector is not None:
            collector.remove()
    current = model_gcp_method(run.model)
    return dict(model=args.model, output_dir=run.output_dir, eval=eval_metrics, best_metric=best_metric,
                best_epoch=best_epoch, gcp_method=current[0] if current else None)


def _stop_message(run: _Run, error: NonFiniteLossError) -> str:
    if run.last_good is None:
        return f'{error}; stopping. No good checkpoint was written before it'
    return f'{error}; stopping. {_last_good(run)}; nothing was saved after it'


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
    try:
        args.model, args.model_kwargs = resolve_model_name(args.model, args.model_kwargs)
    except (ValueError, RuntimeError) as e:  # an unknown method or backbone in the name
        raise TrainSetupError(f'--model {args.model}: {first_lines(e)}') from e
    if is_builtin(args):
        args.num_classes = args.builtin_classes
    else:  # before the model: the class count comes from the data when --num-classes is not given
        *run.datasets, run.class_names = create_datasets(args)
    _build_model(run)
    _setup_optimizer(run)
    _resume(run)
    _setup_ema_and_method(run)
    _setup_data_and_schedule(run)
    _open_output(run, args_text)
    run.watch = DivergenceWatch([('model', run.model), ('EMA model', run.model_ema and run.model_ema.module)])
    try:
        return _train_epochs(run)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(_stop_message(run, e)) from e
    finally:
        if run.lock is not None:
            run.lock.release()


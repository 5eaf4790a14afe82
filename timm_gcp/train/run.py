"""One training run: its output folder, then the epochs (hybrid switch, train, check, evaluate, save only what is
finite), and the messages a run stops with. The phases before the epochs are in :mod:`.prepare`."""
import argparse
import errno
import logging
import math
import os
import shutil
from datetime import datetime
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import yaml
from timm.loss import LabelSmoothingCrossEntropy
from timm.utils import CheckpointSaver, distribute_bn, random_seed, unwrap_model, update_summary

from .._compat import saver_load_state_dict, trim_summary
from ..checkpoint_model import model_gcp_method
from ..diagnostics import CovStatsCollector
from ..evaluation import evaluate
from ..models import resolve_model_name
from .args import is_builtin
from .data import create_datasets
from .errors import CheckpointWriteError, NonFiniteLossError, TrainSetupError, first_lines
from .guard import CheckpointState, DivergenceWatch
from .loop import train_one_epoch
from .params import set_gcp_method_all
from .prepare import build_model, resume, setup_data_and_schedule, setup_ema_and_method, setup_optimizer
from .run_dir import claim_run_folder, is_run_folder, remove_interrupted_save
from .state import RunState

__all__ = ['train_model']

_logger = logging.getLogger(__name__)


def _open_output(run: RunState, args_text: Optional[str]) -> None:
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


def _hybrid_switch(run: RunState, epoch: int) -> None:
    args = run.args
    current = model_gcp_method(run.model)
    if args.gcp_switch_epoch is None or epoch < args.gcp_switch_epoch or current[0] == args.gcp_switch_method:
        return
    n = set_gcp_method_all(run.gcp_targets(), args.gcp_switch_method, dict(args.gcp_switch_kwargs))
    if run.primary:
        _logger.info(f'Hybrid protocol: epoch {epoch}: switched {n} matrix square root(s) from {current[0]!r} to '
                     f'{args.gcp_switch_method!r} (same weights).')


def _report_skipped(run: RunState, epoch: int) -> None:
    """Warn how many unreadable training images the epoch skipped (each was named in a warning when skipped)."""
    take = getattr(run.datasets[0] if run.datasets else None, 'take_skipped', None)
    skipped = take() if take is not None else 0
    if skipped and run.primary:
        _logger.warning(f'epoch {epoch}: skipped {skipped} unreadable training image(s) (named in the warnings above)')


def _evaluate(run: RunState, epoch: int, loss_eval: nn.Module) -> Dict[str, float]:
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


def _end_epoch(run: RunState, epoch: int, train_metrics: Dict[str, Any], eval_metrics: Dict[str, float]) -> Any:
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


def _save(run: RunState, epoch: int, metric: float) -> Any:
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


def _write_cause(e: BaseException, run: RunState) -> str:
    """Why a write failed, in the system's words where it gave some (``No space left on device (ENOSPC)``)."""
    if isinstance(e, OSError) and e.errno is not None:
        return f'{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})'
    free = shutil.disk_usage(run.output_dir).free
    if free < 256 * 2 ** 20:  # torch's zip writer reports a full disk as 'unexpected pos'
        return f'{first_lines(e, 1)} (the disk holding it has {free / 2 ** 20:.0f} MiB free: no space left?)'
    return first_lines(e, 1)


def _last_good(run: RunState) -> str:
    """The sentence naming the last good checkpoint of the run (or saying there is none)."""
    if run.last_good is None:
        return 'No good checkpoint was written before it'
    path, epoch = run.last_good
    return f'The last good checkpoint is {path} (epoch {epoch})'


def _train_epochs(run: RunState) -> Dict[str, Any]:
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


def _stop_message(run: RunState, error: NonFiniteLossError) -> str:
    if run.last_good is None:
        return f'{error}; stopping. No good checkpoint was written before it'
    return f'{error}; stopping. {_last_good(run)}; nothing was saved after it'


def train_model(args: argparse.Namespace, device: torch.device, args_text: Optional[str] = None) -> Dict[str, Any]:
    """Train ``args.model`` as configured; returns the final and best evaluation metrics and the output directory.

    Raises:
        TrainSetupError: data, checkpoints or the output folder do not fit the run (nothing is written).
        NonFiniteLossError: the run diverged; the message names where and the last good checkpoint.
    """
    run = RunState(args, device)
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
    build_model(run)
    setup_optimizer(run)
    resume(run)
    setup_ema_and_method(run)
    setup_data_and_schedule(run)
    _open_output(run, args_text)
    run.watch = DivergenceWatch([('model', run.model), ('EMA model', run.model_ema and run.model_ema.module)])
    try:
        return _train_epochs(run)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(_stop_message(run, e)) from e
    finally:
        if run.lock is not None:
            run.lock.release()



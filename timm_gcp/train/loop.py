"""The training epoch loop: gradient accumulation, AMP, clipping, EMA, diagnostics and the divergence checks.

Evaluation is :func:`timm_gcp.evaluation.evaluate`, shared with ``timm-gcp-validate``.
"""
import logging
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import Dict, Optional

import torch
from timm.utils import dispatch_clip_grad

from ..diagnostics import CovStatsCollector
from .errors import NonFiniteLossError
from .guard import DivergenceWatch

__all__ = ['amp_context', 'train_one_epoch']

_logger = logging.getLogger(__name__)


def amp_context(args, device):
    if not args.amp:
        return nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(
        epoch: int, model, loader, optimizer, loss_fn, args, device, lr_scheduler=None, model_ema=None,
        loss_scaler=None, amp_autocast=nullcontext, collector: Optional[CovStatsCollector] = None,
        watch: Optional[DivergenceWatch] = None) -> Dict[str, float]:
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


def _loss_scale(loss_scaler) -> Optional[float]:
    """The scale the next ``loss_scaler(...)`` call multiplies the gradients by (read before the call: the scaler
    updates it after its step), from the scaler's public ``state_dict``; a host sync, on sampled steps only."""
    return loss_scaler.state_dict().get('scale')

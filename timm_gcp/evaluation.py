"""The one evaluation loop: top-1/top-5 accuracy, loss and image count of a model on a loader.

``timm-gcp-train`` evaluates every epoch with it and ``timm-gcp-validate`` (and ``timm-gcp-publish``, through it)
reports its numbers, so a checkpoint's recorded metric and the number its model card quotes come from the same code.
Sums stay on the device; the host reads them at log steps and at the end (no sync per batch). Under DDP the sums are
reduced over processes, and the repeated images that distributed samplers pad the last shard with are not counted.
"""
import logging
import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Optional

import torch
from timm.utils import accuracy

__all__ = ['evaluate']

_logger = logging.getLogger(__name__)


def _unpadded_shard_size(loader: Any, distributed: bool) -> Optional[int]:
    """Number of this process's samples that are not padding, or None when nothing is padded.

    Both padding samplers (torch's ``DistributedSampler``, timm's ``OrderedDistributedSampler``) give rank r the
    dataset positions r, r + W, r + 2W, ... and wrap around past the end.
    """
    from torch.utils.data import DistributedSampler
    from timm.data.distributed_sampler import OrderedDistributedSampler
    if not distributed or not isinstance(getattr(loader, 'sampler', None),
                                         (DistributedSampler, OrderedDistributedSampler)):
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return len(range(rank, len(loader.dataset), world))


@torch.no_grad()
def evaluate(
        model: torch.nn.Module,
        loader: Any,
        device: torch.device,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        amp_autocast: Callable[[], ContextManager] = nullcontext,
        channels_last: bool = False,
        max_batches: Optional[int] = None,
        distributed: bool = False,
        log_every: int = 0,
) -> Dict[str, float]:
    """Evaluate ``model`` on the (images, targets) batches of ``loader``.

    Args:
        loss_fn: also report the mean loss under this criterion.
        amp_autocast: context manager factory the forward runs in (``torch.autocast`` for AMP).
        max_batches: stop after this many batches (None: the whole loader).
        distributed: reduce over the processes of the default group, leaving out sampler padding.
        log_every: log the running accuracy every this many batches (0: never).

    Returns:
        ``top1`` and ``top5`` (%; top-5 is top-k with k = min(5, classes)), ``images`` and, with ``loss_fn``,
        ``loss`` (mean over the images).
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
    remaining = _unpadded_shard_size(loader, distributed)
    start = time.time()
    for step, (x, y) in enumerate(loader):
        if max_batches and step >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.float()
        if remaining is not None:  # forward the whole batch (DDP's collectives), count only real samples
            keep = max(0, min(x.shape[0], remaining))
            remaining -= x.shape[0]
            if keep == 0:
                continue
            out, y = out[:keep], y[:keep]
        n = y.shape[0]
        acc1, acc5 = accuracy(out, y, topk=(1, min(5, out.shape[-1])))
        loss = loss_fn(out, y).double() * n if loss_fn is not None else torch.zeros((), device=device)
        totals += torch.stack([loss.double(), acc1.double() * n / 100, acc5.double() * n / 100,
                               torch.tensor(float(n), dtype=torch.float64, device=device)])
        if log_every and (step + 1) % log_every == 0:
            _, c1, c5, count = totals.tolist()
            _logger.info(f'batch {step + 1}: {int(count)} images, top1 {100. * c1 / count:.3f}, '
                         f'top5 {100. * c5 / count:.3f}, {count / (time.time() - start):.1f} img/s')
    if distributed:
        torch.distributed.all_reduce(totals)
    loss_sum, top1, top5, count = totals.tolist()
    images = int(count)
    count = max(count, 1.)
    out = dict(loss=loss_sum / count) if loss_fn is not None else {}
    out.update(top1=100. * top1 / count, top5=100. * top5 / count, images=images)
    return out

"""The paper's Fig. 2 at a small scale: training error (left) and effective β-smoothness along training (right) of
MPN-COV (``svd``) and iSQRT-COV (``isqrt``) with the meta-layer in float32 and in float64.

Effective β-smoothness (Santurkar et al., "How Does Batch Normalization Help Optimization?", NeurIPS 2018,
arXiv 1805.11604): at a training step with parameters θ and gradient g = ∇L(θ) on the current batch, move θ along
the gradient by several step sizes η, θ' = θ − η·g, and take the largest ‖∇L(θ') − ∇L(θ)‖ / ‖θ' − θ‖ on the same
batch. Each run trains a ``<family>_gcp_<method>`` model built by ``timm.create_model`` (method option ``dtype``) on
the built-in second-order dataset with timm's optimiser and scheduler factories, and writes ``result.json`` into its
own folder; a finished run with the same configuration is read back instead of retrained.
"""
import dataclasses
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

__all__ = ['Fig2Config', 'effective_beta', 'build_fig2_model', 'train_fig2_run', 'run_fig2', 'summarise_fig2']

_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Fig2Config:
    """Sizing of the Fig. 2 runs; every run uses the same recipe, only method, dtype and seed change.

    The default is rank-deficient like the paper's heads: 32 px images through a ResNet-18 with output stride 8 give
    a 4×4 map, so each covariance has M = 16 samples for d = 64 (rank ≤ 15; the paper's ResNet heads have M = 49 for
    d = 256). The built-in data with 8 classes at correlation strength 0.4 keep the training error above zero for
    most of the 6 epochs (with the trainer's 4 classes at 0.6 it reaches 0 % by epoch 3). A run takes about 2.5 min
    on the two-core CPU here with other jobs running (32 steps per epoch, a β probe of 5 forward/backward passes
    every 8 steps).
    """
    methods: Sequence[str] = ('svd', 'isqrt')
    dtypes: Sequence[str] = ('float32', 'float64')
    seeds: Sequence[int] = (0, 1, 2)
    family: str = 'resnet18'
    gcp_dim: int = 64
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {'output_stride': 8})
    img_size: int = 32
    num_classes: int = 8
    data_strength: float = 0.4
    train_samples: int = 1024
    val_samples: int = 256
    batch_size: int = 32
    epochs: int = 6
    opt: str = 'sgd'
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sched: str = 'cosine'
    beta_interval: int = 8
    beta_multipliers: Sequence[float] = (0.5, 1.0, 2.0, 4.0)
    out_dir: str = 'runs/fig2'

    def recipe(self) -> Dict[str, Any]:
        """The fields that define a run's training (everything but which runs and where)."""
        d = dataclasses.asdict(self)
        for k in ('methods', 'dtypes', 'seeds', 'out_dir'):
            d.pop(k)
        return json.loads(json.dumps(d))  # tuples → lists, as read back from result.json


def _flat_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors]))


def effective_beta(
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        step_sizes: Sequence[float],
) -> Dict[str, Any]:
    """Effective β-smoothness of ``loss_fn(model(inputs), targets)`` at the model's current parameters.

    θ' = θ − η·g for every η in ``step_sizes`` (g = ∇L(θ) over the trainable parameters); β = max over η of
    ‖∇L(θ') − g‖ / ‖θ' − θ‖, all on the same batch. The model is evaluated by ``torch.func.functional_call`` on
    copies of its buffers, so neither its parameters nor its buffers (e.g. BN running statistics) change; BN in train
    mode normalises with the batch's statistics at θ' as training would.

    Args:
        model: the model (its mode is used as is).
        loss_fn: (output, targets) → scalar loss.
        inputs, targets: the batch.
        step_sizes: the η to probe (e.g. multiples of the current learning rate).

    Returns:
        ``beta`` (max ratio; NaN when a probe is non-finite), ``ratios`` (one per η), ``grad_norm`` ‖g‖, ``loss`` L(θ)
        and ``loss_range`` (max − min of L over θ and the probed θ').
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_and_grad(theta: Dict[str, torch.Tensor]):
        theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        loss = loss_fn(functional_call(model, {**theta, **buffers}, (inputs,)), targets)
        grads = torch.autograd.grad(loss, [theta[n] for n in names])
        return float(loss.detach()), grads

    loss0, g0 = loss_and_grad({n: p.detach() for n, p in params.items()})
    g_norm = float(_flat_norm(g0))
    ratios, losses = [], [loss0]
    for eta in step_sizes:
        moved = {n: params[n].detach() - eta * g for n, g in zip(names, g0)}
        loss, g = loss_and_grad(moved)
        losses.append(loss)
        diff = float(_flat_norm([a - b for a, b in zip(g, g0)]))
        ratios.append(diff / (eta * g_norm) if g_norm > 0 else 0.0)
    finite = all(math.isfinite(r) for r in ratios) and all(math.isfinite(v) for v in losses)
    return dict(beta=max(ratios) if finite else math.nan, ratios=ratios, grad_norm=g_norm, loss=loss0,
                loss_range=max(losses) - min(losses) if finite else math.nan)


def build_fig2_model(cfg: Fig2Config, method: str, dtype: str) -> nn.Module:
    """``<family>_gcp_<method>`` with the meta-layer in ``dtype`` (random init, no download), on the d×d covariance
    path as in the paper: the Gram path never decomposes Σ's null space, which removes the float32 failure this figure
    is about."""
    import timm

    from ..layers import set_gcp_path
    model = timm.create_model(
        f'{cfg.family}_gcp_{method}', pretrained=False, num_classes=cfg.num_classes, gcp_dim=cfg.gcp_dim,
        gcp_kwargs={'dtype': dtype}, **dict(cfg.model_kwargs))
    set_gcp_path(model, 'cov')
    return model


def _loaders(cfg: Fig2Config, seed: int):
    from torch.utils.data import DataLoader

    from ..data import SecondOrderDataset

    common = dict(num_classes=cfg.num_classes, img_size=cfg.img_size, strength=cfg.data_strength, seed=0)
    train = SecondOrderDataset('train', cfg.train_samples, **common)
    val = SecondOrderDataset('validation', cfg.val_samples, **common)
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen),
            DataLoader(val, batch_size=cfg.batch_size))


@torch.no_grad()
def _error(model: nn.Module, loader) -> float:
    model.eval()
    wrong = total = 0
    for x, y in loader:
        wrong += int((model(x).argmax(-1) != y).sum())
        total += y.numel()
    model.train()
    return 100.0 * wrong / total


def _train_epoch(cfg: Fig2Config, model: nn.Module, opt: torch.optim.Optimizer, loader, epoch: int,
        step: int, betas: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One epoch; probes β every ``cfg.beta_interval`` steps (appended to ``betas``). Stops at a non-finite loss."""
    losses, wrong, total = [], 0, 0
    for x, y in loader:
        if step % cfg.beta_interval == 0:
            lr = opt.param_groups[0]['lr']
            b = effective_beta(model, F.cross_entropy, x, y, [m * lr for m in cfg.beta_multipliers])
            betas.append(dict(step=step, epoch=epoch, lr=lr, **b))
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        if not torch.isfinite(loss):
            return dict(step=step, diverged=True, loss=math.nan, train_err=math.nan)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        wrong += int((out.argmax(-1) != y).sum())
        total += y.numel()
        step += 1
    return dict(step=step, diverged=False, loss=statistics.fmean(losses), train_err=100.0 * wrong / total)


def train_fig2_run(cfg: Fig2Config, method: str, dtype: str, seed: int) -> Dict[str, Any]:
    """Train one run in this process and return its record (what ``result.json`` holds).

    timm's ``create_optimizer_v2``/``create_scheduler_v2`` build the optimiser (``cfg.opt``, momentum, weight decay)
    and the per-epoch schedule. Training error is the top-1 error over each epoch's training batches (train mode, as
    the paper plots it); validation error is measured after each epoch.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_fig2_model(cfg, method, dtype).train()
    opt = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched, _ = create_scheduler_v2(opt, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=0)
    train_loader, val_loader = _loaders(cfg, seed)
    epochs, betas, step, diverged = [], [], 0, False
    for epoch in range(cfg.epochs):
        res = _train_epoch(cfg, model, opt, train_loader, epoch, step, betas)
        step, diverged = res['step'], res['diverged']
        val_err = math.nan if diverged else _error(model, val_loader)
        epochs.append(dict(epoch=epoch + 1, train_loss=res['loss'], train_err=res['train_err'], val_err=val_err))
        _logger.info('fig2 %s %s s%d epoch %d: loss %.4f train err %.2f val err %.2f', method, dtype, seed,
                     epoch + 1, res['loss'], res['train_err'], val_err)
        if diverged:
            break
        sched.step(epoch + 1)
    return dict(method=method, dtype=dtype, seed=seed, recipe=cfg.recipe(), epochs=epochs, beta=betas,
                diverged=diverged, seconds=time.perf_counter() - t0, torch=torch.__version__,
                threads=torch.get_num_threads())


def run_fig2(
        cfg: Fig2Config,
        progress: Optional[Callable[[str], None]] = None,
        train: bool = True,
        train_fn: Callable[[Fig2Config, str, str, int], Dict[str, Any]] = train_fig2_run,
) -> List[Dict[str, Any]]:
    """Train (or read back) every (method, dtype, seed) run; seeds form the outer loop.

    A run folder ``<out_dir>/<method>-<dtype>-s<seed>`` whose ``result.json`` holds the same recipe is reused; any
    other is trained again (the file is written only when the run has finished).

    Args:
        cfg: sizing.
        progress: called with one line per run.
        train: False only collects finished runs; the others are returned with ``pending=True``.
        train_fn: trains one run (tests substitute a cheap one).

    Returns:
        One record per run (see :func:`train_fig2_run`).
    """
    out = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            for dtype in cfg.dtypes:
                path = Path(cfg.out_dir) / f'{method}-{dtype}-s{seed}' / 'result.json'
                rec = json.loads(path.read_text()) if path.exists() else None
                if rec is not None and rec.get('recipe') != cfg.recipe():
                    rec = None
                if rec is None and not train:
                    out.append(dict(method=method, dtype=dtype, seed=seed, pending=True))
                    continue
                if rec is None:
                    rec = train_fn(cfg, method, dtype, seed)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix('.tmp')
                    tmp.write_text(json.dumps(rec))
                    tmp.replace(path)
                out.append(rec)
                if progress is not None:
                    last = rec['epochs'][-1] if rec['epochs'] else {}
                    progress(f'fig2 {method:>5s} {dtype} seed {seed}: train err {last.get("train_err")} '
                             f'({rec["seconds"]:.0f} s){" DIVERGED" if rec["diverged"] else ""}')
    return out


def summarise_fig2(records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Per (method, dtype): seeds finished/diverged, final training and validation error (mean, min, max over seeds),
    and the effective β (median over all probes of all seeds, median over the last epoch's probes, largest)."""
    groups: Dict[tuple, List[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r['method'], r['dtype']), []).append(r)
    rows = []
    for (method, dtype), runs in groups.items():
        done = [r for r in runs if not r.get('pending')]
        final_train = [r['epochs'][-1]['train_err'] for r in done if r['epochs'] and not r['diverged']]
        final_val = [r['epochs'][-1]['val_err'] for r in done if r['epochs'] and not r['diverged']]
        betas = [b['beta'] for r in done for b in r['beta'] if math.isfinite(b['beta'])]
        last = [b['beta'] for r in done for b in r['beta']
                if math.isfinite(b['beta']) and b['epoch'] == r['recipe']['epochs'] - 1]
        rows.append(dict(
            method=method, dtype=dtype, runs=len(done), pending=len(runs) - len(done),
            diverged=sum(1 for r in done if r['diverged']),
            train_err=statistics.fmean(final_train) if final_train else None,
            train_err_min=min(final_train, default=None), train_err_max=max(final_train, default=None),
            val_err=statistics.fmean(final_val) if final_val else None,
            beta_median=statistics.median(betas) if betas else None,
            beta_last_epoch=statistics.median(last) if last else None, beta_max=max(betas, default=None),
            seconds=statistics.fmean([r['seconds'] for r in done]) if done else None))
    return rows

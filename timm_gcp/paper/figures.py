"""The report's figures: one function per figure, each writing a PNG from rows the analyses computed (matplotlib,
Agg backend, imported only when a figure is drawn)."""
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

__all__ = ['plot_gradients', 'plot_ns_function', 'plot_fig2', 'plot_condition']


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_gradients(rows: Sequence[Mapping[str, Any]], path: Path, reference: str) -> None:
    plt = _pyplot()
    rows = [r for r in rows if 'error' not in r]
    cases = list(dict.fromkeys(r['case'] for r in rows))
    methods = list(dict.fromkeys(r['method'] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(cases), 1)
    for i, case in enumerate(cases):
        by = {r['method']: r for r in rows if r['case'] == case}
        xs = [j + i * width for j in range(len(methods))]
        axes[0].bar(xs, [max(by[m]['rel_err'], 1e-17) if m in by else 0 for m in methods], width, label=case)
        axes[1].bar(xs, [max(by[m]['max_abs_grad'], 1e-17) if m in by else 0 for m in methods], width, label=case)
    for ax, title in zip(axes, (f'relative error of ∂L/∂Σ vs {reference}', 'largest |∂L/∂Σ|')):
        ax.set_yscale('log')
        ax.set_xticks([j + width * (len(cases) - 1) / 2 for j in range(len(methods))])
        ax.set_xticklabels(methods, rotation=45, ha='right')
        ax.set_title(title)
        ax.grid(True, axis='y', alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, path)


def plot_ns_function(curves: Mapping[str, torch.Tensor], a: torch.Tensor, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, y in curves.items():
        ax.plot(a.numpy(), y.numpy(), label=label, lw=2 if label == 'exact' else 1.5,
                ls='--' if label == 'exact' else '-')
    ax.set_xscale('log')
    ax.set_xlabel('eigenvalue a of the trace-normalised covariance (tr A = 1, d = 256)')
    ax.set_ylabel('output / √a')
    ax.set_title('Newton–Schulz as a function of one eigenvalue')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    _save(fig, path)


def _band(records: Sequence[Mapping[str, Any]], series: Callable[[Mapping[str, Any]], Sequence[Tuple[float, float]]]):
    """x → (median, min, max) over the records' (x, y) series (non-finite y dropped)."""
    by_x: Dict[float, List[float]] = {}
    for r in records:
        for x, y in series(r):
            if y is not None and math.isfinite(y):
                by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    return xs, [statistics.median(by_x[x]) for x in xs], [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs]


def plot_fig2(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r['method'], r['dtype']), []).append(r)
    for (method, dtype), runs in groups.items():
        label = f'{method} {dtype}'
        ls = '-' if dtype == 'float64' else '--'
        xs, med, lo, hi = _band(runs, lambda r: [(e['epoch'], e['train_err']) for e in r['epochs']])
        line, = axes[0].plot(xs, med, ls=ls, marker='o', ms=3, label=label)
        axes[0].fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        xs, med, lo, hi = _band(runs, lambda r: [(b['step'], b['beta']) for b in r['beta']])
        line, = axes[1].plot(xs, med, ls=ls, label=label)
        axes[1].fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    axes[0].set(xlabel='epoch', ylabel='training error (%)', title='Training error (median, band: min–max of seeds)')
    axes[1].set(xlabel='training step', ylabel='effective β-smoothness', yscale='log',
                title='Effective β-smoothness along training')
    for ax in axes:
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_condition(summary: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in summary:
        for ax, key in zip(axes, ('cond_trend', 'range_cond_trend')):
            pts = [(i + 1, v) for i, v in enumerate(s.get(key) or []) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker='o', label=f'{s["method"]} {s["protocol"]}')
    for ax, title in zip(axes, ('λ_max / max(λ_min, ε) (the paper\'s Table 1 measure)',
                                'λ_max / smallest resolved eigenvalue (range of Σ)')):
        ax.set(yscale='log', xlabel='epoch', ylabel='median over steps and seeds', title=title)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    _save(fig, path)

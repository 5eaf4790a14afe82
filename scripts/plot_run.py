#!/usr/bin/env python
"""Plot a training run's summary.csv (timm-gcp-train or timm train.py) into PNG figures.

    python scripts/plot_run.py output/train/demo              # or the path of summary.csv
    python scripts/plot_run.py RUN_DIR --out figures/ --title "ResNet-50 hybrid"

Writes, where the columns exist: metrics.png (loss, top-1/top-5, lr), spectrum.png (condition number median/max,
λ1/λ2, λ_max and the condition number on the range of Σ of the batch covariances, log scale: the paper's Table 1 /
Fig. 3 quantities, and the fraction of eigenvalues at the ε floor) and head_grad.png (head gradient norm). A dashed
line marks the epoch where the GCP method changed.
"""
import argparse
import csv
import math
import os
import sys
from typing import Dict, List, Optional


def read_summary(path: str) -> Dict[str, List]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f'{path} has no rows')
    cols: Dict[str, List] = {}
    for k in rows[0]:
        vals = [r.get(k, '') for r in rows]
        try:
            cols[k] = [float(v) if v not in ('', None) else math.nan for v in vals]
        except ValueError:
            cols[k] = vals
    return cols


def _switches(cols: Dict[str, List]) -> List[tuple]:
    methods = cols.get('train_gcp_method')
    if not methods or not isinstance(methods[0], str):
        return []
    return [(cols['epoch'][i], methods[i - 1], methods[i])
            for i in range(1, len(methods)) if methods[i] != methods[i - 1]]


def plot_summary(path: str, out_dir: Optional[str] = None, title: str = '') -> List[str]:
    """Write the figures for ``path`` (summary.csv or its directory); returns the PNG paths."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    if os.path.isdir(path):
        path = os.path.join(path, 'summary.csv')
    cols = read_summary(path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    epoch = cols['epoch']
    switches = _switches(cols)
    written = []

    def finish(fig, axes, name):
        for ax in axes:
            for e, a, b in switches:
                ax.axvline(e, ls='--', color='grey', lw=1)
                ax.text(e, 1.0, f' {a}→{b}', transform=ax.get_xaxis_transform(), va='top', fontsize=8)
            ax.set_xlabel('epoch')
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        p = os.path.join(out_dir, name)
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    panels = [('loss', ['train_loss', 'eval_loss'], False), ('accuracy (%)', ['eval_top1', 'eval_top5'], False),
              ('learning rate', ['lr'], True)]
    panels = [(t, [c for c in cs if c in cols], log) for t, cs, log in panels]
    panels = [p for p in panels if p[1]]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
        for ax, (t, cs, log) in zip(axes[0], panels):
            for c in cs:
                ax.plot(epoch, cols[c], marker='o', ms=3, label=c)
            ax.set_title(t)
            if log:
                ax.set_yscale('log')
        finish(fig, axes[0], 'metrics.png')

    spec = [c for c in ('train_cond_median', 'train_cond_max', 'train_eig_ratio_median', 'train_lam_max_median',
                        'train_range_cond_median') if c in cols]
    if spec:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
        for c in spec:
            axes[0][0].plot(epoch, cols[c], marker='o', ms=3, label=c.replace('train_', ''))
        axes[0][0].set_yscale('log')
        axes[0][0].set_title('batch covariance spectrum')
        if 'train_floor_frac' in cols:
            axes[0][1].plot(epoch, cols['train_floor_frac'], marker='o', ms=3, label='floor_frac')
        axes[0][1].set_title('fraction of eigenvalues at ε')
        finish(fig, axes[0], 'spectrum.png')

    if 'train_head_grad_norm' in cols:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        ax.plot(epoch, cols['train_head_grad_norm'], marker='o', ms=3, label='head grad norm')
        ax.set_yscale('log')
        ax.set_title('head gradient norm')
        finish(fig, [ax], 'head_grad.png')
    return written


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('run', help='run directory or its summary.csv')
    p.add_argument('--out', default=None, help='output directory (default: beside summary.csv)')
    p.add_argument('--title', default='')
    args = p.parse_args()
    try:
        paths = plot_summary(args.run, args.out, args.title)
    except (OSError, ValueError, KeyError) as e:
        print(f'plot_run: error: {e}', file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())

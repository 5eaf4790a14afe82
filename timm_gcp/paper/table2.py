"""A small-scale version of the paper's Table 2 (standalone and hybrid training of each method) with the
condition-number trend of its Table 1, driven through the trainer's command line (``python -m timm_gcp.train``), one
subprocess per run, resumable."""
import csv
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ['TABLE2_METHODS', 'TABLE2_TRAINER_ARGS', 'TABLE2_MODEL_KWARGS', 'TABLE2_METHOD_OPTIONS', 'Table2Config',
           'run_table2', 'summarise_table2', 'train_command']

TABLE2_METHODS = ('isqrt', 'svd', 'pade', 'taylor', 'trunc', 'topn', 'newton', 'lyap')

# Sizing measured on this two-core machine (docs/reproduce.md): one run ≈ 75 s with other jobs running, so the 45 runs
# (8 standalone + 7 hybrid, 3 seeds) take about an hour. 32 px images through a stride-8 ResNet-18 give a 4×4 map:
# M = 16 samples for a d = 32 covariance, rank ≤ 15 — rank-deficient like the paper's M = 49 < d = 256.
# The diagnostics sample every step (eigvalsh of 64 matrices of 32×32 is negligible here): with 8 steps per epoch the
# trainer's default interval would see only each epoch's first step, before a hybrid run's switched epoch has trained.
TABLE2_TRAINER_ARGS = (
    '--img-size', '32', '--builtin-train-samples', '512', '--builtin-val-samples', '256', '--baseline-model', '',
    '--diag-interval', '1')
TABLE2_MODEL_KWARGS = ('gcp_dim=32', 'output_stride=8')
# SVD-TopN keeps N = d − 50 of d = 256 eigenvalues in the paper (drops ≈ 20 %). The library default for smaller heads,
# d − min(50, round(50·d/256)), drops the same share and gives the same N = 26 of 32; it is passed explicitly so that
# the table does not change with the default.
TABLE2_METHOD_OPTIONS = {'topn': {'top_n': 26}}


@dataclasses.dataclass
class Table2Config:
    """Sizing of the small-scale Table 2; every run uses the same recipe, only method, protocol and seed change."""
    methods: Sequence[str] = TABLE2_METHODS
    seeds: Sequence[int] = (0, 1, 2)
    model: str = 'resnet18'
    epochs: int = 3
    switch_epoch: int = 2
    batch_size: int = 64
    extra_args: Sequence[str] = TABLE2_TRAINER_ARGS
    model_kwargs: Sequence[str] = TABLE2_MODEL_KWARGS
    method_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: dict(TABLE2_METHOD_OPTIONS))
    data_dir: Optional[str] = None
    out_dir: str = 'runs/table2'
    timeout_s: float = 900.0
    keep_checkpoints: bool = False


def train_command(cfg: Table2Config, method: str, hybrid: bool, seed: int, run_dir: Path) -> List[str]:
    """The trainer command line of one run (``--model-kwargs`` last: it takes every following word)."""
    opts = dict(cfg.method_options.get(method, {}))
    cmd = [sys.executable, '-m', 'timm_gcp.train',
           '--model', f'{cfg.model}_gcp_{"isqrt" if hybrid else method}',
           '--epochs', str(cfg.epochs), '--batch-size', str(cfg.batch_size), '--seed', str(seed),
           '--output', str(run_dir)]
    if hybrid:
        cmd += ['--gcp-switch-epoch', str(cfg.switch_epoch), '--gcp-switch-method', method]
        if opts:
            cmd += ['--gcp-switch-kwargs'] + [f'{k}={v!r}' for k, v in opts.items()]
    if cfg.data_dir:
        cmd += ['--data-dir', cfg.data_dir]
    cmd += list(cfg.extra_args)
    model_kwargs = list(cfg.model_kwargs) + ([f'gcp_kwargs={opts!r}'] if opts and not hybrid else [])
    return cmd + (['--model-kwargs'] + model_kwargs if model_kwargs else [])


def _finished_summary(run_dir: Path, epochs: int, cmd: Sequence[str]) -> Optional[List[Dict[str, str]]]:
    """The rows of the run's summary.csv when it has all ``epochs`` of them and was trained by ``cmd``, else None."""
    found = sorted(run_dir.rglob('summary.csv')) if run_dir.exists() else []
    log = run_dir / 'train.log'
    if not found or not log.exists():
        return None
    with open(log) as f:
        if f.readline().rstrip('\n') != ' '.join(cmd):
            return None  # trained with another recipe or interpreter
    with open(found[0], newline='') as f:
        rows = list(csv.DictReader(f))
    return rows if len(rows) >= epochs else None


def _pick(row: Mapping[str, str], keys: Sequence[str]) -> Optional[float]:
    for k in keys:
        if k in row and row[k] not in ('', None):
            try:
                return float(row[k])
            except ValueError:
                pass
    return None


_ACC_KEYS = ('eval_top1', 'top1', 'val_top1', 'eval_acc1', 'acc1')
# the trainer's summary.csv columns (it prefixes train_): condition number with the ε floor, largest eigenvalue and
# the condition number on the range of Σ
_TREND_KEYS = {
    'cond': ('train_cond_median', 'cond_median'),
    'lam_max': ('train_lam_max_median', 'lam_max_median'),
    'range_cond': ('train_range_cond_median', 'range_cond_median'),
}


def _train_one(cfg: Table2Config, cmd: List[str], run_dir: Path) -> List[Dict[str, str]]:
    """Train one run from scratch in a subprocess; returns its summary rows."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s, env=os.environ.copy())
    (run_dir / 'seconds.txt').write_text(f'{time.perf_counter() - t0:.3f}\n')
    (run_dir / 'train.log').write_text(' '.join(cmd) + '\n' + res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f'trainer exited {res.returncode}: {res.stderr.strip()[-300:]}')
    summary = _finished_summary(run_dir, cfg.epochs, cmd)
    if summary is None:
        raise RuntimeError(f'trainer finished without {cfg.epochs} summary rows in {run_dir}')
    if not cfg.keep_checkpoints:  # ~45 MB each; the table needs only summary.csv
        for ckpt in run_dir.rglob('*.pth.tar'):
            ckpt.unlink()
    return summary


def run_table2(
        cfg: Table2Config,
        progress: Optional[Callable[[str], None]] = None,
        command_fn: Callable[[Table2Config, str, bool, int, Path], List[str]] = train_command,
        train: bool = True,
) -> List[Dict[str, Any]]:
    """Train every (method, protocol, seed) of the small Table 2 in a subprocess and collect its summary.csv.

    Seeds form the outer loop, so an interrupted table already holds every method for the first seeds. A run whose
    summary.csv has all ``cfg.epochs`` rows and whose ``train.log`` starts with the same command line is read back,
    not retrained (an interrupted table resumes); a partial, failed or differently trained run is deleted and trained
    again. After a change of the library, move the run folder away (or pass another ``out_dir``) to retrain.

    Args:
        cfg: sizing.
        progress: called with one line per finished run (the CLI prints it).
        command_fn: builds the trainer command line (tests substitute a fake trainer).
        train: False only collects finished runs; the others get ``pending=True`` (e.g. while another process is
            still training the table).

    Returns:
        One row per run: method, protocol ('standalone'/'hybrid'), seed, final top-1, per-epoch condition numbers,
        largest eigenvalues and range condition numbers, training seconds (measured when the run was trained, kept in
        the run folder), and an error string for runs that failed.
    """
    rows = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            for hybrid in (False, True):
                if hybrid and method == 'isqrt':
                    continue  # hybrid isqrt → isqrt is the standalone run (the paper lists it once)
                proto = 'hybrid' if hybrid else 'standalone'
                run_dir = Path(cfg.out_dir) / f'{method}-{proto}-s{seed}'
                row: Dict[str, Any] = dict(method=method, protocol=proto, seed=seed)
                cmd = command_fn(cfg, method, hybrid, seed, run_dir)
                try:
                    summary = _finished_summary(run_dir, cfg.epochs, cmd)
                    if summary is None and not train:
                        rows.append(dict(row, pending=True))
                        continue
                    summary = summary or _train_one(cfg, cmd, run_dir)
                    row['top1'] = _pick(summary[-1], _ACC_KEYS)
                    row.update({k: [_pick(r, keys) for r in summary] for k, keys in _TREND_KEYS.items()})
                except Exception as e:
                    row['error'] = f'{type(e).__name__}: {e}'
                seconds = run_dir / 'seconds.txt'
                row['seconds'] = float(seconds.read_text()) if seconds.exists() else None
                rows.append(row)
                if progress is not None and train:
                    progress(f'{method:>7s} {proto:>10s} seed {seed}: top1 {row.get("top1")} '
                             f'({row["seconds"] or 0:.0f} s){" ERROR " + row["error"] if "error" in row else ""}')
    return rows


def _median_trend(series: Sequence[Sequence[Optional[float]]]) -> List[Optional[float]]:
    trend = []
    for epoch_vals in zip(*series):
        vals = [v for v in epoch_vals if v is not None]
        trend.append(statistics.median(vals) if vals else None)
    return trend


def summarise_table2(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Mean ± sample std of the final top-1 per (method, protocol), over the runs that produced a number; counts of
    failed and pending runs; per-epoch medians (over seeds) of the trend columns (``cond_trend``, ``lam_max_trend``,
    ``range_cond_trend``)."""
    groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r['method'], r['protocol']), []).append(r)
    out = []
    for (method, proto), runs in groups.items():
        done = [r for r in runs if not r.get('pending') and r.get('top1') is not None]
        accs = [float(r['top1']) for r in done]
        summary = dict(
            method=method, protocol=proto, n=len(accs), failed=sum(1 for r in runs if not r.get('pending')) - len(done),
            pending=sum(1 for r in runs if r.get('pending')),
            mean=statistics.fmean(accs) if accs else None,
            std=statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None))
        for key in _TREND_KEYS:
            summary[f'{key}_trend'] = _median_trend([list(r.get(key) or []) for r in done])
        out.append(summary)
    return out

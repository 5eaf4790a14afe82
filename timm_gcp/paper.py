"""Re-runnable analyses of "Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?"

Song, Sebe, Wang, ICCV 2021, https://arxiv.org/abs/2105.02498. Each function computes one of the paper's claims with
the library's own methods (``timm_gcp.sqrtm``) and returns plain rows (lists of dicts) that
:func:`write_report` turns into a markdown report with PNG figures and CSVs:

- :func:`gradient_comparison`: ∂L/∂Σ of every method for a fixed random upstream gradient G, compared with the exact
  stable gradient (``lyap``) on realistic rank-deficient covariances (paper §3, Table 7's consequence).
- :func:`ns_function_curve`: Newton–Schulz as a function of one eigenvalue (paper §4: the approximate root is a
  different, smoother function).
- :func:`eig_precision_counts`: float32 against float64 eigendecomposition on rank-deficient covariances (paper §3.2).
- :func:`run_table2`: a small-scale Table 2 (standalone and hybrid training of each method) with the condition-number
  trend of Table 1, driven through the trainer's command line.

Tables 6 and 7 come from ``timm_gcp.functional.analysis`` (the core library); this module only formats them.
"""
import csv
import dataclasses
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .functional import METHODS, covariance, sqrtm

__all__ = [
    'GradVariant', 'DEFAULT_GRAD_VARIANTS', 'random_covariances', 'model_feature_covariances', 'method_gradient',
    'gradient_comparison', 'ns_function_curve', 'eig_precision_counts', 'condition_numbers', 'analysis_tables',
    'Table2Config', 'run_table2', 'summarise_table2', 'write_csv', 'write_report',
]

_logger = logging.getLogger(__name__)

EPS64 = 2.220446049250313e-16


# ----------------------------------------------------------------------------------------------------------------------
# Covariances


def random_covariances(
        num: int,
        samples: int,
        dim: int = 256,
        decades: float = 4.0,
        seed: int = 0,
) -> torch.Tensor:
    """Covariances of ``samples`` post-ReLU feature vectors, as a GCP head sees them after its 1×1 reduction.

    Each sample is ReLU(s ⊙ z) with z ~ N(0, I_dim) and per-channel scales s log-uniformly spread over ``decades``
    decades (channel variances over twice that), which mimics the decaying spectrum of real reduced features. With
    ``samples`` ≤ ``dim`` the covariance has rank ``samples − 1`` by construction (the mean is subtracted).

    Args:
        num: number of covariances.
        samples: M, the spatial positions (49 for 7×7, 196 for 14×14).
        dim: d.
        decades: spread of the channel scales.
        seed: generator seed.

    Returns:
        (num, dim, dim) float64 symmetric PSD.
    """
    if num < 1 or samples < 1 or dim < 1:
        raise ValueError(f'num, samples and dim must be >= 1, got {num}, {samples}, {dim}')
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.0, -decades, dim, dtype=torch.float64)
    scales = scales[torch.randperm(dim, generator=gen)]
    z = torch.randn(num, dim, samples, generator=gen, dtype=torch.float64)
    return covariance(torch.relu(z * scales.view(1, dim, 1)))


def model_feature_covariances(
        model_name: str = 'resnet18_gcp_isqrt',
        num: int = 4,
        img_size: int = 224,
        seed: int = 0,
        images: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, str]:
    """Covariances taken from a randomly initialised model's features (no download, no network).

    For a ``*_gcp_*`` model the covariance is that of its own head: backbone ``forward_features`` → the head's 1×1
    reduction, BN and ReLU (``model.global_pool.conv/bn/act``) → covariance. For any other timm model (the fallback
    while the GCP models are unavailable) the backbone map is used directly (first 256 channels). The model runs in
    train mode (batch-statistics BN, as at the start of training) without gradients.

    Args:
        model_name: timm model name (created with ``pretrained=False``).
        num: batch size (ignored when ``images`` is given).
        img_size: square input size; 224 px gives a 7×7 map (M = 49) for a stride-32 backbone.
        seed: seed for the weights and the random images.
        images: optional (B, 3, H, W) images, e.g. from the built-in dataset.

    Returns:
        ((B, d, d) float64 covariances, a one-line description of where they came from).
    """
    import timm
    import timm_gcp  # noqa: F401  registers the *_gcp_* models when they exist

    torch.manual_seed(seed)
    try:
        model = timm.create_model(model_name, pretrained=False)
    except RuntimeError as e:  # unknown model
        fallback = 'resnet18'
        _logger.warning('model %s unavailable (%s); using %s backbone features', model_name, e, fallback)
        model_name = fallback
        model = timm.create_model(fallback, pretrained=False)
    model.train()
    if images is None:
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(num, 3, img_size, img_size, generator=gen)
    with torch.no_grad():
        feat = model.forward_features(images)
        pool = getattr(model, 'global_pool', None)
        if pool is not None and all(hasattr(pool, n) for n in ('conv', 'bn', 'act')):
            feat = pool.act(pool.bn(pool.conv(feat)))
            how = f'{model_name} (random init, train-mode BN): backbone → head 1×1 reduction+BN+ReLU'
        else:
            feat = feat[:, :256]
            how = f'{model_name} (random init, train-mode BN): first {feat.shape[1]} backbone channels'
        cov = covariance(feat.double())
    m = feat.shape[-2] * feat.shape[-1]
    how += f', {tuple(images.shape[-2:])} px images → M = {m} samples, d = {cov.shape[-1]}'
    return cov, how


def condition_numbers(cov: torch.Tensor, eps: float = EPS64) -> torch.Tensor:
    """λ_max / max(λ_min, ε) per matrix by float64 eigh (the floor the eigen-methods use). Returns (B,) float64."""
    lam = torch.linalg.eigvalsh(cov.double())
    return lam[..., -1] / lam[..., 0].clamp_min(eps)


# ----------------------------------------------------------------------------------------------------------------------
# Gradients


@dataclasses.dataclass(frozen=True)
class GradVariant:
    """A method (plus options) whose gradient is compared; ``label`` names it in tables."""
    label: str
    method: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ''


DEFAULT_GRAD_VARIANTS: Tuple[GradVariant, ...] = (
    GradVariant('svd', 'svd'),
    GradVariant('pade', 'pade'),
    GradVariant('taylor', 'taylor'),
    GradVariant('trunc', 'trunc'),
    GradVariant('topn', 'topn'),
    GradVariant('newton', 'newton'),
    GradVariant('pi', 'pi'),
    GradVariant('isqrt', 'isqrt', {}, 'different function: NS-5 shrinks small eigenvalues'),
    GradVariant('isqrt (20 it.)', 'isqrt', {'iters': 20}, 'control: NS nearly converged on the range of Σ'),
    GradVariant('mpa', 'mpa', {}, 'different function: Padé of the matrix root'),
)


def method_gradient(
        cov: torch.Tensor,
        method: str,
        upstream: torch.Tensor,
        **options: Any,
) -> torch.Tensor:
    """∂L/∂Σ for L = Σ_ij G_ij·sqrtm(Σ)_ij through the method's own backward.

    Args:
        cov: (B, d, d) symmetric PSD, float64 (each method casts to its own precision internally).
        method: a key of ``METHODS``.
        upstream: (B, d, d) G = ∂L/∂Q.
        **options: method options.

    Returns:
        (B, d, d) float64 gradient, symmetrised. Σ is symmetric, so only the symmetric part of ∂L/∂Σ is a derivative
        along admissible directions; methods differentiated by autograd (``isqrt``, ``mpa``) return a non-symmetric
        matrix with the same symmetric part, and comparing it raw with the eigen-methods' symmetric gradients would
        report a spurious error.
    """
    c = cov.detach().double().requires_grad_(True)
    q = sqrtm(c, method, **options)
    (grad,) = torch.autograd.grad((q.double() * upstream.double()).sum(), c)
    return 0.5 * (grad + grad.transpose(-1, -2))


def _nanmean(vals: Sequence[float]) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


def _relerr_cos(g: torch.Tensor, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    g, ref = g.flatten(1), ref.flatten(1)
    rel = (g - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)
    cos = (g * ref).sum(1) / (g.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-300)
    return rel, cos


def gradient_comparison(
        covs: Mapping[str, torch.Tensor],
        variants: Sequence[GradVariant] = DEFAULT_GRAD_VARIANTS,
        reference: str = 'lyap',
        seed: int = 0,
        lead_fraction: float = 0.05,
) -> List[Dict[str, Any]]:
    """Compare each method's ∂L/∂Σ with the reference method's for one fixed random upstream gradient.

    Besides the full-matrix relative error ‖g − g_ref‖_F/‖g_ref‖_F and cosine similarity, two sub-blocks in the
    eigenbasis of Σ are compared: the *range* (eigenvalues above 1e-10·λ_max: the directions the samples span) and
    the *leading* block (eigenvalues ≥ ``lead_fraction``·tr Σ, where five Newton–Schulz steps are within 3 % of the
    exact root). The exact gradient is dominated by its null-space block (≈ 1/(2√ε)·G there), and on the range by its
    smallest eigenvalues, so the leading block is where a method that computes a different function (``isqrt``,
    ``mpa``) can fairly be compared with the exact root.

    Args:
        covs: case name → (B, d, d) float64 covariances.
        variants: methods to compare; those not registered in ``METHODS`` are skipped with a logged warning.
        reference: the method whose gradient is the ground truth.
        seed: seed of the upstream gradient G (standard normal, the same for every method).
        lead_fraction: threshold of the leading block, relative to tr Σ.

    Returns:
        One row per (case, variant) with the per-sample means of rel_err, cos, rel_err_range, cos_range,
        rel_err_lead, cos_lead (over the samples whose leading block is not empty; NaN when none is), lead_dim
        (mean size of the leading block), the largest
        |gradient| (max over the batch), the reference's largest |gradient| and the time taken.

    Raises:
        ValueError: the reference method is not registered.
    """
    if reference not in METHODS:
        raise ValueError(f'reference method {reference!r} is not registered; available: {", ".join(METHODS)}')
    rows = []
    for case, cov in covs.items():
        gen = torch.Generator().manual_seed(seed)
        upstream = torch.randn(cov.shape, generator=gen, dtype=torch.float64)
        ref = method_gradient(cov, reference, upstream)
        lam, u = torch.linalg.eigh(cov.double())
        masks = dict(range=lam > 1e-10 * lam[..., -1:], lead=lam >= lead_fraction * lam.sum(-1, keepdim=True))
        for v in variants:
            if v.method not in METHODS:
                _logger.warning('method %s is not registered; skipped', v.method)
                continue
            t0 = time.perf_counter()
            try:
                g = method_gradient(cov, v.method, upstream, **dict(v.options))
            except Exception as e:  # a method failing on these inputs is itself a result worth reporting
                _logger.warning('gradient of %s failed on %s: %s', v.label, case, e)
                rows.append(dict(case=case, method=v.label, error=f'{type(e).__name__}: {e}', note=v.note))
                continue
            dt = time.perf_counter() - t0
            rel, cos = _relerr_cos(g, ref)
            row = dict(case=case, method=v.label, rel_err=float(rel.mean()), cos=float(cos.mean()))
            for name, mask in masks.items():
                rel_b, cos_b = [], []
                for b in range(cov.shape[0]):
                    ub = u[b][:, mask[b]]
                    if ub.shape[1] == 0:
                        rel_b.append(math.nan)
                        cos_b.append(math.nan)
                        continue
                    rb, cb = _relerr_cos((ub.T @ g[b] @ ub)[None], (ub.T @ ref[b] @ ub)[None])
                    rel_b.append(float(rb))
                    cos_b.append(float(cb))
                row[f'rel_err_{name}'] = _nanmean(rel_b)
                row[f'cos_{name}'] = _nanmean(cos_b)
            row['lead_dim'] = float(masks['lead'].sum(-1).double().mean())
            row.update(max_abs_grad=float(g.abs().max()), ref_max_abs_grad=float(ref.abs().max()),
                       finite=bool(torch.isfinite(g).all()), seconds=dt, note=v.note)
            rows.append(row)
            _logger.info('grad %s / %s: rel %.3g cos %.3g', case, v.label, rows[-1]['rel_err'], rows[-1]['cos'])
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Newton–Schulz as a function


def ns_function_curve(
        a: torch.Tensor,
        iters: Sequence[int] = (3, 5, 10),
        dim: int = 256,
        extra_methods: Sequence[str] = ('mpa',),
) -> Dict[str, torch.Tensor]:
    """Output/√a of the matrix root for one eigenvalue a of a trace-normalised d×d covariance.

    Setup: for each a (0 < a ≤ 1) the input is A = diag(a, b, …, b) with b = (1 − a)/(d − 1), so tr A = 1 — exactly
    the matrix iSQRT-COV iterates on after dividing Σ by its trace. Every Newton–Schulz iterate of a diagonal matrix is
    diagonal, so entry (0, 0) of the result is the iteration's scalar function of a alone; its ratio to √a is 1 for
    the exact root. Methods with their own normalisation (``mpa``) see the same matrix and rescale their output back.

    Args:
        a: (n,) eigenvalues in (0, 1].
        iters: Newton–Schulz iteration counts (``isqrt`` with ``iters=k``, method defaults otherwise).
        dim: d.
        extra_methods: further registered methods to evaluate the same way (skipped when not registered).

    Returns:
        label → (n,) float64 ratios; 'exact' is all ones.

    Raises:
        ValueError: a outside (0, 1] or dim < 2.
    """
    a = a.double().flatten()
    if dim < 2:
        raise ValueError(f'dim must be >= 2, got {dim}')
    if not bool(((a > 0) & (a <= 1)).all()):
        raise ValueError('eigenvalues a must lie in (0, 1] (the trace-normalised setting)')
    diag = ((1.0 - a) / (dim - 1)).unsqueeze(1).expand(-1, dim).clone()
    diag[:, 0] = a
    mats = torch.diag_embed(diag)
    out = {'exact': torch.ones_like(a)}
    for k in iters:
        out[f'NS {k} it.'] = sqrtm(mats, 'isqrt', iters=k)[:, 0, 0].double() / a.sqrt()
    for m in extra_methods:
        if m not in METHODS:
            _logger.warning('method %s is not registered; left out of the NS curve', m)
            continue
        out[m] = sqrtm(mats, m)[:, 0, 0].double() / a.sqrt()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# float32 vs float64 eigendecomposition


def eig_precision_counts(covs: Mapping[str, torch.Tensor], eps: float = EPS64) -> List[Dict[str, Any]]:
    """How a float32 eigendecomposition treats rank-deficient covariances, against float64 (paper §3.2).

    The genuine eigenvalues are the float64 ones above d·ε₆₄·λ_max (for M < d samples that is the rank by
    construction, M − 1). For each case the per-matrix means of:
    float64 and float32 eigenvalues ≤ 0 and ≤ ε; genuine eigenvalues that float32 returns ≤ ε ("zeroed": the
    eigen-methods floor them) or off by more than 50 % ("lost"); null-space eigenvalues float32 returns above ε
    ("spurious": they survive the floor and enter the root as noise); the float32 noise level (largest |λ| outside
    the genuine ones, relative to λ_max); and the condition numbers λ_max/max(λ_min, ε) in both precisions.

    Args:
        covs: case name → (B, d, d) covariances (float64).
        eps: eigenvalue floor the eigen-methods use.

    Returns:
        One row per case.
    """
    rows = []
    for case, cov in covs.items():
        c64 = cov.double()
        l64 = torch.linalg.eigvalsh(c64).flip(-1)  # descending
        l32 = torch.linalg.eigvalsh(c64.float()).double().flip(-1)
        d = c64.shape[-1]
        lmax = l64[..., :1]
        genuine = l64 > d * EPS64 * lmax
        r = genuine.sum(-1)
        zeroed = ((l32 <= eps) & genuine).sum(-1)
        spurious = ((l32 > eps) & ~genuine).sum(-1)
        lost = (((l32 - l64).abs() > 0.5 * l64) & genuine).sum(-1)
        noise = torch.where(genuine, torch.zeros_like(l32), l32.abs()).amax(-1) / lmax.squeeze(-1)
        smallest_genuine = torch.where(genuine, l64, torch.full_like(l64, math.inf)).amin(-1) / lmax.squeeze(-1)
        m = lambda t: float(t.double().mean())  # noqa: E731
        rows.append(dict(
            case=case, d=d, genuine_rank=m(r),
            fp64_le0=m((l64 <= 0).sum(-1)), fp64_le_eps=m((l64 <= eps).sum(-1)),
            fp32_le0=m((l32 <= 0).sum(-1)), fp32_le_eps=m((l32 <= eps).sum(-1)),
            fp32_zeroed_genuine=m(zeroed), fp32_lost_genuine=m(lost), fp32_spurious_positive=m(spurious),
            smallest_genuine_rel=m(smallest_genuine), fp32_noise_rel=m(noise),
            cond_fp64=m(l64[..., 0] / l64[..., -1].clamp_min(eps)),
            cond_fp32=m(l32[..., 0] / l32[..., -1].clamp_min(eps))))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Tables 6 and 7 (library functions of the core engineer)


def analysis_tables() -> Optional[Dict[str, List[Dict[str, Any]]]]:
    """Tables 6 and 7 from ``timm_gcp.functional.analysis`` as rows, beside the paper's numbers.

    Returns:
        {'table6': one row per r, 'table7': one row per method}, or None while the analysis module is missing.
    """
    try:
        from .functional import analysis
    except ImportError:
        _logger.warning('timm_gcp.functional.analysis is not available; Tables 6 and 7 left as placeholders')
        return None
    t6 = analysis.table6()
    table6 = []
    for i, r in enumerate(analysis.TABLE6_R):
        row: Dict[str, Any] = dict(r=r)
        row.update({k: v[i] for k, v in t6.items()})
        row.update({f'paper_{k}': v[i] for k, v in analysis.PAPER_TABLE6.items()})
        table6.append(row)
    table7 = [dict(method=m, **vals, paper=analysis.PAPER_TABLE7.get(m)) for m, vals in analysis.table7().items()]
    return dict(table6=table6, table7=table7)


# ----------------------------------------------------------------------------------------------------------------------
# Table 2 (small scale) through the trainer


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
# SVD-TopN keeps N = d − 50 of d = 256 eigenvalues in the paper (drops ≈ 20 %); the library default max(d − 50, 1)
# keeps a single eigenvalue at d = 32, so the small table drops the same share: N = 26 of 32.
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


def _train_command(cfg: Table2Config, method: str, hybrid: bool, seed: int, run_dir: Path) -> List[str]:
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
    # --model-kwargs takes every following word, so it goes last
    model_kwargs = list(cfg.model_kwargs) + ([f'gcp_kwargs={opts!r}'] if opts and not hybrid else [])
    return cmd + (['--model-kwargs'] + model_kwargs if model_kwargs else [])


def _finished_summary(run_dir: Path, epochs: int) -> Optional[List[Dict[str, str]]]:
    """The rows of the run's summary.csv when it has all ``epochs`` of them, else None."""
    found = sorted(run_dir.rglob('summary.csv')) if run_dir.exists() else []
    if not found:
        return None
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
_COND_KEYS = ('train_cond_median', 'cond_median')  # the trainer's summary.csv column (timm prefixes train_)


def run_table2(
        cfg: Table2Config,
        progress: Optional[Callable[[str], None]] = None,
        command_fn: Callable[[Table2Config, str, bool, int, Path], List[str]] = _train_command,
        train: bool = True,
) -> List[Dict[str, Any]]:
    """Train every (method, protocol, seed) of the small Table 2 in a subprocess and collect its summary.csv.

    Seeds form the outer loop, so an interrupted table already holds every method for the first seeds. A run whose
    summary.csv has all ``cfg.epochs`` rows is read back, not retrained (an interrupted table resumes); a partial or
    failed run is deleted and trained again.

    Args:
        cfg: sizing.
        progress: called with one line per finished run (the CLI prints it).
        command_fn: builds the trainer command line (tests substitute a fake trainer).
        train: False only collects finished runs; the others get ``pending=True`` (e.g. while another process is
            still training the table).

    Returns:
        One row per run: method, protocol ('standalone'/'hybrid'), seed, final top-1, per-epoch condition numbers,
        training seconds (measured when the run was trained, kept in the run folder), and an error string for runs
        that failed.
    """
    rows = []
    out = Path(cfg.out_dir)
    for seed in cfg.seeds:
        for method in cfg.methods:
            for hybrid in (False, True):
                if hybrid and method == 'isqrt':
                    continue  # hybrid isqrt → isqrt is the standalone run (the paper lists it once)
                proto = 'hybrid' if hybrid else 'standalone'
                run_dir = out / f'{method}-{proto}-s{seed}'
                row: Dict[str, Any] = dict(method=method, protocol=proto, seed=seed)
                try:
                    summary = _finished_summary(run_dir, cfg.epochs)
                    if summary is None and not train:
                        row['pending'] = True
                        rows.append(row)
                        continue
                    if summary is None:
                        if run_dir.exists():
                            shutil.rmtree(run_dir)
                        run_dir.mkdir(parents=True)
                        cmd = command_fn(cfg, method, hybrid, seed, run_dir)
                        t0 = time.perf_counter()
                        res = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s,
                                             env=os.environ.copy())
                        (run_dir / 'seconds.txt').write_text(f'{time.perf_counter() - t0:.3f}\n')
                        (run_dir / 'train.log').write_text(' '.join(cmd) + '\n' + res.stdout + res.stderr)
                        if res.returncode != 0:
                            raise RuntimeError(f'trainer exited {res.returncode}: {res.stderr.strip()[-300:]}')
                        summary = _finished_summary(run_dir, cfg.epochs)
                        if summary is None:
                            raise RuntimeError(f'trainer finished without {cfg.epochs} summary rows in {run_dir}')
                        if not cfg.keep_checkpoints:  # ~45 MB each; the table needs only summary.csv
                            for ckpt in run_dir.rglob('*.pth.tar'):
                                ckpt.unlink()
                    row['top1'] = _pick(summary[-1], _ACC_KEYS)
                    row['cond'] = [_pick(r, _COND_KEYS) for r in summary]
                except Exception as e:
                    row['error'] = f'{type(e).__name__}: {e}'
                seconds = run_dir / 'seconds.txt'
                row['seconds'] = float(seconds.read_text()) if seconds.exists() else None
                rows.append(row)
                if progress is not None and train:
                    progress(f'{method:>7s} {proto:>10s} seed {seed}: top1 {row.get("top1")} '
                             f'({row["seconds"] or 0:.0f} s){" ERROR " + row["error"] if "error" in row else ""}')
    return rows


def summarise_table2(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Mean ± sample std of the final top-1 per (method, protocol), over the runs that produced a number; counts of
    failed and pending runs; the per-epoch median (over seeds) of the condition-number column."""
    groups: Dict[Tuple[str, str], List[float]] = {}
    conds: Dict[Tuple[str, str], List[List[Optional[float]]]] = {}
    failed: Dict[Tuple[str, str], int] = {}
    pending: Dict[Tuple[str, str], int] = {}
    for r in rows:
        key = (r['method'], r['protocol'])
        groups.setdefault(key, [])
        failed.setdefault(key, 0)
        pending.setdefault(key, 0)
        if r.get('pending'):
            pending[key] += 1
            continue
        if r.get('top1') is None:
            failed[key] += 1
            continue
        groups[key].append(float(r['top1']))
        conds.setdefault(key, []).append(list(r.get('cond') or []))
    out = []
    for (method, proto), accs in groups.items():
        trend = []
        for epoch_vals in zip(*conds.get((method, proto), [])):
            vals = [v for v in epoch_vals if v is not None]
            trend.append(statistics.median(vals) if vals else None)
        out.append(dict(
            method=method, protocol=proto, n=len(accs), failed=failed[(method, proto)],
            pending=pending[(method, proto)],
            mean=statistics.fmean(accs) if accs else None,
            std=statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None),
            cond_trend=trend))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Output


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows (dicts, keys in first-seen order) to ``path``."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (';'.join('' if x is None else f'{x:.4g}' for x in v) if isinstance(v, list) else v)
                        for k, v in r.items()})


def _fmt(x: Any) -> str:
    if x is None:
        return '—'
    if isinstance(x, bool):
        return 'yes' if x else 'NO'
    if isinstance(x, float):
        if x == 0:
            return '0'
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f'{x:.3g}' if 1e-3 <= abs(x) < 1e5 else f'{x:.2e}'
    return str(x)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str]]) -> str:
    """Markdown table of ``rows``; ``columns`` are (key, header) pairs."""
    lines = ['| ' + ' | '.join(h for _, h in columns) + ' |', '|' + '---|' * len(columns)]
    for r in rows:
        lines.append('| ' + ' | '.join(_fmt(r.get(k)) for k, _ in columns) + ' |')
    return '\n'.join(lines)


def _gradient_findings(rows: Sequence[Mapping[str, Any]], reference: str) -> List[str]:
    """Bullet points computed from the gradient rows (so that re-running the report keeps them true)."""
    ok = [r for r in rows if 'error' not in r]
    methods = list(dict.fromkeys(r['method'] for r in ok))
    by = {m: [r for r in ok if r['method'] == m] for m in methods}
    worst = lambda m, k: max((r[k] for r in by[m] if not math.isnan(r[k])), default=math.nan)  # noqa: E731
    exact_range = [m for m in methods if worst(m, 'rel_err_range') < 1e-6]
    out = ['**Computed findings** (worst case over the cases above):', '']
    if exact_range:
        out.append(f'- Same gradient as `{reference}` on the range of Σ (rel. err < 1e-6): '
                   + ', '.join(f'`{m}`' for m in exact_range) + '; their full-matrix differences are therefore all '
                   'in the null-space block, i.e. in how they treat ties/near-ties at the ε floor.')
    for m in methods:
        if m in exact_range:
            continue
        out.append(f'- `{m}`: rel. err on the range ≤ {_fmt(worst(m, "rel_err_range"))}, on the leading block ≤ '
                   f'{_fmt(worst(m, "rel_err_lead"))}; largest |∂L/∂Σ| {_fmt(worst(m, "max_abs_grad"))}.')
    if errors := [r for r in rows if 'error' in r]:
        out += [f'- `{r["method"]}` failed on {r["case"]}: {r["error"]}' for r in errors]
    ref_max = max((r['ref_max_abs_grad'] for r in ok), default=math.nan)
    out.append(f'- Largest |∂L/∂Σ| of `{reference}` over all cases: {_fmt(ref_max)}.')
    return out


def _plot_ns(curves: Mapping[str, torch.Tensor], a: torch.Tensor, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_grad(rows: Sequence[Mapping[str, Any]], path: Path, reference: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_cond(summary: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in summary:
        trend = s.get('cond_trend') or []
        pts = [(i + 1, v) for i, v in enumerate(trend) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker='o', label=f'{s["method"]} {s["protocol"]}')
    ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.set_ylabel('median condition number of Σ')
    ax.set_title('Condition number over training (paper Table 1)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table2_section(c: Table2Config, rows: Sequence[Mapping[str, Any]], out_dir: Path,
        command: Optional[str]) -> List[str]:
    summary = summarise_table2(rows)
    write_csv(out_dir / 'table2_runs.csv', list(rows))
    write_csv(out_dir / 'table2.csv', summary)
    _plot_cond(summary, out_dir / 'table2_condition.png')
    done = [r for r in rows if not r.get('pending') and r.get('top1') is not None]
    secs = [r['seconds'] for r in done if r.get('seconds')]
    md = [f'Sizing: `{c.model}_gcp_<method>`, {c.epochs} epochs, hybrid = `isqrt` until epoch {c.switch_epoch}, then '
          f'the method; batch {c.batch_size}; seeds {list(c.seeds)}; data {c.data_dir or "built-in dataset"}; '
          f'trainer args `{" ".join(c.extra_args)}`, model kwargs `{" ".join(c.model_kwargs)}`, method options '
          f'`{dict(c.method_options)}` (see `docs/reproduce.md` for how this was sized). Top-1 (%) on '
          f'the validation split after the last epoch, mean ± sample std over the finished seeds (n).', '',
          f'{len(done)} of {len(rows)} runs finished'
          + (f', {statistics.fmean(secs):.0f} s per run on average (wall clock, shared two-core CPU)' if secs else '')
          + '.', '']
    pending = [r for r in rows if r.get('pending')]
    if pending:
        md += [f'> **PARTIAL** — {len(pending)} runs pending (' + ', '.join(
            f'{r["method"]} {r["protocol"]} s{r["seed"]}' for r in pending[:8])
            + (', …' if len(pending) > 8 else '') + '). Finish them (finished runs are reused) with: '
            f'`{command or "python scripts/reproduce_paper.py --table2"}`', '']

    def acc(s: Optional[Mapping[str, Any]]) -> str:
        if s is None or s['mean'] is None:
            return '—'
        return f'{s["mean"]:.2f} (n=1)' if s['n'] == 1 else f'{s["mean"]:.2f} ± {s["std"]:.2f} (n={s["n"]})'

    by = {(s['method'], s['protocol']): s for s in summary}
    lines = ['| method | paper name | standalone top-1 | hybrid top-1 | failed runs |', '|---|---|---|---|---|']
    for m in c.methods:
        st, hy = by.get((m, 'standalone')), by.get((m, 'hybrid'))
        paper_name = METHODS[m].paper_name if m in METHODS else m
        fails = sum(s['failed'] for s in (st, hy) if s)
        lines.append(f'| {m} | {paper_name} | {acc(st)} | {"= standalone" if m == "isqrt" else acc(hy)} | {fails} |')
    failed = [r for r in rows if r.get('error')]
    md += lines + [''] + [f'- failed: {r["method"]} {r["protocol"]} s{r["seed"]}: {r["error"][:200]}' for r in failed]
    md += ['', _cond_sampling_note(c), '', '![condition numbers](table2_condition.png)', '',
           markdown_table([dict(run=f'{s["method"]} {s["protocol"]}',
                                trend=' → '.join(_fmt(v) for v in s['cond_trend'])) for s in summary if s['n']],
                          [('run', 'run'), ('trend', 'median over seeds of the per-epoch median condition number')]),
           '']
    return md


def _cond_sampling_note(cfg: Table2Config) -> str:
    """One sentence on which training steps the condition-number trend was sampled at (from the trainer args)."""
    args = list(cfg.extra_args)
    interval = int(args[args.index('--diag-interval') + 1]) if '--diag-interval' in args[:-1] else None
    if interval == 1:
        where = 'at every training step, so each epoch\'s value covers that whole epoch'
    else:
        where = (f'at every {interval or "--diag-interval"}-th training step of each epoch, counting from its first '
                 f'step (taken before that epoch has trained)')
    return (f'Condition numbers λ_max / max(λ_min, ε) of the head\'s covariances, sampled {where}; a hybrid run '
            f'trains epochs {cfg.switch_epoch + 1} to {cfg.epochs} (1-based) with the switched method.')


def write_report(
        out_dir: Path,
        command: str,
        grad_covs: Optional[Mapping[str, torch.Tensor]] = None,
        case_notes: Optional[Mapping[str, str]] = None,
        table2_cfg: Optional[Table2Config] = None,
        table2_rows: Optional[Sequence[Mapping[str, Any]]] = None,
        progress: Optional[Callable[[str], None]] = None,
        reference: str = 'lyap',
        ns_points: int = 121,
        table2_command: Optional[str] = None,
) -> Path:
    """Run every analysis and write ``paper_report.md``, its PNG figures and CSVs into ``out_dir``.

    Args:
        out_dir: destination folder (created).
        command: the exact command line that produced the report (written into its header).
        grad_covs: case name → covariances for the gradient and precision sections (default: M = 49 and 196 random,
            d = 256, 4 each).
        case_notes: case name → how its covariances were made.
        table2_cfg: Table 2 sizing (with ``table2_rows`` the finished runs); None leaves Table 2 pending.
        table2_rows: rows from :func:`run_table2`.
        progress: called with a line per finished section.
        reference: the method whose gradient the others are compared with (the exact stable gradient, ``lyap``).
        ns_points: eigenvalues on the log grid 1e-6…1 of the Newton–Schulz curve.
        table2_command: the command that finishes pending Table 2 runs (named in the report when some are pending).

    Returns:
        Path of the report.
    """
    say = progress or (lambda s: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if grad_covs is None:
        grad_covs = {f'random M={m}': random_covariances(4, m, seed=m) for m in (49, 196)}
    case_notes = dict(case_notes or {})
    md = ['# Reproducing the analyses of Song, Sebe & Wang, ICCV 2021 (arXiv 2105.02498)', '',
          f'Produced by `{command}` on {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} '
          f'(torch {torch.__version__}, {torch.get_num_threads()} CPU threads). '
          'CSVs next to this file hold every number shown here.', '']

    # Tables 6 and 7
    md += ['## Tables 6 and 7: kernel approximation error and largest |K|', '']
    tables = analysis_tables()
    if tables is None:
        md += ['> **PLACEHOLDER** — `timm_gcp.functional.analysis` (core library) is missing from this checkout. '
               'Re-running the command above fills this section from it.', '']
    else:
        write_csv(out_dir / 'table6.csv', tables['table6'])
        write_csv(out_dir / 'table7.csv', tables['table7'])
        t6cols = [k for k in tables['table6'][0] if k != 'r']
        md += ['### Table 6: absolute error of the backward kernels\' series to 1/(1−r), float64', '',
               'Computed by `timm_gcp.functional.analysis.table6()`: `taylor`/`pade` are the library\'s kernels, '
               '`taylor_termwise` the degree-100 series summed term by term, `pade_reference` the reference [50/50] '
               'coefficients (mpmath, 20 digits) evaluated term by term; `paper_*` are the paper\'s Table 6.', '',
               markdown_table(tables['table6'], [('r', 'r')] + [(k, k) for k in t6cols]), '',
               '### Table 7: largest |K_ij| each kernel allows', '',
               'Computed by `timm_gcp.functional.analysis.table7()`: `worst` over the closest pairs the ε floor '
               'allows, `tie` at λᵢ = λⱼ = ε, `random49`/`random196` on covariance spectra of 49/196 Gaussian samples '
               'at d = 256; `paper` is the paper\'s Table 7 (inf = unbounded).', '',
               markdown_table(tables['table7'], [(k, k) for k in tables['table7'][0]]), '']
    say('tables 6/7 done')

    # Gradients
    rows = gradient_comparison(grad_covs, reference=reference)
    write_csv(out_dir / 'gradients.csv', rows)
    _plot_grad(rows, out_dir / 'gradients.png', reference)
    cond = {case: condition_numbers(c) for case, c in grad_covs.items()}
    md += [f'## Gradients on realistic covariances, against the exact stable gradient (`{reference}`)', '',
           'A fixed standard-normal upstream gradient G = ∂L/∂Q (one per case) is pushed through each method\'s '
           'backward; ∂L/∂Σ (symmetric part) is compared with `' + reference + '`\'s (the exact gradient; `lyap` '
           'computes it without the 1/(λᵢ−λⱼ) cancellation). Columns: the full matrix; the "range" block UᵣᵀgUᵣ on '
           'the eigenvectors Σ spans '
           '(eigenvalues > 1e-10·λ_max); the "leading" block on eigenvalues ≥ 0.05·tr Σ (where 5 Newton–Schulz steps '
           'are within 3 % of the exact root; "leading dim" is its size). The full-matrix numbers are dominated by '
           'the null-space block, where the exact gradient is ≈ 1/(2√ε) ≈ 3.4e7 times G; the range numbers by the '
           'smallest genuine eigenvalues.', '']
    for case, c in grad_covs.items():
        note = case_notes.get(case, '')
        if case.startswith('random M='):
            note = note or ('ReLU(s ⊙ z), z ~ N(0, I), channel scales s log-uniform over 4 decades; '
                            f'{c.shape[0]} covariances')
        md.append(f'- **{case}**: {note}; median condition number (ε floor) {float(cond[case].median()):.2e}.')
    md += ['', markdown_table(rows, [('case', 'case'), ('method', 'method'), ('rel_err', 'rel. err'),
                                     ('cos', 'cosine'), ('rel_err_range', 'rel. err (range)'),
                                     ('rel_err_lead', 'rel. err (leading)'), ('cos_lead', 'cosine (leading)'),
                                     ('lead_dim', 'leading dim'), ('max_abs_grad', 'max |∂L/∂Σ|'),
                                     ('ref_max_abs_grad', f'{reference} max |∂L/∂Σ|'), ('finite', 'finite'),
                                     ('note', 'note')]),
           '', '![gradients](gradients.png)', '', *_gradient_findings(rows, reference), '',
           '**Reading it.** `isqrt` and `mpa` compute a *different function* from the exact root (see the next '
           'section: five Newton–Schulz steps return well under the exact root for every eigenvalue below ~0.05 of '
           'the trace), so their gradients are not noisy estimates of the exact one and large full-matrix errors are '
           'expected, not a bug. The `isqrt (20 it.)` control shows the gap closing on the range once the iteration '
           'converges there. Where `isqrt` still differs on the leading block, the cause is its √trΣ normalisation: '
           'the derivative through tr Σ adds a multiple of the identity that is zero only for the exact root, and '
           'with five steps the unconverged small eigenvalues make it large. The null space is where all methods '
           'differ most: `lyap` gives the off-diagonal null-space block (UᵀGU)ᵢⱼ/(2√ε) ≈ 1e7·|G|, whereas in the '
           'K-based backward of `svd`/`pade`/`trunc`/`topn` an exact tie at the ε floor contributes an antisymmetric '
           'term that the final symmetrisation removes — whatever K is there — so their full-matrix agreement with '
           '`lyap` is poor while their range blocks match it; the approximate roots produce neither.', '']
    say(f'gradients done ({time.perf_counter() - t_start:.0f} s)')

    # NS curves
    a = torch.logspace(-6, 0, ns_points, dtype=torch.float64)
    curves = ns_function_curve(a)
    _plot_ns(curves, a, out_dir / 'ns_function.png')
    write_csv(out_dir / 'ns_function.csv', [dict(a=float(a[i]), **{k: float(v[i]) for k, v in curves.items()})
                                             for i in range(a.numel())])
    probe = [1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    idx = [int((a.log() - math.log(p)).abs().argmin()) for p in probe]
    md += ['## Newton–Schulz as a function of the eigenvalue', '',
           'Setup: A = diag(a, b, …, b), b = (1 − a)/255, so A is a 256-d covariance already divided by its trace '
           '(what `isqrt` iterates on). Newton–Schulz maps diagonal matrices to diagonal matrices, so output[0, 0] is '
           'the iteration\'s scalar function of a; the plot shows it divided by √a (exact root = 1). A '
           'trace-normalised 256-d covariance has mean eigenvalue 1/256 ≈ 3.9e-3, so most of its spectrum lies '
           'where NS-5 returns well under half the exact root.', '',
           '![NS as a function](ns_function.png)', '',
           markdown_table([dict(a=f'{a[i]:.0e}', **{k: float(v[i]) for k, v in curves.items()}) for i in idx],
                          [('a', 'a')] + [(k, k) for k in curves]), '']
    say('NS curve done')

    # fp32 vs fp64
    prec = eig_precision_counts(grad_covs)
    write_csv(out_dir / 'eig_precision.csv', prec)
    md += ['## float32 against float64 eigendecomposition (paper §3.2)', '',
           'Per-matrix means. "genuine" = float64 eigenvalues above d·ε₆₄·λ_max (the rank the samples give, M − 1 '
           'for M < d); "zeroed" = genuine eigenvalues float32 returns ≤ ε (floored away); "lost" = genuine '
           'eigenvalues float32 gets '
           'wrong by more than 50 %; "null-space > ε" = zero eigenvalues float32 returns above the ε floor (they '
           'survive into the root as noise); "fp32 noise" = the largest |λ| float32 returns outside the genuine '
           'ones, relative '
           'to λ_max (≈ the float32 resolution, where every smaller eigenvalue is indistinguishable from zero).', '',
           markdown_table(prec, [('case', 'case'), ('genuine_rank', 'genuine'), ('fp64_le0', 'fp64 ≤ 0'),
                                 ('fp64_le_eps', 'fp64 ≤ ε'), ('fp32_le0', 'fp32 ≤ 0'), ('fp32_le_eps', 'fp32 ≤ ε'),
                                 ('fp32_zeroed_genuine', 'genuine zeroed by fp32'),
                                 ('fp32_lost_genuine', 'genuine lost by fp32'),
                                 ('fp32_spurious_positive', 'null-space > ε in fp32'),
                                 ('smallest_genuine_rel', 'smallest genuine / λmax'),
                                 ('fp32_noise_rel', 'fp32 noise / λmax'),
                                 ('cond_fp64', 'cond fp64'), ('cond_fp32', 'cond fp32')]), '']
    say('precision done')

    # Table 2
    md += ['## Table 2 (small scale) and the condition-number trend (Table 1)', '']
    if table2_cfg is None or not table2_rows:
        md += ['> **PENDING** — the Table 2 runs were not part of this report run; see `docs/reproduce.md` for the '
               'command.', '']
    else:
        md += _table2_section(table2_cfg, table2_rows, out_dir, table2_command)
    md += [f'_Total report time: {time.perf_counter() - t_start:.0f} s._', '']
    path = out_dir / 'paper_report.md'
    path.write_text('\n'.join(md))
    return path

"""The methods' gradients against the exact one, and Newton–Schulz as a function of one eigenvalue.

- :func:`gradient_comparison`: ∂L/∂Σ of every method for a fixed random upstream gradient G, compared with the exact
  stable gradient (``lyap``) on realistic rank-deficient covariances (the consequence of the paper's Table 7).
- :func:`ns_function_curve`: Newton–Schulz as a function of one eigenvalue (the approximate root is a different,
  smoother function).
"""
import dataclasses
import logging
import math
import statistics
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from ..functional import METHODS, sqrtm

__all__ = ['GradVariant', 'DEFAULT_GRAD_VARIANTS', 'method_gradient', 'gradient_comparison', 'ns_function_curve',
           'relerr_cos', 'RANGE_REL', 'LEAD_FRACTION', 'NS_CURVE_DIM']

_logger = logging.getLogger(__name__)

RANGE_REL = 1e-10  # the range of Σ in gradient_comparison: eigenvalues above RANGE_REL·λ_max
LEAD_FRACTION = 0.05  # the leading block: eigenvalues at least LEAD_FRACTION·tr Σ
NS_CURVE_DIM = 256  # d of the trace-normalised covariance in ns_function_curve


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
        cov: (B, d, d) symmetric PSD, float64 (each method computes in its own precision internally).
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


def relerr_cos(g: torch.Tensor, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ‖g − ref‖/‖ref‖ and cosine similarity of two (B, ...) tensors (flattened per sample)."""
    g, ref = g.flatten(1), ref.flatten(1)
    rel = (g - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)
    cos = (g * ref).sum(1) / (g.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-300)
    return rel, cos


def _block_errors(g: torch.Tensor, ref: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> Tuple[float, float]:
    """Mean over samples of rel. error and cosine of the eigen-block UₘᵀgUₘ (NaN where the block is empty)."""
    rel_b, cos_b = [], []
    for b in range(g.shape[0]):
        ub = u[b][:, mask[b]]
        if ub.shape[1] == 0:
            rel_b.append(math.nan)
            cos_b.append(math.nan)
            continue
        rb, cb = relerr_cos((ub.T @ g[b] @ ub)[None], (ub.T @ ref[b] @ ub)[None])
        rel_b.append(float(rb))
        cos_b.append(float(cb))
    return _nanmean(rel_b), _nanmean(cos_b)


def _variant_row(case: str, v: GradVariant, cov: torch.Tensor, upstream: torch.Tensor, ref: torch.Tensor,
        u: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    t0 = time.perf_counter()
    try:
        g = method_gradient(cov, v.method, upstream, **dict(v.options))
    except Exception as e:  # a method failing on these inputs is itself a result worth reporting
        _logger.warning('gradient of %s failed on %s: %s', v.label, case, e)
        return dict(case=case, method=v.label, error=f'{type(e).__name__}: {e}', note=v.note)
    dt = time.perf_counter() - t0
    rel, cos = relerr_cos(g, ref)
    row: Dict[str, Any] = dict(case=case, method=v.label, rel_err=float(rel.mean()), cos=float(cos.mean()))
    for name, mask in masks.items():
        row[f'rel_err_{name}'], row[f'cos_{name}'] = _block_errors(g, ref, u, mask)
    row['lead_dim'] = float(masks['lead'].sum(-1).double().mean())
    row.update(max_abs_grad=float(g.abs().max()), ref_max_abs_grad=float(ref.abs().max()),
               finite=bool(torch.isfinite(g).all()), seconds=dt, note=v.note)
    return row


def gradient_comparison(
        covs: Mapping[str, torch.Tensor],
        variants: Sequence[GradVariant] = DEFAULT_GRAD_VARIANTS,
        reference: str = 'lyap',
        seed: int = 0,
        lead_fraction: float = LEAD_FRACTION,
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
        (mean size of the leading block), the largest |gradient| (max over the batch), the reference's largest
        |gradient| and the time taken.

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
        masks = dict(range=lam > RANGE_REL * lam[..., -1:], lead=lam >= lead_fraction * lam.sum(-1, keepdim=True))
        for v in variants:
            if v.method not in METHODS:
                _logger.warning('method %s is not registered; skipped', v.method)
                continue
            rows.append(_variant_row(case, v, cov, upstream, ref, u, masks))
            if 'error' not in rows[-1]:
                _logger.info('grad %s / %s: rel %.3g cos %.3g', case, v.label, rows[-1]['rel_err'], rows[-1]['cos'])
    return rows


def ns_function_curve(
        a: torch.Tensor,
        iters: Sequence[int] = (3, 5, 10),
        dim: int = NS_CURVE_DIM,
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
        extra_methods: further registered methods to evaluate the same way.

    Returns:
        label → (n,) float64 ratios; 'exact' is all ones.

    Raises:
        ValueError: a outside (0, 1], dim < 2 or an unregistered extra method.
    """
    a = a.double().flatten()
    if dim < 2:
        raise ValueError(f'dim must be >= 2, got {dim}')
    if not bool(((a > 0) & (a <= 1)).all()):
        raise ValueError('eigenvalues a must lie in (0, 1] (the trace-normalised setting)')
    unknown = [m for m in extra_methods if m not in METHODS]
    if unknown:
        raise ValueError(f'unknown method(s) {unknown}; available: {", ".join(METHODS)}')
    diag = ((1.0 - a) / (dim - 1)).unsqueeze(1).expand(-1, dim).clone()
    diag[:, 0] = a
    mats = torch.diag_embed(diag).float()  # the float32 input isqrt sees in a model
    out = {'exact': torch.ones_like(a)}
    for k in iters:
        out[f'NS {k} it.'] = sqrtm(mats, 'isqrt', iters=k)[:, 0, 0].double() / a.sqrt()
    for m in extra_methods:
        out[m] = sqrtm(mats, m)[:, 0, 0].double() / a.sqrt()
    return out

"""SVD-Padé's K evaluated term by term, as the ICCV 2021 reference code does (opt-in: ``pade`` with ``series=True``).

The reference builds the [50/50] Padé approximant P/Q of 1/(1−x) with mpmath at 20 digits (Taylor coefficients by
``mpmath.taylor``, then ``mpmath.pade``), rounds the coefficients to float64 and sums both polynomials power by power
over every entry of the B×d×d matrix r_ij = min(λ_i, λ_j)/max(λ_i, λ_j): K_ij = ±(1/λ_max)·P(r)/Q(r), + where
λ_i ≥ λ_j (so at a tie in both triangles), 0 on the diagonal. 1/(1−x) is rational, so the approximant equals it up to
the coefficients' rounding (measured 7e-16 relative at r = 0.9, 1e-14 at 0.99, 4e-13 at 0.999), except at exact
ties: there Q(1) sums to 0 in float64 while P(1) ≈ −0.549, so K = −inf in both triangles. The reference then
replaces every −inf by the most negative finite K of the whole batch (+inf by the largest, NaN by the largest),
coupling the samples; we take each sample's own extreme finite K instead, the same rule per sample. The result is
symmetric at ties, so its backward weight is
W_ij = K_ij·√λ_i + K_ji·√λ_j rather than the antisymmetric form.

The default ``pade`` evaluates the same function in closed form, 1/(λ_max − λ_min) (finite ±2⁵³/λ at ties): the two
agree away from ties, and at ties they differ only in the block of equal eigenvalues. For rank-deficient covariances
those are the zero eigenvalues floored at ε, whose eigenvectors are orthogonal to the centred features, so the
gradient into the features is the same; the series costs 100 passes over B×d×d (more than the eigendecomposition on
CPU) and is kept for reproducing the reference's numbers.
"""
import functools
from typing import Tuple

import torch

__all__ = ['reference_pade_coefficients', 'pade_series_kernel', 'pade_series_weight']


@functools.lru_cache(maxsize=None)
def reference_pade_coefficients(m: int = 50, n: int = 50, dps: int = 20) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """[m/n] Padé approximant of 1/(1−x) built as the SVD-Padé reference builds it (numerical Taylor coefficients at
    ``dps`` digits), rounded to float64, lowest order first.

    1/(1−x) is itself rational, so the Padé table is degenerate: with exact Taylor coefficients the linear system is
    singular; the numerically computed coefficients make it solvable and give one of many equivalent pairs
    (p₁..p₃ ≈ 1.05905, 0.20074, −0.23819 at 20 digits). mpmath (a dependency of torch's sympy) is imported lazily.
    """
    import mpmath
    with mpmath.workdps(dps):
        series = mpmath.taylor(lambda x: 1 / (1 - x), 0, m + n)
        p, q = mpmath.pade(series, m, n)
    return tuple(float(c) for c in p), tuple(float(c) for c in q)


def pade_series_kernel(lam: torch.Tensor) -> torch.Tensor:
    """K of the reference's term-by-term [50/50] Padé evaluation, per-sample tie replacement (see the module
    docstring), from descending floored eigenvalues ``lam`` (B, d); (B, d, d) in ``lam``'s dtype."""
    p, q = reference_pade_coefficients()
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    lmax = torch.maximum(li, lj)
    r = torch.minimum(li, lj) / lmax
    off = ~torch.eye(lam.shape[-1], dtype=torch.bool, device=lam.device)
    r = torch.where(off, r, torch.zeros_like(r))
    num, den, power = torch.full_like(r, p[0]), torch.full_like(r, q[0]), torch.ones_like(r)
    for cp, cq in zip(p[1:], q[1:]):
        power = power * r
        num = num.add_(power, alpha=cp)
        den = den.add_(power, alpha=cq)
    sign = torch.where(li >= lj, 1.0, -1.0).to(lam.dtype)
    k = torch.where(off, sign / lmax * (num / den), torch.zeros_like(r))
    finite = torch.isfinite(k)
    kmax = torch.where(finite, k, torch.full_like(k, -torch.inf)).amax((-2, -1), keepdim=True).expand_as(k)
    kmin = torch.where(finite, k, torch.full_like(k, torch.inf)).amin((-2, -1), keepdim=True).expand_as(k)
    k = torch.where(k == torch.inf, kmax, k)
    k = torch.where(k == -torch.inf, kmin, k)
    return torch.where(torch.isnan(k), kmax, k)


def pade_series_weight(lam: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """W_ij = K_ij·√λ_i + K_ji·√λ_j of ``pade_series_kernel`` (K is not antisymmetric at ties)."""
    k = pade_series_kernel(lam)
    return k * sq.unsqueeze(-1) + k.transpose(-1, -2) * sq.unsqueeze(-2)

"""Numerical analysis of the backward kernels: the paper's Table 6 (approximation error to 1/(1−x)) and Table 7
(largest |K_ij| each method allows), computed with the library's own kernels, and what the reference code does at
exact ties.

The reference [50/50] Padé coefficients (``pade_coefficients``) are the library's
``functional.pade_series.reference_pade_coefficients``, built the way the SVD-Padé reference builds them (mpmath at 20
digits); mpmath is imported lazily.
"""
import math
from typing import Any, Dict, List, Sequence

import torch

from ..functional import EPS
from ..functional.eig_sqrt import KERNELS, TIE_GAP
from ..functional.pade_series import reference_pade_coefficients as pade_coefficients
from ..functional.registry import default_top_n

__all__ = [
    'pade_coefficients', 'pade_eval', 'taylor_eval', 'TABLE6_R', 'PAPER_TABLE6', 'table6', 'PAPER_TABLE7', 'table7',
    'spectrum_max_k', 'pade_tie_quotient', 'topn_bounds', 'analysis_tables', 'GAUSSIAN_SAMPLES', 'GAUSSIAN_DIM',
]

# the Gaussian spectra of table7's random<M> columns: M samples of d = GAUSSIAN_DIM channels
GAUSSIAN_SAMPLES = (49, 196)
GAUSSIAN_DIM = 256

TABLE6_R = (0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999)
PAPER_TABLE6 = {
    'taylor': (9e-19, 7e-18, 2e-21, 8e-16, 2e-4, 36, 904),
    'pade': (9e-19, 5e-18, 1e-21, 5e-17, 3e-16, 8e-13, 3e-10),
}
PAPER_TABLE7 = {'pade': 6.00e36, 'taylor': 4.55e17, 'trunc': 1e10, 'topn': 4.50e15, 'svd': math.inf}


def pade_eval(r: torch.Tensor, p: Sequence[float], q: Sequence[float], horner: bool = True) -> torch.Tensor:
    """P(r)/Q(r) on every entry, term by term.

    Args:
        r: ratios in [0, 1].
        p, q: coefficients, lowest order first.
        horner: Horner's rule (True) or the reference's order (False): running powers r^k, each term added to a
            running sum in increasing order. At r = 1 the two orders round differently: in the reference's order
            Q(1) of the 20-digit coefficients sums to exactly 0 in float64.
    """
    if horner:
        num = torch.full_like(r, p[-1])
        den = torch.full_like(r, q[-1])
        for cp, cq in zip(p[-2::-1], q[-2::-1]):
            num = num * r + cp
            den = den * r + cq
        return num / den
    num = torch.full_like(r, p[0])
    den = torch.full_like(r, q[0])
    power = torch.ones_like(r)
    for cp, cq in zip(p[1:], q[1:]):
        power = power * r
        num = num + cp * power
        den = den + cq * power
    return num / den


def taylor_eval(r: torch.Tensor, degree: int = 100) -> torch.Tensor:
    """Σ_{k=0}^{degree} r^k by Horner's rule."""
    out = torch.ones_like(r)
    for _ in range(degree):
        out = out * r + 1.0
    return out


def _kernel_series(kernel: str, r: torch.Tensor, **opts: Any) -> torch.Tensor:
    """λ_max·K_01 of ``kernel`` for the spectrum (1, r): the kernel's approximation of 1/(1−r)."""
    lam = torch.stack([torch.ones_like(r), r], dim=-1)
    return KERNELS[kernel](lam, **opts)[..., 0, 1]


def table6(rs: Sequence[float] = TABLE6_R, degree: int = 100) -> Dict[str, List[float]]:
    """Absolute error to 1/(1−r) (float64) of: the library's ``taylor`` kernel at ``degree``, the same series summed
    term by term, the library's ``pade`` kernel, and the reference [50/50] coefficients evaluated term by term.

    The exact value 1/(1−r) is taken in 40-digit arithmetic, so the float64 rounding of the approximations shows.
    """
    import mpmath
    r = torch.tensor(rs, dtype=torch.float64)
    with mpmath.workdps(40):
        exact = [1 / (1 - mpmath.mpf(float(x))) for x in r.tolist()]

    def err(vals: torch.Tensor) -> List[float]:
        with mpmath.workdps(40):
            return [float(abs(mpmath.mpf(v) - e)) for v, e in zip(vals.tolist(), exact)]

    p, q = pade_coefficients()
    return {
        'taylor': err(_kernel_series('taylor', r, degree=degree)),
        'taylor_termwise': err(taylor_eval(r, degree)),
        'pade': err(_kernel_series('pade', r)),
        'pade_reference': err(pade_eval(r, p, q)),
    }


def spectrum_max_k(lam: torch.Tensor, method: str, **opts: Any) -> float:
    """Largest |K_ij| the method's kernel produces on the (already floored, descending) spectra ``lam`` (B, d)."""
    if method == 'topn':
        top_n = opts.pop('top_n', None)
        n = default_top_n(lam.shape[-1]) if top_n is None else top_n
        lam = torch.cat([lam[..., :n], lam.new_full(lam[..., n:].shape, EPS)], dim=-1)
        method = 'svd'
    kernel = {'svd': 'exact'}.get(method, method)
    return float(KERNELS[kernel](lam, **opts).abs().max())


def _gaussian_spectra(eps: float = EPS, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Floored, descending covariance spectra of 49 and 196 Gaussian samples at d = 256 (one each)."""
    gen = torch.Generator().manual_seed(seed)
    spectra = {}
    for m in GAUSSIAN_SAMPLES:
        x = torch.randn(1, GAUSSIAN_DIM, m, generator=gen, dtype=torch.float64)
        xc = x - x.mean(-1, keepdim=True)
        spectra[f'random{m}'] = torch.linalg.eigvalsh(xc @ xc.transpose(1, 2) / m).flip(-1).clamp_min(eps)
    return spectra


def table7(eps: float = EPS) -> Dict[str, Dict[str, float]]:
    """Largest |K_ij| each kernel allows, on floored float64 spectra.

    ``worst``: over the pairs that the floor makes possible: an exact tie at ε, the nearest distinct pair
    (ε·(1+2⁻⁵²), ε), and the nearest pair at the top (1, 1 − 2⁻⁵³). ``tie``: at an exact tie λ_i = λ_j = ε.
    ``random49``/``random196``: on the covariance spectra of 49 and 196 Gaussian samples at d = 256 (seed 0).
    """
    top = 1.0
    worst = torch.tensor([[top, top - TIE_GAP, 2 * eps, eps * (1 + 2.0 ** -52), eps, eps]], dtype=torch.float64)
    tie = torch.tensor([[1.0, eps, eps]], dtype=torch.float64)
    spectra = _gaussian_spectra(eps)
    out = {}
    for method, opts in (('svd', {}), ('pade', {}), ('taylor', {'degree': 100}), ('trunc', {'threshold': 1e10}),
            ('topn', {}), ('pi', {'iters': 20})):
        row = {
            'worst': spectrum_max_k(worst, method, **({**opts, 'top_n': 4} if method == 'topn' else opts)),
            'tie': spectrum_max_k(tie, method, **({**opts, 'top_n': 3} if method == 'topn' else opts)),
        }
        for name, lam in spectra.items():
            row[name] = spectrum_max_k(lam, method, **dict(opts))
        out[method] = row
    return out


def topn_bounds(eps: float = EPS) -> List[Dict[str, Any]]:
    """Largest |K_ij| of SVD-TopN on the Gaussian spectra of :func:`table7` for N = the library default and N = the
    rank (M − 1), beside 1/ε.

    With N above the rank, TopN keeps round-off eigenvalues of the null space, whose near-ties make K as large as
    the exact K of ``svd``; with N at most the rank every kept eigenvalue is a genuine one and K is bounded by the
    smallest genuine gap and by 1/(λ_N − ε).
    """
    rows = []
    for name, lam in _gaussian_spectra(eps).items():
        m = int(name.removeprefix('random'))
        for label, n in (('default', default_top_n(lam.shape[-1])), ('rank', m - 1)):
            rows.append(dict(spectrum=name, N=n, which=label, max_k=spectrum_max_k(lam, 'topn', top_n=n),
                             lambda_n=float(lam[0, n - 1]), one_over_eps=1.0 / eps))
    return rows


def pade_tie_quotient(m: int = 50, n: int = 50, dps: int = 20, eps: float = EPS) -> Dict[str, Any]:
    """What the reference [m/n] Padé kernel gives at an exact tie (r = 1).

    Returns:
        ``mp_quotient``: P(1)/Q(1) with the reference's coefficients, each polynomial summed term by term in
        ``dps``-digit arithmetic (the precision the reference builds them in); ``mp_over_eps``: its magnitude divided
        by ε, the largest |K| at a tie λ_i = λ_j = ε (the paper's Table 7 entry is this quantity);
        ``exact_over_eps``: the same with the coefficients summed exactly (Q(1) is a cancellation to ~1e-22, so the
        rounding of the running sum decides its value); ``float64_p``/``float64_q``: P(1) and Q(1) of the
        float64-rounded coefficients summed in the reference's order in float64 (Q(1) rounds to 0, so the reference
        gets an infinite K there and replaces it).
    """
    import mpmath
    with mpmath.workdps(dps):
        series = mpmath.taylor(lambda x: 1 / (1 - x), 0, m + n)
        p, q = mpmath.pade(series, m, n)
        num, den = mpmath.mpf(0), mpmath.mpf(0)
        for cp, cq in zip(p, q):
            num, den = num + cp, den + cq
        quotient = num / den
        exact = mpmath.fsum(p) / mpmath.fsum(q)
    pf, qf = pade_coefficients(m, n, dps)
    one = torch.ones(1, dtype=torch.float64)
    p64 = torch.full_like(one, pf[0])
    q64 = torch.full_like(one, qf[0])
    for cp, cq in zip(pf[1:], qf[1:]):
        p64, q64 = p64 + cp * one, q64 + cq * one
    return dict(mp_quotient=float(quotient), mp_over_eps=abs(float(quotient)) / eps,
                exact_over_eps=abs(float(exact)) / eps, float64_p=float(p64), float64_q=float(q64),
                mpmath_version=mpmath.__version__, dps=dps)


def analysis_tables() -> Dict[str, List[Dict[str, Any]]]:
    """Tables 6 and 7 as rows beside the paper's numbers, with the TopN bounds and the Padé tie quotient.

    Returns:
        {'table6': one row per r, 'table7': one row per method, 'topn': :func:`topn_bounds`,
        'pade_tie': [:func:`pade_tie_quotient`]}.
    """
    t6 = table6()
    rows6 = []
    for i, r in enumerate(TABLE6_R):
        row: Dict[str, Any] = dict(r=r)
        row.update({k: v[i] for k, v in t6.items()})
        row.update({f'paper_{k}': v[i] for k, v in PAPER_TABLE6.items()})
        rows6.append(row)
    rows7 = [dict(method=m, **vals, paper=PAPER_TABLE7.get(m)) for m, vals in table7().items()]
    return dict(table6=rows6, table7=rows7, topn=topn_bounds(), pade_tie=[pade_tie_quotient()])

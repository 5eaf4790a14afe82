"""Matrix Padé approximant of the square root with the Lyapunov-iteration backward.

Song, Sebe, Wang, "Fast Differentiable Matrix Square Root", ICLR 2022 (arXiv 2201.08663).

Forward (MPA): n = ‖Σ‖_F, A = Σ/n (spectrum in [0, 1]), X = I − A, and √(1 − x) ≈ P_M(x)/Q_N(x) its [M/N] Padé
approximant, so Σ^½ ≈ √n·Q_N(X)⁻¹·P_M(X). Both are polynomials in the symmetric A and commute. The denominator
Q_N(x) of the Padé approximant of √(1−x) has its zeros on the branch cut x > 1 and is positive on [0, 1]
(``pade_sqrt_coefficients`` checks this when it builds the coefficients), so Q_N(X) is symmetric positive definite and
we solve with a Cholesky factorisation: valid for these systems, faster than LU, and immune to a defect seen with
MKL, whose batched LU (``linalg.solve``/``inv``) returned garbage for n ≥ 256 with batch ≥ 2 after
``torch.set_num_threads(2)``. ONNX has neither a Cholesky factorisation nor a linear solve: while ``torch.onnx.export``
traces the forward, Q_N(X)⁻¹ comes from a Newton–Schulz iteration (matmuls only), started from the interval Q_N takes
on [0, 1], with enough steps for float64 rounding.

Backward: the gradient of the exact root, ∂L/∂Σ = X with Q·X + X·Q = sym(G), solved by the coupled Newton–Schulz
iteration for the matrix sign function of the block matrix [[Q̂, −C], [0, −Q̂]] with Q̂ = Q/√n (spectrum in [0, 1]):
sign = [[I, −2X̂], [0, −I]]. Writing B_k, E_k for the blocks (E₀ = C, E_k → 2X̂):
B' = ½·B(3I − B²), E' = ½(3E − B²E − EB² + BEB); E stays symmetric, so EB² = (B²E)ᵀ and one step is 5 matmuls.
Because the backward is the exact root's gradient evaluated at the Padé root, it agrees with finite differences of
the MPA forward up to the Padé error and the iteration's convergence (both tiny on well-conditioned spectra).

Zero matrix: output 0 and gradient 0 (as ``isqrt`` at zero trace).
"""
import functools
import math
from typing import Tuple

import torch

from .checks import as_float_dtype, no_autocast

__all__ = ['mpa_sqrtm', 'pade_sqrt_coefficients', 'lyap_sign_solve']


@functools.lru_cache(maxsize=None)
def pade_sqrt_coefficients(m: int = 5, n: int = 5) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """[m/n] Padé approximant of √(1 − x) from its Taylor series (coefficients lowest order first, q₀ = 1).

    Built with mpmath at 40 digits (imported lazily; it ships with torch's sympy dependency) and rounded to float64.

    Raises:
        ValueError: if m, n < 1, or the denominator is not positive on [0, 1] (then Q_N(X) would not be SPD).
    """
    if m < 1 or n < 1:
        raise ValueError(f'mpa: Padé degrees must be >= 1, got [{m}/{n}]')
    import mpmath
    with mpmath.workdps(40):
        taylor = [mpmath.binomial(mpmath.mpf(1) / 2, k) * (-1) ** k for k in range(m + n + 1)]
        p, q = mpmath.pade(taylor, m, n)
        grid = [mpmath.mpf(i) / 1000 for i in range(1001)]
        if min(mpmath.polyval(q[::-1], x) for x in grid) <= 0:
            raise ValueError(f'mpa: the [{m}/{n}] Padé denominator of sqrt(1-x) is not positive on [0, 1]')
        return tuple(float(c) for c in p), tuple(float(c) for c in q)


def _poly(powers, coeffs, eye):
    out = eye * coeffs[0]
    for c, xk in zip(coeffs[1:], powers):
        out = out + c * xk
    return out


def lyap_sign_solve(b: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Solve B·X + X·B = C for symmetric B (spectrum in (0, √3)) and symmetric C by ``iters`` sign-iteration steps.

    Returns:
        X (B, d, d); exact in the limit for positive-definite B, finite (growth ≤ 1.5^iters) for singular B.
    """
    d = b.shape[-1]
    eye15 = torch.eye(d, dtype=b.dtype, device=b.device).mul_(1.5)
    e = c
    for i in range(iters):
        b2 = torch.bmm(b, b)
        b2e = torch.bmm(b2, e)
        beb = torch.bmm(b, torch.bmm(e, b))
        e = 1.5 * e - 0.5 * (b2e + b2e.transpose(-1, -2)) + 0.5 * beb
        if i < iters - 1:
            b = torch.bmm(b, eye15 - 0.5 * b2)
    return 0.5 * e


def _cholesky_solve(den: torch.Tensor, num: torch.Tensor, degree: int, dtype: torch.dtype,
        device: torch.device) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(den)
    failed = info != 0
    if device.type == 'cpu' and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
        # free on CPU; on an accelerator this would be a second device sync, so there the failed samples
        # become NaN instead (per sample, nothing batch-wide)
        if bool(failed.any()):
            bad = torch.nonzero(failed).flatten().tolist()
            raise ValueError(f'mpa: the [{degree}/{degree}] Padé denominator is not positive definite in {dtype} '
                f'for samples {bad[:10]}: the input is not symmetric positive semi-definite (sqrtm with '
                f'check=True names what is wrong with it)')
    y = torch.cholesky_solve(num, chol)
    if device.type not in ('cpu', 'meta'):
        y = torch.where(failed.view(-1, 1, 1), torch.full_like(y, float('nan')), y)
    return y


@functools.lru_cache(maxsize=None)
def _denominator_range(degree: int) -> Tuple[float, float]:
    """Smallest and largest value of the [degree/degree] Padé denominator Q_N(x) of √(1−x) on [0, 1] (a grid of
    10,001 points: Q_N is a smooth low-degree polynomial there)."""
    _, q = pade_sqrt_coefficients(degree, degree)
    values = [sum(c * (i / 10000) ** k for k, c in enumerate(q)) for i in range(10001)]
    return min(values), max(values)


def _spd_inverse_ns(m: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """M⁻¹ for symmetric M with spectrum in [lo, hi] (0 < lo) by the Newton–Schulz iteration Z ← Z(2I − M·Z).

    With Z₀ = 2I/(lo + hi) the error E = I − M·Z starts at ‖E₀‖ ≤ ρ = (hi − lo)/(hi + lo) and squares each step, so
    ⌈log₂(ln 2⁻⁵³ / ln ρ)⌉ + 1 steps reach float64 rounding. Matmuls only: the ONNX form of the Padé denominator solve
    (ONNX has no Cholesky factorisation or linear solve).
    """
    rho = (hi - lo) / (hi + lo)
    steps = 1 if rho <= 0 else math.ceil(math.log2(math.log(2.0 ** -53) / math.log(rho))) + 1
    eye2 = 2.0 * torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    z = (eye2 / (lo + hi)).expand_as(m)
    for _ in range(steps):
        z = torch.bmm(z, eye2 - torch.bmm(m, z))
    return z


class _MPASqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cov: torch.Tensor, degree: int, lyap_iters: int, dtype: torch.dtype) -> torch.Tensor:
        p, q = pade_sqrt_coefficients(degree, degree)
        a = cov.to(dtype)
        d = a.shape[-1]
        # ‖Σ‖_F of the entries scaled by their maximum: the plain sum of squares overflows float32 from entries of
        # about 1e19/d on, though Σ and its root are representable
        peak = a.abs().amax((-2, -1))
        norm = torch.linalg.matrix_norm(a / torch.where(peak > 0, peak, torch.ones_like(peak)).view(-1, 1, 1)) * peak
        pos = norm > 0
        norm_safe = torch.where(pos, norm, torch.ones_like(norm)).view(-1, 1, 1)
        root_norm = torch.where(pos, norm, torch.zeros_like(norm)).sqrt().view(-1, 1, 1)
        eye = torch.eye(d, dtype=dtype, device=a.device)
        x = eye - a / norm_safe
        powers = [x]
        for _ in range(degree - 1):
            powers.append(torch.bmm(powers[-1], x))
        num = _poly(powers, p, eye)
        den = _poly(powers, q, eye)
        if torch.onnx.is_in_onnx_export():
            y = torch.bmm(_spd_inverse_ns(den, *_denominator_range(degree)), num)
        else:
            y = _cholesky_solve(den, num, degree, dtype, a.device)
        y = 0.5 * (y + y.transpose(-1, -2))  # Q_N⁻¹P_M is symmetric in exact arithmetic (they commute)
        ctx.save_for_backward(y, root_norm)
        ctx.lyap_iters, ctx.out_dtype = lyap_iters, cov.dtype
        return (y * root_norm).to(cov.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, root_norm = ctx.saved_tensors
        g = grad.to(y.dtype)
        c = 0.5 * (g + g.transpose(-1, -2))
        # backward() called inside an autocast region would otherwise run these matmuls in half precision
        with no_autocast(grad.device):
            xhat = lyap_sign_solve(y, c, ctx.lyap_iters)
        # Q = √n·Q̂: Q·X + X·Q = C ⇔ Q̂·(√n X) + (√n X)·Q̂ = C
        scale = torch.where(root_norm > 0, 1.0 / torch.where(root_norm > 0, root_norm, torch.ones_like(root_norm)),
            torch.zeros_like(root_norm))
        return (xhat * scale).to(ctx.out_dtype), None, None, None


def mpa_sqrtm(cov: torch.Tensor, degree: int = 5, lyap_iters: int = 8,
        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ^½ ≈ √‖Σ‖_F·Q_N(I − A)⁻¹P_M(I − A), A = Σ/‖Σ‖_F, [degree/degree] Padé of √(1−x) (MPA, ICLR 2022).

    Args:
        cov: (B, d, d) symmetric PSD, any floating dtype.
        degree: Padé degree M = N (5 in the paper).
        lyap_iters: sign-iteration steps of the Lyapunov backward (8 in the paper).
        dtype: compute precision (float32 by default; float64 for gradcheck).

    Returns:
        (B, d, d) in the dtype of ``cov``; 0 for the zero matrix.
    """
    dtype = as_float_dtype(dtype, 'mpa')
    if degree < 1 or lyap_iters < 1:
        raise ValueError(f'mpa: degree and lyap_iters must be >= 1, got {degree} and {lyap_iters}')
    with no_autocast(cov.device):
        return _MPASqrt.apply(cov, degree, lyap_iters, dtype)

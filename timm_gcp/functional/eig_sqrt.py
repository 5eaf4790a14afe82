"""Eigendecomposition-based matrix square root with interchangeable backward kernels.

Forward (shared by every eigen-method): Σ → float64, eigh, eigenvalues floored at ε, sorted descending,
Q = U·diag(λ^½)·Uᵀ. Backward: the matrix-backprop rule of Ionescu et al. (ICCV 2015, arXiv 1509.07838) with a
method-specific K matrix (SPEC §2):

    ∂L/∂U = (G + Gᵀ)·U·Λ^½,  ∂L/∂λ = ½·λ^−½ ⊙ diag(UᵀGU),
    ∂L/∂Σ = sym( U·[Kᵀ ∘ (Uᵀ·∂L/∂U) + diag(∂L/∂λ)]·Uᵀ ).

With S = Uᵀ·sym(G)·U the bracket, symmetrised, is S ∘ W with the symmetric weight

    W_ij = K_ij·√λ_i + K_ji·√λ_j  (i ≠ j),   W_ii = 1/(2√λ_i),

which for an antisymmetric K is W_ij = K_ij·(√λ_i − √λ_j). The backward therefore costs four batched matmuls
(S and U·(S∘W)·Uᵀ) plus elementwise work, and a finite K at an exact tie (λ_i == λ_j) contributes exactly zero.
Computing W directly also avoids the cancellation of two huge terms that the literal formula suffers at near-ties.

Kernels are plain functions ``kernel(lam, **opts) -> K`` of the floored, descending eigenvalues (B, d); a method
that is one K is one function and one entry in ``KERNELS``. ``WEIGHTS`` holds the methods whose backward is given
directly as W (``lyap``, and ``pi`` whose K is not antisymmetric).
"""
import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .newton_schulz import ns_vjp

__all__ = [
    'EPS', 'TIE_GAP', 'eig_sqrtm', 'eig_forward', 'exact_kernel', 'pade_kernel', 'taylor_kernel', 'trunc_kernel',
    'pi_kernel', 'lyap_weight', 'pi_weight', 'kernel_weight', 'KERNELS', 'WEIGHTS',
]

_logger = logging.getLogger(__name__)

EPS = 2.220446049250313e-16  # float64 machine epsilon: the eigenvalue floor of the reference implementations
TIE_GAP = 2.0 ** -53  # 1 − (largest float64 below 1): the smallest non-zero 1 − r, used for r == 1 (exact ties)


def _pairs(lam: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(λ_max, r = λ_min/λ_max, sign) for every pair; sign = +1 above the diagonal, −1 below, 0 on it."""
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    lmax = torch.maximum(li, lj)
    r = torch.minimum(li, lj) / lmax
    d = lam.shape[-1]
    ones = torch.ones(d, d, dtype=lam.dtype, device=lam.device)
    sign = ones.triu(1) - ones.tril(-1)
    return lmax, r, sign


def exact_kernel(lam: torch.Tensor) -> torch.Tensor:
    """``svd``: K_ij = 1/(λ_i − λ_j) off the diagonal; 0 on the diagonal and at exact ties (λ_i == λ_j)."""
    diff = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    tie = diff == 0
    return torch.where(tie, torch.zeros_like(diff), 1.0 / torch.where(tie, torch.ones_like(diff), diff))


def pade_kernel(lam: torch.Tensor) -> torch.Tensor:
    """``pade``: K_ij = ±(1/λ_max)·R(r), R the [50/50] Padé approximant of 1/(1−r), evaluated in closed form.

    1/(1−x) is rational, so its [M/N] Padé approximants (M, N ≥ 1) equal it up to the rounding of their coefficients
    (≤ 1e-9 relative for r ≤ 0.999 with the reference's coefficients, see ``analysis.pade_coefficients``); we
    evaluate 1/(1−r) directly instead of a degree-50 polynomial pair over every entry. Sign: + for i < j (λ_i ≥ λ_j),
    − for i > j. At an exact tie (r == 1) we use the value at the largest float64 r below 1, 1 − r = 2⁻⁵³:
    |K| = 2⁵³/λ, at most 2⁵³/ε ≈ 4.06e31, per sample and finite (the reference gives ±inf and then substitutes
    the batch maximum).
    """
    lmax, r, sign = _pairs(lam)
    return sign / (lmax * (1.0 - r).clamp_min(TIE_GAP))


def _geometric(r: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_{k<n} r^k = (1 − rⁿ)/(1 − r) for r ∈ (0, 1], n at r == 1.

    1 − rⁿ = −expm1(n·log1p(r − 1)); r − 1 is exact for r ≥ ½ (Sterbenz), so no cancellation near r = 1.
    """
    if n <= 0:
        return torch.zeros_like(r)
    one_minus = 1.0 - r
    tie = one_minus == 0
    num = -torch.expm1(n * torch.log1p(-one_minus))
    return torch.where(tie, torch.full_like(r, float(n)), num / torch.where(tie, torch.ones_like(r), one_minus))


def taylor_kernel(lam: torch.Tensor, degree: int = 100) -> torch.Tensor:
    """``taylor``: K_ij = ±(1/λ_max)·Σ_{k=0}^{degree} r^k, in closed form; ±(degree+1)/λ at exact ties."""
    lmax, r, sign = _pairs(lam)
    return sign * _geometric(r, degree + 1) / lmax


def trunc_kernel(lam: torch.Tensor, threshold: float = 1e10) -> torch.Tensor:
    """``trunc``: exact K clipped to [−T, T]; ±T at exact ties (+ above the diagonal), 0 on the diagonal."""
    diff = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    tie = diff == 0
    d = lam.shape[-1]
    ones = torch.ones(d, d, dtype=lam.dtype, device=lam.device)
    sign = ones.triu(1) - ones.tril(-1)
    k = (1.0 / torch.where(tie, torch.ones_like(diff), diff)).clamp(-threshold, threshold)
    return torch.where(tie, sign * threshold, k)


def pi_kernel(lam: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """``pi``: the K that T power-iteration steps with deflation (Wang et al., arXiv 1906.09023) give.

    Differentiating T steps v ← M_k v/‖M_k v‖ started at the exact eigenvector v_k of the deflated matrix
    M_k = M − Σ_{j<k} λ_j v_j v_jᵀ gives, with g_n(r) = Σ_{t<n} r^t and r = λ_min/λ_max:
    K_ij = +g_T(r)/λ_max for i < j and K_ij = −g_{T−1}(r)/λ_max for i > j (the larger eigenvector's direction is
    deflated away after one step, and the deflation term feeds back the earlier vector's own truncated series).
    T → ∞ gives the exact K. Not antisymmetric; at exact ties |K| = T/λ.
    """
    lmax, r, sign = _pairs(lam)
    upper = _geometric(r, iters) / lmax
    lower = _geometric(r, iters - 1) / lmax
    return torch.where(sign > 0, upper, torch.where(sign < 0, -lower, torch.zeros_like(upper)))


def lyap_weight(lam: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``lyap``: W_ij = 1/(√λ_i + √λ_j), the exact Daleckii–Krein weight of the square root, no cancellation."""
    return 1.0 / (sq.unsqueeze(-1) + sq.unsqueeze(-2))


def pi_weight(lam: torch.Tensor, sq: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """``pi``: W_ij = (g_T(r)·√λ_max − g_{T−1}(r)·√λ_min)/λ_max from ``pi_kernel`` (symmetric by construction)."""
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    lmax = torch.maximum(li, lj)
    r = torch.minimum(li, lj) / lmax
    smax = torch.maximum(sq.unsqueeze(-1), sq.unsqueeze(-2))
    smin = torch.minimum(sq.unsqueeze(-1), sq.unsqueeze(-2))
    return (_geometric(r, iters) * smax - _geometric(r, iters - 1) * smin) / lmax


KERNELS: Dict[str, Callable[..., torch.Tensor]] = {
    'exact': exact_kernel,
    'pade': pade_kernel,
    'taylor': taylor_kernel,
    'trunc': trunc_kernel,
    'pi': pi_kernel,
}
# Backward weights given directly (diagonal is overwritten with 1/(2√λ) afterwards).
WEIGHTS: Dict[str, Callable[..., torch.Tensor]] = {
    'lyap': lyap_weight,
    'pi': pi_weight,
}


def kernel_weight(kernel: str, lam: torch.Tensor, sq: torch.Tensor, **opts: Any) -> torch.Tensor:
    """The symmetric backward weight W (B, d, d) of ``kernel`` (see the module docstring), diagonal 1/(2√λ_i)."""
    if kernel in WEIGHTS:
        w = WEIGHTS[kernel](lam, sq, **opts)
    else:
        # every K in KERNELS without a WEIGHTS entry is antisymmetric: W_ij = K_ij·(√λ_i − √λ_j)
        w = KERNELS[kernel](lam, **opts)
        w.mul_(sq.unsqueeze(-1) - sq.unsqueeze(-2))
    w.diagonal(dim1=-2, dim2=-1).copy_(0.5 / sq)
    return w


def eig_forward(cov: torch.Tensor, eps: float = EPS, top_n: Optional[int] = None,
        eig_device: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 eigendecomposition with the floor and ordering the kernels expect.

    Args:
        cov: (B, d, d) symmetric (the lower triangle is read).
        eps: eigenvalue floor.
        top_n: keep the ``top_n`` largest eigenvalues and set the rest to ``eps`` (SVD-TopN).
        eig_device: run eigh there (e.g. 'cpu' for a CUDA input); the results come back to ``cov.device``.

    Returns:
        ``(q, u, lam)``: float64 Q = U·diag(√λ)·Uᵀ (B, d, d), eigenvectors U (B, d, d) and floored eigenvalues λ (B, d),
        in descending order, all on ``cov.device``.
    """
    a = cov.to(dtype=torch.float64)
    if eig_device is not None:
        # explicit, opt-in round trip (e.g. CPU LAPACK for a CUDA input); a no-op when the devices agree
        lam, u = torch.linalg.eigh(a.to(eig_device))
        lam, u = lam.to(cov.device), u.to(cov.device)
    else:
        lam, u = torch.linalg.eigh(a)
    lam, u = lam.flip(-1), u.flip(-1)  # descending, as the K kernels expect
    lam = lam.clamp_min(eps)
    if top_n is not None and top_n < lam.shape[-1]:
        lam = torch.cat([lam[..., :top_n], lam.new_full(lam[..., top_n:].shape, eps)], dim=-1)
    q = torch.matmul(u * lam.sqrt().unsqueeze(-2), u.transpose(-1, -2))
    return q, u, lam


class _EigSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cov: torch.Tensor, kernel: str, kernel_opts: Dict[str, Any], eps: float,
            top_n: Optional[int], eig_device: Optional[str], ns_iters: Optional[int]) -> torch.Tensor:
        q, u, lam = eig_forward(cov, eps=eps, top_n=top_n, eig_device=eig_device)
        if ns_iters is not None:
            # newton: the backward differentiates the Newton–Schulz map at Σ itself, not at the floored spectrum
            ctx.save_for_backward(cov.to(torch.float64))
        else:
            ctx.save_for_backward(u, lam)
        ctx.kernel, ctx.kernel_opts, ctx.ns_iters = kernel, kernel_opts, ns_iters
        ctx.out_dtype = cov.dtype
        return q.to(cov.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g = grad.to(torch.float64)
        if ctx.ns_iters is not None:
            cov, = ctx.saved_tensors
            out = ns_vjp(cov, g, iters=ctx.ns_iters, dtype=torch.float64)
        else:
            u, lam = ctx.saved_tensors
            sq = lam.sqrt()
            ut = u.transpose(-1, -2)
            s = ut @ (g + g.transpose(-1, -2)) @ u  # 2·S
            w = kernel_weight(ctx.kernel, lam, sq, **ctx.kernel_opts)
            w.mul_(s).mul_(0.5)
            out = u @ w @ ut
        return out.to(ctx.out_dtype), None, None, None, None, None, None


def eig_sqrtm(cov: torch.Tensor, kernel: str = 'exact', eps: float = EPS, top_n: Optional[int] = None,
        eig_device: Optional[str] = None, ns_iters: Optional[int] = None, **kernel_opts: Any) -> torch.Tensor:
    """Square root of (B, d, d) symmetric PSD matrices by float64 eigh with a chosen backward.

    Args:
        cov: (B, d, d) symmetric PSD, any floating dtype.
        kernel: name in ``KERNELS`` or ``WEIGHTS`` that defines the backward.
        eps: eigenvalue floor.
        top_n: keep the largest ``top_n`` eigenvalues, set the rest to ``eps`` (SVD-TopN).
        eig_device: run the eigendecomposition on this device (e.g. 'cpu' for a CUDA input).
        ns_iters: when set, the backward is the gradient of √trΣ·NS_{ns_iters}(Σ/trΣ) at Σ (SVD-Newton) instead of a
            kernel.
        **kernel_opts: options of the kernel (``degree``, ``threshold``, ``iters``).

    Returns:
        (B, d, d) Σ^½ (computed in float64) in the dtype and on the device of ``cov``.
    """
    if kernel not in KERNELS and kernel not in WEIGHTS:
        raise ValueError(f'unknown kernel {kernel!r}; valid kernels: {", ".join(sorted({*KERNELS, *WEIGHTS}))}')
    if top_n is not None and not 1 <= top_n <= cov.shape[-1]:
        raise ValueError(f'top_n must be in [1, d={cov.shape[-1]}], got {top_n}')
    return _EigSqrt.apply(cov, kernel, kernel_opts, eps, top_n, eig_device, ns_iters)

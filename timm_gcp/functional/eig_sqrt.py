"""Eigendecomposition-based matrix square root with interchangeable backward kernels.

Forward (shared by every eigen-method): Σ in the method's precision (float64 unless the ``dtype`` option lowers it),
eigh, eigenvalues floored at ε, sorted descending, Q = U·diag(λ^½)·Uᵀ. Backward: the matrix-backprop rule of Ionescu
et al. (ICCV 2015, arXiv 1509.07838) with a method-specific K matrix:

    ∂L/∂U = (G + Gᵀ)·U·Λ^½,  ∂L/∂λ = ½·λ^−½ ⊙ diag(UᵀGU),
    ∂L/∂Σ = sym( U·[Kᵀ ∘ (Uᵀ·∂L/∂U) + diag(∂L/∂λ)]·Uᵀ ).

With S = Uᵀ·sym(G)·U the bracket, symmetrised, is S ∘ W with the symmetric weight

    W_ij = K_ij·√λ_i + K_ji·√λ_j  (i ≠ j),   W_ii = 1/(2√λ_i),

which for an antisymmetric K is W_ij = K_ij·(√λ_i − √λ_j). The backward therefore costs four batched matmuls
(S and U·(S∘W)·Uᵀ) plus elementwise work, and a finite K at an exact tie (λ_i == λ_j) contributes exactly zero.
Computing W directly also avoids the cancellation of two huge terms that the literal formula suffers at near-ties.

Kernels are plain functions ``kernel(lam, **opts) -> K`` of the floored, descending eigenvalues (B, d); a method
that is one K is one function and one entry in ``KERNELS`` (Table 7 and the tests read them). ``WEIGHTS`` holds W
directly: for ``lyap`` (no K), for ``pi`` (K not antisymmetric) and, with fewer passes over B×d×d than K·(√λ_i − √λ_j),
for ``exact``, ``pade``, ``taylor`` and ``trunc`` (tested equal to the literal formula with their K).

``newton`` shares the forward but differentiates the Newton–Schulz map instead (``newton_backward``).
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .pade_series import pade_series_kernel, pade_series_weight

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
    evaluate (1/λ_max)/(1−r) = 1/(λ_max − λ_min) directly instead of a degree-50 polynomial pair over every entry
    (one subtraction: 1 − r for r ≥ ½ and λ_max − λ_min are both exact, Sterbenz). Sign: + for i < j (λ_i ≥ λ_j),
    − for i > j. At an exact tie (r == 1) we use the value at the largest float64 r below 1, 1 − r = 2⁻⁵³:
    |K| = 2⁵³/λ, at most 2⁵³/ε ≈ 4.06e31, per sample, finite and antisymmetric, so it adds nothing to the backward
    (the reference's term-by-term evaluation gives −inf in both triangles and substitutes the batch minimum;
    ``series=True`` of the ``pade`` method reproduces that evaluation, per sample: see ``pade_series``).
    """
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    d = lam.shape[-1]
    ones = torch.ones(d, d, dtype=lam.dtype, device=lam.device)
    return (ones.triu(1) - ones.tril(-1)) / _pade_den(li, lj)


def _pade_den(li: torch.Tensor, lj: torch.Tensor) -> torch.Tensor:
    # λ_max·max(1 − r, 2⁻⁵³) written as max(λ_max − λ_min, 2⁻⁵³·λ_max): a distinct pair differs by at least one ulp of
    # λ_max ≥ 2⁻⁵³·λ_max, so the maximum picks the tie value only at exact ties
    den = (li - lj).abs_()
    return torch.maximum(den, torch.maximum(li, lj).mul_(TIE_GAP), out=den)


def _geometric(r: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_{k<n} r^k = (1 − rⁿ)/(1 − r) for r ∈ (0, 1], n at r == 1.

    1 − rⁿ = −expm1(n·log1p(r − 1)); r − 1 is exact for r ≥ ½ (Sterbenz), so no cancellation near r = 1. At r == 1
    the quotient is 0/0, replaced by its limit n.
    """
    if n <= 0:
        return torch.zeros_like(r)
    one_minus = torch.rsub(r, 1.0)
    out = torch.log1p(-one_minus).mul_(n).expm1_().neg_()
    return out.div_(one_minus).nan_to_num_(nan=float(n))


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
    return torch.where(tie, torch.where(sign == 0, 0.0, sign * threshold), k)  # sign·T alone: 0·inf on the diagonal


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


def _exact_weight(lam: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    # K_ij·(√λ_i − √λ_j) with K = 1/(λ_i − λ_j) as one division; an exact tie gives 0/0, which the svd tie rule
    # (K = 0) turns into 0. λ ≥ ε > 0 is finite, so NaN arises only there.
    w = (sq.unsqueeze(-1) - sq.unsqueeze(-2)).div_(lam.unsqueeze(-1) - lam.unsqueeze(-2))
    return w.nan_to_num_(nan=0.0)


def _pade_weight(lam: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    # K_ij·(√λ_i − √λ_j) = |√λ_i − √λ_j|·|K_ij|: sign(j − i)·(√λ_i − √λ_j) ≥ 0 for descending λ
    return (sq.unsqueeze(-1) - sq.unsqueeze(-2)).abs_().div_(_pade_den(lam.unsqueeze(-1), lam.unsqueeze(-2)))


def _taylor_weight(lam: torch.Tensor, sq: torch.Tensor, degree: int = 100) -> torch.Tensor:
    # K_ij·(√λ_i − √λ_j) = |√λ_i − √λ_j|·Σ_{k≤K} r^k/λ_max (sign(j − i)·(√λ_i − √λ_j) ≥ 0 for descending λ)
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    lmax = torch.maximum(li, lj)
    g = _geometric(torch.minimum(li, lj).div_(lmax), degree + 1)
    return (sq.unsqueeze(-1) - sq.unsqueeze(-2)).abs_().mul_(g).div_(lmax)


def _trunc_weight(lam: torch.Tensor, sq: torch.Tensor, threshold: float = 1e10) -> torch.Tensor:
    # clip(1/(λ_i − λ_j), ±T)·(√λ_i − √λ_j); a tie gives 1/(+0) = +inf → T, times √λ_i − √λ_j = 0 (with T = inf,
    # no clipping, inf·0 = NaN: the tie rule's 0, as in svd)
    k = (lam.unsqueeze(-1) - lam.unsqueeze(-2)).reciprocal_().clamp_(-threshold, threshold)
    return k.mul_(sq.unsqueeze(-1) - sq.unsqueeze(-2)).nan_to_num_(nan=0.0)


KERNELS['pade_series'] = pade_series_kernel
WEIGHTS['pade_series'] = pade_series_weight
WEIGHTS['taylor'] = _taylor_weight
WEIGHTS['trunc'] = _trunc_weight
WEIGHTS['exact'] = _exact_weight
WEIGHTS['pade'] = _pade_weight


def kernel_weight(kernel: str, lam: torch.Tensor, sq: torch.Tensor, **opts: Any) -> torch.Tensor:
    """The symmetric backward weight W (B, d, d) of ``kernel`` (see the module docstring), diagonal 1/(2√λ_i).

    ``WEIGHTS`` entries compute W directly (fewer passes over B×d×d; ``exact`` and ``pade`` are the same numbers as
    their K times (√λ_i − √λ_j), tested against the literal formula); other kernels go through their K.
    """
    if kernel in WEIGHTS:
        w = WEIGHTS[kernel](lam, sq, **opts)
    else:
        # every K in KERNELS without a WEIGHTS entry is antisymmetric: W_ij = K_ij·(√λ_i − √λ_j)
        w = KERNELS[kernel](lam, **opts)
        w.mul_(sq.unsqueeze(-1) - sq.unsqueeze(-2))
    w.diagonal(dim1=-2, dim2=-1).copy_(0.5 / sq)
    return w


# --------------------------------------------------------------------------------------------- eigendecomposition
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY: Optional[Tuple[int, int]] = None
SPLIT_EIGH = True  # CPU: split the batch over min(torch.get_num_threads(), 4) concurrent eigh calls (see _eigh)


def _eigh_chunk(a: torch.Tensor, inference: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(inference), torch.no_grad():
        return torch.linalg.eigh(a)


def _eigh(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched eigh; on CPU the batch is split over concurrent LAPACK calls.

    torch loops syevd over the matrices of a CPU batch and MKL threads each call only partly; running chunks of the
    batch concurrently keeps both cores busy (1.15–1.3× faster than MKL's own threading, measured on two cores).
    Results are identical to one call (each matrix is decomposed by the same routine). The pool is created lazily,
    per process. The worker threads run without autograd, so an input that needs a gradient (``eig_forward`` called
    under autograd) takes one call.
    """
    global _POOL, _POOL_KEY
    # at most 4 concurrent calls: each may start its own MKL/OpenMP team (measured only on 2 cores here)
    n = min(torch.get_num_threads(), a.shape[0], 4)
    if (not SPLIT_EIGH or a.device.type != 'cpu' or n < 2 or (a.requires_grad and torch.is_grad_enabled())
            or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()):
        return torch.linalg.eigh(a)
    key = (os.getpid(), n)
    if _POOL is None or _POOL_KEY != key:
        _POOL, _POOL_KEY = ThreadPoolExecutor(max_workers=n, thread_name_prefix='timm_gcp_eigh'), key
        _logger.debug('eigh: splitting CPU batches over %d threads', n)
    inference = torch.is_inference_mode_enabled()
    parts = list(_POOL.map(lambda c: _eigh_chunk(c, inference), a.chunk(n)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _eigh_desc(cov: torch.Tensor, eig_device: Optional[str],
        dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unfloored eigenvalues and eigenvectors of ``cov`` computed in ``dtype``, descending, on ``cov.device``."""
    a = cov.to(dtype=dtype)
    if eig_device is not None and a.device.type != 'meta':
        # explicit, opt-in round trip (e.g. CPU LAPACK for a CUDA input); a no-op when the devices agree. Not for
        # meta tensors (shape inference): there are no values to move
        lam, u = _eigh(a.to(eig_device))
        lam, u = lam.to(cov.device), u.to(cov.device)
    else:
        lam, u = _eigh(a)
    return lam.flip(-1), u.flip(-1)  # descending, as the K kernels expect


def eig_forward(cov: torch.Tensor, eps: float = EPS, top_n: Optional[int] = None,
        eig_device: Optional[str] = None,
        dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigendecomposition (float64 by default) with the floor and ordering the kernels expect.

    Args:
        cov: (B, d, d) symmetric (the lower triangle is read).
        eps: eigenvalue floor.
        top_n: keep the ``top_n`` largest eigenvalues and set the rest to ``eps`` (SVD-TopN).
        eig_device: run eigh there (e.g. 'cpu' for a CUDA input); the results come back to ``cov.device``.
        dtype: compute precision.

    Returns:
        ``(q, u, lam)`` in ``dtype``: Q = U·diag(√λ)·Uᵀ (B, d, d), eigenvectors U (B, d, d) and floored eigenvalues
        λ (B, d), in descending order, all on ``cov.device``.
    """
    raw, u = _eigh_desc(cov, eig_device, dtype)
    lam = _floor(raw, eps, top_n)
    return _assemble(u, lam), u, lam


def _floor(lam: torch.Tensor, eps: float, top_n: Optional[int]) -> torch.Tensor:
    lam = lam.clamp_min(eps)
    if top_n is not None and top_n < lam.shape[-1]:
        lam = torch.cat([lam[..., :top_n], lam.new_full(lam[..., top_n:].shape, eps)], dim=-1)
    return lam


def _assemble(u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.matmul(u * lam.sqrt().unsqueeze(-2), u.transpose(-1, -2))


# ------------------------------------------------------------------------------------------ SVD-Newton backward
def _ns_divided_differences(a: torch.Tensor, iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """y_N(a_i) and the divided differences D_ij = [y_N](a_i, a_j) (D_ii = y_N'(a_i)) of the scalar coupled
    Newton–Schulz map, by the Leibniz rule [fg]_ij = [f]_ij·g_j + f_i·[g]_ij through every step.

    No difference quotient (y_i − y_j)/(a_i − a_j) is ever formed, so near-ties lose nothing to cancellation.
    """
    y, z = a, torch.ones_like(a)
    # step 0 (Z₀ = 1): t = 1.5 − ½a, [t] = −½, [y₁] = t_j − ½a_i, [z₁] = [t] = −½
    t = 1.5 - 0.5 * a
    dy = t.unsqueeze(-2) - 0.5 * a.unsqueeze(-1)
    dz = None
    y, z = y * t, t
    for k in range(1, iters):
        zy = z * y
        # [zy] = [z]·y_j + z_i·[y]   ([z] is the constant −½ after step 0)
        dzy = (dy * z.unsqueeze(-1)).add_(y.unsqueeze(-2) * -0.5 if dz is None else dz * y.unsqueeze(-2))
        t = 1.5 - 0.5 * zy
        # [y'] = [y]·t_j + y_i·[t],  [t] = −½[zy]
        dy_next = (dy * t.unsqueeze(-2)).addcmul_(dzy, y.unsqueeze(-1), value=-0.5)
        if k < iters - 1:
            # [z'] = [t]·z_j + t_i·[z]
            dz_next = dzy * (-0.5 * z.unsqueeze(-2))
            dz_next = dz_next.sub_(0.5 * t.unsqueeze(-1)) if dz is None else dz_next.addcmul_(dz, t.unsqueeze(-1))
            dz = dz_next
            z = t * z
        y, dy = y * t, dy_next
    return y, dy


def newton_backward(u: torch.Tensor, lam: torch.Tensor, tr: torch.Tensor, grad: torch.Tensor,
        iters: int) -> torch.Tensor:
    """Gradient of f(Σ) = √t·NS_iters(Σ/t), t = tr Σ, at Σ = U·diag(λ)·Uᵀ (unfloored λ), given ∂L/∂f = ``grad``.

    f is a spectral function of A = Σ/t, so its Fréchet derivative is U[(Uᵀ·E·U) ∘ D]Uᵀ with D the divided
    differences of the scalar map (Daleckii–Krein): ∂L/∂A = √t·U[(UᵀGU) ∘ D]Uᵀ; the trace adds
    (⟨G, Y_N⟩/(2√t) − ⟨∂L/∂A, A⟩/t)·I. Equal to differentiating the matrix iteration (``ns_vjp``; tested) at the
    cost of four matmuls and ~6 elementwise passes per iteration instead of 9 matmuls per iteration.
    Zero trace: gradient 0, as ``isqrt``.
    """
    pos = tr > 0
    t = torch.where(pos, tr, torch.ones_like(tr))
    a = lam / t.unsqueeze(-1)
    y, dd = _ns_divided_differences(a, iters)
    ut = u.transpose(-1, -2)
    s = ut @ grad @ u
    s_diag = s.diagonal(dim1=-2, dim2=-1)
    rt = t.sqrt()
    coef = (s_diag * (0.5 * y / rt.unsqueeze(-1) - dd.diagonal(dim1=-2, dim2=-1) * a / rt.unsqueeze(-1))).sum(-1)
    inner = dd.mul_(s).mul_((1.0 / rt).view(-1, 1, 1))
    inner.diagonal(dim1=-2, dim2=-1).add_(coef.unsqueeze(-1))
    out = u @ inner @ ut
    return out * pos.view(-1, 1, 1)


# ------------------------------------------------------------------------------------------------- autograd
class _EigSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cov: torch.Tensor, kernel: str, kernel_opts: Dict[str, Any], eps: float,
            top_n: Optional[int], eig_device: Optional[str], ns_iters: Optional[int],
            dtype: torch.dtype) -> torch.Tensor:
        raw, u = _eigh_desc(cov, eig_device, dtype)
        lam = _floor(raw, eps, top_n)
        q = _assemble(u, lam)
        if ns_iters is not None:
            # newton: the backward differentiates the Newton–Schulz map at Σ itself, not at the floored spectrum
            tr = cov.diagonal(dim1=-2, dim2=-1).to(dtype).sum(-1)  # no second full copy of Σ
            ctx.save_for_backward(u, raw, tr)
        else:
            ctx.save_for_backward(u, lam)
        ctx.kernel, ctx.kernel_opts, ctx.ns_iters = kernel, kernel_opts, ns_iters
        ctx.out_dtype = cov.dtype
        return q.to(cov.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.ns_iters is not None:
            u, raw, tr = ctx.saved_tensors
            g = grad.to(u.dtype)
            out = newton_backward(u, raw, tr, g, ctx.ns_iters)
        else:
            u, lam = ctx.saved_tensors
            g = grad.to(u.dtype)
            ut = u.transpose(-1, -2)
            s2 = torch.bmm(ut, g + g.transpose(-1, -2)).bmm(u)  # 2·S, S = Uᵀ·sym(G)·U
            w = kernel_weight(ctx.kernel, lam, sq=lam.sqrt(), **ctx.kernel_opts).mul_(s2)
            out = torch.baddbmm(w, torch.bmm(u, w), ut, beta=0.0, alpha=0.5)  # ½·U·(2S ∘ W)·Uᵀ, w ignored
        return out.to(ctx.out_dtype), None, None, None, None, None, None, None


def eig_sqrtm(cov: torch.Tensor, kernel: str = 'exact', eps: float = EPS, top_n: Optional[int] = None,
        eig_device: Optional[str] = None, ns_iters: Optional[int] = None, dtype: torch.dtype = torch.float64,
        **kernel_opts: Any) -> torch.Tensor:
    """Square root of (B, d, d) symmetric PSD matrices by eigh (float64 by default) with a chosen backward.

    Args:
        cov: (B, d, d) symmetric PSD, any floating dtype.
        kernel: name in ``KERNELS`` or ``WEIGHTS`` that defines the backward.
        eps: eigenvalue floor.
        top_n: keep the largest ``top_n`` eigenvalues, set the rest to ``eps`` (SVD-TopN).
        eig_device: run the eigendecomposition on this device (e.g. 'cpu' for a CUDA input).
        ns_iters: when set, the backward is the gradient of √trΣ·NS_{ns_iters}(Σ/trΣ) at Σ (SVD-Newton) instead of a
            kernel.
        dtype: precision of the eigendecomposition and the backward. float64 (the default) represents the small
            eigenvalues of a rank-deficient covariance; float32 is the single-precision setting that the ICCV 2021
            paper shows failing to train (kept for that ablation).
        **kernel_opts: options of the kernel (``degree``, ``threshold``, ``iters``).

    Returns:
        (B, d, d) Σ^½ (computed in ``dtype``) in the dtype and on the device of ``cov``.
    """
    if kernel not in KERNELS and kernel not in WEIGHTS:
        raise ValueError(f'unknown kernel {kernel!r}; valid kernels: {", ".join(sorted({*KERNELS, *WEIGHTS}))}')
    if top_n is not None and not 1 <= top_n <= cov.shape[-1]:
        raise ValueError(f'top_n must be in [1, d={cov.shape[-1]}], got {top_n}')
    return _EigSqrt.apply(cov, kernel, kernel_opts, eps, top_n, eig_device, ns_iters, dtype)

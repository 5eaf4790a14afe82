"""Matrix square roots of a covariance computed from the M×M Gram matrix, for maps with fewer positions than channels.

With M positions of d channels, Xc (d×M) the centred features of one sample, Σ = Xc·Xcᵀ/M has rank at most M − 1.
G = Xcᵀ·Xc/M (M×M) has the same non-zero eigenvalues; with G = V·Λ·Vᵀ and P = Xc·V/√M (so Pᵀ·P = Λ), the range
eigenvectors of Σ are U_r = P·Λ_r^(−½). Everything below is exact algebra on these identities, no approximation:

* Forward of a spectral method f with its value f₀ on the null space (f(ε) for the eigen-methods, whose floor ε every
  null eigenvalue sits at; f(0) for ``mpa``):
  f(Σ) = f₀·I + P·diag(h)·Pᵀ with h_j = (f(λ̃_j) − f₀)/λ_j on the range, 0 elsewhere (λ̃ the method's modified
  eigenvalues: floored, or the top N kept for SVD-TopN).
* Backward: every eigen-method's gradient is ∂L/∂Σ = U·(S ∘ W)·Uᵀ with S = Uᵀ·sym(Ḡ)·U and a symmetric weight
  W_ij = w(λ̃_i, λ̃_j) of the eigenvalue pair. Only range columns reach the features (∂L/∂Xc = (2/M)·∂L/∂Σ·Xc), and
  the (null, range) block is (I − U_r·U_rᵀ)·sym(Ḡ)·U_r·diag(w(null, λ̃_j)), so with T = Pᵀ·sym(Ḡ)·P:
  ∂L/∂Xc = (2/√M)·[sym(Ḡ)·P·D + P·(T ∘ W'')]·Vᵀ,  D_j = w(null, λ̃_j),  W''_ij = (w(λ̃_i, λ̃_j) − D_j)/λ_i.
  W comes from the method's own kernel (``kernel_weight``) evaluated on the spectrum [λ̃₁ … λ̃_M, null], so each
  method keeps its exact, Padé, Taylor, clipped, top-N, power-iteration or Daleckii–Krein weights and tie rules.
  SVD-Newton's weight is the divided difference of the scalar Newton–Schulz map plus a multiple of I; MPA's
  Lyapunov sign iteration is, in the eigenbasis, a scalar recursion on each eigenvalue pair, so ``mpa`` keeps its
  iteration's gradient too.
* iSQRT-COV: every Newton–Schulz iterate is a polynomial p with p(0) = 0, and p(Σ) = Xc·q(G)·Xcᵀ/M with
  q(x) = p(x)/x. The iteration tracks q: Â = G/tr G, Q₀ = Z₀ = I, T = ½(3I − Â·Z·Q), Q ← Q·T, Z ← T·Z, and the root
  is √trΣ·Xc·Q_N·Xcᵀ/(M·trΣ): the same iterates as on Σ, on M×M matrices. Z_k and Q_k obey the same recursion from
  the same start (Y_k = A·Z_k in the d-space iteration), so only Q is kept: T = ½(3I − Â·Q²).

A G eigenvalue at or below max(ε, c·u·λ_max) (u the unit roundoff of the compute dtype, c = 2·(d + M): the rounding
that forming G and decomposing it can leave on an exact zero) is treated as null: the eigenvector of such a value is
rounding noise, and counting it in the range would send that noise into the gradient. The d-space path floors such
values at ε too, or keeps them as noise of the same size; the two paths agree to rounding (tested at d = 256).

Cost per sample: O(M³ + d²·M) instead of O(d³). Which path a layer takes is decided by ``use_gram``.
"""
from typing import Any, Dict, Optional, Tuple

import torch

from .checks import as_float_dtype, no_autocast
from .eig_sqrt import EPS, _eigh_desc, _ns_divided_differences, kernel_weight
from .mpa import pade_sqrt_coefficients

__all__ = ['GRAM_PATHS', 'GRAM_MAX_FRACTION', 'use_gram', 'gram_eig_sqrtm', 'gram_ns_sqrtm', 'gram_mpa_sqrtm']

GRAM_PATHS = ('auto', 'gram', 'cov')
# 'auto' takes the Gram path while M < d, and for iSQRT-COV (whose M×M iteration grows as M³, against the fixed d³ of
# the covariance path) while M ≤ GRAM_MAX_FRACTION·d. Measured on a two-core CPU, B = 32, d = 256
# (zoo/results/bench_gram_crossover_cpu.txt): forward+backward on the Gram path took 0.92 of the covariance path's
# time for isqrt at M = 240 and 1.05 at M = 248; the eigen-methods and mpa 0.55-0.90 at every M up to 248.
GRAM_MAX_FRACTION = 0.9375
_ITERATIVE = ('isqrt',)


def use_gram(d: int, m: int, path: str = 'auto', method: str = '') -> bool:
    """Whether covariance pooling of ``m`` positions in ``d`` channels runs on the M×M Gram matrix.

    Args:
        d: channels (the covariance is d×d).
        m: positions (samples) per map.
        path: 'auto' (the Gram path where it is faster: m < d, and m ≤ ``GRAM_MAX_FRACTION``·d for ``isqrt`` or when
            no method is named), 'gram' (whenever m < d) or 'cov' (never).
        method: the square-root method, a key of ``METHODS``.

    Raises:
        ValueError: an unknown ``path``.
    """
    if path not in GRAM_PATHS:
        raise ValueError(f'path must be one of {GRAM_PATHS}, got {path!r}')
    if path == 'cov' or m >= d:
        return False
    return path == 'gram' or (method and method not in _ITERATIVE) or m <= GRAM_MAX_FRACTION * d


def _centred(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x - x.mean(dim=-1, keepdim=True)


def _gram(xc: torch.Tensor) -> torch.Tensor:
    g = torch.bmm(xc.transpose(1, 2), xc).div_(xc.shape[-1])
    return 0.5 * (g + g.transpose(1, 2))


def _spectrum(g: torch.Tensor, d: int, eig_device: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(descending eigenvalues with the null ones set to 0, eigenvectors V, range mask) of the Gram matrices."""
    lam, v = _eigh_desc(g, eig_device, g.dtype)
    m = g.shape[-1]
    noise = 2 * (d + m) * torch.finfo(g.dtype).eps * lam[:, :1].clamp_min(0)
    rng = lam > noise.clamp_min(EPS)
    return torch.where(rng, lam, torch.zeros_like(lam)), v, rng


def _assemble(p: torch.Tensor, h: torch.Tensor, null_value: torch.Tensor) -> torch.Tensor:
    """f₀·I + P·diag(h)·Pᵀ, (B, d, d); ``null_value`` (B,) or a scalar tensor."""
    q = torch.bmm(p * h.unsqueeze(1), p.transpose(1, 2))
    q.diagonal(dim1=-2, dim2=-1).add_(null_value.reshape(-1, 1))
    return q


def _backward(p: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, w_aug: torch.Tensor, rng: torch.Tensor,
        grad: torch.Tensor, eye_coef: Optional[torch.Tensor] = None) -> torch.Tensor:
    """∂L/∂Xc (B, d, M) from the augmented weight ``w_aug`` (B, M+1, M+1), last index the null space."""
    m = p.shape[-1]
    gp = torch.bmm(grad + grad.transpose(1, 2), p)  # 2·sym(Ḡ)·P
    t2 = torch.bmm(p.transpose(1, 2), gp)  # 2·T
    mask = rng.to(p.dtype)
    dn = w_aug[:, m, :m] * mask
    w2 = (w_aug[:, :m, :m] - dn.unsqueeze(1)).div_(torch.where(rng, lam, torch.ones_like(lam)).unsqueeze(-1))
    w2.mul_(mask.unsqueeze(-1)).mul_(mask.unsqueeze(-2))
    inner = torch.baddbmm(gp * dn.unsqueeze(1), p, t2 * w2)
    dxc = torch.bmm(inner, v.transpose(1, 2)).div_(m ** 0.5)
    if eye_coef is not None:
        # ∂L/∂Σ += c·I adds (2/M)·c·Xc; Xc = P·Vᵀ·√M on the range
        dxc = dxc + torch.bmm(p * mask.unsqueeze(1), v.transpose(1, 2)).mul_(2 * eye_coef.view(-1, 1, 1) / m ** 0.5)
    return dxc


class _GramEig(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xc: torch.Tensor, kernel: str, kernel_opts: Dict[str, Any], eps: float, top_n: Optional[int],
            eig_device: Optional[str], ns_iters: Optional[int]) -> torch.Tensor:
        d, m = xc.shape[1], xc.shape[2]
        lam, v, rng = _spectrum(_gram(xc), d, eig_device)
        p = torch.bmm(xc, v).div_(m ** 0.5)
        lt = lam.clamp_min(eps)
        if top_n is not None and top_n < m:
            lt = torch.cat([lt[:, :top_n], lt.new_full(lt[:, top_n:].shape, eps)], dim=1)
        f0 = torch.tensor(eps, dtype=xc.dtype, device=xc.device).sqrt()
        h = torch.where(rng, (lt.sqrt() - f0) / torch.where(rng, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        ctx.save_for_backward(p, v, lam, lt, rng)
        ctx.kernel, ctx.kernel_opts, ctx.eps, ctx.ns_iters = kernel, kernel_opts, eps, ns_iters
        return _assemble(p, h, f0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, v, lam, lt, rng = ctx.saved_tensors
        grad = grad.to(p.dtype)
        eye_coef = None
        if ctx.ns_iters is not None:
            w_aug, eye_coef = _newton_weight(p, lam, rng, grad, ctx.ns_iters)
        else:
            lam_aug = torch.cat([lt, lt.new_full((lt.shape[0], 1), ctx.eps)], dim=1)
            w_aug = kernel_weight(ctx.kernel, lam_aug, sq=lam_aug.sqrt(), **ctx.kernel_opts)
        return _backward(p, v, lam, w_aug, rng, grad, eye_coef), None, None, None, None, None, None


def _newton_weight(p: torch.Tensor, lam: torch.Tensor, rng: torch.Tensor, grad: torch.Tensor,
        iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """SVD-Newton: W = [y_N](a_i, a_j)/√t on a = λ/t (null a = 0) and the trace term's coefficient of I."""
    tr = lam.sum(-1)
    pos = tr > 0
    t = torch.where(pos, tr, torch.ones_like(tr))
    a = torch.cat([lam, lam.new_zeros(lam.shape[0], 1)], dim=1) / t.unsqueeze(-1)
    y, dd = _ns_divided_differences(a, iters)
    rt = t.sqrt().unsqueeze(-1)
    # S_ii = u_iᵀ·sym(Ḡ)·u_i = (Pᵀ·sym(Ḡ)·P)_ii/λ_i on the range; null eigenvalues add nothing (y(0) = 0, a = 0)
    s_diag = torch.einsum('bdi,bdi->bi', p, torch.bmm(0.5 * (grad + grad.transpose(1, 2)), p))
    s_diag = torch.where(rng, s_diag / torch.where(rng, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    m = lam.shape[-1]
    coef = (s_diag * (0.5 * y[:, :m] - dd.diagonal(dim1=-2, dim2=-1)[:, :m] * a[:, :m]) / rt).sum(-1)
    w = dd.div_(rt.unsqueeze(-1)).mul_(pos.view(-1, 1, 1))
    return w, coef * pos


def gram_eig_sqrtm(x: torch.Tensor, kernel: str = 'exact', eps: float = EPS, top_n: Optional[int] = None,
        eig_device: Optional[str] = None, ns_iters: Optional[int] = None, dtype: torch.dtype = torch.float64,
        **kernel_opts: Any) -> torch.Tensor:
    """Σ^½ of the biased covariance of ``x``'s samples by an eigen-method, from the M×M Gram matrix.

    The same function as ``eig_sqrtm(covariance(x, dtype=dtype), ...)`` with the same backward kernel (see the
    module docstring), at O(M³ + d²·M) per sample.

    Args:
        x: (B, d, M) samples (M positions), any floating dtype.
        kernel, eps, top_n, eig_device, ns_iters, **kernel_opts: as ``eig_sqrtm``.
        dtype: precision of the Gram matrix, its eigendecomposition and the backward.

    Returns:
        (B, d, d) Σ^½ in ``dtype``.
    """
    if top_n is not None and not 1 <= top_n <= x.shape[1]:
        raise ValueError(f'top_n must be in [1, d={x.shape[1]}], got {top_n}')
    with no_autocast(x.device):
        return _GramEig.apply(_centred(x, dtype), kernel, kernel_opts, eps, top_n, eig_device, ns_iters)


def gram_ns_sqrtm(x: torch.Tensor, iters: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """iSQRT-COV's Σ^½ ≈ √trΣ·NS_iters(Σ/trΣ) of the covariance of ``x``'s samples, iterated on the M×M Gram matrix.

    Autograd differentiates the M×M iteration, so the gradient is that of the forward as computed, as ``ns_sqrtm``'s.

    Args:
        x: (B, d, M) samples, any floating dtype.
        iters: Newton–Schulz steps (the last updates Q only).
        dtype: compute precision.

    Returns:
        (B, d, d) in ``dtype``; 0 for samples with zero trace (constant features), with a zero gradient.
    """
    dtype = as_float_dtype(dtype, 'isqrt')
    with no_autocast(x.device):
        xc = _centred(x, dtype)
        m = xc.shape[-1]
        g = _gram(xc)
        tr = g.diagonal(dim1=-2, dim2=-1).sum(-1)
        pos = tr > 0
        t = torch.where(pos, tr, torch.ones_like(tr)).view(-1, 1, 1)
        a = g / t
        eye15 = torch.eye(m, dtype=dtype, device=x.device).mul_(1.5)
        # Z_k = Q_k for every k (both start at I, take the same T_k and are polynomials in Â, which commute), so
        # T = ½(3I − Â·Z·Q) = ½(3I − Â·Q²): three M×M products a step instead of four
        q = eye15 - 0.5 * a
        for _ in range(iters - 1):
            q = torch.bmm(q, torch.baddbmm(eye15, a, torch.bmm(q, q), alpha=-0.5))
        scale = torch.where(pos, 1.0 / (m * t.view(-1).sqrt()), torch.zeros_like(tr)).view(-1, 1, 1)
        return _Sandwich.apply(xc, q * scale)  # √t/(M·t)·Xc·Q_N·Xcᵀ, the factor folded in on M×M


class _Sandwich(torch.autograd.Function):
    """Xc·sym(Q)·Xcᵀ (B, d, d) with a backward of one d²·M product instead of autograd's two: with S = Ḡ + Ḡᵀ,
    ∂L/∂Xc = S·Xc·sym(Q) and ∂L/∂Q = ½·Xcᵀ·S·Xc (symmetric, the gradient through sym)."""

    @staticmethod
    def forward(ctx, xc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        q = 0.5 * (q + q.transpose(1, 2))
        ctx.save_for_backward(xc, q)
        return torch.bmm(torch.bmm(xc, q), xc.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xc, q = ctx.saved_tensors
        sx = torch.bmm(grad + grad.transpose(1, 2), xc)
        return torch.bmm(sx, q), torch.bmm(xc.transpose(1, 2), sx).mul_(0.5)


class _GramMPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xc: torch.Tensor, degree: int, lyap_iters: int) -> torch.Tensor:
        d, m = xc.shape[1], xc.shape[2]
        lam, v, rng = _spectrum(_gram(xc), d, None)
        p = torch.bmm(xc, v).div_(m ** 0.5)
        norm = lam.square().sum(-1).sqrt()  # ‖Σ‖_F = ‖G‖_F
        pos = norm > 0
        n = torch.where(pos, norm, torch.ones_like(norm))
        b = _pade_root(torch.cat([lam, lam.new_zeros(lam.shape[0], 1)], dim=1) / n.unsqueeze(-1), degree)
        rn = (n.sqrt() * pos).unsqueeze(-1)
        f = b * rn  # √n·b(λ/n) on [λ₁ … λ_M, 0]
        h = torch.where(rng, (f[:, :m] - f[:, m:]) / torch.where(rng, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        ctx.save_for_backward(p, v, lam, b, rng, rn)
        ctx.lyap_iters = lyap_iters
        return _assemble(p, h, f[:, m])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, v, lam, b, rng, rn = ctx.saved_tensors
        grad = grad.to(p.dtype)
        # the sign iteration of lyap_sign_solve on each eigenvalue pair: E ← (1.5 − ½(b_i² + b_j²) + ½·b_i·b_j)·E,
        # b ← b·(1.5 − ½b²); X̂ = ½E_N, and ∂L/∂Σ = X̂/√n
        bi, bj = b.unsqueeze(-1), b.unsqueeze(-2)
        e = torch.ones_like(bi * bj)
        for i in range(ctx.lyap_iters):
            e.mul_(1.5 - 0.5 * (bi * bi + bj * bj) + 0.5 * bi * bj)
            if i < ctx.lyap_iters - 1:
                bi, bj = bi * (1.5 - 0.5 * bi * bi), bj * (1.5 - 0.5 * bj * bj)
        scale = torch.where(rn > 0, 0.5 / torch.where(rn > 0, rn, torch.ones_like(rn)), torch.zeros_like(rn))
        return _backward(p, v, lam, e.mul_(scale.unsqueeze(-1)), rng, grad), None, None


def _pade_root(a: torch.Tensor, degree: int) -> torch.Tensor:
    """The scalar [degree/degree] Padé approximant of √(1 − x) at x = 1 − a (``mpa``'s function of each eigenvalue)."""
    p, q = pade_sqrt_coefficients(degree, degree)
    x = 1 - a
    num = torch.full_like(x, p[-1])
    den = torch.full_like(x, q[-1])
    for cp, cq in zip(reversed(p[:-1]), reversed(q[:-1])):
        num = num * x + cp
        den = den * x + cq
    return num / den


def gram_mpa_sqrtm(x: torch.Tensor, degree: int = 5, lyap_iters: int = 8,
        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MPA-Lya's Σ^½ of the covariance of ``x``'s samples, from the M×M Gram matrix.

    The matrix Padé approximant √‖Σ‖_F·Q_N(I − A)⁻¹P_M(I − A) is a rational function of Σ, applied here to each
    eigenvalue of G (and f(0) on the null space); the backward runs the Lyapunov sign iteration of ``mpa`` on each
    eigenvalue pair, which is what the matrix iteration computes in Σ's eigenbasis.

    Args:
        x: (B, d, M) samples, any floating dtype.
        degree, lyap_iters: as ``mpa_sqrtm``.
        dtype: precision of G and the backward; the M×M eigendecomposition runs in float64 (it is cheap, and the
            spectral form needs eigenvectors accurate to the precision of the matrix form it replaces).

    Returns:
        (B, d, d) in ``dtype``; 0 for the zero matrix, with a zero gradient.
    """
    dtype = as_float_dtype(dtype, 'mpa')
    with no_autocast(x.device):
        xc = _centred(x, dtype)
        out = _GramMPA.apply(xc.to(torch.float64), degree, lyap_iters)
        return out.to(dtype)

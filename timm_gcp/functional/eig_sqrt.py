"""Eigendecomposition-based matrix square root with interchangeable backward kernels.

Forward (shared by every eigen-method): Σ → float64, eigh, eigenvalues floored at ε, Q = U·diag(λ^½)·Uᵀ.
Backward: the matrix-backprop rule of Ionescu et al. with a method-specific K matrix (see SPEC §2):

    ∂L/∂U = (G + Gᵀ)·U·Λ^½,  ∂L/∂λ = ½·λ^−½ ⊙ diag(UᵀGU),
    ∂L/∂Σ = sym( U·[Kᵀ ∘ (Uᵀ·∂L/∂U) + diag(∂L/∂λ)]·Uᵀ ).

Kernels are plain functions ``kernel(lam, **opts) -> K`` of the floored, descending eigenvalues (B, d), so adding a
method is one function and one registry entry.
"""
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ['EPS', 'eig_sqrtm', 'exact_kernel', 'KERNELS']

EPS = 2.220446049250313e-16  # float64 machine epsilon: the eigenvalue floor of the reference implementations


def exact_kernel(lam: torch.Tensor) -> torch.Tensor:
    """K_ij = 1/(λ_i − λ_j) off the diagonal; 0 on the diagonal and at exact ties (λ_i == λ_j)."""
    diff = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    tie = diff == 0
    return torch.where(tie, torch.zeros_like(diff), 1.0 / torch.where(tie, torch.ones_like(diff), diff))


KERNELS: Dict[str, Callable[..., torch.Tensor]] = {'exact': exact_kernel}


class _EigSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cov: torch.Tensor, kernel: str, kernel_opts: Dict[str, Any], eps: float,
            top_n: Optional[int], eig_device: Optional[str]) -> torch.Tensor:
        out_dtype, out_device = cov.dtype, cov.device
        a = cov.to(dtype=torch.float64)
        if eig_device is not None:
            a = a.to(eig_device)
        lam, u = torch.linalg.eigh(a)  # ascending
        lam, u = lam.flip(-1), u.flip(-1)  # descending, as the K kernels expect
        lam = lam.clamp_min(eps)
        if top_n is not None and top_n < lam.shape[-1]:
            lam = torch.cat([lam[..., :top_n], lam.new_full(lam[..., top_n:].shape, eps)], dim=-1)
        q = (u * lam.sqrt().unsqueeze(-2)) @ u.transpose(-1, -2)
        ctx.save_for_backward(u, lam)
        ctx.kernel, ctx.kernel_opts = kernel, kernel_opts
        ctx.out_dtype, ctx.out_device = out_dtype, out_device
        return q.to(device=out_device, dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, lam = ctx.saved_tensors
        g = grad.to(device=u.device, dtype=torch.float64)
        k = KERNELS[ctx.kernel](lam, **ctx.kernel_opts)
        sq = lam.sqrt()
        ut_gs_u = u.transpose(-1, -2) @ (g + g.transpose(-1, -2)) @ u
        inner = k.transpose(-1, -2) * (ut_gs_u * sq.unsqueeze(-2))
        dlam = 0.25 * ut_gs_u.diagonal(dim1=-2, dim2=-1) / sq
        inner = inner + torch.diag_embed(dlam)
        out = u @ inner @ u.transpose(-1, -2)
        out = 0.5 * (out + out.transpose(-1, -2))
        return out.to(device=ctx.out_device, dtype=ctx.out_dtype), None, None, None, None, None


def eig_sqrtm(cov: torch.Tensor, kernel: str = 'exact', eps: float = EPS, top_n: Optional[int] = None,
        eig_device: Optional[str] = None, **kernel_opts: Any) -> torch.Tensor:
    """Square root of (B, d, d) symmetric PSD matrices by float64 eigh with a chosen backward kernel.

    Args:
        cov: (B, d, d) symmetric PSD.
        kernel: name in ``KERNELS`` that builds K for the backward.
        eps: eigenvalue floor.
        top_n: keep the largest ``top_n`` eigenvalues, set the rest to ``eps`` (SVD-TopN).
        eig_device: run the eigendecomposition on this device (e.g. 'cpu' for a CUDA input).

    Returns:
        (B, d, d) Σ^½ in the dtype and on the device of ``cov``.
    """
    return _EigSqrt.apply(cov, kernel, kernel_opts, eps, top_n, eig_device)

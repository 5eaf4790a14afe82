"""Coupled Newton–Schulz iteration for the matrix square root (iSQRT-COV, Li et al., CVPR 2018, arXiv 1712.01034).

Forward: t = tr Σ, A = Σ/t, Y₀ = A, Z₀ = I, T_k = ½(3I − Z_k·Y_k), Y_{k+1} = Y_k·T_k, Z_{k+1} = T_k·Z_k (the last step
updates Y only), Q = √t·Y_N. The first step uses Z₀ = I (T₀ = ½(3I − A), Z₁ = T₀) and saves two matmuls.

Backward: a hand-written reverse sweep of exactly that computation (every matmul's two adjoints, the trace
normalisation and the √t compensation), so it is the gradient of the forward as computed and passes gradcheck in
float64. It does not rely on Y_k, Z_k, T_k commuting (they do only in exact arithmetic and only for symmetric A), so it
is also right for the non-symmetric perturbations gradcheck makes. Fused ``baddbmm`` calls keep the elementwise work
small: per middle step the forward is 3 matmuls and the backward 6.

Zero trace (the all-zero matrix, constant features): the output is 0 and the gradient through that sample is 0
(√ is not differentiable at 0; we take the zero subgradient rather than divide by zero).
"""
from typing import List, Optional, Tuple

import torch

from .checks import as_float_dtype, no_autocast

__all__ = ['ns_sqrtm', 'ns_forward', 'ns_backward', 'ns_vjp']

_Saved = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[Tuple[torch.Tensor, Optional[torch.Tensor],
    torch.Tensor]]]


def ns_forward(a: torch.Tensor, iters: int) -> Tuple[torch.Tensor, _Saved]:
    """Run the iteration on ``a`` (already in the compute dtype) and return ``(Q, saved)`` for :func:`ns_backward`."""
    if iters < 1:
        raise ValueError(f'Newton-Schulz needs iters >= 1, got {iters}')
    d = a.shape[-1]
    tr = a.diagonal(dim1=-2, dim2=-1).sum(-1)
    pos = tr > 0
    tr_safe = torch.where(pos, tr, torch.ones_like(tr)).view(-1, 1, 1)
    root_tr = torch.where(pos, tr, torch.zeros_like(tr)).sqrt().view(-1, 1, 1)
    x = a / tr_safe
    eye15 = torch.eye(d, dtype=a.dtype, device=a.device).mul_(1.5)
    y, z = x, None
    steps = []
    for i in range(iters):
        # T = ½(3I − Z·Y); with Z₀ = I that is ½(3I − A)
        t = eye15 - 0.5 * y if z is None else torch.baddbmm(eye15, z, y, alpha=-0.5)
        steps.append((y, z, t))
        y_next = torch.bmm(y, t)
        if i < iters - 1:
            z = t if z is None else torch.bmm(t, z)
        y = y_next
    return y * root_tr, (x, tr_safe, root_tr, steps + [(y, None, None)])


def ns_backward(saved: _Saved, grad: torch.Tensor) -> torch.Tensor:
    """Gradient of the ``ns_forward`` output with respect to its input ``a``, given ∂L/∂Q = ``grad``."""
    x, tr_safe, root_tr, steps = saved
    y_last = steps[-1][0]
    grad = grad.to(x.dtype)
    # Q = √t·Y_N: ∂L/∂Y_N = √t·G and ∂L/∂t gets ⟨G, Y_N⟩/(2√t) (zero where t = 0, see the module docstring)
    dt = (grad * y_last).sum((-2, -1), keepdim=True)
    dt = torch.where(root_tr > 0, dt / (2.0 * torch.where(root_tr > 0, root_tr, torch.ones_like(root_tr))),
        torch.zeros_like(dt))
    dy, dz = grad * root_tr, None
    for y, z, t in reversed(steps[:-1]):
        yt, tt = y.transpose(-1, -2), t.transpose(-1, -2)
        # Y' = Y·T and Z' = T·Z (Z' = T when Z = I; no Z' on the last step)
        dt_mat = torch.bmm(yt, dy)
        if dz is not None:
            dt_mat = dt_mat + dz if z is None else torch.baddbmm(dt_mat, dz, z.transpose(-1, -2))
        dy_prev = torch.bmm(dy, tt)
        dz_prev = None
        if z is not None:
            dz_prev = torch.bmm(tt, dz) if dz is not None else None
        # T = 1.5I − ½·Z·Y (or 1.5I − ½·Y when Z = I)
        if z is None:
            dy_prev.add_(dt_mat, alpha=-0.5)
        else:
            dy_prev = torch.baddbmm(dy_prev, z.transpose(-1, -2), dt_mat, alpha=-0.5)
            yt_ = yt
            dz_prev = (torch.bmm(dt_mat, yt_).mul_(-0.5) if dz_prev is None
                else torch.baddbmm(dz_prev, dt_mat, yt_, alpha=-0.5))
        dy, dz = dy_prev, dz_prev
    # A = Σ/t with t = tr Σ: ∂L/∂Σ = ∂L/∂A / t + (∂L/∂t − ⟨∂L/∂A, A⟩/t)·I
    dx = dy
    dt = dt - (dx * x).sum((-2, -1), keepdim=True) / tr_safe
    out = dx / tr_safe
    out.diagonal(dim1=-2, dim2=-1).add_(dt.view(-1, 1))
    return out


def ns_vjp(cov: torch.Tensor, grad: torch.Tensor, iters: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """∂L/∂Σ of Q = √trΣ·NS_iters(Σ/trΣ) given ∂L/∂Q, computed in ``dtype`` (the forward is recomputed)."""
    with no_autocast(cov.device):
        _, saved = ns_forward(cov.to(dtype), iters)
        return ns_backward(saved, grad.to(dtype))


class _NSSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cov: torch.Tensor, iters: int, dtype: torch.dtype) -> torch.Tensor:
        q, (x, tr_safe, root_tr, steps) = ns_forward(cov.to(dtype), iters)
        # through save_for_backward, so saved-tensor hooks (activation checkpointing, save_on_cpu) see the iterates;
        # each tensor once (Y₀ is A, Z₁ is T₀), with ctx.layout mapping the flat (A, t, √t, steps...) list onto them
        flat = [x, tr_safe, root_tr, *(m for step in steps for m in step)]
        unique = {id(m): m for m in flat if m is not None}
        pos = {k: i for i, k in enumerate(unique)}
        ctx.layout = [None if m is None else pos[id(m)] for m in flat]
        ctx.save_for_backward(*unique.values())
        ctx.out_dtype = cov.dtype
        return q.to(cov.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        x, tr_safe, root_tr, *flat = [None if i is None else saved[i] for i in ctx.layout]
        steps = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
        # backward() called inside an autocast region would otherwise run these float32 matmuls in half precision
        with no_autocast(grad.device):
            out = ns_backward((x, tr_safe, root_tr, steps), grad)
        return out.to(ctx.out_dtype), None, None


def ns_sqrtm(cov: torch.Tensor, iters: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ^½ ≈ √tr Σ · Y_N with A = Σ/tr Σ, Y₀ = A, Z₀ = I, T = ½(3I − Z Y), Y ← Y T, Z ← T Z (iSQRT-COV).

    Args:
        cov: (B, d, d) symmetric PSD, any floating dtype.
        iters: number of iterations N (the last one updates Y only); 5 in iSQRT-COV.
        dtype: compute precision (float32 as in fast-MPN-COV; float64 for gradcheck).

    Returns:
        (B, d, d) in the dtype of ``cov``; 0 for samples with zero trace. The backward is hand-written (see the
        module docstring).
    """
    dtype = as_float_dtype(dtype, 'isqrt')
    if iters < 1:
        raise ValueError(f'isqrt: iters must be >= 1, got {iters}')
    with no_autocast(cov.device):
        return _NSSqrt.apply(cov, iters, dtype)

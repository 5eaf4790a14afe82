"""Tensor functions of the second-order heads without a matrix root: DropCov's adaptive channel dropout and SoT's
token cross-covariance with its singular-value power normalisation (svPN).

* DropCov (NeurIPS 2022, "DropCov: A Simple yet Effective Method for Improving Deep Architectures",
  https://github.com/mingzeG/DropCov): during training only, whole channels are dropped before the covariance, at a
  rate that grows as the channels decorrelate (:func:`dropcov_rate`, :func:`channel_dropout`).
* SoT ("SoT: Delving Deeper into Classification Head for Transformer", arXiv:2104.10935,
  https://github.com/jiangtaoxie/SoT): a multi-head cross-covariance of the patch tokens (:func:`token_cross_cov`)
  normalised by :func:`svpn`.
"""
import math

import torch
import torch.nn.functional as F

from .checks import check_float

__all__ = ['DROPCOV_SCALE', 'dropcov_rate', 'channel_dropout', 'token_cross_cov', 'svpn']

DROPCOV_SCALE = 10.  # the constant of DropCov's rule p = 1 - (10 / log2 d) * rho


def dropcov_rate(attn: torch.Tensor, cov: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """DropCov's channel-dropout rate from the channel attention and the covariance of the modulated features.

    ρ_b = cos(a_b, Σ_b·1): the cosine between sample b's channel attention a_b and the row sums of its covariance
    (how strongly each channel correlates with all the others). With the batch rule of the paper's code, one rate for
    the whole batch, p = clamp(1 − (10 / log₂ d)·mean_b ρ_b, 0, 1); with ``per_sample``, p_b = clamp(1 − (10 / log₂ d)
    ·ρ_b, 0, 1), so a sample's rate does not depend on which other samples share its batch (or on the batch size under
    gradient accumulation and data parallelism, where the batch rule sees each replica's micro-batch only).

    The rate is a statistic, not a function to learn through: it is computed without autograd, on the device of the
    inputs, with no host synchronisation. A sample whose covariance row sums vanish (all-constant channels) has ρ = 0.

    Args:
        attn: (B, d) channel attention.
        cov: (B, d, d) covariance of the modulated features, d ≥ 2.
        per_sample: one rate per sample instead of one per batch.

    Returns:
        (B,) dropout probabilities in [0, 1], float32 or float64 (the promoted dtype of the inputs); all equal
        without ``per_sample``.

    Raises:
        ValueError: shapes that do not match, or d < 2 (log₂ d = 0).
    """
    check_float(attn, 'attn')
    check_float(cov, 'cov')
    if attn.dim() != 2 or cov.shape != (*attn.shape, attn.shape[1]):
        raise ValueError(f'dropcov_rate: expected attn (B, d) and cov (B, d, d), got {tuple(attn.shape)} and '
            f'{tuple(cov.shape)}')
    d = attn.shape[1]
    if d < 2:
        raise ValueError(f'dropcov_rate: needs d >= 2 channels (the rule divides by log2 d), got d = {d}')
    dtype = torch.promote_types(torch.promote_types(attn.dtype, cov.dtype), torch.float32)
    with torch.no_grad():
        rho = F.cosine_similarity(attn.to(dtype), cov.to(dtype).sum(dim=2), dim=1, eps=1e-12)
        if not per_sample:
            rho = rho.mean().expand(attn.shape[0])
        return (1. - (DROPCOV_SCALE / math.log2(d)) * rho).clamp(0., 1.)


def channel_dropout(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Drop whole channels per sample (``nn.Dropout2d`` with a tensor rate): channel c of sample b is zeroed with
    probability p_b and kept channels are scaled by 1/(1 − p_b), so the expectation is unchanged.

    The rate stays on the device (no ``.item()``); p_b = 1 zeroes every channel of the sample (scale 0, not 1/0).

    Args:
        x: (B, C, ...) features.
        p: (B,) rates in [0, 1] (no gradient is taken through them).

    Returns:
        ``x`` with dropped channels, same shape and dtype.
    """
    keep = (1. - p.detach()).to(x.dtype)
    mask = torch.rand(x.shape[:2], device=x.device, dtype=x.dtype) < keep[:, None]
    scale = torch.where(keep > 0, 1. / keep.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(keep))
    return x * (mask.to(x.dtype) * scale[:, None]).reshape(*x.shape[:2], *([1] * (x.dim() - 2)))


def token_cross_cov(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SoT's cross-covariance of two token projections: Σ = (Q − μ_Q)ᵀ(K − μ_K) / N.

    μ is one scalar per matrix (the mean over all N·r entries of each head's Q, and of its K), as SoT centres them,
    not a mean per column. Σ is r×r and not symmetric.

    Args:
        q, k: (..., N, r) projections of N tokens (e.g. (B, h, N, r) for h heads).

    Returns:
        (..., r, r) in the dtype of the inputs.
    """
    if q.shape != k.shape or q.dim() < 2:
        raise ValueError(f'token_cross_cov: q and k must have one shape (..., N, r), got {tuple(q.shape)} and '
            f'{tuple(k.shape)}')
    n = q.shape[-2]
    q = q - q.mean(dim=(-2, -1), keepdim=True)
    k = k - k.mean(dim=(-2, -1), keepdim=True)
    return q.transpose(-2, -1) @ k / n


def svpn(cov: torch.Tensor, v0: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5) -> torch.Tensor:
    """SoT's singular-value power normalisation with one power-iteration step from the start vector ``v0``.

    u = Σv₀/‖Σv₀‖, v = Σᵀu/‖Σᵀu‖, σ̂ = uᵀΣv (the estimate of the largest singular value, ≥ 0 since it equals
    ‖Σᵀu‖); out = u·σ̂^α·vᵀ + (Σ − u·σ̂·vᵀ)/(σ̂^(1−α) + eps). With α = ½ this is Σ/√σ̂ up to ``eps``: a rescaling of
    the whole matrix by its estimated top singular value, not a matrix root. σ̂ is floored at the dtype's smallest
    normal number so that Σ = 0 gives 0, not NaN.

    Args:
        cov: (B, r, r) matrices (not necessarily symmetric).
        v0: (r,) start vector (learned in SoT).
        alpha: the power applied to σ̂.
        eps: added to σ̂^(1−α) in the remainder's denominator.

    Returns:
        (B, r, r) in the dtype of ``cov``.
    """
    if cov.dim() != 3 or cov.shape[-1] != cov.shape[-2] or v0.shape != cov.shape[-1:]:
        raise ValueError(f'svpn: expected cov (B, r, r) and v0 (r,), got {tuple(cov.shape)} and {tuple(v0.shape)}')
    u = F.normalize(cov @ v0.to(cov.dtype), dim=-1)
    v = F.normalize((cov.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1), dim=-1)
    sigma = (u.unsqueeze(1) @ cov @ v.unsqueeze(-1)).clamp_min(torch.finfo(cov.dtype).tiny)  # (B, 1, 1)
    top = u.unsqueeze(-1) @ v.unsqueeze(1)  # (B, r, r) rank-one u·vᵀ
    return top * sigma.pow(alpha) + (cov - top * sigma) / (sigma.pow(1. - alpha) + eps)

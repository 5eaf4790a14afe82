"""Coupled Newton–Schulz iteration for the matrix square root (iSQRT-COV, Li et al., CVPR 2018)."""
import torch

__all__ = ['ns_sqrtm']


def ns_sqrtm(cov: torch.Tensor, iters: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ^½ ≈ √tr Σ · Y_N with A = Σ/tr Σ, Y₀ = A, Z₀ = I, T = ½(3I − Z Y), Y ← Y T, Z ← T Z.

    Args:
        cov: (B, d, d) symmetric PSD.
        iters: number of iterations N (the last one updates Y only).
        dtype: compute precision (float32 as in fast-MPN-COV).

    Returns:
        (B, d, d), dtype of ``cov``.
    """
    out_dtype = cov.dtype
    with torch.autocast(device_type=cov.device.type, enabled=False):
        a = cov.to(dtype)
        d = a.shape[-1]
        tr = a.diagonal(dim1=-2, dim2=-1).sum(-1)
        tr = tr.clamp_min(torch.finfo(dtype).tiny).view(-1, 1, 1)
        a = a / tr
        eye = torch.eye(d, dtype=dtype, device=a.device).expand_as(a)
        y, z = a, eye
        for i in range(iters):
            t = 0.5 * (3.0 * eye - z @ y)
            if i < iters - 1:
                y, z = y @ t, t @ z
            else:
                y = y @ t
        return (y * tr.sqrt()).to(out_dtype)

"""Covariance pooling in one call: features → covariance in the method's precision → Σ^½ → upper triangle."""
from typing import Any

import torch

from .covariance import covariance, triu_vec
from .registry import method_dtype, sqrtm

__all__ = ['cov_pool']


def cov_pool(x: torch.Tensor, method: str = 'pade', check: bool = True, **options: Any) -> torch.Tensor:
    """Matrix-square-root normalised covariance pooling of a feature map, the functional form of ``CovPool``'s
    pooling (without its 1×1 reduction).

    The covariance, the square root and its backward all run in ``method``'s precision (``method_dtype``: float64
    for the eigen-methods, float32 for ``isqrt`` and ``mpa``, or the ``dtype`` option), whatever the dtype of ``x``
    and with autocast off.

    Args:
        x: (B, C, H, W) feature map or (B, C, N) samples.
        method: a key of ``METHODS``.
        check: raise ``ValueError`` on non-finite features (one device sync).
        **options: method options.

    Returns:
        (B, C(C+1)/2) upper triangles of Σ^½ (``torch.triu_indices`` order) in the dtype of ``x``.
    """
    cov = covariance(x, check=check, dtype=method_dtype(method, **options))
    return triu_vec(sqrtm(cov, method, check=False, symmetric=True, **options)).to(x.dtype)

"""Covariance pooling in one call: features → Σ^½ in the method's precision → upper triangle.

Two paths compute the same function. The covariance path forms Σ (d×d) and takes its root; the Gram path, for maps
with fewer positions M than channels d, works on the M×M Gram matrix of the centred features (``gram.py``), at
O(M³ + d²·M) instead of O(d³) per sample. ``use_gram`` decides.
"""
from typing import Any

import torch

from .checks import check_features, check_float, no_autocast
from .covariance import covariance, triu_vec
from .gram import use_gram
from .registry import METHODS, method_dtype, resolve_method, sqrtm

__all__ = ['cov_pool', 'features_sqrtm']


def features_sqrtm(x: torch.Tensor, method: str = 'pade', path: str = 'auto', check: bool = True,
        **options: Any) -> torch.Tensor:
    """Σ^½ of the biased covariance of the samples of ``x``, by ``method``, on the covariance or the Gram path.

    Args:
        x: (B, d, M) samples (M positions of d channels), any floating dtype.
        method: a key of ``METHODS``.
        path: 'auto' (the Gram path where it is faster: M < d, see ``use_gram``), 'gram' (whenever M < d) or 'cov'
            (always the d×d covariance). Both give the same values and gradients up to rounding.
        check: raise ``ValueError`` on non-finite features, or features whose covariance overflows the method's
            precision (one device sync).
        **options: method options.

    Returns:
        (B, d, d) Σ^½ in the method's precision (``method_dtype``), computed with autocast off.
    """
    check_float(x, 'x')
    if x.dim() != 3 or x.shape[-1] < 1:
        raise ValueError(f'features_sqrtm expects (B, d, M) samples with M >= 1, got shape {tuple(x.shape)}')
    opts = resolve_method(method, **options)
    dtype = method_dtype(method, **options)
    gram_fn = METHODS[method].gram_fn
    if gram_fn is None or not use_gram(x.shape[1], x.shape[2], path, method):
        cov = covariance(x, check=check, dtype=dtype)
        return sqrtm(cov, method, check=False, symmetric=True, **options)
    if check:
        check_features(x, dtype)
    with no_autocast(x.device):
        return gram_fn(x, **opts)


def cov_pool(x: torch.Tensor, method: str = 'pade', check: bool = True, path: str = 'auto',
        **options: Any) -> torch.Tensor:
    """Matrix-square-root normalised covariance pooling of a feature map, the functional form of ``CovPool``'s
    pooling (without its 1×1 reduction).

    The covariance (or the Gram matrix), the square root and its backward all run in ``method``'s precision
    (``method_dtype``: float64 for the eigen-methods, float32 for ``isqrt`` and ``mpa``, or the ``dtype`` option),
    whatever the dtype of ``x`` and with autocast off.

    Args:
        x: (B, C, H, W) feature map or (B, C, N) samples.
        method: a key of ``METHODS``.
        check: raise ``ValueError`` on non-finite features (one device sync).
        path: 'auto', 'gram' or 'cov', as ``features_sqrtm``.
        **options: method options.

    Returns:
        (B, C(C+1)/2) upper triangles of Σ^½ (``torch.triu_indices`` order) in the dtype of ``x``.
    """
    check_float(x, 'x')
    if x.dim() == 4:
        x = x.flatten(2)
    elif x.dim() != 3:
        raise ValueError(f'cov_pool expects (B, C, H, W) or (B, C, N), got shape {tuple(x.shape)}')
    return triu_vec(features_sqrtm(x, method, path=path, check=check, **options)).to(x.dtype)

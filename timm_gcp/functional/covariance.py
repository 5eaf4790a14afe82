"""Covariance pooling and upper-triangle vectorisation (pure tensor functions)."""
import functools
from typing import Optional

import torch

from .checks import as_float_dtype, check_features, check_float, no_autocast

__all__ = ['covariance', 'triu_vec', 'triu_unvec']


def covariance(x: torch.Tensor, check: bool = True, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Biased sample covariance of the spatial positions of a feature map.

    Σ = (1/N)·(X − μ)(X − μ)ᵀ, computed by subtracting the per-channel mean (never an N×N centring matrix, which the
    reference implementations build at O(N²) memory).

    Form Σ in the precision of the square root that follows (``dtype=method_dtype(method)``, or ``cov_pool``): with
    N < C samples Σ is rank-deficient, and in float32 its zero eigenvalues become rounding noise that the eigen-methods'
    backward amplifies; casting a float32 Σ to float64 afterwards does not bring them back.

    Args:
        x: (B, C, H, W) feature map or (B, C, N) samples; N = H·W positions are the samples.
        check: raise ``ValueError`` on non-finite features, or features whose covariance overflows ``dtype``
            (one device sync).
        dtype: precision to form Σ in (float32 or float64; the features are cast to it before the mean is
            subtracted). None: the input dtype, at least float32.

    Returns:
        (B, C, C) symmetric PSD matrices in ``dtype``. Autocast is disabled inside, so a bf16/fp16 input is upcast
        rather than multiplied in half precision.
    """
    check_float(x, 'x')
    if x.dim() == 4:
        x = x.flatten(2)
    elif x.dim() != 3:
        raise ValueError(f'covariance expects (B, C, H, W) or (B, C, N), got shape {tuple(x.shape)}')
    if x.shape[-1] < 1:
        raise ValueError(f'covariance needs at least one sample (N >= 1), got shape {tuple(x.shape)}')
    dtype = torch.promote_types(x.dtype, torch.float32) if dtype is None else as_float_dtype(dtype, 'covariance')
    if check:
        check_features(x, dtype)
    with no_autocast(x.device):
        x = x.to(dtype)
        xc = x - x.mean(dim=-1, keepdim=True)
        cov = torch.bmm(xc, xc.transpose(1, 2)) / x.shape[-1]
        # bmm is not exactly symmetric in floating point; downstream eigh reads one triangle only, but iterative
        # methods and the triu vector see both, so symmetrise explicitly.
        cov = 0.5 * (cov + cov.transpose(1, 2))
    return cov


def _triu_index_traceable(d: int, device: torch.device) -> torch.Tensor:
    """The index of :func:`_triu_index` in closed form, from ops every exporter expresses.

    Entry k of the triangle lies in row r, the largest with r·d − r(r−1)/2 ≤ k, at flat position k + r(r+1)/2. The
    float square root only seeds r; the two integer corrections make it exact for any d. Used while tracing or
    compiling: ONNX has no ``triu_indices`` (``aten::triu_indices`` fails the TorchScript-based
    ``torch.onnx.export``), and a cached tensor would become a trace-time constant of one device.
    """
    n = d * (d + 1) // 2
    k = torch.arange(n, device=device)
    b = 2 * d + 1
    r = ((b - (b * b - 8 * k).to(torch.float32).sqrt()) * 0.5).floor().to(torch.int64)
    r = r - ((r * (b - r)) // 2 > k).to(torch.int64)  # r·(2d + 1 − r)/2: entry number of row r's diagonal
    r = r + (((r + 1) * (b - 1 - r)) // 2 <= k).to(torch.int64)  # the same for row r + 1
    return k + (r * (r + 1)) // 2


@functools.lru_cache(maxsize=16)
def _triu_index_cached(d: int, device: torch.device) -> torch.Tensor:
    # a normal tensor even when first asked for under torch.inference_mode (index_select saves it for backward)
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(d, d, device=device)
        return rows * d + cols


def _triu_index(d: int, device: torch.device) -> torch.Tensor:
    """Flat (row-major) positions in a d×d matrix of its upper triangle, in ``torch.triu_indices(d, d)`` order."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return _triu_index_traceable(d, device)
    return _triu_index_cached(d, device)


def triu_vec(m: torch.Tensor) -> torch.Tensor:
    """Row-major upper triangle including the diagonal, as ``torch.triu_indices(d, d)`` orders it.

    Args:
        m: (B, d, d) matrices.

    Returns:
        (B, d(d+1)/2) values (32,896 for d=256), same dtype; no √2 weighting of off-diagonal entries.
    """
    check_float(m, 'm')
    if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f'triu_vec expects (B, d, d), got shape {tuple(m.shape)}')
    d = m.shape[-1]
    return m.flatten(1).index_select(1, _triu_index(d, m.device))


def triu_unvec(v: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """Inverse of :func:`triu_vec`.

    Args:
        v: (B, d(d+1)/2) upper-triangle vectors.
        symmetric: mirror the upper triangle into the lower one (True) or leave the lower triangle zero.

    Returns:
        (B, d, d) matrices, same dtype.
    """
    check_float(v, 'v')
    if v.dim() != 2:
        raise ValueError(f'triu_unvec expects (B, d(d+1)/2), got shape {tuple(v.shape)}')
    n = v.shape[1]
    d = int(round(((8 * n + 1) ** 0.5 - 1) / 2))
    if d * (d + 1) // 2 != n:
        raise ValueError(f'triu_unvec: {n} values is not d(d+1)/2 for any integer d')
    idx = _triu_index(d, v.device)
    out = v.new_zeros(v.shape[0], d * d).index_copy(1, idx, v).view(-1, d, d)
    if symmetric:
        out = out + out.triu(1).transpose(1, 2)
    return out

"""Input validation shared by the functional API.

Every public tensor function validates its input here so that bad input fails with a message that names the problem
(shape, dtype, non-finite, non-symmetric or indefinite samples) instead of a LAPACK error or a silent NaN.
"""
import contextlib
from typing import Any, Callable, ContextManager, Dict, Mapping, Optional, Tuple

import torch

__all__ = [
    'NonFiniteError', 'check_square_batch', 'check_finite', 'check_features', 'check_covariance', 'check_float',
    'no_autocast', 'as_float_dtype', 'portable_options']


def check_float(x: torch.Tensor, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` has a floating-point dtype."""
    if not torch.is_tensor(x):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(x).__name__}')
    if not x.dtype.is_floating_point:
        raise TypeError(f'{name} must have a floating-point dtype, got {x.dtype}')


def check_square_batch(x: torch.Tensor, name: str = 'cov') -> None:
    """Raise ``ValueError`` unless ``x`` is a (B, d, d) batch of square matrices with d >= 1."""
    check_float(x, name)
    if x.dim() != 3 or x.shape[-1] != x.shape[-2] or x.shape[-1] < 1:
        raise ValueError(f'{name} must have shape (B, d, d) with d >= 1, got {tuple(x.shape)}')


class NonFiniteError(ValueError):
    """A tensor given to the GCP functions holds NaN/inf (in training: the run has diverged upstream)."""


def _skip_value_checks(x: torch.Tensor) -> bool:
    # no values on meta; data-dependent control flow cannot be scripted, traced or compiled
    return (x.device.type == 'meta' or torch.jit.is_scripting() or torch.jit.is_tracing()
        or torch.compiler.is_compiling())


def _samples(flags: torch.Tensor, detail: Callable[[int], str], limit: int = 10) -> Tuple[int, str]:
    idx = torch.nonzero(flags).flatten().tolist()
    listed = ', '.join(f'sample {i}{detail(i)}' for i in idx[:limit])
    more = f' (and {len(idx) - limit} more samples)' if len(idx) > limit else ''
    return len(idx), listed + more


def _finite_error(x: torch.Tensor, bad: torch.Tensor, name: str, what: Optional[str]) -> NonFiniteError:
    counts = bad.flatten(1).sum(1)
    n, listed = _samples(counts > 0, lambda i: f': {int(counts[i])}')
    return NonFiniteError(f'{name} holds non-finite values (NaN/inf) in {n} of {x.shape[0]} samples: {listed} '
        f'non-finite entries out of {x[0].numel()}' + (f'; {what}' if what else ''))


def check_finite(x: torch.Tensor, name: str = 'cov', what: Optional[str] = None) -> None:
    """Raise ``NonFiniteError`` (a ``ValueError``) naming the samples that hold NaN/inf and how many values each holds.

    Skipped on the ``meta`` device (no values) and while tracing/compiling (data-dependent control flow); the check
    synchronises with the device once, which is the price of an error message instead of NaN weights.
    """
    if _skip_value_checks(x):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise _finite_error(x, bad, name, what)


def check_features(x: torch.Tensor, dtype: torch.dtype, name: str = 'x') -> None:
    """Raise ``ValueError`` for non-finite features, or features whose covariance would overflow ``dtype``.

    The covariance of centred features reaches (2·max|x|)²: finite features above about 9e18 overflow float32 there
    (inf, then NaN in the root) while float64 holds them. One device synchronisation for both checks.
    """
    if _skip_value_checks(x):
        return
    with torch.no_grad():
        bad = ~torch.isfinite(x)
        peak = torch.where(bad, torch.zeros_like(x), x).abs().flatten(1).amax(1).to(torch.float64)
        too_large = 4 * peak.square() > torch.finfo(dtype).max
        if not bool(bad.any() | too_large.any()):
            return
    if bool(bad.any()):
        raise _finite_error(x, bad, name, None)
    n, listed = _samples(too_large, lambda i: f' (max |x| = {float(peak[i]):.3g})')
    raise ValueError(f'{name}: the covariance of {n} of {x.shape[0]} samples would overflow {dtype} '
        f'(its entries reach (2·max|x|)² > {torch.finfo(dtype).max:.3g}): {listed}; form it in torch.float64 '
        f"(covariance(x, dtype=torch.float64), or the method option dtype='float64'), or rescale the features")


def check_covariance(cov: torch.Tensor, name: str = 'cov', what: Optional[str] = None,
        compute_dtype: Optional[torch.dtype] = None) -> None:
    """Raise ``ValueError`` naming the samples of a (B, d, d) batch that break the input contract of every matrix
    square-root method: finite, symmetric and positive semi-definite up to rounding.

    * symmetric: max|Σ − Σᵀ| ≤ √u·max|Σ| (u the unit roundoff of ``cov``'s dtype);
    * PSD: Σ + δ·I has a Cholesky factor with δ = 4·d·u·|tr Σ| (rounding of a PSD matrix formed in ``cov``'s dtype
      moves its eigenvalues by far less), i.e. no eigenvalue below about −δ;
    * in range: with ``compute_dtype`` narrower than ``cov``'s dtype (a float64 covariance into a float32 method),
      d·max|Σ| must fit ``compute_dtype``.

    Costs a Cholesky factorisation (a sixth of one d×d matmul per sample) and one device synchronisation. Skipped on
    the ``meta`` device and while tracing/compiling.
    """
    if _skip_value_checks(cov):
        return
    d = cov.shape[-1]
    with torch.no_grad():
        bad = ~torch.isfinite(cov)
        finite = ~bad.flatten(1).any(1)
        work = torch.where(bad, torch.zeros_like(cov), cov).to(torch.promote_types(cov.dtype, torch.float32))
        u = torch.finfo(cov.dtype).eps
        peak = work.abs().flatten(1).amax(1)
        asym = (work - work.transpose(-1, -2)).abs().flatten(1).amax(1)
        not_sym = asym > u ** 0.5 * peak
        tr = work.diagonal(dim1=-2, dim2=-1).sum(-1)
        shifted = 0.5 * (work + work.transpose(-1, -2))
        shift = (4 * d * u * tr.abs()).clamp_min(torch.finfo(work.dtype).tiny)
        shifted.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1))
        not_psd = (torch.linalg.cholesky_ex(shifted)[1] != 0) & finite & ~not_sym
        out_of_range = torch.zeros_like(finite)
        if compute_dtype is not None and torch.finfo(compute_dtype).max < torch.finfo(work.dtype).max:
            out_of_range = (peak.to(torch.float64) * d > torch.finfo(compute_dtype).max) & finite
        if not bool((~finite | not_sym | not_psd | out_of_range).any()):
            return
    if not bool(finite.all()):
        raise _finite_error(cov, bad, name, what)
    suffix = f'; {what}' if what else ''
    b = cov.shape[0]
    if bool(not_sym.any()):
        n, listed = _samples(not_sym, lambda i: f' (max|Σ − Σᵀ| = {float(asym[i]):.3g}, max|Σ| = {float(peak[i]):.3g})')
        raise ValueError(f'{name} is not symmetric in {n} of {b} samples: {listed}. The matrix square roots take '
            f'symmetric positive semi-definite matrices (covariances); symmetrise with ½(Σ + Σᵀ) if the asymmetry is '
            f'intended to be dropped{suffix}')
    if bool(out_of_range.any()):
        n, listed = _samples(out_of_range, lambda i: f' (max|Σ| = {float(peak[i]):.3g})')
        raise ValueError(f'{name}: {n} of {b} samples are too large for {compute_dtype} (d·max|Σ| must stay below '
            f"{torch.finfo(compute_dtype).max:.3g}): {listed}; use the method option dtype='float64'{suffix}")
    n, listed = _samples(not_psd, lambda i: f' (tr Σ = {float(tr[i]):.3g})')
    raise ValueError(f'{name} is not positive semi-definite in {n} of {b} samples: {listed}. It has an eigenvalue '
        f'below −4·d·u·|tr Σ| (u = {u:.3g}, the rounding of {cov.dtype}); the matrix square roots take symmetric '
        f'positive semi-definite matrices (covariances){suffix}')


def as_float_dtype(dtype, name: str) -> torch.dtype:
    """A floating ``torch.dtype`` from a dtype or its name ('float64', 'torch.float32'; YAML/CLI configs hold strings).

    Raises:
        ValueError: anything else, naming the option.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace('torch.', ''), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f'{name}: dtype must be a floating torch.dtype or its name, got {dtype!r}')
    return dtype


def portable_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Method options with ``torch.dtype``/``torch.device`` values replaced by their names ('float64', 'cpu'), which
    every method accepts too: what a JSON config (timm's ``config.json``) or a YAML recipe can hold."""
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.dtype):
            v = str(v).replace('torch.', '')
        elif isinstance(v, torch.device):
            v = str(v)
        out[k] = v
    return out


def no_autocast(device: torch.device) -> ContextManager:
    """Context that disables autocast for ``device``'s type (a no-op where autocast does not exist, e.g. ``meta``)."""
    available = getattr(torch.amp, 'is_autocast_available', lambda t: t in ('cpu', 'cuda'))
    if available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()

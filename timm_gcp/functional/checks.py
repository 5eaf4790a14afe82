"""Input validation shared by the functional API.

Every public tensor function validates its input here so that bad input fails with a message that names the problem
(shape, dtype, non-finite samples) instead of a LAPACK error or a silent NaN.
"""
import contextlib
from typing import Any, ContextManager, Dict, Mapping, Optional

import torch

__all__ = ['check_square_batch', 'check_finite', 'check_float', 'no_autocast', 'as_float_dtype', 'portable_options']


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


def check_finite(x: torch.Tensor, name: str = 'cov', what: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the samples that hold NaN/inf and how many values each holds.

    Skipped on the ``meta`` device (no values) and while tracing/compiling (data-dependent control flow); the check
    synchronises with the device once, which is the price of an error message instead of NaN weights.
    """
    if x.device.type == 'meta' or torch.jit.is_scripting() or torch.jit.is_tracing():
        return
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    counts = bad.flatten(1).sum(1)
    idx = torch.nonzero(counts).flatten().tolist()
    per = ', '.join(f'sample {i}: {int(counts[i])}' for i in idx[:10])
    more = f' (and {len(idx) - 10} more samples)' if len(idx) > 10 else ''
    raise ValueError(
        f'{name} holds non-finite values (NaN/inf) in {len(idx)} of {x.shape[0]} samples{more}: {per} '
        f'non-finite entries out of {x[0].numel()}' + (f'; {what}' if what else ''))


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

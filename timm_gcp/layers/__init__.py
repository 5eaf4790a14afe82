"""GCP layers: `MatrixSqrt`, `CovPool`, `GcpClassifierHead`, and the method switch used by the hybrid protocol."""
from typing import Any, Dict, Tuple

import torch.nn as nn

from ..functional import portable_options, resolve_method
from .cov_pool import CovPool, GcpClassifierHead, gcp_out_features
from .matrix_sqrt import MatrixSqrt, set_gcp_path

__all__ = ['MatrixSqrt', 'CovPool', 'GcpClassifierHead', 'gcp_out_features', 'set_gcp_method', 'get_gcp_method',
    'set_gcp_path']


def set_gcp_method(model: nn.Module, method: str, **options: Any) -> int:
    """Switch every ``MatrixSqrt`` in ``model`` to ``method`` with ``options`` (no weight changes).

    Also records the new ``gcp_method``/``gcp_kwargs`` in the model's timm construction args (``model._model_args``)
    where timm keeps them, so a config exported afterwards (``save_for_hf``/``push_to_hf_hub``) rebuilds the model
    with the method it now uses (dtype/device options recorded by name, which JSON can hold).

    Args:
        model: any module containing GCP layers (a timm GCP model, a DDP/EMA wrapper's module, ...).
        method: a key of ``timm_gcp.METHODS``.
        **options: method options; those not given take the method's defaults.

    Returns:
        The number of ``MatrixSqrt`` modules switched.

    Raises:
        ValueError: unknown method/option (nothing is changed), or no ``MatrixSqrt`` in ``model``.
    """
    resolve_method(method, **options)
    roots = [m for m in model.modules() if isinstance(m, MatrixSqrt)]
    if not roots:
        raise ValueError(f'set_gcp_method: {type(model).__name__} contains no MatrixSqrt (not a GCP model?)')
    for m in roots:
        m.set_method(method, **options)
    for m in model.modules():
        if isinstance(getattr(m, '_model_args', None), dict):
            m._model_args = dict(m._model_args, gcp_method=method, gcp_kwargs=portable_options(options))
    return len(roots)


def get_gcp_method(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """The ``(method, options)`` of the ``MatrixSqrt`` modules in ``model`` (options as given, defaults not filled).

    Raises:
        ValueError: no ``MatrixSqrt`` in ``model``, or its ``MatrixSqrt`` modules use different methods/options.
    """
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, MatrixSqrt):
            found[name] = m.get_method()
    if not found:
        raise ValueError(f'get_gcp_method: {type(model).__name__} contains no MatrixSqrt (not a GCP model?)')
    first = next(iter(found.values()))
    if any(v != first for v in found.values()):
        listing = '; '.join(f'{n or "<root>"}: {v[0]} {v[1]}' for n, v in found.items())
        raise ValueError(f'get_gcp_method: the MatrixSqrt modules differ ({listing}); use set_gcp_method to unify')
    return first

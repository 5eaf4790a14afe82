"""The hybrid protocol's method switch: which square-root method a model's covariance heads run, and changing it.

Only matrix-root heads (``CovPool`` and its ``MatrixSqrt``) can switch: the switch changes a function, not weights.
DropCov and SoT heads (``DropCovPool``, ``SoTPool``) have parameters of their own and no root to switch, so a switch
into or out of them is refused with a message that says so.
"""
from typing import Any, Dict, List, Tuple

import torch.nn as nn

from ..functional import METHODS, portable_options, resolve_method
from .dropcov import DropCovPool
from .matrix_sqrt import MatrixSqrt
from .sot import SoTPool

__all__ = ['OTHER_HEADS', 'set_gcp_method', 'get_gcp_method']

OTHER_HEADS = (DropCovPool, SoTPool)  # second-order heads that are not a matrix root; their head_name is their token


def _other_heads(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    # any pooling module with a head_name (its model-name token) is a head of its own, not a matrix root
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(type(m), 'head_name', None), str)]


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
        ValueError: unknown method/option (nothing is changed); ``method`` names a DropCov/SoT head, or ``model``
            has one (neither has a matrix root to switch); no ``MatrixSqrt`` in ``model``.
    """
    heads = {cls.head_name: cls for cls in OTHER_HEADS}
    if method in heads and method not in METHODS:
        raise ValueError(f'set_gcp_method: {method!r} is a head of its own with its own parameters, not a matrix '
            f'square-root method; a model cannot be switched into it. Build the <backbone>_gcp_{method} model and '
            f'train it (the backbone weights can be loaded from this model\'s checkpoint)')
    others = _other_heads(model)
    if others:
        name, head = others[0]
        raise ValueError(f'set_gcp_method: {type(model).__name__} has a {head.head_name!r} head ({name or "<root>"}: '
            f'{type(head).__name__}), which has no matrix square root; the hybrid method switch applies to '
            f'matrix-root heads only (switching out of {head.head_name!r} would change parameters, not a function)')
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
    """The ``(method, options)`` of the second-order heads in ``model`` (options as given, defaults not filled).

    For matrix-root heads, the method of their ``MatrixSqrt`` modules; for a DropCov or SoT head, its name
    (``'dropcov'``, ``'sot'``, the token of its model names) and its options.

    Raises:
        ValueError: no GCP head in ``model``, or its heads use different methods/options.
    """
    found = {n: m.get_method() for n, m in _other_heads(model)}
    if not found:
        found = {n: m.get_method() for n, m in model.named_modules() if isinstance(m, MatrixSqrt)}
    if not found:
        raise ValueError(f'get_gcp_method: {type(model).__name__} contains no MatrixSqrt (not a GCP model?)')
    first = next(iter(found.values()))
    if any(v != first for v in found.values()):
        listing = '; '.join(f'{n or "<root>"}: {v[0]} {v[1]}' for n, v in found.items())
        raise ValueError(f'get_gcp_method: the MatrixSqrt modules differ ({listing}); use set_gcp_method to unify')
    return first

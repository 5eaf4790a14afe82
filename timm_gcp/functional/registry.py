"""The one registry of matrix square-root methods: name → implementation and default options."""
import dataclasses
from typing import Any, Callable, Dict, Mapping

import torch

from .checks import check_finite, check_square_batch
from .eig_sqrt import EPS, eig_sqrtm
from .newton_schulz import ns_sqrtm

__all__ = ['MethodSpec', 'METHODS', 'sqrtm', 'resolve_method', 'register_method']


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A matrix square-root method.

    Attributes:
        name: registry key (part of model names, e.g. ``resnet50_gcp_<name>``).
        fn: ``fn(cov, **options) -> Tensor`` computing in its own precision and returning ``cov``'s dtype.
        defaults: every option the method takes, with its default; other options are rejected.
        paper_name: the name used in the ICCV 2021 paper (or the method's source).
        eigen: True when the forward is an eigendecomposition.
        description: one line for listings and model cards.
    """
    name: str
    fn: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any]
    paper_name: str
    eigen: bool
    description: str


METHODS: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f'method {spec.name!r} is already registered')
    METHODS[spec.name] = spec
    return spec


_EIG = dict(eps=EPS, eig_device=None)

register_method(MethodSpec(
    'isqrt', ns_sqrtm, dict(iters=5, dtype=torch.float32), 'iSQRT-COV', False,
    'coupled Newton-Schulz iteration on Σ/trΣ, √trΣ compensation'))
register_method(MethodSpec(
    'svd', lambda cov, **o: eig_sqrtm(cov, kernel='exact', **o), dict(_EIG), 'MPN-COV', True,
    'eigh forward, exact K = 1/(λi−λj) backward'))


def resolve_method(method: str, **options: Any) -> Dict[str, Any]:
    """Validate ``method`` and ``options`` and return the full option dict (defaults filled in).

    Raises:
        ValueError: unknown method name or an option the method does not take (the message lists what is valid).
    """
    if method not in METHODS:
        raise ValueError(f'unknown matrix square-root method {method!r}; valid methods: {", ".join(METHODS)}')
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        valid = ', '.join(spec.defaults) or 'none'
        raise ValueError(f'method {method!r} does not take option(s) {", ".join(unknown)}; valid options: {valid}')
    return {**spec.defaults, **options}


def sqrtm(cov: torch.Tensor, method: str = 'pade', check: bool = True, **options: Any) -> torch.Tensor:
    """Batched square root of symmetric PSD matrices by a registered method.

    Args:
        cov: (B, d, d) symmetric PSD matrices, any floating dtype.
        method: a key of ``METHODS``.
        check: raise ``ValueError`` naming the samples with non-finite entries (one device sync).
        **options: method options (see ``METHODS[method].defaults``).

    Returns:
        (B, d, d) Σ^½ in the dtype and on the device of ``cov``. Autocast does not reach inside.
    """
    opts = resolve_method(method, **options)
    check_square_batch(cov, 'cov')
    if check:
        check_finite(cov, 'cov', what=f'method {method!r}')
    with torch.autocast(device_type=cov.device.type, enabled=False):
        return METHODS[method].fn(cov, **opts)

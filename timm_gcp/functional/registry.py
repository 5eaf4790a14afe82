"""The one registry of matrix square-root methods: name → implementation and default options."""
import dataclasses
import math
import numbers
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from .checks import as_float_dtype, check_covariance, check_finite, check_square_batch, no_autocast
from .eig_sqrt import EPS, eig_sqrtm
from .gram import gram_eig_sqrtm, gram_mpa_sqrtm, gram_ns_sqrtm
from .mpa import mpa_sqrtm
from .newton_schulz import ns_sqrtm

__all__ = ['MethodSpec', 'METHODS', 'COMPUTE_DTYPES', 'PrecisionWarning', 'sqrtm', 'resolve_method', 'method_dtype',
    'register_method']


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
        gram_fn: ``gram_fn(x, **options) -> Tensor``, the same root of the covariance of the (B, d, M) samples ``x``
            computed from their M×M Gram matrix (``timm_gcp.functional.gram``), in the method's precision; None
            when the method has no Gram form.
    """
    name: str
    fn: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any]
    paper_name: str
    eigen: bool
    description: str
    gram_fn: Optional[Callable[..., torch.Tensor]] = None


METHODS: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f'method {spec.name!r} is already registered')
    METHODS[spec.name] = spec
    return spec


# Eigen-methods compute in float64 by default (the ICCV 2021 paper's setting): a rank-deficient covariance has
# d − M + 1 zero eigenvalues, which float32 turns into rounding noise whose eigenvectors leak into the gradient.
_EIG = dict(eps=EPS, eig_device=None, dtype=torch.float64)


_Fns = Tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]


def _eig_method(kernel: Union[str, Callable[[Mapping[str, Any]], str]],
        **fixed: Callable[[Mapping[str, Any], int], Any]) -> _Fns:
    """``(fn, gram_fn)`` of an eigen-method: on the d×d covariance and from the M×M Gram matrix, same options.

    Args:
        kernel: the backward kernel's name, or a function of the options giving it.
        **fixed: ``eig_sqrtm`` keyword (a kernel option, ``top_n`` or ``ns_iters``) → function of (options, d) giving
            its value.
    """
    def kwargs(d: int, opts: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(eps=opts['eps'], eig_device=opts['eig_device'], dtype=as_float_dtype(opts['dtype'], 'dtype'))
        out.update({k: get(opts, d) for k, get in fixed.items()})
        out['kernel'] = kernel(opts) if callable(kernel) else kernel
        return out

    def fn(cov: torch.Tensor, **options: Any) -> torch.Tensor:
        return eig_sqrtm(cov, **kwargs(cov.shape[-1], options))

    def gram_fn(x: torch.Tensor, **options: Any) -> torch.Tensor:
        return gram_eig_sqrtm(x, **kwargs(x.shape[1], options))

    return fn, gram_fn


def default_top_n(d: int) -> int:
    """SVD-TopN's N when ``top_n`` is None: d − 50 for d ≥ 256 (the paper: 206 of 256); smaller heads drop the same
    fraction, round(50·d/256) eigenvalues (d = 8 keeps 6), instead of all but one."""
    return d - min(50, round(50 * d / 256))


def _method(name: str, fns: _Fns, defaults: Dict[str, Any], paper_name: str, eigen: bool,
        description: str) -> MethodSpec:
    return register_method(MethodSpec(name, fns[0], defaults, paper_name, eigen, description, gram_fn=fns[1]))


_method('isqrt', (ns_sqrtm, gram_ns_sqrtm), dict(iters=5, dtype=torch.float32), 'iSQRT-COV', False,
    'coupled Newton-Schulz iteration on Σ/trΣ with √trΣ compensation, hand-written backward')
_method('svd', _eig_method('exact'), dict(_EIG), 'MPN-COV', True,
    'float64 eigh forward, exact K = 1/(λi−λj) backward (0 at exact ties)')
_method('pade', _eig_method(lambda o: 'pade_series' if o['series'] else 'pade'), dict(series=False, **_EIG),
    'SVD-Padé', True,
    'float64 eigh forward, K = [50/50] Padé of 1/(1−r) in closed form (finite ±2^53/λ at exact ties); series=True: '
    'term by term as the reference code, ties per sample')
_method('taylor', _eig_method('taylor', degree=lambda o, d: int(o['degree'])), dict(degree=100, **_EIG),
    'SVD-Taylor', True, 'float64 eigh forward, K = degree-K Taylor series of 1/(1−r) in closed form')
_method('trunc', _eig_method('trunc', threshold=lambda o, d: float(o['threshold'])), dict(threshold=1e10, **_EIG),
    'SVD-Trunc', True, 'float64 eigh forward, exact K clipped to [−T, T]')
_method('topn', _eig_method('exact', top_n=lambda o, d: default_top_n(d) if o['top_n'] is None else int(o['top_n'])),
    dict(top_n=None, **_EIG), 'SVD-TopN', True,
    'float64 eigh forward keeping the top N = d−50 eigenvalues (d ≥ 256; rest set to ε), exact K backward')
_method('newton', _eig_method('exact', ns_iters=lambda o, d: int(o['iters'])), dict(iters=10, **_EIG),
    'SVD-Newton', True, 'float64 eigh forward, backward = gradient of √trΣ·NS_10(Σ/trΣ)')
_method('pi', _eig_method('pi', iters=lambda o, d: int(o['iters'])), dict(iters=20, **_EIG), 'SVD-PI', True,
    'float64 eigh forward, gradient of 20 deflated power-iteration steps (Wang et al. 2019) in closed form')
_method('lyap', _eig_method('lyap'), dict(_EIG), 'eigh + Daleckii-Krein (Lyapunov) backward', True,
    'float64 eigh forward, exact root gradient 1/(√λi+√λj) without cancellation')
_method('mpa', (mpa_sqrtm, gram_mpa_sqrtm), dict(degree=5, lyap_iters=8, dtype=torch.float32),
    'MPA-Lya (Song et al., ICLR 2022)', False,
    'matrix Padé [5/5] of √(1−x) on Σ/‖Σ‖_F (Cholesky solve), Lyapunov sign-iteration backward')


def _int_at_least(lo: int) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo
        return None if ok else f'an integer >= {lo}'
    return check


def _positive_number(v: Any, finite: bool) -> bool:
    return (isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0
        and (math.isfinite(v) or not finite and v == math.inf))


COMPUTE_DTYPES = (torch.float32, torch.float64)  # eigh, Cholesky and the iterations need at least float32


def _check_dtype(v: Any) -> Optional[str]:
    try:
        ok = as_float_dtype(v, 'dtype') in COMPUTE_DTYPES
    except ValueError:
        ok = False
    return None if ok else "torch.float32 or torch.float64, or its name ('float32', 'float64')"


def _check_device(v: Any) -> Optional[str]:
    device = v
    if isinstance(v, str):
        try:
            device = torch.device(v)
        except RuntimeError:
            pass
    if v is None or isinstance(device, torch.device) and device.type != 'meta':
        return None
    return "None, a device string (e.g. 'cpu', 'cuda:0') or a torch.device that holds values (not 'meta')"


# Valid values of the built-in options, by option name, for every method that takes them (other option names are
# unchecked; a method that gives one of these names another range overrides it in _METHOD_OPTION_CHECKS).
# Checked when a method is resolved, i.e. when a model is built or a switch is configured, not only when it runs: an
# ε ≤ 0 floor turns the rank-deficient covariances of GCP into inf/NaN gradients, a negative T or degree silently
# zeroes or flips K, and a non-integer count used to be truncated.
_OPTION_CHECKS: Dict[str, Callable[[Any], Optional[str]]] = {
    # an absolute eigenvalue floor far below the covariance's scale (float64 machine epsilon by default); a floor
    # of 1 or more would replace the spectrum of a normalised feature covariance and overflows float32 outputs
    'eps': lambda v: None if _positive_number(v, finite=True) and v < 1 else 'a positive number below 1',
    'threshold': lambda v: None if _positive_number(v, finite=False) else 'a positive number (inf: no clipping)',
    'iters': _int_at_least(1),
    'lyap_iters': _int_at_least(1),
    'degree': _int_at_least(1),
    'top_n': lambda v: None if v is None else _int_at_least(1)(v),
    'dtype': _check_dtype,
    'eig_device': _check_device,
    'series': lambda v: None if isinstance(v, bool) else 'True or False',
}
_METHOD_OPTION_CHECKS: Dict[str, Dict[str, Callable[[Any], Optional[str]]]] = {
    'taylor': {'degree': _int_at_least(0)},  # degree 0: K = ±1/λ_max, the series' first term
}
# mpa's Padé denominator Q_N(I − A) is positive definite in exact arithmetic, but evaluated term by term it loses
# that from degree 12 in float32 and 23 in float64 (measured on rank-deficient covariances, d = 32-256): cap with a
# margin, per compute dtype.
MPA_MAX_DEGREE = {torch.float32: 10, torch.float64: 20}


def _check_combination(method: str, opts: Mapping[str, Any]) -> None:
    if method == 'mpa':
        dtype = as_float_dtype(opts['dtype'], 'dtype')
        if opts['degree'] > MPA_MAX_DEGREE[dtype]:
            raise ValueError(f"method 'mpa': option degree={opts['degree']} is invalid with dtype={dtype}; it must be "
                f'at most {MPA_MAX_DEGREE[dtype]} (higher degrees lose the positive definiteness of the Padé '
                f'denominator to rounding; {", ".join(f"{v} in {k}" for k, v in MPA_MAX_DEGREE.items())})')


def resolve_method(method: str, **options: Any) -> Dict[str, Any]:
    """Validate ``method`` and ``options`` and return the full option dict (defaults filled in).

    Raises:
        ValueError: unknown method name, an option the method does not take (the message lists what is valid), or
            an option value out of its range (the message names the option and what it must be).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f'unknown matrix square-root method {method!r} (a method name, one of: {", ".join(METHODS)})')
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        valid = ', '.join(spec.defaults) or 'none'
        raise ValueError(f'method {method!r} does not take option(s) {", ".join(unknown)}; valid options: {valid}')
    checks = {**_OPTION_CHECKS, **_METHOD_OPTION_CHECKS.get(method, {})}
    for name, value in options.items():
        need = checks[name](value) if name in checks else None
        if need is not None:
            raise ValueError(f'method {method!r}: option {name}={value!r} is invalid; it must be {need}')
    resolved = {**spec.defaults, **options}
    _check_combination(method, resolved)
    return resolved


def method_dtype(method: str, **options: Any) -> torch.dtype:
    """The precision ``method`` computes in with ``options``: its ``dtype`` option (float64 for the eigen-methods,
    float32 for ``isqrt`` and ``mpa`` unless set). The whole GCP meta-layer (covariance, root, backward) runs in it.

    Raises:
        ValueError: as ``resolve_method``.
    """
    return as_float_dtype(resolve_method(method, **options)['dtype'], 'dtype')


class PrecisionWarning(UserWarning):
    """A covariance reached a square-root method in a lower precision than the method computes in."""


def _warn_precision(cov: torch.Tensor, method: str, dtype: torch.dtype) -> None:
    if torch.finfo(cov.dtype).eps <= torch.finfo(dtype).eps or torch.jit.is_scripting():
        return
    warnings.warn(
        f'sqrtm: method {method!r} computes in {dtype} but was given a {cov.dtype} covariance. If it was formed from '
        f'features in {cov.dtype}, its small eigenvalues are rounding noise (a rank-deficient covariance, fewer '
        f'samples than channels, has many) and the gradient into the features is wrong; form it in {dtype} with '
        f'covariance(x, dtype={dtype}) or use cov_pool(x, method). Pass a {dtype} covariance, or the option '
        f"dtype='{str(cov.dtype).replace('torch.', '')}', to silence this.", PrecisionWarning, stacklevel=3)


def sqrtm(cov: torch.Tensor, method: str = 'pade', check: Union[bool, str] = True, symmetric: bool = False,
        **options: Any) -> torch.Tensor:
    """Batched square root of symmetric PSD matrices by a registered method.

    The method computes in its precision (``method_dtype``: float64 for the eigen-methods, float32 for ``isqrt`` and
    ``mpa``) whatever ``cov``'s dtype. Precision lost before that cannot be recovered: a covariance formed in float32
    from M < d samples holds its d − M + 1 zero eigenvalues as float32 rounding noise (about 1e-8·λ_max) whose
    eigenvectors are not orthogonal to the features, and the eigen-methods' backward weights them heavily, so the
    gradient into the features is off (cosine 0.2–0.9 to the float64 one on GCP ResNet heads). Form the covariance in
    the method's precision (``covariance(x, dtype=method_dtype(method))``, or ``cov_pool`` from features in one
    call); a covariance in a lower precision than the method's gets a ``PrecisionWarning``.

    Input contract, the same for every method: ``cov`` is symmetric positive semi-definite, up to rounding. It is
    symmetrised (½(Σ + Σᵀ)) before the method sees it, so every method computes the root of the same matrix. With
    ``check`` (the default), a sample that is non-finite, not symmetric beyond rounding (max|Σ − Σᵀ| > √u·max|Σ|), or
    has an eigenvalue below −4·d·u·|tr Σ| (u the unit roundoff of ``cov``'s dtype) raises ``ValueError`` naming it,
    whatever the method. Without the check such input gives undefined results: the eigen-methods floor negative
    eigenvalues at ``eps`` (the root of the PSD part), ``isqrt``/``mpa``/``newton`` can return NaN.

    Args:
        cov: (B, d, d) symmetric PSD matrices, any floating dtype.
        method: a key of ``METHODS``.
        check: True validates the input contract above (a Cholesky factorisation and one device sync; measured on
            a two-core CPU at B = 32, d = 256: a fifth of an eigen-method's forward, an eighth of ``isqrt``'s);
            ``'finite'`` only rejects non-finite samples (for covariances formed by ``covariance``, symmetric PSD by
            construction); False checks nothing.
        symmetric: ``cov`` is exactly symmetric already (as ``covariance`` returns it): skip the symmetrisation.
        **options: method options (see ``METHODS[method].defaults``).

    Returns:
        (B, d, d) Σ^½ in the dtype and on the device of ``cov``. Autocast does not reach inside.
    """
    opts = resolve_method(method, **options)
    check_square_batch(cov, 'cov')
    dtype = as_float_dtype(opts['dtype'], 'dtype')
    _warn_precision(cov, method, dtype)
    if check not in (True, False, 'finite'):
        raise ValueError(f"sqrtm: check must be True, False or 'finite', got {check!r}")
    if check == 'finite':
        check_finite(cov, 'cov', what=f'method {method!r}')
    elif check:
        check_covariance(cov, 'cov', what=f'method {method!r}', compute_dtype=dtype)
    with no_autocast(cov.device):
        # every method sees the same symmetric matrix (eigh would read one triangle, the iterations both)
        return METHODS[method].fn(cov if symmetric else 0.5 * (cov + cov.transpose(-1, -2)), **opts)

"""`MatrixSqrt`: the matrix square root of a batch of covariance matrices as a switchable module.

The module holds no parameters; its method (a key of ``timm_gcp.METHODS``) and options can be changed on a built
model, which is how the hybrid protocol of arXiv:2105.02498 switches from iSQRT-COV to an SVD method late in training.
"""
import logging
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from ..functional import GRAM_PATHS, METHODS, features_sqrtm, method_dtype, resolve_method, sqrtm

__all__ = ['MatrixSqrt', 'set_gcp_path', 'OnnxExportError', 'onnx_missing_operator', 'check_onnx_export']

_logger = logging.getLogger(__name__)

TORCHSCRIPT_UNSUPPORTED = (
    'GCP models cannot be compiled with torch.jit.script: the matrix square root (MatrixSqrt) runs a '
    'torch.autograd.Function with a custom backward and takes per-method keyword options, neither of which '
    'TorchScript supports (TorchScript is also deprecated in PyTorch). Use torch.compile for speed, or FX '
    '(timm features_only=True, feature_cls="fx") for graph access.')

# The ONNX operator set has no eigendecomposition, which the forward of the eigen-methods needs. (Nor a Cholesky
# factorisation or linear solve: while exporting, ``mpa`` inverts its Padé denominator with matmuls instead.)
_ONNX_MISSING_EIGEN = 'linalg_eigh (symmetric eigendecomposition)'


class OnnxExportError(RuntimeError):
    """A GCP model's matrix square-root method cannot be expressed in ONNX."""


def onnx_missing_operator(method: str) -> Optional[str]:
    """The operator ONNX lacks for ``method``'s forward, or None when ONNX expresses it (``isqrt``, ``mpa``).

    Raises:
        ValueError: unknown method.
    """
    method_dtype(method)  # unknown method: ValueError listing the valid ones
    return _ONNX_MISSING_EIGEN if METHODS[method].eigen else None


def check_onnx_export(method: str) -> None:
    """Raise ``OnnxExportError`` while ``torch.onnx.export`` runs (either exporter) if ONNX cannot express ``method``.

    Every code path that computes a GCP root calls it (``MatrixSqrt.forward`` does), so the user gets this error
    rather than the exporter's failure on a missing operator deep inside its own code. Free outside an export.
    """
    if not torch.onnx.is_in_onnx_export():
        return
    missing = onnx_missing_operator(method)
    if missing is None:
        return
    onnx_ok = sorted(m for m in METHODS if onnx_missing_operator(m) is None)
    raise OnnxExportError(
        f'cannot export the GCP matrix square root {method!r} to ONNX: its forward needs {missing}, which the ONNX '
        f'operator set does not have. Instead: export the same weights with an ONNX-expressible method '
        f'({", ".join(onnx_ok)}; timm_gcp.set_gcp_method(model, {onnx_ok[0]!r}) changes the function, not the '
        f'weights, so validate first that the switch keeps the accuracy you need), or deploy with torch.export '
        f'(an ExportedProgram, saved with torch.export.save) or torch.compile, which support every method.')


@register_notrace_module  # FX would otherwise inline Function.apply and lose the custom backward
class MatrixSqrt(nn.Module):
    """Σ^½ of (B, d, d) symmetric PSD matrices by a registered method (see ``timm_gcp.METHODS``).

    Args:
        method: a key of ``timm_gcp.METHODS``.
        **options: method options (e.g. ``iters=3`` for ``isqrt``); validated now, defaults filled at call time.

    Attribute ``check_finite``: ``None`` (default) validates the input on the CPU only, where the check costs no device
    synchronisation; on an accelerator the per-step host round trip is skipped (a non-finite input then shows up as a
    non-finite loss, which ``timm-gcp-train`` stops on). ``True``/``False`` force it on/off. What is validated: the
    whole input contract of ``sqrtm`` (finite, symmetric, PSD up to rounding), unless ``from_features``.

    Attribute ``from_features``: False (default): the input is a (B, d, d) covariance. ``CovPool`` sets it True for
    its own root: the input is then the (B, d, M) samples themselves, and the module computes the root of their
    biased covariance on the path ``path`` says (``features_sqrtm``): the d×d covariance, or the M×M Gram matrix
    when the map has fewer positions than channels (the same values and gradients, at O(M³ + d²·M) instead of
    O(d³)). Only non-finite (or, in float32, overflowing) features are looked for then: a covariance formed from
    them is symmetric PSD by construction.

    Attribute ``from_covariance``: False (default). True when the (B, d, d) input is exactly symmetric by construction
    (SoT's symmetrised cross-covariance): then only non-finite values are looked for, and it is not symmetrised again.

    Attribute ``path``: 'auto' (default: the Gram path when it is faster, see ``timm_gcp.functional.use_gram``),
    'gram' or 'cov' (force one, for ablations and reference runs). It changes no weight and no state-dict entry.

    Attribute ``compute_dtype``: the precision of the current method (float64 for the eigen-methods, float32 for
    ``isqrt`` and ``mpa``, or their ``dtype`` option); ``CovPool`` forms the covariance in it.

    The output has the dtype and device of the input; each method computes in its own precision with autocast
    disabled.
    """

    def __init__(self, method: str = 'pade', **options: Any) -> None:
        super().__init__()
        self.method = ''
        self.options: Dict[str, Any] = {}
        self.compute_dtype = torch.float64
        self.check_finite: Optional[bool] = None
        self.from_features = False
        self.from_covariance = False
        self.path = 'auto'
        self.set_method(method, **options)

    @torch.jit.ignore
    def set_method(self, method: str, **options: Any) -> None:
        """Switch to ``method`` with ``options`` (the function changes; there are no weights).

        Raises:
            ValueError: unknown method or an option the method does not take.
        """
        dtype = method_dtype(method, **options)  # validates before changing anything
        if self.method and (method, options) != (self.method, self.options):
            _logger.info(f'MatrixSqrt: switching from {self.method!r} {self.options} to {method!r} {options}')
        self.method = method
        self.options = dict(options)
        self.compute_dtype = dtype

    @torch.jit.ignore
    def get_method(self) -> Tuple[str, Dict[str, Any]]:
        """The current method name and the options given explicitly (defaults not filled in)."""
        return self.method, dict(self.options)

    @torch.jit.ignore
    def resolved_options(self) -> Dict[str, Any]:
        """Every option of the current method, defaults filled in."""
        return resolve_method(self.method, **self.options)

    def __prepare_scriptable__(self) -> 'MatrixSqrt':
        # torch.jit.script calls this on every submodule before compiling: fail early with the reason.
        raise RuntimeError(TORCHSCRIPT_UNSUPPORTED)

    @torch.jit.ignore
    def set_path(self, path: str) -> None:
        """Force the Gram ('gram') or covariance ('cov') path, or let the shapes decide ('auto').

        Raises:
            ValueError: another value.
        """
        if path not in GRAM_PATHS:
            raise ValueError(f'path must be one of {GRAM_PATHS}, got {path!r}')
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, d, d) symmetric PSD covariances, or with ``from_features`` (B, d, M) samples.
        Returns: (B, d, d) Σ^½: dtype and device of ``x`` for a covariance, the method's precision from samples.

        Raises:
            OnnxExportError: while ``torch.onnx.export`` traces a method whose forward ONNX cannot express (before
                the exporter meets the missing operator deep inside its own code).
        """
        check_onnx_export(self.method)
        check = x.device.type == 'cpu' if self.check_finite is None else self.check_finite
        if self.from_features:
            return features_sqrtm(x, self.method, path=self.path, check=bool(check), **self.options)
        if check and self.from_covariance:
            check = 'finite'
        return sqrtm(x, self.method, check=check, symmetric=self.from_covariance, **self.options)

    def extra_repr(self) -> str:
        opts = ''.join(f', {k}={v!r}' for k, v in self.options.items())
        path = f', path={self.path!r}' if self.path != 'auto' else ''
        return f'method={self.method!r}{opts}{path}'


def set_gcp_path(model: nn.Module, path: str) -> int:
    """Set how every ``MatrixSqrt`` in ``model`` computes its root: 'auto' (the M×M Gram matrix where a map has fewer
    positions than channels and that is faster), 'gram' or 'cov' (the d×d covariance). Values and gradients are the
    same on both paths up to rounding; weights and state-dict entries do not change.

    Returns:
        The number of ``MatrixSqrt`` modules set.

    Raises:
        ValueError: an unknown ``path`` (nothing is changed), or no ``MatrixSqrt`` in ``model``.
    """
    if path not in GRAM_PATHS:
        raise ValueError(f'path must be one of {GRAM_PATHS}, got {path!r}')
    roots = [m for m in model.modules() if isinstance(m, MatrixSqrt)]
    if not roots:
        raise ValueError(f'set_gcp_path: {type(model).__name__} contains no MatrixSqrt (not a GCP model?)')
    for m in roots:
        m.set_path(path)
    return len(roots)

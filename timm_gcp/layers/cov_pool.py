"""Global covariance pooling (GCP) with a matrix square root, and a classifier head built on it.

Pipeline (ICCV 2021, arXiv:2105.02498; iSQRT-COV, arXiv:1712.01034): 1×1 conv (no bias) → BN → ReLU down to
``gcp_dim`` channels, biased spatial covariance Σ (d×d), Σ^½ by a method of ``timm_gcp.METHODS``, row-major upper
triangle including the diagonal (d(d+1)/2 values, 32,896 for d = 256).
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.layers import get_device_dtype, register_notrace_function

from ..functional import covariance, triu_vec
from .matrix_sqrt import MatrixSqrt

__all__ = ['CovPool', 'GcpClassifierHead', 'gcp_out_features']


def gcp_out_features(d: int) -> int:
    """Length of the upper-triangle vector of a d×d matrix, d(d+1)/2."""
    return d * (d + 1) // 2


# The functional API validates its input with Python control flow, which FX cannot trace: keep these two calls as
# leaves of an FX graph (autograd through them is ordinary autograd, so nothing is lost). FX only auto-wraps
# functions whose global name has no leading underscore.
@register_notrace_function
def gcp_covariance(x: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f'CovPool expects a (B, {channels}, H, W) feature map, got shape {tuple(x.shape)}')
    # Non-finite features are reported by MatrixSqrt (sqrtm checks its input), so skip the second check here.
    return covariance(x, check=False, dtype=dtype)


@register_notrace_function
def gcp_triu(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return triu_vec(q).to(dtype)


def _check_dim(name: str, value: Optional[int], allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int{" or None" if allow_none else ""}, got {value!r}')


class CovPool(nn.Module):
    """Matrix-square-root normalised covariance pooling: (B, C, H, W) → (B, d(d+1)/2).

    Args:
        in_chs: channels C of the input feature map.
        gcp_dim: channels d after the 1×1 reduction (256 in the papers); None skips conv, BN and ReLU (d = C).
        method: matrix square-root method, a key of ``timm_gcp.METHODS``; change it later with
            ``self.sqrtm.set_method`` or ``timm_gcp.set_gcp_method(model, ...)``.
        method_kwargs: options of the method (e.g. ``{'iters': 3}``).

    Submodules ``conv``, ``bn``, ``act`` (Identity when ``gcp_dim`` is None) and ``sqrtm``; parameter names do not
    depend on the method. The covariance, the root and their backward run in the method's precision
    (``self.sqrtm.compute_dtype``: float64 for the eigen-methods, float32 for ``isqrt`` and ``mpa``, or the method's
    ``dtype`` option), with autocast off; the output is cast back to the input dtype. An FX graph traced from the model
    holds the precision of the method in use when it was traced: trace again after switching to a method of another
    precision.
    """

    pool_type = 'gcp'  # what timm reads as a model's global_pool name

    def __init__(
            self,
            in_chs: int,
            gcp_dim: Optional[int] = 256,
            method: str = 'pade',
            method_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_dim('in_chs', in_chs, allow_none=False)
        _check_dim('gcp_dim', gcp_dim, allow_none=True)
        if method_kwargs is not None and not isinstance(method_kwargs, dict):
            raise TypeError(f'method_kwargs must be a dict of method options, got {type(method_kwargs).__name__}')
        self.in_chs = in_chs
        self.gcp_dim = gcp_dim
        if gcp_dim is None:
            self.conv = nn.Identity()
            self.bn = nn.Identity()
            self.act = nn.Identity()
            d = in_chs
        else:
            self.conv = nn.Conv2d(in_chs, gcp_dim, kernel_size=1, bias=False, **dd)
            self.bn = nn.BatchNorm2d(gcp_dim, **dd)
            self.act = nn.ReLU(inplace=True)
            d = gcp_dim
        self.dim = d
        self.sqrtm = MatrixSqrt(method, **(method_kwargs or {}))
        self.sqrtm.check_contract = False  # the covariance formed here is symmetric PSD: look for NaN/inf only
        self.out_features = gcp_out_features(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) reduction conv, BN at weight 1 / bias 0, as the reference heads do."""
        if isinstance(self.conv, nn.Conv2d):
            nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        if isinstance(self.bn, nn.BatchNorm2d):
            self.bn.reset_parameters()

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        cov = gcp_covariance(x, self.dim, self.sqrtm.compute_dtype)
        return gcp_triu(self.sqrtm(cov), x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chs, H, W). Returns: (B, d(d+1)/2) in the dtype of ``x``."""
        x = self.act(self.bn(self.conv(x)))
        return self._pool(x)

    def extra_repr(self) -> str:
        return f'in_chs={self.in_chs}, gcp_dim={self.gcp_dim}, out_features={self.out_features}'


class GcpClassifierHead(nn.Module):
    """``CovPool`` → dropout → ``fc`` (Linear d(d+1)/2 → classes, Identity when ``num_classes`` is 0).

    A head for any backbone that ends in a (B, C, H, W) map. Submodules ``global_pool``, ``drop``, ``fc``.

    Args:
        in_chs: channels of the backbone's final map.
        num_classes: classifier outputs; 0 gives the pooled vector.
        gcp_dim, method, method_kwargs: as in ``CovPool``.
        drop_rate: dropout before the classifier.
    """

    def __init__(
            self,
            in_chs: int,
            num_classes: int,
            gcp_dim: Optional[int] = 256,
            method: str = 'pade',
            method_kwargs: Optional[Dict[str, Any]] = None,
            drop_rate: float = 0.,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.global_pool = CovPool(in_chs, gcp_dim, method, method_kwargs, **dd)
        self.num_features = self.global_pool.out_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(
            self,
            num_classes: int,
            pool_type: Optional[str] = None,
            reset_other: bool = False,
            in_features: Optional[int] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Replace ``fc`` by a fresh classifier with ``num_classes`` outputs; the pooling weights are kept.

        The signature is that of timm's heads (``ClassifierHead.reset``), so a timm model whose ``reset_classifier``
        calls ``self.head.reset(num_classes, global_pool, reset_other=..., in_features=..., **dd)`` works with this
        head in place of its own.

        Args:
            num_classes: outputs of the new classifier; 0 removes it.
            pool_type: None or ``'gcp'`` (this head's pooling cannot become another kind).
            reset_other: accepted for timm's head API; there is nothing else to reset.
            in_features: a new backbone width: the ``CovPool`` is rebuilt for it (new reduction weights, same
                ``gcp_dim`` and method); unchanged when None or equal to the current one.
            device, dtype: of the new layers (default: those of the head's parameters).

        Raises:
            ValueError: a ``pool_type`` other than None or ``'gcp'``.
        """
        if pool_type is not None and pool_type != CovPool.pool_type:
            raise ValueError(f'GcpClassifierHead.reset: pool_type {pool_type!r} is not supported; this head pools '
                f'with {CovPool.pool_type!r} (pass None to keep it)')
        dd = get_device_dtype(self, device=device, dtype=dtype)
        pool = self.global_pool
        if in_features is not None and in_features != pool.in_chs:
            method, options = pool.sqrtm.get_method()
            self.global_pool = CovPool(in_features, pool.gcp_dim, method, options, **dd).train(self.training)
            self.global_pool.sqrtm.check_finite = pool.sqrtm.check_finite
            self.num_features = self.global_pool.out_features
        fc = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.fc = fc.train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

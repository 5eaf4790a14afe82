"""Global covariance pooling (GCP) with a matrix square root.

Pipeline (ICCV 2021, arXiv:2105.02498; iSQRT-COV, arXiv:1712.01034): 1×1 conv (no bias) → BN → ReLU down to
``gcp_dim`` channels, biased covariance Σ (d×d) of the positions, Σ^½ by a method of ``timm_gcp.METHODS``, row-major
upper triangle including the diagonal (d(d+1)/2 values, 32,896 for d = 256).

The positions are those of an NCHW or NHWC feature map (CNNs; timm's Swin) or the patch tokens of an NLC token
sequence (ViT, DeiT, EVA: the prefix tokens, i.e. class, register and distillation tokens, are not samples of the
covariance). For tokens and NHWC maps the same 1×1 convolution and BatchNorm act on every token/position: a linear map
without bias followed by a per-channel batch norm, the token equivalent of the reduction.
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

from ..functional import triu_vec
from .matrix_sqrt import MatrixSqrt

__all__ = ['CovPool', 'gcp_out_features', 'INPUT_FORMATS', 'TooFewPositionsError', 'check_positions', 'set_layout',
           'set_reduction', 'layout_repr']

INPUT_FORMATS = ('NCHW', 'NHWC', 'NLC')  # feature map, channels-last feature map, token sequence


def gcp_out_features(d: int) -> int:
    """Length of the upper-triangle vector of a d×d matrix, d(d+1)/2."""
    return d * (d + 1) // 2


def set_layout(module: nn.Module, input_fmt: str, num_prefix_tokens: int, cls_token: bool) -> None:
    """Check a pooling module's input layout (ValueError naming a value it cannot take) and set its ``input_fmt``,
    ``num_prefix_tokens`` and ``cls_token``."""
    if input_fmt not in INPUT_FORMATS:
        raise ValueError(f'input_fmt must be one of {INPUT_FORMATS}, got {input_fmt!r}')
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0 or (
            num_prefix_tokens and input_fmt != 'NLC'):
        raise ValueError(f'num_prefix_tokens must be an int >= 0, and 0 unless input_fmt is NLC; got '
            f'{num_prefix_tokens!r} with input_fmt {input_fmt!r}')
    if cls_token and num_prefix_tokens < 1:
        raise ValueError('cls_token=True needs a class token: an NLC input with num_prefix_tokens >= 1')
    module.input_fmt = input_fmt
    module.num_prefix_tokens = num_prefix_tokens
    module.cls_token = bool(cls_token)


def set_reduction(module: nn.Module, in_chs: int, gcp_dim: Optional[int], device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = None) -> int:
    """Give a pooling module its ``in_chs``, ``gcp_dim`` and the 1×1 reduction ``conv`` (no bias) → ``bn`` → ``act``
    (ReLU) to ``gcp_dim`` channels (all three Identity when ``gcp_dim`` is None); returns the channels d after it."""
    module.in_chs, module.gcp_dim = in_chs, gcp_dim
    if gcp_dim is None:
        module.conv, module.bn, module.act = nn.Identity(), nn.Identity(), nn.Identity()
        return in_chs
    module.conv = nn.Conv2d(in_chs, gcp_dim, kernel_size=1, bias=False, device=device, dtype=dtype)
    module.bn = nn.BatchNorm2d(gcp_dim, device=device, dtype=dtype)
    module.act = nn.ReLU(inplace=True)
    return gcp_dim


def layout_repr(input_fmt: str, num_prefix_tokens: int, cls_token: bool, always: bool = False) -> str:
    """The input-layout part of a pooling module's ``extra_repr`` (``', '``-led; '' for a plain NCHW map unless
    ``always``)."""
    text = f', input_fmt={input_fmt!r}' if always or input_fmt != 'NCHW' else ''
    if num_prefix_tokens:
        text += f', num_prefix_tokens={num_prefix_tokens}'
    if cls_token:
        text += ', cls_token=True'
    return text


# The functional API validates its input with Python control flow, which FX cannot trace: keep these calls as
# leaves of an FX graph (autograd through them is ordinary autograd, so nothing is lost). FX only auto-wraps
# functions whose global name has no leading underscore.
@register_notrace_function
def gcp_samples(x: torch.Tensor, channels: int, input_fmt: str, num_prefix_tokens: int) -> torch.Tensor:
    """The positions (or patch tokens) of ``x`` as a (B, C, H, W) map (a view; tokens become (B, C, N, 1)).

    Raises:
        ValueError: ``x`` does not have the layout and channel count the pooling was built for.
    """
    if input_fmt == 'NCHW':
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f'CovPool expects a (B, {channels}, H, W) feature map (NCHW), got shape {tuple(x.shape)}')
        return x
    if input_fmt == 'NHWC':
        if x.dim() != 4 or x.shape[-1] != channels:
            raise ValueError(f'CovPool expects a (B, H, W, {channels}) feature map (NHWC), got shape {tuple(x.shape)}')
        return x.permute(0, 3, 1, 2)
    if x.dim() != 3 or x.shape[-1] != channels or x.shape[1] <= num_prefix_tokens:
        raise ValueError(f'CovPool expects a (B, N, {channels}) token sequence (NLC) with {num_prefix_tokens} prefix '
            f'tokens before at least one patch token, got shape {tuple(x.shape)}')
    return x[:, num_prefix_tokens:].transpose(1, 2).unsqueeze(-1)


MIN_POSITIONS = 2  # the covariance of one position is 0: every input would give the same pooled vector


class TooFewPositionsError(ValueError):
    """A feature map with fewer than 2 positions: its covariance is 0 for every input, so the model cannot learn."""


def check_positions(x: torch.Tensor) -> None:
    """Raise :class:`TooFewPositionsError` when a (B, d, H, W) map has fewer than 2 positions (H·W < 2)."""
    m = x.shape[2] * x.shape[3]
    if m < MIN_POSITIONS:
        raise TooFewPositionsError(
            f'covariance pooling needs at least {MIN_POSITIONS} positions, but the feature map has shape '
            f'{tuple(x.shape)} (H×W = {x.shape[2]}×{x.shape[3]}): its covariance is 0 for every input. Use a larger '
            f'input image, or a smaller output_stride (e.g. output_stride=16 or 8) so the last map keeps more '
            f'positions')


@register_notrace_function
def gcp_positions(x: torch.Tensor) -> torch.Tensor:
    """The (B, d, M) samples of a (B, d, H, W) map.

    Raises:
        TooFewPositionsError (a ValueError): fewer than 2 positions (H·W < 2): the covariance would be 0 whatever the
            input, so the model could not learn.
    """
    check_positions(x)
    return x.flatten(2)


@register_notrace_function
def gcp_triu(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return triu_vec(q).to(dtype)


def _check_dim(name: str, value: Optional[int], allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int{" or None" if allow_none else ""}, got {value!r}')


class CovPool(nn.Module):
    """Matrix-square-root normalised covariance pooling: a feature map or token sequence → (B, d(d+1)/2).

    Args:
        in_chs: channels C of the input.
        gcp_dim: channels d after the 1×1 reduction (256 in the papers); None skips conv, BN and ReLU (d = C).
        method: matrix square-root method, a key of ``timm_gcp.METHODS``; change it later with
            ``self.sqrtm.set_method`` or ``timm_gcp.set_gcp_method(model, ...)``.
        method_kwargs: options of the method (e.g. ``{'iters': 3}``).
        input_fmt: layout of the input: 'NCHW' (B, C, H, W), 'NHWC' (B, H, W, C) or 'NLC' (B, N, C) tokens.
        num_prefix_tokens: NLC only: the leading class/register/distillation tokens, left out of the covariance.
        cls_token: NLC only: put the first prefix token (the class token, C values) in front of the pooled vector.
            A linear classifier on the result is the sum of a class-token classifier and a GCP classifier (So-ViT,
            arXiv:2104.10935); ``out_features`` grows by C.
        path: 'auto' (default), 'gram' or 'cov': how the root of the covariance is computed (``MatrixSqrt.path``).
            With M positions and d channels, M < d, the M×M Gram matrix of the centred features gives the same values
            and gradients at O(M³ + d²·M) instead of O(d³); 'auto' takes it where it is faster.

    Submodules ``conv``, ``bn``, ``act`` (Identity when ``gcp_dim`` is None) and ``sqrtm``; parameter names depend on
    neither the method nor the layout. The covariance, the root and their backward run in the method's precision
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
            input_fmt: str = 'NCHW',
            num_prefix_tokens: int = 0,
            cls_token: bool = False,
            path: str = 'auto',
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_dim('in_chs', in_chs, allow_none=False)
        _check_dim('gcp_dim', gcp_dim, allow_none=True)
        if method_kwargs is not None and not isinstance(method_kwargs, dict):
            raise TypeError(f'method_kwargs must be a dict of method options, got {type(method_kwargs).__name__}')
        set_layout(self, input_fmt, num_prefix_tokens, cls_token)
        self.dim = d = set_reduction(self, in_chs, gcp_dim, **dd)
        self.sqrtm = MatrixSqrt(method, **(method_kwargs or {}))
        self.sqrtm.from_features = True  # the root of the samples' covariance, on the Gram or the covariance path
        self.sqrtm.set_path(path)
        self.out_features = gcp_out_features(d) + (in_chs if self.cls_token else 0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) reduction conv, BN at weight 1 / bias 0, as the reference heads do."""
        if isinstance(self.conv, nn.Conv2d):
            nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        if isinstance(self.bn, nn.BatchNorm2d):
            self.bn.reset_parameters()

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return gcp_triu(self.sqrtm(gcp_positions(x)), x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chs, H, W), (B, H, W, in_chs) or (B, N, in_chs) as ``input_fmt`` says.
        Returns: (B, out_features) in the dtype of ``x``."""
        y = gcp_samples(x, self.in_chs, self.input_fmt, self.num_prefix_tokens)
        out = self._pool(self.act(self.bn(self.conv(y))))
        if self.cls_token:
            out = torch.cat([x[:, 0].to(out.dtype), out], dim=1)
        return out

    def extra_repr(self) -> str:
        layout = layout_repr(self.input_fmt, self.num_prefix_tokens, self.cls_token)
        return f'in_chs={self.in_chs}, gcp_dim={self.gcp_dim}{layout}, out_features={self.out_features}'


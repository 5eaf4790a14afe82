"""`SoTPool`: SoT's multi-head token cross-covariance pooling for transformer (and other token) backbones.

SoT ("SoT: Delving Deeper into Classification Head for Transformer", Xie, Zeng, Wang, Zhou, Li; arXiv:2104.10935;
https://github.com/jiangtaoxie/SoT; first as So-ViT) classifies with the class token and with a second-order
representation of the patch tokens, and sums the two logits. The representation: the tokens are projected to h heads
of two r-wide matrices Q, K; each head's cross-covariance Σ = (Q − μ)ᵀ(K − μ)/N (one mean per matrix) is normalised
by svPN, flattened whole (r², no triangle: Σ is not symmetric) and the heads concatenated (h·r² values), with dropout.

A linear classifier on ``[class token, visual]`` is exactly class-token logits + visual logits (one shared bias), so
``cls_token=True`` puts the class token in front of the pooled vector and the model's one ``fc`` classifies both.
Backbones without a class token (Swin) use the visual logits alone.

Not included: SoT's convolutional token stem (a DenseNet-style stem replacing the patch embedding). The gains the
paper reports for DeiT-S (79.8 → 82.7) and Swin-T (81.3 → 83.0) include that stem.
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

from ..functional import METHODS, svpn, token_cross_cov
from ..functional.checks import no_autocast
from .cov_pool import gcp_samples, layout_repr, set_layout
from .matrix_sqrt import MatrixSqrt

__all__ = ['SoTPool', 'SOT_PRESETS', 'SOT_NORMS', 'sot_preset', 'check_sot_options', 'sot_covariance', 'sot_svpn']

# SoT's presets by backbone width C: (heads h, head width r, dropout of the visual features)
SOT_PRESETS: Dict[int, Tuple[int, int, float]] = {240: (6, 14, 0.), 384: (6, 24, 0.5), 528: (6, 38, 0.7)}
SOT_NORMS = ('svpn', 'none')  # besides these, an eigen-method of timm_gcp.METHODS (the root of the symmetric part)
_OPTIONS = ('num_heads', 'head_dim', 'drop', 'norm')


def sot_preset(width: int) -> Tuple[int, int, float]:
    """``(num_heads, head_dim, drop)`` of the published preset nearest to ``width`` (ties: the smaller width).

    SoT publishes Tiny (C = 240), Small (384) and Base (528). Wider backbones (Swin-T's final 768 channels) take
    Base: 6 heads of r = 38, 8,664 features, dropout 0.7, the largest head SoT trained.
    """
    nearest = min(SOT_PRESETS, key=lambda c: (abs(c - width), c))
    return SOT_PRESETS[nearest]


def check_sot_options(options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The options as given, validated (presets are filled in by ``SoTPool`` from the width).

    Raises:
        TypeError: ``options`` is not a dict.
        ValueError: an unknown option or a bad value.
    """
    if options is not None and not isinstance(options, dict):
        raise TypeError(f'SoT options must be a dict, got {type(options).__name__}')
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f'SoT: unknown option(s) {", ".join(unknown)}; valid: {", ".join(_OPTIONS)}')
    for key in ('num_heads', 'head_dim'):
        v = options.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f'SoT: {key} must be a positive int, got {v!r}')
    drop = options.get('drop')
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1):
        raise ValueError(f'SoT: drop must be a float in [0, 1), got {drop!r}')
    norm = options.get('norm', 'svpn')
    if norm not in SOT_NORMS and not (norm in METHODS and METHODS[norm].eigen):
        eigen = [m for m, spec in METHODS.items() if spec.eigen]
        raise ValueError(f'SoT: norm must be one of {", ".join(SOT_NORMS)} or an eigen-method of timm_gcp.METHODS '
            f'({", ".join(eigen)}: the symmetric part of Σ is indefinite, which the iterative roots cannot take), '
            f'got {norm!r}')
    return options


# Leaves of an FX graph (dtype promotion and the autocast guard are Python); autograd through them is ordinary.
@register_notrace_function
def sot_covariance(qk: torch.Tensor) -> torch.Tensor:
    """(2, B, h, N, r) projections Q, K → (B·h, r, r) cross-covariances in float32 (float64 for float64 input),
    autocast off."""
    dtype = torch.promote_types(qk.dtype, torch.float32)
    with no_autocast(qk.device):
        return token_cross_cov(qk[0].to(dtype), qk[1].to(dtype)).flatten(0, 1)


@register_notrace_function
def sot_svpn(cov: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    """:func:`timm_gcp.functional.svpn` with autocast off."""
    with no_autocast(cov.device):
        return svpn(cov, v0.to(cov.dtype))


class SoTPool(nn.Module):
    """SoT pooling: tokens (or positions) → (B, h·r²) normalised cross-covariances (+ C class-token values in front).

    Args:
        in_chs: channels C of the tokens.
        num_heads, head_dim, drop: h, r and the dropout of the visual features; None takes SoT's preset for the
            width (:func:`sot_preset`).
        norm: ``'svpn'`` (SoT's: one power-iteration step from a learned start vector, Σ/√σ̂ up to 1e-5),
            ``'none'``, or an eigen-method of ``timm_gcp.METHODS`` (``'svd'``, ``'pade'``, ...): the exact square root
            of the symmetric part ½(Σ + Σᵀ) in float64. That part is indefinite; the eigen-methods floor its
            eigenvalues at ε, so this is the root of its positive part (negative directions are dropped).
        input_fmt, num_prefix_tokens, cls_token: the input layout, as in ``CovPool``: NLC token sequences (prefix
            tokens are not samples), NHWC maps (Swin) or NCHW maps (every position a token).

    Submodules/parameters: ``proj`` (Linear C → 2·h·r, no bias), ``v0`` (svPN's start vector, r values, shared by the
    heads), ``drop``, and ``sqrtm`` with an eigen-method norm.
    """
    pool_type = 'gcp'  # what timm reads as a model's global_pool name
    head_name = 'sot'  # the model-name token of this head (<family>_gcp_sot)

    def __init__(
            self,
            in_chs: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            drop: Optional[float] = None,
            norm: str = 'svpn',
            input_fmt: str = 'NLC',
            num_prefix_tokens: int = 0,
            cls_token: bool = False,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self._given = check_sot_options(dict(num_heads=num_heads, head_dim=head_dim, drop=drop, norm=norm))
        if isinstance(in_chs, bool) or not isinstance(in_chs, int) or in_chs < 1:
            raise ValueError(f'in_chs must be a positive int, got {in_chs!r}')
        set_layout(self, input_fmt, num_prefix_tokens, cls_token)
        preset = sot_preset(in_chs)
        self.num_heads = num_heads or preset[0]
        self.head_dim = head_dim or preset[1]
        self.in_chs = in_chs
        self.norm = norm
        self.proj = nn.Linear(in_chs, 2 * self.num_heads * self.head_dim, bias=False, **dd)
        self.v0 = nn.Parameter(torch.empty(self.head_dim, **dd))
        self.drop = nn.Dropout(preset[2] if drop is None else drop)
        if norm in METHODS:
            self.sqrtm = MatrixSqrt(norm)
            self.sqrtm.from_covariance = True  # symmetric by construction; its floor takes the negative part
        self.out_features = self.num_heads * self.head_dim ** 2 + (in_chs if self.cls_token else 0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``proj`` at PyTorch's Linear default, ``v0`` standard normal (as SoT initialises them)."""
        self.proj.reset_parameters()
        nn.init.normal_(self.v0)

    @torch.jit.ignore
    def get_method(self) -> Tuple[str, Dict[str, Any]]:
        """``('sot', options)``: the head's name and the options given (presets not filled in)."""
        given = {k: v for k, v in self._given.items() if v is not None}
        if given.get('norm') == 'svpn':
            del given['norm']
        return self.head_name, given

    def _normalise(self, cov: torch.Tensor) -> torch.Tensor:
        if self.norm == 'svpn':
            return sot_svpn(cov, self.v0)
        if self.norm == 'none':
            return cov
        return self.sqrtm((0.5 * (cov + cov.transpose(1, 2))).to(self.sqrtm.compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, N, in_chs), (B, H, W, in_chs) or (B, in_chs, H, W) as ``input_fmt`` says.
        Returns: (B, out_features) in the dtype of ``x``."""
        tokens = gcp_samples(x, self.in_chs, self.input_fmt, self.num_prefix_tokens).flatten(2).transpose(1, 2)
        h, r = self.num_heads, self.head_dim
        qk = self.proj(tokens).unflatten(-1, (2, h, r)).permute(2, 0, 3, 1, 4)  # (2, B, h, N, r)
        visual = self._normalise(sot_covariance(qk)).reshape(-1, h * r * r).type_as(x)
        out = self.drop(visual)
        if self.cls_token:
            out = torch.cat([x[:, 0], out], dim=1)
        return out

    def extra_repr(self) -> str:
        layout = layout_repr(self.input_fmt, self.num_prefix_tokens, self.cls_token, always=True)
        return (f'in_chs={self.in_chs}, num_heads={self.num_heads}, head_dim={self.head_dim}, norm={self.norm!r}'
            f'{layout}, out_features={self.out_features}')

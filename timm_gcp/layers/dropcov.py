"""`DropCovPool`: covariance pooling without a matrix root, with DropCov's adaptive channel dropout in training.

DropCov (NeurIPS 2022, "DropCov: A Simple yet Effective Method for Improving Deep Architectures", Wang, Gao, Zhang,
Xie, Li, Hu; https://github.com/mingzeG/DropCov) replaces the post-normalisation of the covariance (the matrix root)
by a pre-normalisation: in training, whole channels are dropped before the covariance at a rate that adapts to how
correlated the channels are. Inference is reduce → Σ → upper triangle, the cheapest covariance head there is.

Precision: Σ is formed in float32 (float64 for float64 input) with autocast off. Nothing downstream inverts,
roots or eigendecomposes it, so the rank deficiency that makes the eigen-methods need float64 (small eigenvalues as
float32 noise with large backward weights) does not arise: the forward and backward are matrix products only.
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

from ..functional import channel_dropout, covariance, dropcov_rate
from ..functional.checks import no_autocast
from .cov_pool import check_positions, gcp_out_features, gcp_samples, gcp_triu, layout_repr, set_layout, set_reduction

__all__ = ['DropCovPool', 'DROPCOV_OPTIONS', 'check_dropcov_options', 'dropcov_covariance']

# options of the head (gcp_kwargs of a <family>_gcp_dropcov model) and their defaults
DROPCOV_OPTIONS: Dict[str, Any] = {'per_sample': False, 'kernel_size': 3}


def check_dropcov_options(options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``options`` with the defaults filled in.

    Raises:
        TypeError: ``options`` is not a dict.
        ValueError: an unknown option, or a value of the wrong kind.
    """
    if options is not None and not isinstance(options, dict):
        raise TypeError(f'DropCov options must be a dict, got {type(options).__name__}')
    unknown = sorted(set(options or {}) - set(DROPCOV_OPTIONS))
    if unknown:
        raise ValueError(f'DropCov: unknown option(s) {", ".join(unknown)}; valid: {", ".join(DROPCOV_OPTIONS)}')
    out = {**DROPCOV_OPTIONS, **(options or {})}
    if not isinstance(out['per_sample'], bool):
        raise ValueError(f'DropCov: per_sample must be a bool, got {out["per_sample"]!r}')
    k = out['kernel_size']
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f'DropCov: kernel_size must be an odd positive int, got {k!r}')
    return out


# A leaf of an FX graph (its checks and the autocast guard are Python control flow); autograd through it is ordinary.
@register_notrace_function
def dropcov_covariance(y: torch.Tensor, attn: Optional[torch.Tensor], per_sample: bool) -> torch.Tensor:
    """Σ of (B, d, H, W) features in float32 (float64 for float64 input) with autocast off; with the channel
    attention ``attn`` (B, d) (training), of the modulated features y·(1 + a) with whole channels dropped at the rate
    of :func:`timm_gcp.functional.dropcov_rate`. Dropping channels scales rows and columns of Σ, so the dropped
    covariance is m·mᵀ ⊙ Σ of the covariance the rate already needed (exactly what forming it again would give)."""
    check_positions(y)
    dtype = torch.promote_types(y.dtype, torch.float32)
    with no_autocast(y.device):
        if attn is None:
            return covariance(y.to(dtype), check=False, dtype=dtype)
        y = y.to(dtype) * (1. + attn.to(dtype)[:, :, None, None])
        cov = covariance(y, check=False, dtype=dtype)
        p = dropcov_rate(attn, cov, per_sample=per_sample)
        keep = channel_dropout(torch.ones(cov.shape[:2], device=cov.device, dtype=cov.dtype), p)
        return cov * (keep.unsqueeze(2) * keep.unsqueeze(1))


class DropCovPool(nn.Module):
    """DropCov pooling: a feature map or token sequence → (B, d(d+1)/2) upper triangle of the plain covariance.

    Training: 1×1 conv (no bias) → BN → ReLU to d channels; channel attention a = softmax over channels of a
    ``kernel_size`` Conv1d across the channel axis of the channel means; features x·(1 + a); the dropout rate from the
    cosine rule (:func:`timm_gcp.functional.dropcov_rate`) on their covariance, no gradient through it; whole channels
    dropped per sample (survivors scaled by 1/(1 − p)); Σ = (1/N)·X̄·X̄ᵀ; upper triangle. Dropping channels scales
    rows and columns of Σ, so the dropped covariance is computed as m·mᵀ ⊙ Σ from the covariance the rate already
    needed (one covariance per step, exactly equal to forming it again; :func:`dropcov_covariance`).

    Evaluation: reduce → Σ → upper triangle (no attention, no dropout, no normalisation).

    Args:
        in_chs: channels C of the input.
        gcp_dim: channels d after the reduction (None: no reduction, d = C). The paper's reported parameter counts
            (ResNet-50 32.0 M) are those of d = 128; its code builds d = 256.
        input_fmt, num_prefix_tokens, cls_token: the input layout, as in ``CovPool``.
        per_sample: one dropout rate per sample instead of one per batch (the paper's code).
        kernel_size: of the attention's Conv1d (3).

    Submodules ``conv``, ``bn``, ``act`` (the reduction, as in ``CovPool``) and ``attn`` (the Conv1d, used in
    training only).
    """
    pool_type = 'gcp'  # what timm reads as a model's global_pool name
    head_name = 'dropcov'  # the model-name token of this head (<family>_gcp_dropcov)

    def __init__(
            self,
            in_chs: int,
            gcp_dim: Optional[int] = 128,
            input_fmt: str = 'NCHW',
            num_prefix_tokens: int = 0,
            cls_token: bool = False,
            per_sample: bool = False,
            kernel_size: int = 3,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_dropcov_options(dict(per_sample=per_sample, kernel_size=kernel_size))
        if isinstance(in_chs, bool) or not isinstance(in_chs, int) or in_chs < 1:
            raise ValueError(f'in_chs must be a positive int, got {in_chs!r}')
        if gcp_dim is not None and (isinstance(gcp_dim, bool) or not isinstance(gcp_dim, int) or gcp_dim < 2):
            raise ValueError(f'gcp_dim must be an int >= 2 or None, got {gcp_dim!r}')
        set_layout(self, input_fmt, num_prefix_tokens, cls_token)
        self.per_sample = per_sample
        self.kernel_size = kernel_size
        d = set_reduction(self, in_chs, gcp_dim, **dd)
        if d < 2:
            raise ValueError(f'DropCovPool needs at least 2 channels, got {d}')
        self.dim = d
        self.attn = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=False, **dd)
        self.out_features = gcp_out_features(d) + (in_chs if self.cls_token else 0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) reduction conv, BN at weight 1 / bias 0; the attention's Conv1d at
        PyTorch's default, as in the paper's code."""
        if isinstance(self.conv, nn.Conv2d):
            nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        if isinstance(self.bn, nn.BatchNorm2d):
            self.bn.reset_parameters()
        self.attn.reset_parameters()

    @torch.jit.ignore
    def get_method(self) -> Tuple[str, Dict[str, Any]]:
        """``('dropcov', options)``: the head's name and the options that differ from their defaults."""
        current = dict(per_sample=self.per_sample, kernel_size=self.kernel_size)
        return self.head_name, {k: v for k, v in current.items() if v != DROPCOV_OPTIONS[k]}

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) → (B, d): softmax over channels of the Conv1d of the channel means."""
        return torch.softmax(self.attn(x.mean(dim=(2, 3)).unsqueeze(1)).squeeze(1), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chs, H, W), (B, H, W, in_chs) or (B, N, in_chs) as ``input_fmt`` says.
        Returns: (B, out_features) in the dtype of ``x``."""
        y = self.act(self.bn(self.conv(gcp_samples(x, self.in_chs, self.input_fmt, self.num_prefix_tokens))))
        attn = self.channel_attention(y) if self.training else None
        out = gcp_triu(dropcov_covariance(y, attn, self.per_sample), x.dtype)
        if self.cls_token:
            out = torch.cat([x[:, 0], out], dim=1)
        return out

    def extra_repr(self) -> str:
        layout = layout_repr(self.input_fmt, self.num_prefix_tokens, self.cls_token)
        rate = ', per_sample=True' if self.per_sample else ''
        return f'in_chs={self.in_chs}, gcp_dim={self.gcp_dim}{layout}{rate}, out_features={self.out_features}'

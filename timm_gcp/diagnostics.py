"""Training diagnostics of a GCP head: the spectral analysis of ICCV 2021 "Why Approximate Matrix Square Root
Outperforms Accurate SVD in Global Covariance Pooling?" (https://arxiv.org/abs/2105.02498, §3) as a feature.

Pure functions take a batch of covariance matrices and return per-sample statistics; ``CovStatsCollector`` hooks the
``MatrixSqrt`` modules of a model (the batch covariance, formed from the samples a ``CovPool`` gives its root),
samples every n-th training step, and gives
per-epoch summaries for ``summary.csv``:

- ``cond_median`` / ``cond_max``: condition number λ_max / max(λ_min, ε) over the sampled samples (paper Table 1). For a
  rank-deficient Σ (M ≤ d samples) λ_min is the floor ε, so this is λ_max/ε: it follows the scale of the features;
- ``lam_max_median``: the largest eigenvalue λ_max;
- ``range_cond_median``: λ_max over the smallest eigenvalue Σ resolves, i.e. above d·ε_Σ·λ_max with ε_Σ the machine
  epsilon of Σ's dtype (the condition number on the range of Σ, independent of the scale);
- ``eig_ratio_median``: λ_1 / λ_2, the ratio of the two largest eigenvalues (paper Fig. 3);
- ``floor_frac``: fraction of eigenvalues at or below the floor ε;
- ``head_grad_norm``: L2 norm of the gradients of the head parameters (mean over sampled steps).

Sampling costs one float64 ``eigvalsh`` per sampled batch and no extra forward. Statistics stay on the device until
``summary()`` (one host sync per epoch).
"""
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from .functional import EPS, covariance
from .layers import MatrixSqrt

__all__ = ['EPS', 'eigvals_floored', 'covariance_stats', 'head_grad_norm', 'CovStatsCollector']

_logger = logging.getLogger(__name__)

def eigvals_floored(cov: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eigenvalues of symmetric matrices, computed in float64 and floored at ``eps``.

    Args:
        cov: (B, d, d) symmetric PSD matrices, any floating dtype.
        eps: floor (negative round-off and exact zeros become ``eps``).

    Returns:
        (B, d) float64 eigenvalues in descending order.
    """
    if cov.ndim != 3 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f'cov must have shape (B, d, d), got {tuple(cov.shape)}')
    with torch.autocast(device_type=cov.device.type, enabled=False):
        lam = torch.linalg.eigvalsh(cov.detach().to(torch.float64))
    return lam.flip(-1).clamp_min(eps)


def covariance_stats(cov: torch.Tensor, eps: float = EPS) -> Dict[str, torch.Tensor]:
    """Per-sample spectral statistics of a batch of covariances.

    Args:
        cov: (B, d, d) symmetric PSD matrices, d >= 2.
        eps: eigenvalue floor, as in the eigen-methods.

    Returns:
        dict of (B,) float64 tensors: ``cond`` = λ_max / max(λ_min, ε), ``eig_ratio`` = λ_1 / max(λ_2, ε),
        ``floor_frac`` = fraction of eigenvalues ≤ ε, ``lam_max`` = λ_max, ``range_cond`` = λ_max over the smallest
        eigenvalue above d·ε_Σ·λ_max (ε_Σ: machine epsilon of ``cov``'s dtype; smaller ones are round-off of the
        null space).
    """
    if cov.shape[-1] < 2:
        raise ValueError(f'covariance_stats needs d >= 2, got d={cov.shape[-1]}')
    lam = eigvals_floored(cov, eps)
    d = cov.shape[-1]
    lmax = lam[:, :1]
    resolved = lam > d * torch.finfo(cov.dtype).eps * lmax
    smallest = torch.where(resolved, lam, torch.full_like(lam, float('inf'))).amin(-1)
    return dict(
        cond=lam[:, 0] / lam[:, -1],
        eig_ratio=lam[:, 0] / lam[:, 1],
        floor_frac=(lam <= eps).to(torch.float64).mean(-1),
        lam_max=lam[:, 0],
        range_cond=torch.where(torch.isfinite(smallest), lam[:, 0] / smallest, torch.ones_like(smallest)),
    )


def head_grad_norm(params: Iterable[torch.Tensor]) -> Optional[torch.Tensor]:
    """L2 norm of the gradients of ``params`` as a 0-dim tensor (no host sync), or None when none has a gradient."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class CovStatsCollector:
    """Collects covariance and head-gradient statistics from a model during training.

    Hooks every module of ``module_types`` (default: timm_gcp's ``MatrixSqrt``, whose input is the batch covariance).
    Call ``step(i)`` before each training forward and ``after_backward()`` after each backward; every ``interval``-th
    step is sampled. ``summary()`` returns the epoch's statistics and resets them.

    Args:
        model: the (unwrapped) model.
        head_params: parameters whose gradient norm is recorded (e.g. the GCP head's).
        interval: sample every ``interval``-th step (>= 1).
        eps: eigenvalue floor.
        module_types: module classes whose first forward input is a (B, d, d) covariance batch.
    """

    def __init__(
            self,
            model: nn.Module,
            head_params: Sequence[torch.Tensor] = (),
            interval: int = 10,
            eps: float = EPS,
            module_types: Optional[Tuple[Type[nn.Module], ...]] = None,
    ):
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        self.interval = interval
        self.eps = eps
        self.head_params = list(head_params)
        self._active = False
        self._stats: Dict[str, List[torch.Tensor]] = {}
        self._grad_norms: List[torch.Tensor] = []
        types = (MatrixSqrt,) if module_types is None else tuple(module_types)
        self._handles = []
        if types:
            for module in model.modules():
                if isinstance(module, types):
                    self._handles.append(module.register_forward_hook(self._hook))
        self.num_hooked = len(self._handles)

    def _hook(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self._active or not module.training:
            return
        x = inputs[0]
        if getattr(module, 'from_features', False):
            # a CovPool's root takes the (B, d, M) samples (it may never form Σ): form it here, on sampled steps only
            x = covariance(x.detach(), check=False, dtype=torch.float64)
        for k, v in covariance_stats(x, self.eps).items():
            self._stats.setdefault(k, []).append(v)

    def step(self, index: int) -> bool:
        """Declare training step ``index``; returns whether it is sampled."""
        self._active = index % self.interval == 0
        return self._active

    def after_backward(self, grad_scale: Optional[Union[float, torch.Tensor]] = None) -> None:
        """Record the head gradient norm of a sampled step.

        Args:
            grad_scale: factor the gradients are multiplied by (an AMP loss scale that was not unscaled); the
                recorded norm is divided by it.
        """
        if self._active and self.head_params:
            norm = head_grad_norm(self.head_params)
            if norm is not None:
                self._grad_norms.append(norm if grad_scale is None else norm / grad_scale)
        self._active = False

    def summary(self) -> Dict[str, float]:
        """Statistics over the sampled steps since the last call (one host sync); resets the collector."""
        out: Dict[str, float] = {}
        if self._stats:
            cond = torch.cat(self._stats['cond'])
            out['cond_median'] = cond.median().item()
            out['cond_max'] = cond.max().item()
            out['eig_ratio_median'] = torch.cat(self._stats['eig_ratio']).median().item()
            out['floor_frac'] = torch.cat(self._stats['floor_frac']).mean().item()
            out['lam_max_median'] = torch.cat(self._stats['lam_max']).median().item()
            out['range_cond_median'] = torch.cat(self._stats['range_cond']).median().item()
        if self._grad_norms:
            out['head_grad_norm'] = torch.stack(self._grad_norms).mean().item()
        self._stats = {}
        self._grad_norms = []
        return out

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

"""Covariance matrices to analyse and benchmark the meta-layers on: the one random generator of the package (used by
the paper analyses, the meta-layer benchmark and the tests) and the covariances of a randomly initialised model's
own GCP head."""
from typing import Any, Optional, Tuple, Union

import torch

from ..functional import EPS, covariance

__all__ = ['random_features', 'random_covariances', 'model_head_features', 'model_feature_covariances',
           'condition_numbers', 'DEFAULT_DECADES']

DEFAULT_DECADES = 4.0  # spread of the channel scales of the random features (log10 of largest / smallest)


def random_features(
        num: int,
        samples: int,
        dim: int = 256,
        decades: float = DEFAULT_DECADES,
        relu: bool = True,
        seed: int = 0,
) -> torch.Tensor:
    """Feature samples as a GCP head sees them after its 1×1 reduction and ReLU, in float64.

    Each sample is ReLU(s ⊙ z) with z ~ N(0, I_dim) and per-channel scales s log-uniformly spread over ``decades``
    decades (channel variances over twice that), which mimics the decaying spectrum of real reduced features
    (``decades=0``: plain ReLU'd Gaussians; ``relu=False``: Gaussians).

    Args:
        num: number of feature sets B.
        samples: M, the spatial positions (49 for 7×7, 196 for 14×14).
        dim: d.
        decades: spread of the channel scales.
        relu: apply ReLU to the samples.
        seed: generator seed (the result depends on nothing else).

    Returns:
        (num, dim, samples) float64.
    """
    if num < 1 or samples < 1 or dim < 1:
        raise ValueError(f'num, samples and dim must be >= 1, got {num}, {samples}, {dim}')
    if decades < 0:
        raise ValueError(f'decades must be >= 0, got {decades}')
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.0, -decades, dim, dtype=torch.float64)
    scales = scales[torch.randperm(dim, generator=gen)]
    x = torch.randn(num, dim, samples, generator=gen, dtype=torch.float64) * scales.view(1, dim, 1)
    return torch.relu(x) if relu else x


def random_covariances(
        num: int,
        samples: int,
        dim: int = 256,
        dtype: torch.dtype = torch.float64,
        device: Union[str, torch.device] = 'cpu',
        **features: Any,
) -> torch.Tensor:
    """Covariances of :func:`random_features`, formed in float64 and cast to ``dtype``.

    With ``samples`` ≤ ``dim`` the covariance has rank ``samples − 1`` by construction (the mean is subtracted).

    Args:
        num, samples, dim: as in :func:`random_features`.
        dtype: dtype of the result.
        device: device of the result.
        features: the other arguments of :func:`random_features` (``decades``, ``relu``, ``seed``).

    Returns:
        (num, dim, dim) symmetric PSD.
    """
    cov = covariance(random_features(num, samples, dim, **features))
    return cov.to(device=device, dtype=dtype)


def model_head_features(
        model_name: str = 'resnet18_gcp_isqrt',
        num: int = 2,
        img_size: int = 224,
        seed: int = 0,
        images: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, str]:
    """The reduced features a randomly initialised GCP model's head takes the covariance of (no network).

    Backbone ``forward_features`` → the head's 1×1 reduction, BN and ReLU (``model.global_pool.conv/bn/act``). The
    model runs in train mode (batch-statistics BN, as at the start of training) without gradients.

    Args:
        model_name: a ``*_gcp_*`` timm model name (created with ``pretrained=False``).
        num: batch size (ignored when ``images`` is given).
        img_size: square input size; 224 px gives a 7×7 map (M = 49) for a stride-32 backbone.
        seed: seed for the weights and the random images.
        images: optional (B, 3, H, W) images, e.g. from the built-in dataset.

    Returns:
        ((B, d, M) float32 features, a one-line description of where they came from).
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False).train()
    pool = getattr(model, 'global_pool', None)
    if not all(hasattr(pool, n) for n in ('conv', 'bn', 'act')):
        raise ValueError(f'{model_name} has no GCP head (global_pool with conv, bn and act)')
    if images is None:
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(num, 3, img_size, img_size, generator=gen)
    with torch.no_grad():
        feat = pool.act(pool.bn(pool.conv(model.forward_features(images)))).flatten(2)
    how = (f'{model_name} (random init, train-mode BN): backbone → head 1×1 reduction+BN+ReLU, '
           f'{tuple(images.shape[-2:])} px images → M = {feat.shape[-1]} samples, d = {feat.shape[1]}')
    return feat, how


def model_feature_covariances(
        model_name: str = 'resnet18_gcp_isqrt',
        num: int = 4,
        img_size: int = 224,
        seed: int = 0,
        images: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, str]:
    """Covariances, formed in float64, of :func:`model_head_features` (same arguments).

    Returns:
        ((B, d, d) float64 covariances, a one-line description of where they came from).
    """
    feat, how = model_head_features(model_name, num, img_size, seed, images)
    return covariance(feat.double()), how


def condition_numbers(cov: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """λ_max / max(λ_min, ε) per matrix by float64 eigh (the floor the eigen-methods use). Returns (B,) float64."""
    lam = torch.linalg.eigvalsh(cov.double())
    return lam[..., -1] / lam[..., 0].clamp_min(eps)

"""A built-in dataset whose classes differ only in second-order statistics.

Every class owns a 3×3 channel *correlation* matrix C_k (unit diagonal). A sample of class k is a smooth random
texture: i.i.d. standard normal noise per channel, low-pass filtered with a fixed Gaussian kernel and rescaled to unit
variance, then mixed across channels with the Cholesky factor of C_k. Each pixel's colour vector is therefore
N(0, C_k): per-channel means (0) and variances (1) are the same in every class, only the cross-channel correlations
(and thus the covariance a GCP head computes) tell the classes apart. Samples are generated on the fly and
deterministically from ``(seed, index)``, so no files are needed and two runs see the same data.
"""
import hashlib
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ['SecondOrderDataset', 'class_correlations']

_SPLITS = ('train', 'validation')


def class_correlations(num_classes: int, channels: int = 3, strength: float = 0.6, seed: int = 0) -> torch.Tensor:
    """Per-class channel correlation matrices with unit diagonal, spread apart.

    Candidates are I + ``strength``·(R − I), R a random correlation matrix (positive definite for ``strength`` < 1);
    ``num_classes`` of 16·``num_classes`` candidates are picked by greedy farthest-point selection (Frobenius
    distance), so no two classes are nearly the same.

    Args:
        num_classes: number of classes K.
        channels: image channels c.
        strength: 0 gives identical (identity) matrices; larger values give stronger correlations.
        seed: generator seed; the matrices depend on nothing else.

    Returns:
        (K, c, c) float64 symmetric positive definite matrices with unit diagonal.
    """
    if num_classes < 2:
        raise ValueError(f'num_classes must be >= 2, got {num_classes}')
    if not 0.0 <= strength < 1.0:
        raise ValueError(f'strength must be in [0, 1), got {strength}')
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(16 * num_classes, channels, channels + 1, dtype=torch.float64, generator=gen)
    r = a @ a.transpose(1, 2)
    d = r.diagonal(dim1=1, dim2=2).rsqrt()
    r = d[:, :, None] * r * d[:, None, :]
    eye = torch.eye(channels, dtype=torch.float64)
    cand = eye * (1 - strength) + strength * r
    flat = cand.flatten(1)
    dist = torch.cdist(flat, flat)
    chosen = [0]
    for _ in range(num_classes - 1):
        chosen.append(int(dist[:, chosen].min(1).values.argmax()))
    return cand[chosen]


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k2 = k[:, None] * k[None, :]
    # Unit L2 norm keeps the filtered white noise at unit variance (away from the borders, which we crop off).
    return (k2 / k2.norm()).float()


class SecondOrderDataset(Dataset):
    """Random textures whose classes differ only in their channel covariance.

    Args:
        split: ``'train'`` or ``'validation'`` (disjoint sample seeds, same class matrices).
        num_samples: length of the split; labels cycle through the classes (``index % num_classes``), so the classes
            are balanced.
        num_classes: number of classes.
        img_size: output height and width.
        channels: output channels.
        strength: how far the class correlations are from the identity (see ``class_correlations``).
        sigma: spatial smoothing (pixels) of the texture.
        offset_std: std of a per-image colour cast added to every pixel (same distribution in every class, so
            first-order statistics carry no class signal); 0 disables it.
        seed: seed of the class matrices and of every sample.

    Returns (per item): ``(image, label)`` with image a (channels, img_size, img_size) float32 tensor, already
    normalised (per-channel mean 0, variance 1 in distribution), and label an int.
    """

    def __init__(
            self,
            split: str = 'train',
            num_samples: int = 1024,
            num_classes: int = 4,
            img_size: int = 32,
            channels: int = 3,
            strength: float = 0.6,
            sigma: float = 1.5,
            offset_std: float = 0.0,
            seed: int = 0,
    ):
        if split not in _SPLITS:
            raise ValueError(f'split must be one of {_SPLITS}, got {split!r}')
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        if img_size < 4:
            raise ValueError(f'img_size must be >= 4, got {img_size}')
        self.split = split
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.img_size = img_size
        self.channels = channels
        self.seed = seed
        self.offset_std = offset_std
        self.correlations = class_correlations(num_classes, channels, strength, seed)
        self._chol = torch.linalg.cholesky(self.correlations).float()
        self._kernel = _gaussian_kernel(sigma)
        self._pad = self._kernel.shape[-1] // 2

    def __len__(self) -> int:
        return self.num_samples

    @property
    def targets(self) -> List[int]:
        return [i % self.num_classes for i in range(self.num_samples)]

    def sample_seed(self, index: int) -> int:
        # torch's CPU generator (mt19937) keeps only 32 bits of its seed, so the bits of (seed, split, index) are
        # mixed by a hash rather than laid side by side (offsets in the high bits would collide).
        key = f'{self.seed}/{self.split}/{index}'.encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), 'little') >> 1

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} out of range for {self.num_samples} samples')
        label = index % self.num_classes
        gen = torch.Generator().manual_seed(self.sample_seed(index))
        size = self.img_size + 2 * self._pad
        noise = torch.randn(self.channels, 1, size, size, generator=gen)
        tex = F.conv2d(noise, self._kernel[None, None]).squeeze(1)  # (c, img, img), unit variance per pixel
        img = torch.einsum('ij,jhw->ihw', self._chol[label], tex)
        if self.offset_std > 0:
            # A per-image colour cast, the same distribution in every class: first-order statistics carry no signal.
            img = img + self.offset_std * torch.randn(self.channels, 1, 1, generator=gen)
        return img.contiguous(), label

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(split={self.split!r}, num_samples={self.num_samples}, '
                f'num_classes={self.num_classes}, img_size={self.img_size}, seed={self.seed})')

"""Shared helpers for the tests of ``timm_gcp.functional`` (plain functions, not fixtures)."""
import torch

from timm_gcp.functional import EPS


def spd(batch: int, d: int, lo: float = 0.5, hi: float = 2.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(batch, d, d) symmetric positive definite with eigenvalues spread evenly over [lo, hi] (distinct, gaps
    (hi − lo)/(d − 1)) and random eigenvectors."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, d, d, generator=gen, dtype=torch.float64))
    lam = torch.linspace(hi, lo, d, dtype=torch.float64)
    return ((q * lam) @ q.transpose(-1, -2)).to(dtype)


def sample_cov(batch: int, d: int, m: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Biased covariance of ``m`` Gaussian samples (rank-deficient when m <= d): the package's one random-covariance
    generator with plain Gaussians (no channel-scale spread, no ReLU)."""
    from timm_gcp.paper import random_covariances
    return random_covariances(batch, m, dim=d, decades=0.0, relu=False, seed=seed, dtype=dtype)


def exact_root(cov: torch.Tensor) -> torch.Tensor:
    lam, u = torch.linalg.eigh(cov.double())
    return (u * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ u.transpose(-1, -2)


def sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.transpose(-1, -2))


def grad_of(method: str, cov: torch.Tensor, g: torch.Tensor, **opts) -> torch.Tensor:
    """∂⟨G, sqrtm(cov)⟩/∂cov by the library's backward."""
    from timm_gcp import sqrtm
    c = cov.detach().clone().requires_grad_()
    (sqrtm(c, method, **opts) * g).sum().backward()
    return c.grad


def ionescu_literal(u: torch.Tensor, lam: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The matrix-backprop rule written literally: ∂L/∂U, ∂L/∂λ, Kᵀ∘(Uᵀ∂L/∂U) + diag(∂L/∂λ), U·[…]·Uᵀ, symmetrised."""
    sq = lam.sqrt()
    dl_du = (g + g.transpose(-1, -2)) @ u * sq.unsqueeze(-2)
    dl_dlam = 0.5 / sq * (u.transpose(-1, -2) @ g @ u).diagonal(dim1=-2, dim2=-1)
    inner = k.transpose(-1, -2) * (u.transpose(-1, -2) @ dl_du) + torch.diag_embed(dl_dlam)
    return sym(u @ inner @ u.transpose(-1, -2))


def eig_desc(cov: torch.Tensor, eps: float = EPS):
    lam, u = torch.linalg.eigh(cov.double())
    return lam.flip(-1).clamp_min(eps), u.flip(-1)


def ns_reference(cov: torch.Tensor, iters: int) -> torch.Tensor:
    """Plain differentiable coupled Newton–Schulz with trace normalisation (autograd reference)."""
    d = cov.shape[-1]
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1)
    a = cov / tr
    eye = torch.eye(d, dtype=cov.dtype).expand_as(a)
    y, z = a, eye
    for i in range(iters):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * tr.sqrt()

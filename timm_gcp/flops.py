"""Parameters and GFLOPs of the GCP models, with the eigendecomposition that torch's FLOP counter leaves out.

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products and convolutions (2 FLOPs per multiply-add) but
has no formula for ``eigh``: :func:`eig_flops` is the one estimate of it, as a function of the channels d, the
positions M, the method and the path (the d x d covariance, or the M x M Gram matrix that the eigen-methods decompose
when M < d). :func:`measure_archs` runs every architecture of the zoo registry once and adds it; ``scripts/gen_zoo.py
--measure`` stores the result in the registry, from which ``MODEL_CARDS.md`` is written.
"""
import logging
from typing import Any, Dict, List, Mapping, Optional

from .functional import METHODS, use_gram
from .layers import CovPool, set_gcp_method, set_gcp_path
from .layers.cov_pool import gcp_samples

__all__ = ['EIGH_FLOPS_PER_N3', 'gram_path_used', 'eig_flops', 'measure_archs']

_logger = logging.getLogger(__name__)


# FLOPs of a symmetric eigendecomposition of an n x n matrix with its eigenvectors, per matrix, in units of n^3:
# Householder tridiagonalisation (4/3 n^3), accumulating its transformations and the implicit QR iterations on the
# eigenvectors; Golub & Van Loan, Matrix Computations (4th ed., section 8.3) give about 9 n^3 for the symmetric QR
# algorithm computing eigenvalues and eigenvectors. LAPACK's divide-and-conquer (syevd) is not costlier in practice.
EIGH_FLOPS_PER_N3 = 9


def gram_path_used(d: int, M: int, method: str, path: str = 'auto') -> bool:
    """Whether ``method`` decomposes the M x M Gram matrix rather than the d x d covariance: the functional package's
    own rule (:func:`timm_gcp.functional.use_gram`), so the estimate follows what the code runs."""
    return use_gram(d, M, path, method)


def eig_flops(d: int, M: int, method: str, gram_path: Optional[bool] = None) -> int:
    """FLOPs of the eigendecomposition in one GCP meta-layer, per image: ``EIGH_FLOPS_PER_N3 * n**3`` with n = d on
    the covariance path and n = M on the Gram path; 0 for methods that do not decompose (``isqrt``, ``mpa``).

    Only the eigendecomposition is here: the products around it (the covariance or Gram matrix, the eigenvectors
    lifted back to d-space, U diag(f(lambda)) U^T) are matrix products that the FLOP counter counts as they run.

    Args:
        d: channels after the reduction (``gcp_dim``, 256 in the paper).
        M: positions (or patch tokens) the covariance is taken over.
        method: a ``timm_gcp.functional.METHODS`` name.
        gram_path: which matrix is decomposed; None asks :func:`gram_path_used` (the default ``'auto'`` path).
    """
    if not METHODS[method].eigen:
        return 0
    if gram_path is None:
        gram_path = gram_path_used(d, M, method)
    n = M if gram_path else d
    return EIGH_FLOPS_PER_N3 * n ** 3


def _gcp_eig_flops_hooks(model: Any, found: List[int]) -> List[Any]:
    """Forward hooks that add :func:`eig_flops` of every CovPool of ``model`` to ``found`` (per image)."""
    def hook(module: Any, args: tuple) -> None:
        y = gcp_samples(args[0], module.in_chs, module.input_fmt, module.num_prefix_tokens)
        d, m, method = module.dim, y.shape[-2] * y.shape[-1], module.sqrtm.method
        found.append(eig_flops(d, m, method, gram_path_used(d, m, method, module.sqrtm.path)))
    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, CovPool)]


def measure_archs(data: Mapping[str, Any], device: str = 'cpu',
                  gcp_path: str = 'auto') -> Dict[str, Dict[str, float]]:
    """Parameters (M) and forward GFLOPs (batch 1, default input size, eval mode) of every family x method on the
    root path ``gcp_path`` ('auto': as built), by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
    multiply-add) plus :func:`eig_flops` of each GCP meta-layer for the map it sees (``eig_gflops``, in ``gflops``):
    the counter has no formula for eigh. The forward really runs (autocast rejects the meta device): minutes.
    """
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for fam in data['families']:
        with torch.device(device):  # one build per family: switching the method changes the function, not the weights
            model = timm.create_model(f'{fam["name"]}_{data["methods"][0]}', pretrained=False).eval()
        if gcp_path != 'auto':
            set_gcp_path(model, gcp_path)
        params = sum(p.numel() for p in model.parameters())
        x = torch.randn(1, *fam['input_size'], device=device, generator=torch.Generator(device).manual_seed(0))
        for method in data['methods']:
            arch = f'{fam["name"]}_{method}'
            set_gcp_method(model, method)
            eig: List[int] = []
            hooks = _gcp_eig_flops_hooks(model, eig)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x)
            for h in hooks:
                h.remove()
            total = counter.get_total_flops() + sum(eig)
            out[arch] = dict(params_m=round(params / 1e6, 3), gflops=round(total / 1e9, 3),
                             eig_gflops=round(sum(eig) / 1e9, 3))
            _logger.info('%s: %.3f M params, %.3f GFLOPs', arch, out[arch]['params_m'], out[arch]['gflops'])
    return out

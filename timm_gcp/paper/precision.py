"""What float32 does inside the meta-layer (the paper's §3.2: the SVD meta-layers need float64), and what the
reference implementation's handling of exact eigenvalue ties changes.

- :func:`eig_precision_counts`: a float32 against a float64 eigendecomposition of the same rank-deficient covariances.
- :func:`head_gradient_precision`: the gradient a model's GCP head sends into the backbone with the meta-layer in
  float32 against float64 (``dtype`` method option), for each method.
- :func:`tie_rule_comparison`: ∂L/∂Σ and ∂L/∂X of our kernels against the reference code's tie rule (an infinite K at
  an exact tie replaced by the batch's largest or smallest finite K).
"""
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ..functional import EPS, METHODS, covariance, sqrtm
from ..functional.eig_sqrt import KERNELS, eig_forward
from .gradients import relerr_cos
from .kernels import pade_coefficients, pade_eval

__all__ = ['eig_precision_counts', 'head_gradient_precision', 'reference_tie_kernel', 'tie_rule_comparison',
           'TIE_RULES', 'LOST_FRACTION']

_logger = logging.getLogger(__name__)

LOST_FRACTION = 0.5  # a genuine eigenvalue float32 gets wrong by more than this fraction counts as lost


def eig_precision_counts(covs: Mapping[str, torch.Tensor], eps: float = EPS) -> List[Dict[str, Any]]:
    """How a float32 eigendecomposition treats rank-deficient covariances, against float64.

    The genuine eigenvalues are the float64 ones above d·ε·λ_max (for M < d samples that is the rank by
    construction, M − 1). For each case the per-matrix means of: float64 and float32 eigenvalues ≤ 0 and ≤ ε;
    genuine eigenvalues float32 gets wrong by more than 50 % ("lost"); null-space eigenvalues float32 returns above ε
    ("spurious": they survive the floor and enter the root as noise); the float32 noise level (largest |λ| outside
    the genuine ones, relative to λ_max); and the condition numbers λ_max/max(λ_min, ε) in both precisions.

    Args:
        covs: case name → (B, d, d) covariances (float64; rounded to float32 for the float32 decomposition).
        eps: eigenvalue floor the eigen-methods use.

    Returns:
        One row per case.
    """
    rows = []
    for case, cov in covs.items():
        c64 = cov.double()
        l64 = torch.linalg.eigvalsh(c64).flip(-1)  # descending
        l32 = torch.linalg.eigvalsh(c64.float()).double().flip(-1)
        d = c64.shape[-1]
        lmax = l64[..., :1]
        genuine = l64 > d * EPS * lmax
        spurious = ((l32 > eps) & ~genuine).sum(-1)
        lost = (((l32 - l64).abs() > LOST_FRACTION * l64) & genuine).sum(-1)
        noise = torch.where(genuine, torch.zeros_like(l32), l32.abs()).amax(-1) / lmax.squeeze(-1)
        smallest_genuine = torch.where(genuine, l64, torch.full_like(l64, math.inf)).amin(-1) / lmax.squeeze(-1)
        m = lambda t: float(t.double().mean())  # noqa: E731
        rows.append(dict(
            case=case, d=d, genuine_rank=m(genuine.sum(-1)),
            fp64_le0=m((l64 <= 0).sum(-1)), fp64_le_eps=m((l64 <= eps).sum(-1)),
            fp32_le0=m((l32 <= 0).sum(-1)), fp32_le_eps=m((l32 <= eps).sum(-1)),
            fp32_lost_genuine=m(lost), fp32_spurious_positive=m(spurious),
            smallest_genuine_rel=m(smallest_genuine), fp32_noise_rel=m(noise),
            cond_fp64=m(l64[..., 0] / l64[..., -1].clamp_min(eps)),
            cond_fp32=m(l32[..., 0] / l32[..., -1].clamp_min(eps))))
    return rows


def head_gradient_precision(
        methods: Optional[Sequence[str]] = None,
        img_sizes: Sequence[int] = (224, 448),
        family: str = 'resnet18',
        num: int = 2,
        seed: int = 0,
        low: str = 'float32',
        high: str = 'float64',
        model_kwargs: Optional[Mapping[str, Any]] = None,
        path: str = 'cov',
) -> List[Dict[str, Any]]:
    """∂L/∂(backbone features) of a randomly initialised ``<family>_gcp_<method>`` head with the meta-layer in
    ``low`` precision against ``high`` precision (the method's ``dtype`` option), for each method.

    One model is built (random init, train-mode BN); for each image size its backbone features of ``num`` random
    images are computed once, then for every method and both dtypes the head (``forward_head``: reduction, BN, ReLU,
    covariance, root, classifier) is differentiated for L = ⟨G, logits⟩ with one fixed random G.

    Args:
        methods: methods that take a ``dtype`` option (default: every eigen-method and ``isqrt``).
        img_sizes: square image sizes (224 px: M = 49 samples for a stride-32 backbone; 448 px: M = 196).
        family: model family; the models are ``<family>_gcp_<method>``.
        num: images per batch.
        seed: seed of the weights, the images and G.
        low, high: the two dtypes compared.
        model_kwargs: passed to ``timm.create_model``.
        path: the root path of the head (``set_gcp_path``): 'cov' decomposes the d x d covariance, whose float32
            null-space noise the paper's precision finding is about; 'gram' (the default for M < d in the models)
            decomposes the M x M Gram matrix of the features, which has no null space.

    Returns:
        One row per (method, image size): method, img_size, samples M, default dtype of the method, cosine and
        relative error of the ``low`` gradient against the ``high`` one (per-sample means and the worst sample), the
        relative difference of the logits.
    """
    import timm

    from ..layers import set_gcp_method, set_gcp_path

    methods = list(methods or [m for m, s in METHODS.items() if s.eigen or m == 'isqrt'])
    torch.manual_seed(seed)
    model = timm.create_model(f'{family}_gcp_isqrt', pretrained=False, **dict(model_kwargs or {})).train()
    set_gcp_path(model, path)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for size in img_sizes:
        images = torch.randn(num, 3, size, size, generator=gen)
        with torch.no_grad():
            feats = model.forward_features(images)
        upstream = None
        for method in methods:
            grads, logits = {}, {}
            for dtype in (low, high):
                set_gcp_method(model, method, dtype=dtype)
                f = feats.detach().clone().requires_grad_(True)
                out = model.forward_head(f)
                if upstream is None:
                    upstream = torch.randn(out.shape, generator=gen)
                (grads[dtype],) = torch.autograd.grad((out * upstream).sum(), f)
                logits[dtype] = out.detach()
            rel, cos = relerr_cos(grads[low].double(), grads[high].double())
            out_rel, _ = relerr_cos(logits[low].double(), logits[high].double())
            rows.append(dict(
                method=method, img_size=size, samples=feats.shape[-2] * feats.shape[-1],
                default_dtype=str(METHODS[method].defaults.get('dtype', '')).replace('torch.', ''),
                cos=float(cos.mean()), cos_min=float(cos.min()), rel_err=float(rel.mean()),
                rel_err_max=float(rel.max()), logits_rel_err=float(out_rel.mean()),
                finite=bool(torch.isfinite(grads[low]).all())))
            _logger.info('head grad %s %d px: cos %.4f rel %.3g', method, size, rows[-1]['cos'], rows[-1]['rel_err'])
    return rows


# The reference code's kernels, with the way it replaces non-finite entries (DifferentiableSVD's SVD_Original and
# SVD_Pade): rule → kernel of the floored, descending spectrum (B, d) before the replacement.
def _reference_exact(lam: torch.Tensor) -> torch.Tensor:
    k = 1.0 / (lam.unsqueeze(-1) - lam.unsqueeze(-2))  # +inf in both triangles at a tie (ε − ε = +0)
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def _reference_pade(lam: torch.Tensor) -> torch.Tensor:
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    r = torch.minimum(li, lj) / torch.maximum(li, lj)
    r.diagonal(dim1=-2, dim2=-1).zero_()  # the reference's ratio is λ_i/λ_j − I: 0 on the diagonal
    scale = torch.where(li >= lj, 1.0 / li, -1.0 / lj)  # positive in both triangles at a tie
    scale.diagonal(dim1=-2, dim2=-1).zero_()
    p, q = pade_coefficients()
    # the reference's evaluation order: at r = 1, Q(1) sums to exactly 0 and P(1) < 0, so K = −inf at ties
    return scale * pade_eval(r, p, q, horner=False)


TIE_RULES = {'svd': _reference_exact, 'pade': _reference_pade}
_OUR_KERNELS = {'svd': 'exact', 'pade': 'pade'}


def reference_tie_kernel(lam: torch.Tensor, rule: str) -> torch.Tensor:
    """K as the reference code computes it, non-finite entries replaced as it does.

    SVD_Original (``svd``): K = 1/(λ_i − λ_j) is +inf in both triangles at an exact tie and is replaced by the largest
    finite K of the whole batch. SVD-Padé (``pade``): P(1)/Q(1) is −inf (Q(1) rounds to 0 in float64), and with the
    positive scale 1/λ that both triangles get at a tie K is −inf in both, replaced by the smallest finite K of the
    batch. Both replacements are symmetric (K_ij = K_ji at a tie), and both couple the samples of a batch.

    Args:
        lam: (B, d) floored eigenvalues, descending.
        rule: ``'svd'`` or ``'pade'``.

    Returns:
        (B, d, d) float64 K.
    """
    if rule not in TIE_RULES:
        raise ValueError(f'unknown tie rule {rule!r}; valid: {", ".join(TIE_RULES)}')
    k = TIE_RULES[rule](lam.double())
    finite = k[torch.isfinite(k)]
    k = torch.where(k == math.inf, finite.max(), k)
    k = torch.where(k == -math.inf, finite.min(), k)
    return torch.where(torch.isnan(k), finite.max(), k)


def _literal_backward(u: torch.Tensor, lam: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """U·[Kᵀ ∘ (Uᵀ·∂L/∂U) + diag(∂L/∂λ)]·Uᵀ, not symmetrised (the reference's eigen backward)."""
    sq = lam.sqrt()
    dl_du = (g + g.transpose(-1, -2)) @ u * sq.unsqueeze(-2)
    dl_dlam = 0.5 / sq * (u.transpose(-1, -2) @ g @ u).diagonal(dim1=-2, dim2=-1)
    inner = k.transpose(-1, -2) * (u.transpose(-1, -2) @ dl_du) + torch.diag_embed(dl_dlam)
    return u @ inner @ u.transpose(-1, -2)


def _library_grads(x: torch.Tensor, method: str, upstream: torch.Tensor):
    """(∂L/∂Σ, ∂L/∂X) through the library's covariance and ``sqrtm`` for L = ⟨G, sqrtm(Σ)⟩, all float64."""
    xg = x.detach().double().requires_grad_(True)
    cov = covariance(xg)
    g_cov, g_x = torch.autograd.grad((sqrtm(cov, method) * upstream).sum(), (cov, xg))
    return 0.5 * (g_cov + g_cov.transpose(-1, -2)), g_x


def _our_kernel(lam: torch.Tensor, rule: str) -> torch.Tensor:
    """Our K, with the entries at exact ties set to 0: the library's backward weighs them by
    K_ij·(√λ_i − √λ_j) = 0 exactly, while the literal formula would add two huge terms (±2⁵³/λ for ``pade``) whose
    rounding does not cancel."""
    k = KERNELS[_OUR_KERNELS[rule]](lam)
    return torch.where(lam.unsqueeze(-1) == lam.unsqueeze(-2), torch.zeros_like(k), k)


def _block_share(delta: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> float:
    """‖Uₘᵀ·Δ·Uₘ‖ / ‖Δ‖ over the batch, Uₘ the eigenvectors selected by ``mask`` (B, d)."""
    inside = sum(float((u[b][:, mask[b]].T @ delta[b] @ u[b][:, mask[b]]).norm()) ** 2 for b in range(u.shape[0]))
    return math.sqrt(inside) / max(float(delta.norm()), 1e-300)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten(1).norm(dim=1).max() / b.flatten(1).norm(dim=1).clamp_min(1e-300).min())


def tie_rule_comparison(
        features: Mapping[str, torch.Tensor],
        rules: Sequence[str] = ('svd', 'pade'),
        seed: int = 0,
        eps: float = EPS,
) -> List[Dict[str, Any]]:
    """Our ``svd``/``pade`` backward against the same backward with the reference code's tie rule.

    For features X (B, d, M) the covariance Σ = (1/M)·Xc·Xcᵀ is formed in float64 and L = ⟨G, Σ^½⟩ for one fixed
    random G. Ours: the library's gradients (autograd through ``covariance`` and ``sqrtm``). Reference rule: the
    literal backward U·[Kᵀ∘(Uᵀ∂L/∂U) + diag(∂L/∂λ)]·Uᵀ with :func:`reference_tie_kernel`, then the covariance's
    backward ∂L/∂X = (S + Sᵀ)·Xc/M. The same literal backward with our K (0 at ties: see :func:`_our_kernel`)
    reproduces our gradient (``literal_check``), so every difference comes from the K at ties. Ties exist only
    between eigenvalues at the ε floor, whose eigenvectors span (numerically) the null space of Σ, which Xc is
    orthogonal to.

    Args:
        features: case name → (B, d, M) features (any float dtype; used in float64).
        rules: tie rules to compare (keys of ``TIE_RULES``).
        seed: seed of G.
        eps: eigenvalue floor.

    Returns:
        One row per (case, rule): eigenvalues at the floor per sample (every pair of them is a tie), the largest
        |K| the reference puts at ties, the relative
        difference of ∂L/∂Σ, the share of that difference inside the floored-eigenvalue block, the relative
        difference of ∂L/∂X (worst sample), the same for ``lyap`` (the exact gradient) against ours, and
        ``literal_check`` (our K through the literal backward against the library's ∂L/∂Σ).
    """
    rows = []
    for case, x in features.items():
        x = x.double().flatten(2)
        xc = x - x.mean(-1, keepdim=True)
        gen = torch.Generator().manual_seed(seed)
        upstream = torch.randn(x.shape[0], x.shape[1], x.shape[1], generator=gen, dtype=torch.float64)
        _, u, lam = eig_forward(covariance(x), eps=eps)
        floored = lam <= eps
        _, gx_lyap = _library_grads(x, 'lyap', upstream)
        for rule in rules:
            g_sigma, g_x = _library_grads(x, rule, upstream)
            ours_literal = _literal_backward(u, lam, _our_kernel(lam, rule), upstream)
            k_ref = reference_tie_kernel(lam, rule)
            s_ref = _literal_backward(u, lam, k_ref, upstream)
            gx_ref = (s_ref + s_ref.transpose(-1, -2)) @ xc / x.shape[-1]
            delta = 0.5 * (s_ref + s_ref.transpose(-1, -2)) - g_sigma
            tie_mask = floored.unsqueeze(-1) & floored.unsqueeze(-2) & ~torch.eye(lam.shape[-1], dtype=torch.bool)
            rows.append(dict(
                case=case, rule=rule, floored=float(floored.sum(-1).double().mean()),
                k_at_ties=float(k_ref[tie_mask].abs().max()) if bool(tie_mask.any()) else 0.0,
                sigma_rel_diff=_rel(0.5 * (s_ref + s_ref.transpose(-1, -2)), g_sigma),
                null_share=_block_share(delta, u, floored),
                x_rel_diff=_rel(gx_ref, g_x), lyap_x_rel_diff=_rel(gx_lyap, g_x),
                literal_check=_rel(0.5 * (ours_literal + ours_literal.transpose(-1, -2)), g_sigma)))
            _logger.info('tie rule %s on %s: Σ %.3g, X %.3g', rule, case, rows[-1]['sigma_rel_diff'],
                         rows[-1]['x_rel_diff'])
    return rows

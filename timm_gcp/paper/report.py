"""The paper-reproduction report's text: markdown written by named sections around the rows the analyses compute.

Each ``_section_*`` function calls its analysis (the other modules of this package), writes the rows as CSVs
(:mod:`.tables`) and figures (:mod:`.figures`) into the report folder and returns its markdown lines, in which every
number is computed (from the rows, the configs or the analyses' constants); :func:`write_report` runs them in order.
"""
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..functional import EPS, METHODS
from ..functional.registry import default_top_n
from .covariances import DEFAULT_DECADES, condition_numbers, random_covariances
from .fig2 import Fig2Config, summarise_fig2
from .figures import plot_condition, plot_fig2, plot_gradients, plot_ns_function
from .gradients import LEAD_FRACTION, NS_CURVE_DIM, RANGE_REL, gradient_comparison, ns_function_curve
from .kernels import GAUSSIAN_DIM, GAUSSIAN_SAMPLES, analysis_tables
from .precision import LOST_FRACTION, eig_precision_counts, head_gradient_precision, tie_rule_comparison
from .table2 import Table2Config, summarise_table2
from .tables import fmt, markdown_table, write_csv

__all__ = ['write_report']


# ----------------------------------------------------------------------------------------------------------------------
# Tables 6 and 7


def _section_tables67(out_dir: Path) -> List[str]:
    tables = analysis_tables()
    for name in ('table6', 'table7', 'topn', 'pade_tie'):
        write_csv(out_dir / f'{name}.csv', tables[name])
    t6cols = [k for k in tables['table6'][0] if k != 'r']
    tie = tables['pade_tie'][0]
    paper_pade, paper_topn = (next(r['paper'] for r in tables['table7'] if r['method'] == m) for m in ('pade', 'topn'))
    top_n = default_top_n(GAUSSIAN_DIM)
    m1, m2 = GAUSSIAN_SAMPLES
    return [
        '## Tables 6 and 7: kernel approximation error and largest |K|', '',
        '### Table 6: absolute error of the backward kernels\' series to 1/(1−r), float64', '',
        'Computed by `timm_gcp.paper.kernels.table6()`: `taylor`/`pade` are the library\'s kernels, '
        '`taylor_termwise` the degree-100 series summed term by term, `pade_reference` the reference [50/50] '
        'coefficients (mpmath, 20 digits) evaluated term by term; `paper_*` are the paper\'s Table 6.', '',
        markdown_table(tables['table6'], [('r', 'r')] + [(k, k) for k in t6cols]), '',
        '### Table 7: largest |K_ij| each kernel allows', '',
        'Computed by `timm_gcp.paper.kernels.table7()`: `worst` over the closest pairs the ε floor allows, `tie` at '
        f'λᵢ = λⱼ = ε, `random{m1}`/`random{m2}` on covariance spectra of {m1}/{m2} Gaussian samples at '
        f'd = {GAUSSIAN_DIM}; `paper` is the paper\'s Table 7 (inf = unbounded).', '',
        markdown_table(tables['table7'], [(k, k) for k in tables['table7'][0]]), '',
        f'- **Padé.** The paper\'s {paper_pade:.2e} is |P(1)/Q(1)|/ε in high-precision arithmetic: the reference\'s '
        f'[50/50] coefficients (mpmath {tie["mpmath_version"]}, {tie["dps"]} digits), each polynomial summed term by '
        f'term in {tie["dps"]}-digit arithmetic, give P(1)/Q(1) = {tie["mp_quotient"]:.4e}, divided by ε = '
        f'{EPS:.4e}: {tie["mp_over_eps"]:.3e} here. Q(1) is a cancellation to about 1e-22, so the last digits decide '
        f'it: summed exactly, the same coefficients give {tie["exact_over_eps"]:.3e}. It is not a value any code '
        'substitutes. In float64 the reference\'s running sums give '
        f'P(1) = {tie["float64_p"]:.4g} and Q(1) = {tie["float64_q"]:.3g}, so SVD-Padé\'s K is −inf at an exact '
        'tie, in *both* triangles (the scale 1/λ is positive in both), and the reference replaces it by the '
        'smallest finite K of the whole batch; SVD_Original\'s 1/(λᵢ − λⱼ) is +inf in both triangles and is '
        'replaced by the batch maximum. Both replacements are symmetric (Kᵢⱼ = Kⱼᵢ). Ours: `pade` takes the value at '
        'the largest float64 r below 1 (±2⁵³/λ, antisymmetric, per sample), `svd` takes 0; what this changes is '
        'measured in the tie-rule section below.',
        f'- **TopN.** The paper\'s {paper_topn:.2e} is 1/ε = {1 / EPS:.4e}: the bound holds when the N kept '
        f'eigenvalues are genuine ones, at least ε above the floor. Our `random{m1}`/`random{m2}` columns use the '
        f'library default N = {top_n} of {GAUSSIAN_DIM}, above the rank of those covariances ({m1 - 1} and {m2 - 1}): '
        'TopN then keeps round-off eigenvalues of the null space, and their near-ties give the same K as `svd`. With '
        'N at most the rank, K is bounded by the genuine gaps:', '',
        markdown_table(tables['topn'], [('spectrum', 'spectrum'), ('which', 'N chosen as'), ('N', 'N'),
                                        ('lambda_n', 'λ_N'), ('max_k', 'largest |K|'), ('one_over_eps', '1/ε')]),
        '',
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Gradients against the exact one


def _gradient_findings(rows: Sequence[Mapping[str, Any]], reference: str) -> List[str]:
    """Bullet points computed from the gradient rows (so that re-running the report keeps them true)."""
    ok = [r for r in rows if 'error' not in r]
    methods = list(dict.fromkeys(r['method'] for r in ok))
    by = {m: [r for r in ok if r['method'] == m] for m in methods}
    worst = lambda m, k: max((r[k] for r in by[m] if not math.isnan(r[k])), default=math.nan)  # noqa: E731
    exact_range = [m for m in methods if worst(m, 'rel_err_range') < 1e-6]
    out = ['**Computed findings** (worst case over the cases above):', '']
    if exact_range:
        out.append(f'- Same gradient as `{reference}` on the range of Σ (rel. err < 1e-6): '
                   + ', '.join(f'`{m}`' for m in exact_range) + '; their full-matrix differences are therefore all '
                   'in the null-space block, i.e. in how they treat ties/near-ties at the ε floor.')
    for m in methods:
        if m in exact_range:
            continue
        out.append(f'- `{m}`: rel. err on the range ≤ {fmt(worst(m, "rel_err_range"))}, on the leading block ≤ '
                   f'{fmt(worst(m, "rel_err_lead"))}; largest |∂L/∂Σ| {fmt(worst(m, "max_abs_grad"))}.')
    out += [f'- `{r["method"]}` failed on {r["case"]}: {r["error"]}' for r in rows if 'error' in r]
    ref_max = max((r['ref_max_abs_grad'] for r in ok), default=math.nan)
    out.append(f'- Largest |∂L/∂Σ| of `{reference}` over all cases: {fmt(ref_max)}.')
    return out


def _section_gradients(out_dir: Path, covs: Mapping[str, torch.Tensor], notes: Mapping[str, str],
        reference: str) -> List[str]:
    rows = gradient_comparison(covs, reference=reference)
    write_csv(out_dir / 'gradients.csv', rows)
    plot_gradients(rows, out_dir / 'gradients.png', reference)
    ns5 = float(ns_function_curve(torch.tensor([LEAD_FRACTION]), iters=(5,), extra_methods=())['NS 5 it.'][0])
    null = 1 / (2 * math.sqrt(EPS))  # the exact gradient's weight on the null-space block
    md = [f'## Gradients on realistic covariances, against the exact stable gradient (`{reference}`)', '',
          'A fixed standard-normal upstream gradient G = ∂L/∂Q (one per case) is pushed through each method\'s '
          f'backward; ∂L/∂Σ (symmetric part) is compared with `{reference}`\'s (the exact gradient; `lyap` computes '
          'it without the 1/(λᵢ−λⱼ) cancellation). Columns: the full matrix; the "range" block UᵣᵀgUᵣ on the '
          f'eigenvectors Σ spans (eigenvalues > {RANGE_REL:g}·λ_max); the "leading" block on eigenvalues ≥ '
          f'{LEAD_FRACTION:g}·tr Σ (where 5 Newton–Schulz steps are within {100 * abs(1 - ns5):.2g} % of the exact '
          'root; "leading dim" is its size). The full-matrix numbers are dominated by the null-space block, where the '
          f'exact gradient is ≈ 1/(2√ε) ≈ {null:.2g} times G; the range numbers by the smallest genuine eigenvalues. '
          'The covariances are formed in float64.', '']
    for case, c in covs.items():
        note = notes.get(case) or (f'ReLU(s ⊙ z), z ~ N(0, I), channel scales s log-uniform over '
                                   f'{DEFAULT_DECADES:g} decades; '
                                   f'{c.shape[0]} covariances')
        md.append(f'- **{case}**: {note}; median condition number (ε floor) '
                  f'{float(condition_numbers(c).median()):.2e}.')
    cols = [('case', 'case'), ('method', 'method'), ('rel_err', 'rel. err'), ('cos', 'cosine'),
            ('rel_err_range', 'rel. err (range)'), ('rel_err_lead', 'rel. err (leading)'),
            ('cos_lead', 'cosine (leading)'), ('lead_dim', 'leading dim'), ('max_abs_grad', 'max |∂L/∂Σ|'),
            ('ref_max_abs_grad', f'{reference} max |∂L/∂Σ|'), ('finite', 'finite'), ('note', 'note')]
    md += ['', markdown_table(rows, cols), '', '![gradients](gradients.png)', '', *_gradient_findings(rows, reference),
           '', '**Reading it.** `isqrt` and `mpa` compute a *different function* from the exact root (see the '
           f'Newton–Schulz section: five steps return well under the exact root for every eigenvalue below ~'
           f'{LEAD_FRACTION:g} of the trace), so their gradients are not noisy estimates of the exact one and large '
           'full-matrix errors are '
           'expected, not a bug. The `isqrt (20 it.)` control shows the gap closing on the range once the iteration '
           'converges there. Where `isqrt` still differs on the leading block, the cause is its √trΣ normalisation: '
           'the derivative through tr Σ adds a multiple of the identity that is zero only for the exact root, and '
           'with five steps the unconverged small eigenvalues make it large. The null space is where all methods '
           f'differ most: `lyap` gives the off-diagonal null-space block (UᵀGU)ᵢⱼ/(2√ε) ≈ {null:.1g}·|G|, whereas the '
           'K-based backward of `svd`/`pade`/`trunc`/`topn` gives an exact tie at the ε floor the weight '
           'Kᵢⱼ·(√λᵢ − √λⱼ) = 0, so their full-matrix agreement with `lyap` is poor while their range blocks match '
           'it. The next section measures what that block does to the gradient the backbone receives.', '']
    return md


# ----------------------------------------------------------------------------------------------------------------------
# Tie rule


def _tie_findings(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """The reading of the tie-rule table, with its extremes."""
    if not rows:
        return []
    sig = max(r['sigma_rel_diff'] for r in rows)
    share = min(r['null_share'] for r in rows)
    x = max(r['x_rel_diff'] for r in rows)
    lyap = max(r['lyap_x_rel_diff'] for r in rows)
    return [f'Reading it: the reference\'s tie rule changes ∂L/∂Σ by up to {sig:.3g} (relative), and the share of '
            f'that change inside the block of the floored eigenvectors, which span the null space of Σ, is at least '
            f'{share:.6f} (1 = all of it). The covariance backward multiplies ∂L/∂Σ by the centred features, which are '
            f'orthogonal to that null space, so the gradient the backbone receives differs by at most {x:.3g} '
            '(relative, worst sample). The '
            f'exact gradient (`lyap`), whose null-space block is ≈ 1/(2√ε)·G, gives the same ∂L/∂X to {lyap:.3g}. '
            'With Σ formed in float64 the null-space block of ∂L/∂Σ, where every method handles ties its own way, '
            'does not reach the backbone; the size of the difference grows with the K the reference puts at the '
            'ties (the batch\'s extreme finite K, set by the closest pair of round-off eigenvalues above ε).', '']


def _section_ties(out_dir: Path, features: Mapping[str, torch.Tensor], notes: Mapping[str, str]) -> List[str]:
    rows = tie_rule_comparison(features)
    write_csv(out_dir / 'tie_rule.csv', rows)
    md = ['## Exact ties: our kernels against the reference code\'s tie rule', '',
          'Features X (d × M, M < d) → Σ = (1/M)·Xc·Xcᵀ in float64 → L = ⟨G, Σ^½⟩ for a fixed random G. "Ours" is '
          'the library\'s gradient (autograd through `covariance` and `sqrtm`); "reference rule" is the literal '
          'backward U·[Kᵀ∘(Uᵀ∂L/∂U) + diag(∂L/∂λ)]·Uᵀ with the reference\'s K at ties (SVD_Original: +inf → batch '
          'maximum; SVD-Padé: −inf → batch minimum; both symmetric), followed by the covariance backward '
          '∂L/∂X = (S + Sᵀ)·Xc/M. The same literal backward with our K reproduces our ∂L/∂Σ ("literal check"), so '
          'every difference comes from K at the ties, i.e. pairs of eigenvalues both at the ε floor.', '']
    md += [f'- **{case}**: {notes.get(case, "")}' for case in features if notes.get(case)]
    cols = [('case', 'case'), ('rule', 'rule'), ('floored', 'eigenvalues at ε per sample'),
            ('k_at_ties', '|K| the reference puts at ties'), ('sigma_rel_diff', 'rel. diff of ∂L/∂Σ'),
            ('null_share', 'share of the ∂L/∂Σ difference in the floored block'), ('x_rel_diff', 'rel. diff of ∂L/∂X'),
            ('lyap_x_rel_diff', 'rel. diff of ∂L/∂X, `lyap` vs ours'), ('literal_check', 'literal check')]
    md += ['', markdown_table(rows, cols), '',
        *_tie_findings(rows)]
    return md


# ----------------------------------------------------------------------------------------------------------------------
# Newton–Schulz as a function


def _section_ns(out_dir: Path, points: int) -> List[str]:
    a = torch.logspace(-6, 0, points, dtype=torch.float64)
    curves = ns_function_curve(a)
    plot_ns_function(curves, a, out_dir / 'ns_function.png')
    write_csv(out_dir / 'ns_function.csv', [dict(a=float(a[i]), **{k: float(v[i]) for k, v in curves.items()})
                                             for i in range(a.numel())])
    idx = [int((a.log() - math.log(p)).abs().argmin()) for p in (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)]
    d = NS_CURVE_DIM
    at_mean = float(ns_function_curve(torch.tensor([1.0 / d]), iters=(5,), extra_methods=())['NS 5 it.'][0])
    return ['## Newton–Schulz as a function of the eigenvalue', '',
            f'Setup: A = diag(a, b, …, b), b = (1 − a)/{d - 1}, so A is a {d}-d covariance already divided by its '
            'trace (what `isqrt` iterates on), in float32 as in a model. Newton–Schulz maps diagonal matrices to '
            'diagonal matrices, so output[0, 0] is the iteration\'s scalar function of a; the plot shows it divided by '
            f'√a (exact root = 1). A trace-normalised {d}-d covariance has mean eigenvalue 1/{d} ≈ {1 / d:.2g}, '
            f'where NS-5 returns {at_mean:.2g} of the exact root.', '',
            '![NS as a function](ns_function.png)', '',
            markdown_table([dict(a=f'{a[i]:.0e}', **{k: float(v[i]) for k, v in curves.items()}) for i in idx],
                           [('a', 'a')] + [(k, k) for k in curves]), '']


# ----------------------------------------------------------------------------------------------------------------------
# float32 against float64


def _section_precision(out_dir: Path, covs: Mapping[str, torch.Tensor],
        head_precision: Optional[Mapping[str, Any]]) -> List[str]:
    md = ['## float32 against float64 in the meta-layer', '',
          'The paper runs every SVD meta-layer in float64 ("MPN-COV fails to converge using single precision"). '
          'Each method takes a `dtype` option (eigen-methods default to float64, `isqrt` and `mpa` to float32); '
          'the whole meta-layer — covariance, root and backward — runs in it.', '']
    if head_precision is None:
        md += ['> **PENDING** — the model-gradient measurement was not part of this report run.', '']
    else:
        rows = head_gradient_precision(**head_precision)
        write_csv(out_dir / 'head_gradient_precision.csv', rows)
        md += ['### The gradient a model\'s head sends into the backbone', '',
               f'A randomly initialised `{head_precision.get("family", "resnet18")}_gcp_<method>` (train-mode BN), '
               f'{head_precision.get("num", 2)} random images; the backbone features are computed once, then for '
               'every method ∂L/∂(backbone features) for L = ⟨G, logits⟩ (fixed random G) is computed with the '
               f'meta-layer in float32 and in float64, on the `{head_precision.get("path", "cov")}` root path. '
               'Columns: cosine similarity and relative error of the float32 '
               'gradient against the float64 one (mean over the images, and the worst image), and the relative '
               'difference of the logits.', '',
               markdown_table(rows, [('method', 'method'), ('default_dtype', 'default dtype'), ('img_size', 'px'),
                                     ('samples', 'M'), ('cos', 'cosine'), ('cos_min', 'worst cosine'),
                                     ('rel_err', 'rel. err'), ('rel_err_max', 'worst rel. err'),
                                     ('logits_rel_err', 'logits rel. diff'), ('finite', 'finite')]), '',
               *_precision_findings(rows), '']
    counts = eig_precision_counts(covs)
    write_csv(out_dir / 'eig_precision.csv', counts)
    md += ['### Eigenvalues of the same covariances in float32 and float64', '',
           'Why float32 fails: per-matrix means. "genuine" = float64 eigenvalues above d·ε·λ_max (the rank the '
           f'samples give, M − 1 for M < d); "lost" = genuine eigenvalues float32 gets wrong by more than '
           f'{100 * LOST_FRACTION:g} %; '
           '"null-space > ε" = zero eigenvalues that float32 returns above the ε floor (they survive into the root '
           'and its backward as noise, with eigenvectors that are not orthogonal to the features); "fp32 noise" = '
           'the largest |λ| float32 returns outside the genuine ones, relative to λ_max.', '',
           markdown_table(counts, [('case', 'case'), ('genuine_rank', 'genuine'), ('fp64_le_eps', 'fp64 ≤ ε'),
                                   ('fp32_le_eps', 'fp32 ≤ ε'), ('fp32_lost_genuine', 'genuine lost by fp32'),
                                   ('fp32_spurious_positive', 'null-space > ε in fp32'),
                                   ('smallest_genuine_rel', 'smallest genuine / λmax'),
                                   ('fp32_noise_rel', 'fp32 noise / λmax'), ('cond_fp64', 'cond fp64'),
                                   ('cond_fp32', 'cond fp32')]), '']
    return md


def _precision_findings(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    out = []
    for size in sorted({r['img_size'] for r in rows}):
        at = [r for r in rows if r['img_size'] == size]
        if not at:
            continue
        worst = min(at, key=lambda r: r['cos'])
        best = max(at, key=lambda r: r['cos'])
        out.append(f'- {size} px (M = {at[0]["samples"]}): cosine of the float32 gradient to the float64 one from '
                   f'{worst["cos"]:.4f} (`{worst["method"]}`) to {best["cos"]:.4f} (`{best["method"]}`).')
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Fig. 2


def _fig2_findings(summary: Sequence[Mapping[str, Any]]) -> List[str]:
    """float32 against float64, per method, from the summary rows."""
    by = {(r['method'], r['dtype']): r for r in summary}
    out = []
    for method in dict.fromkeys(r['method'] for r in summary):
        lo, hi = by.get((method, 'float32')), by.get((method, 'float64'))
        if not lo or not hi or lo['beta_median'] is None or hi['beta_median'] is None or lo['train_err'] is None \
                or hi['train_err'] is None:
            continue
        out.append(f'- `{method}`: with the meta-layer in float32 the final training error is {lo["train_err"]:.3g} % '
                   f'(seeds {lo["train_err_min"]:.3g}–{lo["train_err_max"]:.3g}) against {hi["train_err"]:.3g} % '
                   f'({hi["train_err_min"]:.3g}–{hi["train_err_max"]:.3g}) in float64, and the median effective β '
                   f'is {lo["beta_median"] / hi["beta_median"]:.3g}× the float64 one ({lo["beta_median"]:.3g} against '
                   f'{hi["beta_median"]:.3g}; last epoch {lo["beta_last_epoch"]:.3g} against '
                   f'{hi["beta_last_epoch"]:.3g}); {lo["diverged"]} of {lo["runs"]} float32 runs diverged.')
    if out:
        out = ['**Measured** (the paper\'s Fig. 2: MPN-COV fails to converge in single precision, with a much '
               'larger β; iSQRT-COV is insensitive to the precision):', ''] + out + ['']
    return out


def _section_fig2(out_dir: Path, cfg: Optional[Fig2Config], records: Optional[Sequence[Mapping[str, Any]]],
        command: Optional[str]) -> List[str]:
    md = ['## Fig. 2 (small scale): float32 against float64 in training, and gradient smoothness', '']
    if cfg is None or not records:
        return md + ['> **PENDING** — the Fig. 2 runs were not part of this report run; see `docs/reproduce.md` for '
                     'the command.', '']
    done = [r for r in records if not r.get('pending')]
    summary = summarise_fig2(records)
    write_csv(out_dir / 'fig2.csv', summary)
    write_csv(out_dir / 'fig2_epochs.csv', [dict(method=r['method'], dtype=r['dtype'], seed=r['seed'], **e)
                                            for r in done for e in r['epochs']])
    write_csv(out_dir / 'fig2_beta.csv', [dict(method=r['method'], dtype=r['dtype'], seed=r['seed'],
                                               **{k: v for k, v in b.items() if k != 'ratios'})
                                          for r in done for b in r['beta']])
    if done:
        plot_fig2(done, out_dir / 'fig2.png')
    kw = ', '.join(f'{k}={v}' for k, v in cfg.model_kwargs.items())
    md += [f'`{cfg.family}_gcp_<method>` (gcp_dim={cfg.gcp_dim}, {kw}, method option `dtype`), {cfg.img_size} px '
           f'images of the built-in second-order dataset ({cfg.train_samples} training / {cfg.val_samples} '
           f'validation samples, {cfg.num_classes} classes), batch {cfg.batch_size}, {cfg.epochs} epochs, timm '
           f'`{cfg.opt}` (lr {cfg.lr}, momentum {cfg.momentum}, weight decay {cfg.weight_decay}) with the '
           f'`{cfg.sched}` schedule; seeds {list(cfg.seeds)} (weights and batch order; the data are the same). '
           f'Effective β-smoothness every {cfg.beta_interval} steps: θ\' = θ − η·∇L(θ) for '
           f'η = {list(cfg.beta_multipliers)} × the current learning rate, β = max ‖∇L(θ\') − ∇L(θ)‖/‖θ\' − θ‖ '
           'on the same batch (Santurkar et al., NeurIPS 2018, the measure the paper uses). Training error: top-1 '
           'over each epoch\'s training batches.', '']
    pending = [r for r in records if r.get('pending')]
    if pending:
        md += [f'> **PARTIAL** — {len(pending)} of {len(records)} runs pending; finish them (finished runs are '
               f'reused) with `{command or "python scripts/reproduce_paper.py --fig2"}`.', '']
    md += ['![Fig. 2](fig2.png)', '', markdown_table(summary, [
        ('method', 'method'), ('dtype', 'meta-layer dtype'), ('runs', 'runs'), ('diverged', 'diverged'),
        ('train_err', 'final train err (%)'), ('train_err_min', 'min'), ('train_err_max', 'max'),
        ('val_err', 'final val err (%)'), ('beta_median', 'β median'), ('beta_last_epoch', 'β median, last epoch'),
        ('beta_max', 'β max'), ('seconds', 's per run')]), '', *_fig2_findings(summary)]
    return md


# ----------------------------------------------------------------------------------------------------------------------
# Table 2 and the condition-number trend


def _cond_sampling_note(cfg: Table2Config) -> str:
    """One sentence on which training steps the condition-number trend was sampled at (from the trainer args)."""
    args = list(cfg.extra_args)
    interval = int(args[args.index('--diag-interval') + 1]) if '--diag-interval' in args[:-1] else None
    if interval == 1:
        where = 'at every training step, so each epoch\'s value covers that whole epoch'
    else:
        where = (f'at every {interval or "--diag-interval"}-th training step of each epoch, counting from its first '
                 f'step (taken before that epoch has trained)')
    return (f'Spectra of the head\'s covariances, sampled {where}; a hybrid run trains epochs {cfg.switch_epoch + 1} '
            f'to {cfg.epochs} (1-based) with the switched method.')


def _acc(s: Optional[Mapping[str, Any]]) -> str:
    if s is None or s['mean'] is None:
        return '—'
    return f'{s["mean"]:.2f} (n=1)' if s['n'] == 1 else f'{s["mean"]:.2f} ± {s["std"]:.2f} (n={s["n"]})'


def _trend(values: Sequence[Optional[float]]) -> str:
    return ' → '.join(fmt(v) for v in values) if values else '—'


def _ratio_range(summary: Sequence[Mapping[str, Any]], key: str) -> Tuple[float, float]:
    """Smallest and largest last-epoch ÷ first-epoch ratio of a trend over the summarised runs."""
    ratios = [t[-1] / t[0] for t in (s.get(key) or [] for s in summary if s['n'])
              if len(t) > 1 and t[0] and t[-1] is not None]
    return (min(ratios), max(ratios)) if ratios else (math.nan, math.nan)


def _cond_findings(summary: Sequence[Mapping[str, Any]], dim: int) -> List[str]:
    """Why the ε-floored condition number follows λ_max, with the ratios measured in this table (``dim``: d)."""
    res = dim * torch.finfo(torch.float32).eps  # the smallest eigenvalue a float32 covariance resolves, / λ_max
    per_eps = [c / lm for s in summary if s['n'] for c, lm in zip(s['cond_trend'], s['lam_max_trend'])
               if c is not None and lm]
    cond, lmax, rcond = (_ratio_range(summary, k) for k in ('cond_trend', 'lam_max_trend', 'range_cond_trend'))
    out = ['**The condition-number trend (the paper\'s Table 1 shows it falling during training).** With fewer '
           'samples than channels, Σ has zero eigenvalues, whose float64 (or float32) round-off lies on both sides '
           'of 0; the smallest is floored at ε, so λ_max / max(λ_min, ε) = λ_max/ε and the first column measures the '
           'scale of the features, not the conditioning of their spectrum.', '']
    if per_eps:
        out.append(f'- Measured: the first column divided by λ_max lies between {min(per_eps):.6g} and '
                   f'{max(per_eps):.6g} in every epoch of every run (1/ε = {1 / EPS:.6g}).')
    out.append(f'- From the first to the last epoch, λ_max changed by ×{lmax[0]:.3g}–{lmax[1]:.3g}, the first column '
               f'by ×{cond[0]:.3g}–{cond[1]:.3g}, the condition number on the range of Σ (third column: λ_max over '
               'the smallest eigenvalue above d·ε_Σ·λ_max, ε_Σ the machine epsilon of the covariance\'s dtype, a '
               f'scale-free measure) by ×{rcond[0]:.3g}–{rcond[1]:.3g}. A float32 covariance (`isqrt`, and the '
               f'epochs before a hybrid run\'s switch) resolves eigenvalues only above d·ε₃₂·λ_max ({res:.2g}·λ_max '
               f'at d = {dim}), which bounds its range condition number by {1 / res:.2g}.')
    if cond[0] > 1:
        also = ' (and so does the range condition number)' if rcond[0] > 1 else ''
        out.append(f'- The first column rises in every run here, because λ_max does{also}; the paper trains '
                   'ImageNet models for many epochs and does not say how its condition number treats the zero '
                   'eigenvalues. This small table does not reproduce its falling trend.')
    elif cond[1] < 1:
        out.append('- The first column falls in every run here, as in the paper, because λ_max does.')
    return out


def _gcp_dim(c: Table2Config) -> int:
    """d of the Table 2 models: their ``gcp_dim`` model kwarg, else the models' default."""
    for kw in c.model_kwargs:
        key, _, value = kw.partition('=')
        if key.strip() == 'gcp_dim':
            return int(value)
    import timm
    with torch.device('meta'):
        return timm.create_model(f'{c.model}_gcp_isqrt').global_pool.dim


def _section_table2(out_dir: Path, c: Optional[Table2Config], rows: Optional[Sequence[Mapping[str, Any]]],
        command: Optional[str]) -> List[str]:
    md = ['## Table 2 (small scale) and the condition-number trend (Table 1)', '']
    if c is None or not rows:
        return md + ['> **PENDING** — the Table 2 runs were not part of this report run; see `docs/reproduce.md` '
                     'for the command.', '']
    summary = summarise_table2(rows)
    write_csv(out_dir / 'table2_runs.csv', list(rows))
    write_csv(out_dir / 'table2.csv', summary)
    plot_condition(summary, out_dir / 'table2_condition.png')
    done = [r for r in rows if not r.get('pending') and r.get('top1') is not None]
    secs = [r['seconds'] for r in done if r.get('seconds')]
    md += [f'Sizing: `{c.model}_gcp_<method>`, {c.epochs} epochs, hybrid = `isqrt` until epoch {c.switch_epoch}, '
           f'then the method; batch {c.batch_size}; seeds {list(c.seeds)}; data {c.data_dir or "built-in dataset"}; '
           f'trainer args `{" ".join(c.extra_args)}`, model kwargs `{" ".join(c.model_kwargs)}`, method options '
           f'`{dict(c.method_options)}` (see `docs/reproduce.md` for how this was sized). Every method runs its '
           'meta-layer in its default dtype. Top-1 (%) on the validation split after the last epoch, mean ± sample '
           'std over the finished seeds (n).', '',
           f'{len(done)} of {len(rows)} runs finished'
           + (f', {statistics.fmean(secs):.0f} s per run on average (wall clock, shared two-core CPU)' if secs else '')
           + '.', '']
    pending = [r for r in rows if r.get('pending')]
    if pending:
        md += [f'> **PARTIAL** — {len(pending)} runs pending (' + ', '.join(
            f'{r["method"]} {r["protocol"]} s{r["seed"]}' for r in pending[:8])
            + (', …' if len(pending) > 8 else '') + '). Finish them (finished runs are reused) with: '
            f'`{command or "python scripts/reproduce_paper.py --table2"}`', '']
    by = {(s['method'], s['protocol']): s for s in summary}
    lines = ['| method | paper name | standalone top-1 | hybrid top-1 | failed runs |', '|---|---|---|---|---|']
    for m in c.methods:
        st, hy = by.get((m, 'standalone')), by.get((m, 'hybrid'))
        paper_name = METHODS[m].paper_name if m in METHODS else m
        fails = sum(s['failed'] for s in (st, hy) if s)
        lines.append(f'| {m} | {paper_name} | {_acc(st)} | {"= standalone" if m == "isqrt" else _acc(hy)} | {fails} |')
    md += lines + [''] + [f'- failed: {r["method"]} {r["protocol"]} s{r["seed"]}: {r["error"][:200]}'
                          for r in rows if r.get('error')]
    md += ['', _cond_sampling_note(c), '', '![condition numbers](table2_condition.png)', '',
           markdown_table([dict(run=f'{s["method"]} {s["protocol"]}', cond=_trend(s['cond_trend']),
                                lam_max=_trend(s['lam_max_trend']), range_cond=_trend(s['range_cond_trend']))
                           for s in summary if s['n']],
                          [('run', 'run'), ('cond', 'λ_max / max(λ_min, ε)'), ('lam_max', 'λ_max'),
                           ('range_cond', 'λ_max / smallest resolved λ')]), '',
           'Per epoch, medians over the sampled steps, then over seeds.', '', *_cond_findings(summary, _gcp_dim(c)), '']
    return md


# ----------------------------------------------------------------------------------------------------------------------
# The report


def write_report(
        out_dir: Path,
        command: str,
        grad_covs: Optional[Mapping[str, torch.Tensor]] = None,
        case_notes: Optional[Mapping[str, str]] = None,
        tie_features: Optional[Mapping[str, torch.Tensor]] = None,
        head_precision: Optional[Mapping[str, Any]] = None,
        fig2_cfg: Optional[Fig2Config] = None,
        fig2_records: Optional[Sequence[Mapping[str, Any]]] = None,
        table2_cfg: Optional[Table2Config] = None,
        table2_rows: Optional[Sequence[Mapping[str, Any]]] = None,
        progress: Optional[Callable[[str], None]] = None,
        reference: str = 'lyap',
        ns_points: int = 121,
        finish_command: Optional[str] = None,
) -> Path:
    """Run every analysis and write ``paper_report.md``, its PNG figures and CSVs into ``out_dir``.

    Args:
        out_dir: destination folder (created).
        command: the exact command line that produced the report (written into its header).
        grad_covs: case name → float64 covariances for the gradient and eigenvalue sections (default: M = 49 and
            196 random, d = 256, 4 each).
        case_notes: case name → how its covariances (or tie features) were made.
        tie_features: case name → (B, d, M) features for the tie-rule section (default: the random features behind
            ``random M=49``, 2 sets).
        head_precision: keyword arguments of :func:`~timm_gcp.paper.precision.head_gradient_precision`; None leaves
            that measurement pending.
        fig2_cfg, fig2_records: Fig. 2 sizing and the records of :func:`~timm_gcp.paper.fig2.run_fig2`; None leaves
            Fig. 2 pending.
        table2_cfg, table2_rows: Table 2 sizing and the rows of :func:`~timm_gcp.paper.table2.run_table2`; None
            leaves Table 2 pending.
        progress: called with a line per finished section.
        reference: the method whose gradient the others are compared with (the exact stable gradient, ``lyap``).
        ns_points: eigenvalues on the log grid 1e-6…1 of the Newton–Schulz curve.
        finish_command: the command that finishes pending Fig. 2/Table 2 runs (named in the report when some are).

    Returns:
        Path of the report.
    """
    from .covariances import random_features

    say = progress or (lambda s: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    grad_covs = grad_covs if grad_covs is not None else {
        f'random M={m}': random_covariances(4, m, seed=m) for m in (49, 196)}
    tie_features = tie_features if tie_features is not None else {'random M=49': random_features(2, 49, seed=49)}
    notes = dict(case_notes or {})
    md = ['# Reproducing the analyses of Song, Sebe & Wang, ICCV 2021 (arXiv 2105.02498)', '',
          f'Produced by `{command}` on {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} '
          f'(torch {torch.__version__}, {torch.get_num_threads()} CPU threads). '
          'CSVs next to this file hold every number shown here.', '']
    sections = (
        ('tables 6/7', lambda: _section_tables67(out_dir)),
        ('gradients', lambda: _section_gradients(out_dir, grad_covs, notes, reference)),
        ('tie rule', lambda: _section_ties(out_dir, tie_features, notes)),
        ('Newton–Schulz curve', lambda: _section_ns(out_dir, ns_points)),
        ('precision', lambda: _section_precision(out_dir, grad_covs, head_precision)),
        ('Fig. 2', lambda: _section_fig2(out_dir, fig2_cfg, fig2_records, finish_command)),
        ('Table 2', lambda: _section_table2(out_dir, table2_cfg, table2_rows, finish_command)),
    )
    for name, section in sections:
        md += section()
        say(f'{name} done ({time.perf_counter() - t_start:.0f} s)')
    md += [f'_Total report time: {time.perf_counter() - t_start:.0f} s (training runs not included)._', '']
    path = out_dir / 'paper_report.md'
    path.write_text('\n'.join(md))
    return path

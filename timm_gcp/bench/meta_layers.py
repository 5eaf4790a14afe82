"""Timing of the meta-layers (used by ``scripts/bench_meta_layers.py`` and ``scripts/compare_meta_layers.py``); the
inputs come from :func:`timm_gcp.paper.random_covariances`.

Methods are interleaved within one process (each repeat runs every method once, in a rotated order) and reported as
medians, so drifting load on a shared machine hits all methods alike. CUDA work is synchronised before each clock read.
"""
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

from ..functional import METHODS, cov_pool, method_dtype, sqrtm, use_gram

__all__ = [
    'matmul_gflops', 'matmul_probe', 'time_methods', 'isqrt_matmul_flops', 'errors_vs_exact', 'time_pooling',
    'BASELINE',
]

BASELINE = ('isqrt', 'cov')  # a plain d-space 5-step Newton–Schulz forward+backward, covariance included


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], None], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    _sync(device)
    t0 = clock()
    fn()
    _sync(device)
    return clock() - t0


def matmul_gflops(batch: int, d: int, dtype=torch.float32, device='cpu', repeats: int = 5) -> float:
    """Batched (batch, d, d) @ (batch, d, d) throughput in GFLOP/s (median of ``repeats``, 2·batch·d³ flops)."""
    device = torch.device(device)
    a = torch.randn(batch, d, d, dtype=dtype, device=device)
    b = torch.randn(batch, d, d, dtype=dtype, device=device)
    torch.bmm(a, b)
    times = [_median_time(lambda: torch.bmm(a, b), device) for _ in range(repeats)]
    return 2.0 * batch * d ** 3 / statistics.median(times) / 1e9


def isqrt_matmul_flops(batch: int, d: int, iters: int = 5, backward: bool = True) -> float:
    """Matmul flops of ``isqrt``: forward 3N − 3 products (the first step has Z = I), backward 6N − 6; for N = 1
    (one step, Y·T only) 1 and 2."""
    fwd, bwd = (1, 2) if iters == 1 else (3 * iters - 3, 6 * iters - 6)
    n = fwd + (bwd if backward else 0)
    return n * 2.0 * batch * d ** 3


def matmul_probe(batch: int, d: int, dtype=torch.float32, device='cpu') -> Callable[[], None]:
    """A callable doing one batched (batch, d, d) matmul (2·batch·d³ flops), to time among the methods."""
    a = torch.randn(batch, d, d, dtype=dtype, device=device)
    b = torch.randn(batch, d, d, dtype=dtype, device=device)
    return lambda: torch.bmm(a, b)


def time_methods(cov: torch.Tensor, methods: Optional[Iterable[str]] = None, repeats: int = 5, warmup: int = 1,
        backward: bool = True, options: Optional[Dict[str, dict]] = None,
        progress: Optional[Callable[[str], None]] = None,
        probes: Optional[Dict[str, Callable[[], None]]] = None,
        clock: Callable[[], float] = time.perf_counter) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per call of forward and forward+backward for each method, interleaved.

    Each method gets ``cov`` in its own precision (``method_dtype``: float64 for the eigen-methods, float32 for
    ``isqrt`` and ``mpa``), as a GCP head forms it, cast once before the timing. ``probes`` (name → callable) are
    timed in the same rotation (as ``'fwd'``), e.g. a matmul whose throughput the methods are compared against under
    the same load. ``clock=time.process_time`` measures CPU seconds of the whole
    process instead of wall time: with one thread, a measure of work that other processes' load barely changes.

    Returns:
        ``{method: {'fwd': [seconds per repeat], 'fwdbwd': [...]}}`` (probes: ``{'fwd': [...]}``).
    """
    probes = probes or {}
    methods = list(methods or METHODS)
    options = options or {}
    device = cov.device
    covs = {m: cov.to(method_dtype(m, **options.get(m, {}))) for m in methods}
    grads = {m: torch.randn_like(c) for m, c in covs.items()}
    out = {m: {'fwd': [], 'fwdbwd': []} for m in methods}
    out.update({p: {'fwd': []} for p in probes})

    def fwd(m):
        with torch.no_grad():
            sqrtm(covs[m], m, check=False, **options.get(m, {}))

    def fwdbwd(m):
        c = covs[m].detach().requires_grad_()
        (sqrtm(c, m, check=False, **options.get(m, {})) * grads[m]).sum().backward()

    names = methods + list(probes)
    for r in range(warmup + repeats):
        k = r % len(names)
        for m in names[k:] + names[:k]:
            if m in probes:
                t = _median_time(probes[m], device, clock)
                if r >= warmup:
                    out[m]['fwd'].append(t)
                continue
            t_f = _median_time(lambda: fwd(m), device, clock)
            t_b = _median_time(lambda: fwdbwd(m), device, clock) if backward else float('nan')
            if r >= warmup:
                out[m]['fwd'].append(t_f)
                out[m]['fwdbwd'].append(t_b)
        if progress is not None:
            progress(f'repeat {r + 1}/{warmup + repeats} done')
    return out


def errors_vs_exact(cov: torch.Tensor, methods: Optional[Iterable[str]] = None) -> Dict[str, Dict[str, float]]:
    """Relative Frobenius error of each method's root and of its gradient (random upstream G) against ``lyap``
    (the exact root and its exact gradient), all from the same float64 copy of ``cov``."""
    cov = cov.double()
    g = torch.randn(cov.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(cov.device)

    def run(m):
        c = cov.clone().requires_grad_()
        q = sqrtm(c, m)
        (q * g).sum().backward()
        return q.detach(), c.grad

    q_ref, g_ref = run('lyap')
    res = {}
    for m in methods or METHODS:
        q, gr = run(m)
        res[m] = {
            'root': float((q - q_ref).norm() / q_ref.norm()),
            'grad': float((gr - g_ref).norm() / g_ref.norm()),
        }
    return res


def time_pooling(x: torch.Tensor, methods: Optional[Iterable[str]] = None, paths: Iterable[str] = ('gram', 'cov'),
        repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
        progress: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per forward+backward of ``cov_pool(x, method, path=path)`` (covariance or Gram matrix included), for
    every method and path, interleaved in a rotating order with the ``BASELINE`` (d-space ``isqrt``) in every round.

    A path that ``use_gram`` would not take for ``x`` (the Gram path at M ≥ d) is skipped.

    Returns:
        ``{'method/path': [seconds per repeat]}``.
    """
    methods = list(methods or METHODS)
    d, m = x.shape[1], x.shape[2]
    keys = [(k, p) for k in methods for p in paths if p == 'cov' or use_gram(d, m, 'gram', k)]
    if BASELINE not in keys:
        keys.append(BASELINE)
    grad = torch.randn(x.shape[0], d * (d + 1) // 2, dtype=x.dtype, device=x.device)

    def run(method: str, path: str) -> None:
        xx = x.detach().requires_grad_()
        (cov_pool(xx, method, check=False, path=path) * grad).sum().backward()

    out: Dict[str, List[float]] = {f'{k}/{p}': [] for k, p in keys}
    for r in range(warmup + repeats):
        j = r % len(keys)
        for k, p in keys[j:] + keys[:j]:
            t = _median_time(lambda: run(k, p), x.device, clock)
            if r >= warmup:
                out[f'{k}/{p}'].append(t)
        if progress is not None:
            progress(f'repeat {r + 1}/{warmup + repeats} done')
    return out

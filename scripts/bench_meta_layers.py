#!/usr/bin/env python
"""Benchmark every GCP meta-layer.

Default: the square root given a covariance: forward and forward+backward time, ratios to ``isqrt``, matmul
throughput; B ∈ {32, 256}, d = 256, M ∈ {49, 196} (``--quick``: B = 32, M = 49, 3 repeats).

``--pooling``: ``cov_pool`` from the features (covariance or Gram matrix included), forward+backward, on both paths
(the d×d covariance, and the M×M Gram matrix where M < d), each as a fraction of a plain d-space 5-step Newton–Schulz
(``isqrt`` on the covariance path) timed in the same rotation; M ∈ {16, 49, 196, 784} by default. ``--crossover``
adds, per method, the largest M at which the Gram path was faster.

Methods are interleaved in one process and reported as medians; on a shared machine, rerun and compare ratios rather
than absolute times. Runs on CUDA too when present (``--device cuda``), with synchronisation.

    python scripts/bench_meta_layers.py --quick
    python scripts/bench_meta_layers.py --pooling --batch 32 --samples 16 49 196 784
    python scripts/bench_meta_layers.py --pooling --crossover --batch 32 --samples 160 192 224 240 --repeats 3
"""
import argparse
import statistics
import time

import torch

from timm_gcp import METHODS
from timm_gcp.functional import GRAM_MAX_FRACTION
from timm_gcp.functional import eig_sqrt
from timm_gcp.bench import BASELINE, isqrt_matmul_flops, matmul_probe, time_methods, time_pooling
from timm_gcp.paper import random_covariances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='B=32, M=49, 3 repeats')
    parser.add_argument('--batch', type=int, nargs='+', default=None, help='batch sizes (default 32 256)')
    parser.add_argument('--samples', type=int, nargs='+', default=None, help='M = H·W (default 49 196)')
    parser.add_argument('--dim', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=None)
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    parser.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda when available)")
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: leave as is)')
    parser.add_argument('--no-split-eigh', action='store_true', help='one eigh call per batch (no thread split)')
    parser.add_argument('--cpu-time', action='store_true',
        help='time with process CPU time instead of wall time (use with --threads 1 on a loaded machine)')
    parser.add_argument('--pooling', action='store_true',
        help='time cov_pool from features on the Gram and the covariance path (default M: 16 49 196 784)')
    parser.add_argument('--crossover', action='store_true', help='with --pooling: the largest M where Gram wins')
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_split_eigh:
        eig_sqrt.SPLIT_EIGH = False
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    batches = args.batch or ([32] if args.quick else [32, 256])
    samples = args.samples or ([49] if args.quick else [49, 196])
    repeats = args.repeats or (3 if args.quick else 5)
    d = args.dim
    clock = time.process_time if args.cpu_time else time.perf_counter
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__} on {name}; d={d}; medians of {repeats} interleaved runs; '
        f'eigh split: {eig_sqrt.SPLIT_EIGH}; {"process CPU" if args.cpu_time else "wall"} time')

    if args.pooling:
        _pooling(args, device, batches, args.samples or [16, 49, 196, 784], repeats, clock)
        return
    for b in batches:
        reps = repeats if b <= 64 else max(2, repeats // 2)
        flops = 2.0 * b * d ** 3
        probes = {
            'sgemm': matmul_probe(b, d, torch.float32, device),
            'dgemm': matmul_probe(b, d, torch.float64, device),
        }
        for m in samples:
            cov = random_covariances(b, m, dim=d, device=device)
            res = time_methods(cov, args.methods, repeats=reps, probes=probes, clock=clock,
                progress=lambda msg: print(f'  [B={b} M={m}] {msg}', flush=True))
            med = {k: {p: statistics.median(v[p]) for p in v} for k, v in res.items()}
            s_gflops = flops / med['sgemm']['fwd'] / 1e9
            d_gflops = flops / med['dgemm']['fwd'] / 1e9
            print(f'B={b} M={m}: batched {b}x{d}x{d} matmul {s_gflops:.1f} GFLOP/s fp32, {d_gflops:.1f} GFLOP/s fp64 '
                '(timed in the same rotation)')
            base = med.get('isqrt')
            print(f'  {"method":8s} {"fwd ms":>9s} {"fwd+bwd ms":>11s} {"fwd/isqrt":>10s} {"f+b/isqrt":>10s}'
                f' {"f+b/svd":>8s}')
            for k in args.methods:
                f, fb = med[k]['fwd'] * 1e3, med[k]['fwdbwd'] * 1e3
                rf = f'{med[k]["fwd"] / base["fwd"]:.2f}' if base else '-'
                rb = f'{med[k]["fwdbwd"] / base["fwdbwd"]:.2f}' if base else '-'
                rs = f'{med[k]["fwdbwd"] / med["svd"]["fwdbwd"]:.2f}' if 'svd' in med else '-'
                print(f'  {k:8s} {f:9.1f} {fb:11.1f} {rf:>10s} {rb:>10s} {rs:>8s}')
            if base:
                it = METHODS['isqrt'].defaults['iters']
                g_f = isqrt_matmul_flops(b, d, it, backward=False) / base['fwd'] / 1e9
                g_b = isqrt_matmul_flops(b, d, it, backward=True) / base['fwdbwd'] / 1e9
                print(f'  isqrt matmul throughput: fwd {g_f:.1f} GFLOP/s ({g_f / s_gflops:.2f} of sgemm), '
                    f'fwd+bwd {g_b:.1f} GFLOP/s ({g_b / s_gflops:.2f} of sgemm)')


def _pooling(args, device, batches, samples, repeats, clock) -> None:
    d = args.dim
    base = '/'.join(BASELINE)
    print(f'cov_pool forward+backward from (B, {d}, M) features, covariance/Gram matrix included; ratio = time / '
        f'{base} (d-space Newton-Schulz) in the same rotation. Paths: gram = the M x M Gram matrix (M < d only), '
        f'cov = the {d} x {d} covariance; auto takes gram for M < d (isqrt: M <= {GRAM_MAX_FRACTION} d).')
    for b in batches:
        wins = {k: [] for k in args.methods}
        for m in samples:
            gen = torch.Generator().manual_seed(m)
            x = torch.randn(b, d, m, generator=gen).relu_().to(device)  # ReLU features, as after the reduction
            res = time_pooling(x, args.methods, repeats=repeats, clock=clock,
                progress=lambda msg: print(f'  [B={b} M={m}] {msg}', flush=True))
            med = {k: statistics.median(v) for k, v in res.items()}
            ref = med[base]
            print(f'B={b} M={m}: {base} {ref * 1e3:.1f} ms')
            print(f'  {"method":8s} {"gram ms":>9s} {"cov ms":>9s} {"gram/NS":>8s} {"cov/NS":>8s} {"gram/cov":>9s}')
            for k in args.methods:
                g, c = med.get(f'{k}/gram'), med[f'{k}/cov']
                cells = ('-', '-', '-') if g is None else (f'{g * 1e3:.1f}', f'{g / ref:.3f}', f'{g / c:.3f}')
                print(f'  {k:8s} {cells[0]:>9s} {c * 1e3:9.1f} {cells[1]:>8s} {c / ref:8.3f} {cells[2]:>9s}')
                if g is not None and g < c:
                    wins[k].append(m)
        if args.crossover:
            print(f'B={b}: largest M (of {samples}) at which the Gram path was faster, per method:')
            for k, ms in wins.items():
                print(f'  {k:8s} {max(ms) if ms else "none"}')


if __name__ == '__main__':
    main()

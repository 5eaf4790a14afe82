#!/usr/bin/env python
"""Benchmark every GCP meta-layer: forward and forward+backward time, ratios to ``isqrt``, matmul throughput.

B ∈ {32, 256}, d = 256, M ∈ {49, 196} by default (``--quick``: B = 32, M = 49, 3 repeats). Methods are interleaved in
one process and reported as medians; on a shared machine, rerun and compare ratios rather than absolute times.
Runs on CUDA too when present (``--device cuda``), with synchronisation.

    python scripts/bench_meta_layers.py --quick
"""
import argparse
import statistics
import time

import torch

from timm_gcp import METHODS
from timm_gcp.functional import eig_sqrt
from timm_gcp.bench import isqrt_matmul_flops, matmul_probe, time_methods
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


if __name__ == '__main__':
    main()

#!/usr/bin/env python
"""Side-by-side demo of every GCP meta-layer on random features: forward and forward+backward time, and the error of
each root and of its gradient against the exact root (``lyap``: float64 eigh with the exact Daleckii–Krein gradient).

    python scripts/compare_meta_layers.py            # B=8, d=64, M=196 (full rank), a few seconds
    python scripts/compare_meta_layers.py --dim 256 --samples 49   # rank-deficient, as in a ResNet head at 224 px

With M ≤ d the covariance is rank-deficient: the exact gradient then carries 1/(2√ε) ≈ 3e7 weights along the null
space, and the approximate methods (isqrt, mpa, topn, taylor, trunc) differ from it by design.
"""
import argparse
import statistics

import torch

from timm_gcp import METHODS
from timm_gcp.bench import errors_vs_exact, time_methods
from timm_gcp.paper import random_covariances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--dim', type=int, default=64)
    parser.add_argument('--samples', type=int, default=196, help='M = H·W spatial samples per matrix')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()

    cov = random_covariances(args.batch, args.samples, dim=args.dim, device=args.device)
    rank = int(torch.linalg.matrix_rank(cov.double()).min())
    print(f'{args.batch} covariances of {args.samples} ReLU features, d={args.dim} (rank {rank}), on {args.device}')
    times = time_methods(cov, args.methods, repeats=args.repeats)
    errs = errors_vs_exact(cov, args.methods)
    print(f'{"method":8s} {"paper name":34s} {"fwd ms":>8s} {"f+b ms":>8s} {"root err":>9s} {"grad err":>9s}')
    for m in args.methods:
        f = statistics.median(times[m]['fwd']) * 1e3
        fb = statistics.median(times[m]['fwdbwd']) * 1e3
        print(f'{m:8s} {METHODS[m].paper_name[:34]:34s} {f:8.1f} {fb:8.1f} {errs[m]["root"]:9.1e} '
            f'{errs[m]["grad"]:9.1e}')
    print('root/grad err: relative Frobenius error against the exact root and its exact gradient (float64).')


if __name__ == '__main__':
    main()

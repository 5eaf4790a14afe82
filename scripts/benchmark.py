#!/usr/bin/env python3
"""Train-step throughput, memory and head/backbone cost of GCP models against their own timm backbones.

The first group is --baseline (timm's model with its default pooling) beside <baseline>_gcp_<method> for every
--methods entry; --models adds GCP models of any family, each group compared with its own <family> model. For every
GCP head the covariance alone is also timed in float64 and float32 (its share of the head's cost). CPU targets
(ResNet-50 family, printed in the table): an eigen-method head ≤ 0.25 of the backbone's forward+backward, isqrt
≤ 0.15, pade ≤ 1.15× svd.

Examples:
    python scripts/benchmark.py --quick                       # CPU, ResNet-50 group only, batch 8, 3 rounds
    python scripts/benchmark.py --device cuda --amp --batch-size 64 --rounds 10 --csv gpu_results/benchmark.csv

The full CPU table (idle machine, 5 rounds; about 30-60 min on two cores, one family resident at a time):
    python scripts/benchmark.py --methods isqrt,svd,pade,lyap,mpa,dropcov \\
        --models convnext_tiny_gcp_isqrt,convnext_tiny_gcp_pade,vit_small_patch16_224_gcp_isqrt,\\
vit_small_patch16_224_gcp_pade,swin_tiny_patch4_window7_224_gcp_isqrt,swin_tiny_patch4_window7_224_gcp_pade,\\
efficientnet_b0_gcp_isqrt,efficientnet_b0_gcp_pade,regnety_032_gcp_isqrt,regnety_032_gcp_pade,\\
resnet50d_gcp_isqrt,resnet50d_gcp_pade,deit_small_patch16_224_gcp_isqrt,deit_small_patch16_224_gcp_pade,\\
deit_small_patch16_224_gcp_sot,deit_small_patch16_224_gcp_dropcov,swin_tiny_patch4_window7_224_gcp_sot \\
        --csv zoo/results/benchmark_cpu.csv --markdown zoo/results/benchmark_cpu.md
"""
import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from timm_gcp.bench import BenchConfig, format_markdown, run_benchmark


def _names(text: str):
    return tuple(n for n in text.split(',') if n)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', default='isqrt,svd,pade,lyap,mpa,dropcov',
                   help='comma-separated GCP methods (or heads: dropcov) of --baseline')
    p.add_argument('--baseline', default='resnet50', help="timm model with its default pooling; its GCP models are "
                   "<baseline>_gcp_<method> ('' for none)")
    p.add_argument('--models', default='', help='comma-separated GCP models of other families, '
                   '<family>_gcp_<method>; each family is compared with timm\'s <family>')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=None, help='default: 8 on CPU, 64 on CUDA')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--rounds', type=int, default=None, help='interleaved timing rounds (default: 5 CPU, 20 CUDA)')
    p.add_argument('--warmup', type=int, default=None, help='warm-up steps per model (default: 1 CPU, 3 CUDA)')
    p.add_argument('--quick', action='store_true', help='short run: 3 rounds, 1 warm-up step (CPU batch 8)')
    p.add_argument('--amp', action='store_true', help='autocast on CUDA (the GCP meta-layer keeps its own dtype)')
    p.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'])
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads on CPU')
    p.add_argument('--csv', default='benchmark.csv', help='CSV output path')
    p.add_argument('--markdown', default=None, help='also write the markdown table to this path')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith('cuda')
    cfg = BenchConfig(
        methods=_names(args.methods), baseline=args.baseline, models=_names(args.models), device=args.device,
        batch_size=args.batch_size or (64 if cuda else 8), img_size=args.img_size,
        rounds=args.rounds or (3 if args.quick else (20 if cuda else 5)),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick or not cuda else 3),
        amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last)
    try:
        result = run_benchmark(cfg, progress=lambda s: print(s, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as e:
        print(f'benchmark: error: {e}', file=sys.stderr)
        return 2
    table = format_markdown(result)
    print(table)
    rows = [dict(r, **{f'env_{k}': v for k, v in result['env'].items()}) for r in result['rows']]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    if args.markdown:
        Path(args.markdown).write_text(table + '\n')
    print(f'\nCSV: {args.csv}', file=sys.stderr)
    return 1 if any('error' in r for r in result['rows']) else 0


if __name__ == '__main__':
    sys.exit(main())

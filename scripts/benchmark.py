#!/usr/bin/env python3
"""Train-step throughput, memory and head/backbone cost of resnet50 (avg pool) vs resnet50_gcp_<method>.

Examples:
    python scripts/benchmark.py --quick                       # CPU, batch 8, 3 rounds
    python scripts/benchmark.py --device cuda --amp --batch-size 64 --rounds 10 --csv gpu_results/benchmark.csv
"""
import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from timm_gcp.benchmark import BenchConfig, format_markdown, run_benchmark


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', default='isqrt,svd,pade,lyap,mpa', help='comma-separated GCP methods')
    p.add_argument('--baseline', default='resnet50', help='timm model with average pooling; GCP models are '
                   '<baseline>_gcp_<method>')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=None, help='default: 8 on CPU, 64 on CUDA')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--rounds', type=int, default=None, help='interleaved timing rounds (default: 5 CPU, 20 CUDA)')
    p.add_argument('--warmup', type=int, default=None, help='warm-up steps per model (default: 1 CPU, 3 CUDA)')
    p.add_argument('--quick', action='store_true', help='short run: 3 rounds, 1 warm-up step (CPU batch 8)')
    p.add_argument('--amp', action='store_true', help='autocast on CUDA (the GCP meta-layer stays fp32/fp64)')
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
        methods=tuple(m for m in args.methods.split(',') if m), baseline=args.baseline, device=args.device,
        batch_size=args.batch_size or (64 if cuda else 8), img_size=args.img_size,
        rounds=args.rounds or (3 if args.quick else (20 if cuda else 5)),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick or not cuda else 3),
        amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last)
    result = run_benchmark(cfg, progress=lambda s: print(s, file=sys.stderr, flush=True))
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

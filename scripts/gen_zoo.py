#!/usr/bin/env python3
"""Generate timm_gcp/models/_zoo_cfgs.py and MODEL_CARDS.md from zoo/registry.yaml.

    python scripts/gen_zoo.py            # write both files
    python scripts/gen_zoo.py --check    # exit 1 when either is stale (or the registry is not in canonical form)
    python scripts/gen_zoo.py --measure  # measure params/GFLOPs of every architecture into the registry, then write
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from timm_gcp import flops, zoo  # noqa: E402

CFGS_PATH = os.path.join(ROOT, 'timm_gcp', 'models', '_zoo_cfgs.py')
CARDS_PATH = os.path.join(ROOT, 'MODEL_CARDS.md')


def outputs(data: dict) -> dict:
    return {CFGS_PATH: zoo.render_zoo_cfgs(data), CARDS_PATH: zoo.render_model_cards(data)}


def measured_note() -> str:
    """What the GFLOPs columns count (shown above the table of MODEL_CARDS.md)."""
    cov, gram = (flops.eig_flops(256, 49, 'svd', gram_path=g) / 1e9 for g in (False, True))
    return (f'The counter has no formula for eigh, so the eigendecomposition of the eigen-methods is added as an '
            f'estimate (timm_gcp.flops.eig_flops): {flops.EIGH_FLOPS_PER_N3} n^3 FLOPs per image for a symmetric '
            f'eigensolver with eigenvectors, n = M for the M x M Gram matrix that the default path decomposes when '
            f'the map has M < d positions ({gram:.4f} GFLOPs at M = 49), n = d on the covariance path ({cov:.3f} '
            f'GFLOPs at d = 256); every matrix product around it (and all of isqrt and mpa) is counted as it runs.')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--registry', default=os.path.join(ROOT, 'zoo', 'registry.yaml'))
    parser.add_argument('--check', action='store_true', help='exit 1 when a generated file is stale')
    parser.add_argument('--measure', action='store_true',
                        help='measure params/GFLOPs (CPU forward, minutes) into the registry')
    args = parser.parse_args(argv)

    data = zoo.load_registry(args.registry)
    if args.check:
        stale = []
        with open(args.registry, encoding='utf-8') as f:
            if f.read() != zoo.dump_registry(data):
                stale.append(f'{args.registry} (not in canonical form: load and save it with timm_gcp.zoo)')
        for path, text in outputs(data).items():
            current = open(path, encoding='utf-8').read() if os.path.exists(path) else None
            if current != text:
                stale.append(path)
        if stale:
            print('stale: ' + ', '.join(stale) + '\nrun: python scripts/gen_zoo.py', file=sys.stderr)
            return 1
        print('zoo: registry, _zoo_cfgs.py and MODEL_CARDS.md agree')
        return 0
    if args.measure:
        import timm
        import torch
        import timm_gcp  # noqa: F401  (registers the models)
        data['measured'] = dict(
            command='python scripts/gen_zoo.py --measure',
            counter='torch.utils.flop_counter.FlopCounterMode, CPU forward at batch 1, 2 FLOPs per multiply-add',
            note=measured_note(),
            torch=torch.__version__.split('+')[0], timm=timm.__version__,
            archs=flops.measure_archs(data))
        zoo.save_registry(data, args.registry)
        print(f'wrote {args.registry}')
    for path, text in outputs(data).items():
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

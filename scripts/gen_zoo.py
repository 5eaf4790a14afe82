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

from timm_gcp import zoo  # noqa: E402

CFGS_PATH = os.path.join(ROOT, 'timm_gcp', 'models', '_zoo_cfgs.py')
CARDS_PATH = os.path.join(ROOT, 'MODEL_CARDS.md')


def outputs(data: dict) -> dict:
    return {CFGS_PATH: zoo.render_zoo_cfgs(data), CARDS_PATH: zoo.render_model_cards(data)}


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
            note='eigh is not counted (no FLOP formula), so eigen-method columns count the covariance, the '
                 'reconstruction U diag(sqrt(lambda)) U^T and the classifier but not the eigendecomposition itself.',
            torch=torch.__version__.split('+')[0], timm=timm.__version__,
            archs=zoo.measure_archs(data))
        zoo.save_registry(data, args.registry)
        print(f'wrote {args.registry}')
    for path, text in outputs(data).items():
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

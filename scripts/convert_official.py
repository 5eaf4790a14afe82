#!/usr/bin/env python3
"""Convert an official fast-MPN-COV (iSQRT-COV) or DifferentiableSVD (SVD-Pade) checkpoint to timm-gcp.

    python scripts/convert_official.py mpncovresnet50-15991845.pth --output r50_isqrt.safetensors

The layout is recognised from the keys; the architecture is picked from it unless --arch is given. The last line
printed is ``arch: NAME``; load the result with

    import timm_gcp, timm
    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file='r50_isqrt.safetensors'))
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timm_gcp.convert import CheckpointError, convert_file  # noqa: E402
from timm_gcp.cli import setup_cli_logging  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', help='official .pth / .pth.tar (loaded with torch.load(weights_only=True))')
    parser.add_argument('--output', required=True, help='output .safetensors file (never overwritten)')
    parser.add_argument('--arch', default=None, help='target architecture (default: picked from the layout)')
    args = parser.parse_args(argv)
    setup_cli_logging()
    try:
        arch = convert_file(args.checkpoint, args.output, arch=args.arch)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.output}')
    print(f'arch: {arch}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python3
"""Write the paper-reproduction report (markdown + PNG figures + CSVs) for timm-gcp.

Sections: Tables 6/7 (from timm_gcp.functional.analysis), gradients of every method against `lyap` on realistic
covariances, Newton–Schulz as a function, float32 vs float64 eigh, and (with --table2) a small-scale Table 2.

Examples:
    python scripts/reproduce_paper.py --out zoo/results
    python scripts/reproduce_paper.py --out zoo/results --table2
"""
import argparse
import logging
import shlex
import sys
import time
from typing import Optional, Sequence

from timm_gcp import paper


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='zoo/results', help='report folder')
    p.add_argument('--num', type=int, default=4, help='covariances per case')
    p.add_argument('--dim', type=int, default=256, help='covariance size d')
    p.add_argument('--feature-model', default='resnet18_gcp_isqrt',
                   help='model whose (randomly initialised) features give the model-feature covariances')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--table2', action='store_true', help='train (or collect finished) small Table 2 runs')
    p.add_argument('--table2-dir', default='runs/table2', help='run folders; finished runs are reused')
    p.add_argument('--table2-model', default='resnet18', help='family: runs train <family>_gcp_<method>')
    p.add_argument('--table2-methods', default=','.join(paper.TABLE2_METHODS))
    p.add_argument('--table2-seeds', default='0,1,2')
    p.add_argument('--table2-epochs', type=int, default=3)
    p.add_argument('--table2-switch-epoch', type=int, default=2, help='hybrid: epoch at which isqrt is replaced')
    p.add_argument('--table2-batch-size', type=int, default=64)
    p.add_argument('--table2-data-dir', default=None, help='ImageFolder root (default: built-in dataset)')
    p.add_argument('--table2-args', default=shlex.join(paper.TABLE2_TRAINER_ARGS),
                   help='extra trainer arguments, one shell-quoted string (default: %(default)s)')
    p.add_argument('--table2-model-kwargs', default=shlex.join(paper.TABLE2_MODEL_KWARGS),
                   help='--model-kwargs of every run (default: %(default)s); topn gets top_n=26 on top')
    p.add_argument('--table2-timeout', type=float, default=900.0, help='seconds per run')
    p.add_argument('--table2-collect-only', action='store_true',
                   help='report the finished runs only (e.g. while another process trains the rest)')
    p.add_argument('-v', '--verbose', action='store_true')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    command = 'python ' + ' '.join(shlex.quote(a) for a in ['scripts/reproduce_paper.py'] + sys.argv[1:])
    t0 = time.perf_counter()
    say = lambda s: print(f'[{time.perf_counter() - t0:6.0f} s] {s}', flush=True)  # noqa: E731

    covs, notes = {}, {}
    for m in (49, 196):
        covs[f'random M={m}'] = paper.random_covariances(args.num, m, dim=args.dim, seed=args.seed + m)
    for size in (224, 448):
        cov, how = paper.model_feature_covariances(args.feature_model, num=args.num, img_size=size, seed=args.seed)
        m = int(how.split('M = ')[1].split()[0])
        name = f'model M={m}'
        covs[name], notes[name] = cov, how
    say('covariances ready: ' + ', '.join(f'{k} {tuple(v.shape)}' for k, v in covs.items()))

    cfg = rows = None
    if args.table2:
        cfg = paper.Table2Config(
            methods=tuple(args.table2_methods.split(',')), seeds=tuple(int(s) for s in args.table2_seeds.split(',')),
            model=args.table2_model, epochs=args.table2_epochs, switch_epoch=args.table2_switch_epoch,
            batch_size=args.table2_batch_size, extra_args=tuple(shlex.split(args.table2_args)),
            model_kwargs=tuple(shlex.split(args.table2_model_kwargs)), data_dir=args.table2_data_dir,
            out_dir=args.table2_dir, timeout_s=args.table2_timeout)
        rows = paper.run_table2(cfg, progress=say, train=not args.table2_collect_only)
    finish = command.replace(' --table2-collect-only', '')
    path = paper.write_report(args.out, command, grad_covs=covs, case_notes=notes, table2_cfg=cfg,
                              table2_rows=rows, progress=say, table2_command=finish)
    say(f'report: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

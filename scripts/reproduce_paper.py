#!/usr/bin/env python3
"""Write the paper-reproduction report (markdown + PNG figures + CSVs) for timm-gcp.

Sections: Tables 6/7, gradients of every method against `lyap` on realistic covariances, our tie rule against the
reference code's, Newton–Schulz as a function, float32 vs float64 (the gradient a model's head sends into the
backbone, and the eigenvalues), and, with --fig2 and --table2, the small-scale Fig. 2 and Table 2 (training runs,
reused when finished: rerun the same command to resume).

Examples:
    python scripts/reproduce_paper.py --out zoo/results                    # analyses only, a few minutes
    python scripts/reproduce_paper.py --out zoo/results --fig2 --table2    # plus the training runs
    python scripts/reproduce_paper.py --out zoo/results --fig2 --table2 --collect-only   # report finished runs only
"""
import argparse
import dataclasses
import logging
import shlex
import sys
import time
from typing import Optional, Sequence

from timm_gcp import covariance, paper


def _ints(text: str):
    return tuple(int(s) for s in text.split(',') if s)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='zoo/results', help='report folder')
    p.add_argument('--num', type=int, default=4, help='covariances per case')
    p.add_argument('--dim', type=int, default=256, help='covariance size d')
    p.add_argument('--feature-model', default='resnet18_gcp_isqrt',
                   help='model whose (randomly initialised) features give the model-feature covariances')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-head-precision', action='store_true',
                   help='skip the float32-vs-float64 gradient of a resnet18 GCP head at 224 and 448 px (≈ 1 min)')
    p.add_argument('--collect-only', action='store_true',
                   help='report the finished Fig. 2/Table 2 runs only (e.g. while another process trains the rest)')
    g = p.add_argument_group('Fig. 2 (training error and effective β-smoothness, float32 vs float64)')
    g.add_argument('--fig2', action='store_true', help='train (or collect finished) Fig. 2 runs')
    g.add_argument('--fig2-dir', default='runs/fig2', help='run folders; finished runs are reused')
    g.add_argument('--fig2-methods', default='svd,isqrt')
    g.add_argument('--fig2-seeds', default='0,1,2')
    g.add_argument('--fig2-epochs', type=int, default=paper.Fig2Config.epochs)
    g = p.add_argument_group('Table 2 (standalone and hybrid training of each method)')
    g.add_argument('--table2', action='store_true', help='train (or collect finished) small Table 2 runs')
    g.add_argument('--table2-dir', default='runs/table2', help='run folders; finished runs are reused')
    g.add_argument('--table2-model', default='resnet18', help='family: runs train <family>_gcp_<method>')
    g.add_argument('--table2-methods', default=','.join(paper.TABLE2_METHODS))
    g.add_argument('--table2-seeds', default='0,1,2')
    g.add_argument('--table2-epochs', type=int, default=3)
    g.add_argument('--table2-switch-epoch', type=int, default=2, help='hybrid: epoch at which isqrt is replaced')
    g.add_argument('--table2-batch-size', type=int, default=64)
    g.add_argument('--table2-data-dir', default=None, help='ImageFolder root (default: built-in dataset)')
    g.add_argument('--table2-args', default=shlex.join(paper.TABLE2_TRAINER_ARGS),
                   help='extra trainer arguments, one shell-quoted string (default: %(default)s)')
    g.add_argument('--table2-model-kwargs', default=shlex.join(paper.TABLE2_MODEL_KWARGS),
                   help='--model-kwargs of every run (default: %(default)s); topn gets top_n=26 on top')
    g.add_argument('--table2-timeout', type=float, default=900.0, help='seconds per run')
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
    ties = {'random M=49': paper.random_features(2, 49, dim=args.dim, seed=args.seed + 49)}
    for size in (224, 448):
        feats, how = paper.model_head_features(args.feature_model, num=args.num, img_size=size, seed=args.seed)
        name = f'model M={feats.shape[-1]}'
        covs[name], notes[name] = covariance(feats.double()), how
        if size == 224:
            ties[name] = feats[:2]
    say('inputs ready: ' + ', '.join(f'{k} {tuple(v.shape)}' for k, v in covs.items()))

    train = not args.collect_only
    fig2_cfg = fig2_rows = table2_cfg = table2_rows = None
    if args.fig2:
        fig2_cfg = dataclasses.replace(
            paper.Fig2Config(), methods=tuple(args.fig2_methods.split(',')), seeds=_ints(args.fig2_seeds),
            epochs=args.fig2_epochs, out_dir=args.fig2_dir)
        fig2_rows = paper.run_fig2(fig2_cfg, progress=say, train=train)
    if args.table2:
        table2_cfg = paper.Table2Config(
            methods=tuple(args.table2_methods.split(',')), seeds=_ints(args.table2_seeds),
            model=args.table2_model, epochs=args.table2_epochs, switch_epoch=args.table2_switch_epoch,
            batch_size=args.table2_batch_size, extra_args=tuple(shlex.split(args.table2_args)),
            model_kwargs=tuple(shlex.split(args.table2_model_kwargs)), data_dir=args.table2_data_dir,
            out_dir=args.table2_dir, timeout_s=args.table2_timeout)
        table2_rows = paper.run_table2(table2_cfg, progress=say, train=train)
    path = paper.write_report(
        args.out, command, grad_covs=covs, case_notes=notes, tie_features=ties,
        head_precision=None if args.no_head_precision else dict(seed=args.seed),
        fig2_cfg=fig2_cfg, fig2_records=fig2_rows, table2_cfg=table2_cfg, table2_rows=table2_rows, progress=say,
        finish_command=command.replace(' --collect-only', ''))
    say(f'report: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

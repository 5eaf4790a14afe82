#!/usr/bin/env python
"""The paper's hybrid protocol with timm's unmodified train.py, as two stages.

Stage 1 trains <family>_gcp_isqrt with the whole run's arguments (--epochs, schedule, warmup, cooldown) and stops
after the switch epoch; stage 2 resumes the same checkpoint into <family>_gcp_pade (same parameters, another matrix
square root) with optimizer and epoch intact, and train.py steps the schedule to the switch epoch. The learning rate of
every epoch is that of a single uninterrupted run for every timm schedule but plateau, which a resumed run cannot
continue (its state is not in train.py's checkpoint): the script refuses it before running anything. Every argument
after `--` goes to train.py (data, batch size, lr, schedule, ...), the same for both stages; the switch epoch counts
the epochs train.py's loop runs (warmup prefix included).

    python scripts/hybrid_timm_train.py --train-py ~/pytorch-image-models/train.py --model resnet50_gcp \\
        --switch-epoch 45 --epochs 60 --output out --experiment r50_hybrid \\
        -- --data-dir /data/imagenet --config zoo/recipes/resnet50_gcp_imagenet_hybrid.yaml
    # multi-GPU: add --launcher "torchrun --nproc_per_node 8 -m"

(`timm-gcp-train --gcp-switch-epoch 45 --gcp-switch-method pade` does the same in one run.)
"""
import argparse
import shlex
import subprocess
import sys

from timm_gcp.run_timm_script import hybrid_stage_commands


def main() -> int:
    argv = sys.argv[1:]
    passthrough = []
    if '--' in argv:
        i = argv.index('--')
        argv, passthrough = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--train-py', required=True, help="path of timm's train.py")
    p.add_argument('--model', required=True, help='GCP model or family, e.g. resnet50_gcp')
    p.add_argument('--switch-epoch', type=int, required=True)
    p.add_argument('--epochs', type=int, required=True)
    p.add_argument('--from-method', default='isqrt')
    p.add_argument('--method', default='pade', help='method of the last stage')
    p.add_argument('--output', default='./output/train')
    p.add_argument('--experiment', default='hybrid')
    p.add_argument('--launcher', default=f'{shlex.quote(sys.executable)} -m',
                   help='command prefix that runs a module, e.g. "torchrun --nproc_per_node 8 -m"')
    p.add_argument('--dry-run', action='store_true', help='print the two commands only')
    args = p.parse_args(argv)
    launcher = shlex.split(args.launcher)
    if launcher and launcher[-1] != '-m':
        launcher.append('-m')
    try:
        cmds = hybrid_stage_commands(
            args.train_py, args.model, args.switch_epoch, args.epochs, args.output, args.experiment,
            args.from_method, args.method, passthrough, launcher)
    except ValueError as e:
        p.error(str(e))
    for stage, cmd in enumerate(cmds, 1):
        print(f'[hybrid] stage {stage}: {shlex.join(cmd)}', flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f'[hybrid] stage {stage} failed with exit status {rc}', file=sys.stderr)
            return rc
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""The ``timm-gcp-train`` console entry point."""
import logging
import sys
import time
from typing import Optional, Sequence

import torch
import yaml
from timm.utils import FormatterNoInfo, init_distributed_device

from ..cli import error_message, setup_cli_logging
from ..data.folder import UnreadableImageError
from .args import parse_args
from .demo import baseline_args, comparison_table
from .errors import CheckpointWriteError, NonFiniteLossError, TrainSetupError
from .run import train_model

__all__ = ['main']

_logger = logging.getLogger(__name__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of ``timm-gcp-train``; returns the process exit status."""
    setup_cli_logging(FormatterNoInfo())  # timm's console format; one handler however often main() runs
    args, args_text = parse_args(argv)
    device = init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device}.')
    results = []
    try:
        t0 = time.time()
        res = train_model(args, device, args_text)
        results.append((f'GCP ({res["gcp_method"]})' if res['gcp_method'] else 'model', res, time.time() - t0))
        if args.baseline_model:
            base = baseline_args(args)
            t0 = time.time()
            res_b = train_model(base, device, yaml.safe_dump(yaml.safe_load(args_text) | dict(
                model=base.model, model_kwargs=base.model_kwargs, experiment=base.experiment))
                if args_text else None)
            results.append(('average', res_b, time.time() - t0))
    except (NonFiniteLossError, TrainSetupError, CheckpointWriteError, UnreadableImageError) as e:
        if args.rank == 0:
            print(f'timm-gcp-train: error: {error_message(e)}', file=sys.stderr)
        return 2
    finally:
        if args.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if args.rank == 0:
        print(comparison_table(results))
    return 0


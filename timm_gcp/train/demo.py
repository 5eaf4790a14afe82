"""The built-in demo: the baseline run beside the GCP model and the side-by-side result table (printed by the CLI)."""
import argparse
import copy
from typing import Any, Dict, List, Tuple

__all__ = ['baseline_args', 'comparison_table']


def baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments of the baseline run: ``--baseline-model`` trained as the main model is, without its GCP kwargs,
    the hybrid switch or a resume, into ``<experiment>-baseline``."""
    base = copy.deepcopy(args)
    base.model = args.baseline_model
    base.model_kwargs = {k: v for k, v in (args.model_kwargs or {}).items()
                         if not k.startswith('gcp_') and k != 'backbone'}
    base.gcp_switch_epoch = None
    base.experiment = f'{args.experiment}-baseline' if args.experiment else ''
    base.resume = ''
    base.baseline_model = ''
    return base


def comparison_table(results: List[Tuple[str, Dict[str, Any], float]]) -> str:
    """The result table the CLI prints: one row per run (model, pooling, final and best top-1, seconds)."""
    lines = ['', 'Result (built-in second-order dataset, validation split):' if len(results) > 1 else 'Result:',
             f'  {"model":<28} {"pooling":<18} {"top-1 %":>8} {"best %":>8} {"time s":>8}']
    for pooling, r, secs in results:
        best = r['best_metric'] if r['best_metric'] is not None else float('nan')
        lines.append(f'  {r["model"]:<28} {pooling:<18} {r["eval"].get("top1", float("nan")):>8.2f} {best:>8.2f} '
                     f'{secs:>8.1f}')
    return '\n'.join(lines)

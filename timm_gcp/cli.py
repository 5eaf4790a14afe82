"""Command-line plumbing shared by ``timm-gcp-train``, ``timm-gcp-validate``, ``timm-gcp-publish`` and ``scripts/``.

Logging set-up for an entry point, the flags that evaluation and publishing share, and the checks of paths given on
the command line, each written once.
"""
import argparse
import ast
import logging
import os
import sys
from typing import Any, Optional

__all__ = ['setup_cli_logging', 'add_eval_args', 'data_dir_error', 'existing_file_error', 'error_message',
           'eval_args_error', 'KwargsAction']


class _CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted.

    ``logging.StreamHandler()`` keeps the stream it was created with; a CLI ``main()`` called again in the same
    process after ``sys.stderr`` was swapped (notebooks, test runners) would then write to a stale or closed stream.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_cli_logging(formatter: Optional[logging.Formatter] = None, level: int = logging.INFO) -> None:
    """Log to stderr at ``level`` for a command-line entry point; idempotent (one handler however often called).

    Replaces ``logging.basicConfig``/timm's ``setup_default_logging`` in our ``main()`` functions: those add a new
    handler bound to the current ``sys.stderr`` on every call (or none at all when the root already has one).
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _CurrentStderrHandler)), None)
    if handler is None:
        handler = _CurrentStderrHandler()
        root.addHandler(handler)
    handler.setFormatter(formatter or logging.Formatter('%(message)s'))
    root.setLevel(level)


def add_eval_args(parser: argparse.ArgumentParser, data_dir_help: str, data_dir_required: bool = False) -> None:
    """Add the flags ``timm-gcp-validate`` and ``timm-gcp-publish`` share: architecture, EMA weights, evaluation
    data, preprocessing and device (same names as timm's ``validate.py`` where it has them)."""
    parser.add_argument('--model', default=None,
                        help='architecture, a registered timm or timm-gcp name (default: the checkpoint\'s arch and '
                             'gcp_method)')
    parser.add_argument('--use-ema', action='store_true', help='use the checkpoint\'s EMA weights (state_dict_ema)')
    parser.add_argument('--data-dir', default=None, required=data_dir_required, help=data_dir_help)
    parser.add_argument('--dataset', default='', help='timm dataset name, e.g. torch/cifar10 (default: ImageFolder)')
    parser.add_argument('--split', default='validation',
                        help='split folder under --data-dir (timm\'s synonyms such as val/ are found too); \'\' '
                             'evaluates the class folders directly under --data-dir')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--img-size', type=int, default=None,
                        help='image size (default: the checkpoint\'s training img_size, else the pretrained cfg\'s)')
    parser.add_argument('--crop-pct', type=float, default=None,
                        help='centre-crop fraction (default: the checkpoint\'s training crop_pct, else the cfg\'s)')
    parser.add_argument('--interpolation', default=None,
                        help='resize interpolation, e.g. bilinear (default: the checkpoint\'s, else the cfg\'s)')
    parser.add_argument('--device', default=None)


def eval_args_error(args: argparse.Namespace) -> Optional[str]:
    """The error message for a size flag of :func:`add_eval_args` out of range, else None."""
    for flag, value, low in (('--batch-size', args.batch_size, 1), ('--workers', args.workers, 0),
                             ('--img-size', args.img_size, 1)):
        if value is not None and value < low:
            return f'{flag} must be >= {low}, got {value}'
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        return f'--crop-pct must be in (0, 1], got {args.crop_pct}'
    return None


def data_dir_error(data_dir: Optional[str], dataset: str = '', hint: str = '') -> Optional[str]:
    """The error message for a ``--data-dir`` that is not a folder (an ImageFolder root), else None.

    A ``--dataset`` other than ImageFolder may download into or read from a root that does not exist yet.
    """
    if data_dir and not dataset and not os.path.isdir(data_dir):
        return f'--data-dir: no such directory: {data_dir}{hint}'
    return None


def existing_file_error(path: Optional[str], flag: str) -> Optional[str]:
    """The error message for an output file flag whose file already exists (it is never overwritten), else None."""
    if path and os.path.lexists(path):
        return f'{flag} {path} already exists; it is not overwritten (remove it or choose another name)'
    return None


def error_message(e: BaseException) -> str:
    """The message of an error for the user, one line where possible.

    An error raised in a DataLoader worker reaches the main process re-raised with the worker's traceback as its
    message; the user gets the last line of it (the original error's message) without the exception's module path.
    """
    text = str(e).strip() or type(e).__name__
    if 'Original Traceback' in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        head, sep, tail = last.partition(': ')
        text = tail if sep and ' ' not in head else last
    return text


class KwargsAction(argparse.Action):
    """``--flag KEY=VALUE ...`` into a dict, values read as Python literals (strings otherwise), as timm's
    ``ParseKwargs`` does, with two differences: an item without ``=`` is a usage error naming the flag (exit 2), and
    the items are merged into the flag's current value (its default, e.g. a recipe's or the demo's kwargs), a given
    key winning. The flag with no items clears the value."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        items = [v for v in (values or []) if v]
        bad = [v for v in items if '=' not in v or not v.split('=', 1)[0]]
        if bad:
            parser.error(f'{option_string}: expected KEY=VALUE items (e.g. gcp_dim=64), got {bad[0]!r}')
        current = getattr(namespace, self.dest, None)
        kw = dict(current) if items and isinstance(current, dict) else {}
        for item in items:
            key, value = item.split('=', 1)
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = value  # a plain string (no quoting needed on the command line)
        setattr(namespace, self.dest, kw)

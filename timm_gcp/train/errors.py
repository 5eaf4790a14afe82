"""The errors a training run stops with, and how their messages name things."""
from typing import Sequence

__all__ = ['NonFiniteLossError', 'TrainSetupError', 'CheckpointWriteError', 'first_lines', 'describe_non_finite']


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss, a parameter or buffer, an evaluation or the input of a GCP layer became NaN or
    infinite. The message says where and names the last good checkpoint."""


class TrainSetupError(ValueError):
    """The data, a checkpoint or the output folder does not fit the run (missing split, class mismatch, other
    architecture, unreadable file, a folder another run is writing to)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, permissions, an I/O error); the partial file was removed and the
    message names the cause, the path and the last good checkpoint."""


def first_lines(e: BaseException, n: int = 3) -> str:
    """The first ``n`` lines of an error's message on one line (at most 600 characters), for a one-line report."""
    lines = str(e).strip().splitlines()
    return ' '.join(ln.strip() for ln in lines[:n])[:600] or type(e).__name__


def describe_non_finite(names: Sequence[str], n: int = 5) -> str:
    """``'K tensor(s) hold NaN/inf (a, b, ...)'`` for the names of the non-finite tensors (the first ``n`` named)."""
    return f'{len(names)} tensor(s) hold NaN/inf ({", ".join(names[:n])}{", ..." if len(names) > n else ""})'

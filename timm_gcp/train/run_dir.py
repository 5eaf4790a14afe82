"""The run folder: atomic creation, an exclusive lock for the run's lifetime, clean-up of an interrupted save."""
import logging
import os
from typing import Optional

from .errors import TrainSetupError

__all__ = ['RunLock', 'claim_run_folder', 'remove_interrupted_save', 'is_run_folder']

try:
    import fcntl
except ImportError:  # not on Windows: run folders are then not locked (a warning says so)
    fcntl = None

_logger = logging.getLogger(__name__)

_LOCK_FILE = '.timm-gcp-train.lock'
_INTERRUPTED_SAVE = 'tmp.pth.tar'  # CheckpointSaver writes here, then renames to last.pth.tar


def _holds_run(path: str) -> bool:
    return os.path.isdir(path) and any(
        f.endswith('.pth.tar') or f in ('summary.csv', 'args.yaml') for f in os.listdir(path))


def is_run_folder(path: str) -> bool:
    """Whether ``path`` is the folder of a timm-gcp-train (or timm train.py) run: it holds ``args.yaml`` or
    ``summary.csv``; a resumed run continues there, never in another folder that merely holds a checkpoint."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ('args.yaml', 'summary.csv'))


class RunLock:
    """An exclusive ``fcntl.flock`` on ``FOLDER/.timm-gcp-train.lock``, held while a run writes into the folder.

    The lock belongs to the open file, so the operating system releases it when the process ends, however it ends;
    the file itself stays (removing it would open a race) and records the pid of the last holder.
    """

    def __init__(self, folder: str, fd: Optional[int]):
        self.folder, self._fd = folder, fd

    @classmethod
    def try_acquire(cls, folder: str) -> Optional['RunLock']:
        """The lock of ``folder``, or None while another process holds it."""
        if fcntl is None:
            _logger.warning(f'cannot lock {folder}: this platform has no fcntl; make sure no other run writes into it')
            return cls(folder, None)
        fd = os.open(os.path.join(folder, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another open file (another process)
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        return cls(folder, fd)

    @staticmethod
    def holder(folder: str) -> str:
        try:
            with open(os.path.join(folder, _LOCK_FILE)) as f:
                return f'pid {int(f.read().strip())}'
        except (OSError, ValueError):
            return 'another process'

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claim_run_folder(root: str, exp_name: str, resume: str = '') -> RunLock:
    """Create (or, to continue a run, reopen) the run's output folder and lock it; returns the held lock.

    A run resumed from a checkpoint inside ``root/exp_name`` continues there (later summary rows are trimmed,
    checkpoints replaced); while another process holds that folder it stops with :class:`TrainSetupError`. Any other
    run takes ``root/exp_name``, or ``exp_name-1``, ``-2``, ... when that folder holds a run or another process is
    writing there. New folders are made with ``mkdir`` (atomic: two runs cannot both create one) and locked before
    anything is written.
    """
    path = os.path.join(root, exp_name)
    try:
        os.makedirs(root, exist_ok=True)
        if resume and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(path):
            lock = RunLock.try_acquire(path)
            if lock is None:
                raise TrainSetupError(
                    f'{path} is in use by {RunLock.holder(path)} (another timm-gcp-train run holds its lock): two '
                    f'runs must not write one folder. Wait for that run to end, or resume into another --experiment')
            return lock
        for i in range(10000):
            candidate = path if i == 0 else f'{path}-{i}'
            lock = _try_fresh_folder(candidate)
            if lock is not None:
                if i:
                    _logger.warning(f'{path} already holds a training run (or another run is writing there); writing '
                                    f'to {candidate} instead (to continue that run, --resume one of its checkpoints)')
                return lock
    except OSError as e:
        raise TrainSetupError(f'cannot create the run folder {path}: {e.strerror or e}') from e
    raise TrainSetupError(f'no free run folder {path}-N')


def _try_fresh_folder(path: str) -> Optional[RunLock]:
    """The lock of ``path`` when a fresh run may write there (a folder made now, or an empty one nobody holds)."""
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        created = False
    if not os.path.isdir(path):
        raise TrainSetupError(f'the run folder {path} exists and is not a folder')
    if not created and _holds_run(path):
        return None
    lock = RunLock.try_acquire(path)
    if lock is not None and not created and _holds_run(path):  # a run wrote there between the check and the lock
        lock.release()
        return None
    return lock


def remove_interrupted_save(folder: str) -> None:
    """Remove the ``tmp.pth.tar`` a kill during a checkpoint save leaves behind (only ever a partial copy: the saver
    writes it, then renames it to ``last.pth.tar``). Called with the folder's lock held, so no save is under way."""
    path = os.path.join(folder, _INTERRUPTED_SAVE)
    if os.path.isfile(path):
        _logger.warning(f'removing {path} ({os.path.getsize(path)} bytes), left by a save that was interrupted')
        os.remove(path)



"""Run timm's scripts (``train.py``, ``validate.py``, ``inference.py``) unmodified with the GCP models registered.

timm has no plugin discovery, and only ``train.py`` has an import hook (``--device-modules timm_gcp``). This launcher
imports ``timm_gcp`` first and then runs the script as ``__main__`` with ``runpy``, so it serves all three, also under
``torchrun``::

    python -m timm_gcp.run_timm_script PATH/TO/validate.py --model resnet50_gcp_pade --pretrained /data/imagenet
    torchrun --nproc_per_node 8 -m timm_gcp.run_timm_script PATH/TO/train.py --model resnet50_gcp_isqrt ...

``--stop-epoch N`` (before the script) ends a ``train.py`` run at epoch N (its loop runs epochs 0…N−1, or from the
resumed epoch up to N) while the learning-rate schedule stays the one of the whole run (``--epochs`` and warmup/cooldown
as given): the first stage of the hybrid protocol (``hybrid_stage_commands``). The launcher wraps
``timm.scheduler.create_scheduler_v2``, which train.py calls once, so that the number of epochs it returns (the loop's
end) is N; the scheduler itself is built unchanged.

It warns when the script's checkout (``timm/version.py`` next to the script) and the installed timm differ in version:
the scripts follow timm's main branch and may use APIs the installed release lacks (or no longer has).
"""
import contextlib
import functools
import logging
import os
import re
import runpy
import sys
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import yaml

from .models.naming import is_gcp_name, parse_gcp_name

__all__ = ['main', 'checkout_version', 'check_script_args', 'run_script', 'hybrid_stage_commands', 'stop_after_epochs',
    'schedule_name', 'UNRESUMABLE_SCHEDULES']

_logger = logging.getLogger(__name__)


class TimmVersionWarning(UserWarning):
    """The timm script comes from a checkout whose version differs from the installed timm."""


def checkout_version(script_path: str) -> Optional[str]:
    """Version of the timm checkout a script belongs to (``timm/version.py`` beside it), or None if there is none."""
    version_file = os.path.join(os.path.dirname(os.path.abspath(script_path)), 'timm', 'version.py')
    if not os.path.isfile(version_file):
        return None
    with open(version_file) as f:
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read())
    return m.group(1) if m else None


def _model_arg(script_args: Sequence[str]) -> Optional[str]:
    """The value of ``--model``/``-m`` in a timm script's arguments (the last one given), or None."""
    model = None
    for i, a in enumerate(script_args):
        if a in ('--model', '-m') and i + 1 < len(script_args):
            model = script_args[i + 1]
        elif a.startswith('--model='):
            model = a.split('=', 1)[1]
    return model


def check_script_args(script_args: Sequence[str]) -> None:
    """Refuse timm script options that cannot work with a GCP model.

    ``--test-pool`` (validate.py, inference.py) wraps the model in timm's ``TestTimePoolHead``, which re-applies the
    classifier as a 1×1 conv over the *average-pooled* feature map: the GCP classifier takes the d(d+1)/2 covariance
    vector, so the wrapper fails with a reshape error. Covariance pooling already takes a map of any size, so a larger
    ``--img-size`` works without it.

    Raises:
        ValueError: such an option together with a ``*_gcp_*`` model.
    """
    model = _model_arg(script_args) or ''
    if '--test-pool' in script_args and is_gcp_name(model):
        raise ValueError(
            f'--test-pool does not apply to {model}: timm\'s test-time pooling re-applies the classifier over an '
            f'average-pooled map, which a GCP head does not have. Drop --test-pool; covariance pooling already takes '
            f'any input size (e.g. --img-size 448 as it is)')


def stop_after_epochs(create_scheduler: Callable[..., Tuple[Any, int]], stop_epoch: int
        ) -> Callable[..., Tuple[Any, int]]:
    """Wrap a ``create_scheduler_v2``-like factory so that the epoch count it returns is at most ``stop_epoch``.

    timm's train.py runs ``for epoch in range(start_epoch, num_epochs)`` with the ``num_epochs`` the factory returns
    (warmup prefix and cooldown included), and evaluates and checkpoints after the loop's last epoch. The scheduler is
    built from the arguments as given, so every epoch's learning rate is the whole run's.

    Raises:
        ValueError: ``stop_epoch`` < 1.
    """
    if isinstance(stop_epoch, bool) or not isinstance(stop_epoch, int) or stop_epoch < 1:
        raise ValueError(f'stop_epoch must be an int >= 1, got {stop_epoch!r}')

    @functools.wraps(create_scheduler)
    def create(*args: Any, **kwargs: Any) -> Tuple[Any, int]:
        scheduler, num_epochs = create_scheduler(*args, **kwargs)
        if stop_epoch < num_epochs:
            _logger.info(f'stopping after epoch {stop_epoch} of the {num_epochs} epochs the schedule spans')
        create.calls += 1
        return scheduler, min(num_epochs, stop_epoch)

    create.calls = 0
    return create


@contextlib.contextmanager
def _stopping_at(stop_epoch: Optional[int], script_path: str) -> Iterator[None]:
    if stop_epoch is None:
        yield
        return
    with open(script_path) as f:
        if 'create_scheduler_v2' not in f.read():
            raise ValueError(f'--stop-epoch needs a train.py that builds its schedule with '
                f'timm.scheduler.create_scheduler_v2; {script_path} does not')
    import timm.scheduler
    import timm.scheduler.scheduler_factory
    # both names a script may import it by
    modules = (timm.scheduler, timm.scheduler.scheduler_factory)
    original = timm.scheduler.scheduler_factory.create_scheduler_v2
    create = stop_after_epochs(original, stop_epoch)
    for module in modules:
        module.create_scheduler_v2 = create
    try:
        yield
    finally:
        for module in modules:
            module.create_scheduler_v2 = original
    if create.calls == 0:
        raise RuntimeError(f'--stop-epoch {stop_epoch}: {script_path} never called timm.scheduler.create_scheduler_v2, '
            f'so the run was not stopped there')


def run_script(script_path: str, script_args: Sequence[str], stop_epoch: Optional[int] = None) -> None:
    """Import ``timm_gcp`` and run ``script_path`` as ``__main__`` with ``sys.argv = [script_path, *script_args]``.

    Args:
        stop_epoch: end train.py's loop after this many epochs, the learning-rate schedule kept that of the whole
            run (see ``stop_after_epochs``); None runs the script as it is.

    Raises:
        FileNotFoundError: the script does not exist.
        ValueError: options that cannot work with the GCP model named (see ``check_script_args``); ``stop_epoch`` with
            a script that does not build its schedule with ``timm.scheduler.create_scheduler_v2``.
    """
    if not os.path.isfile(script_path):
        raise FileNotFoundError(f'timm script not found: {script_path}')
    check_script_args(script_args)
    import timm  # (importing this module imported timm_gcp, which registered the *_gcp_* models)
    script_version = checkout_version(script_path)
    if script_version is not None and script_version != timm.__version__:
        warnings.warn(
            f'{script_path} comes from a timm {script_version} checkout but timm {timm.__version__} is installed; '
            f'the script may use APIs that differ between the two', TimmVersionWarning, stacklevel=2)
    script_dir = os.path.dirname(os.path.abspath(script_path))
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script_path, *script_args]
    # As `python script.py` would: the script's directory first on sys.path (but the installed timm stays the one
    # imported above, already in sys.modules).
    sys.path.insert(0, script_dir)
    try:
        with _stopping_at(stop_epoch, script_path):
            runpy.run_path(script_path, run_name='__main__')
    finally:
        sys.argv, sys.path[:] = old_argv, old_path


def _pop_stop_epoch(argv: List[str]) -> Optional[int]:
    """Remove the launcher's own ``--stop-epoch N`` / ``--stop-epoch=N`` from the front of ``argv``."""
    if not argv or not argv[0].startswith('--stop-epoch'):
        return None
    if argv[0].startswith('--stop-epoch='):
        value = argv.pop(0).split('=', 1)[1]
    elif argv[0] == '--stop-epoch' and len(argv) > 1:
        argv.pop(0)
        value = argv.pop(0)
    else:
        raise ValueError('--stop-epoch needs a value (the number of epochs to run)')
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'--stop-epoch must be an int, got {value!r}') from None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        print('\nusage: python -m timm_gcp.run_timm_script [--stop-epoch N] SCRIPT.py [SCRIPT ARGS...]')
        return 0 if argv else 2
    try:
        stop_epoch = _pop_stop_epoch(argv)
        if not argv:
            raise ValueError('no timm script given')
        run_script(argv[0], argv[1:], stop_epoch=stop_epoch)
    except (FileNotFoundError, ValueError) as e:
        print(f'run_timm_script: error: {e}', file=sys.stderr)
        return 2
    return 0


# Schedules whose learning rate a resumed train.py cannot reproduce. timm's schedulers are functions of the epoch (or
# update) number, except the plateau scheduler: it lowers the rate after `patience` epochs without improvement of the
# eval metric, a state (best metric, epochs since) that train.py's checkpoint does not hold, and after the switch the
# metric comes from another matrix square root anyway.
UNRESUMABLE_SCHEDULES = {
    'plateau': 'its rate depends on the eval-metric history (best value, epochs without improvement), which '
               "train.py's checkpoint does not keep, so stage 2 cannot continue it; use step or multistep (the "
               "paper's ImageNet recipe: multistep), cosine or tanh",
}
_TRAIN_PY_DEFAULT_SCHED = 'cosine'


def _last_flag_value(args: Sequence[str], flag: str) -> Optional[str]:
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + '='):
            value = a.split('=', 1)[1]
    return value


def schedule_name(train_args: Sequence[str]) -> str:
    """The ``--sched`` timm's train.py will use with ``train_args``: the last ``--sched`` given, else the ``sched`` of
    the ``--config`` YAML (train.py reads it as its defaults), else train.py's default (cosine).

    Raises:
        ValueError: the ``--config`` file cannot be read as a YAML mapping.
    """
    sched = _last_flag_value(train_args, '--sched')
    if sched is not None:
        return sched
    config = _last_flag_value(train_args, '--config') or _last_flag_value(train_args, '-c')
    if config:
        try:
            with open(config) as f:
                cfg = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f'cannot read the train.py config {config}: {e}') from e
        if not isinstance(cfg, dict):
            raise ValueError(f'the train.py config {config} is not a YAML mapping')
        if cfg.get('sched') is not None:
            return str(cfg['sched'])
    return _TRAIN_PY_DEFAULT_SCHED


def hybrid_stage_commands(
        train_py: str,
        model: str,
        switch_epoch: int,
        epochs: int,
        output: str,
        experiment: str,
        from_method: str = 'isqrt',
        to_method: str = 'pade',
        train_args: Sequence[str] = (),
        launcher: Sequence[str] = (sys.executable, '-m'),
) -> List[List[str]]:
    """The two commands of the hybrid protocol with timm's unmodified ``train.py``.

    Stage 1 trains ``<family>_gcp_<from_method>`` with the whole run's arguments (``--epochs epochs``, the schedule,
    warmup and cooldown as given), but the launcher stops it after ``switch_epoch`` epochs (``--stop-epoch``), so its
    learning rates are those of a single run. Stage 2 builds ``<family>_gcp_<to_method>`` (the same parameter names:
    a change of function, not of weights) and resumes stage 1's ``last.pth.tar``; train.py then restores the optimizer
    and epoch and steps the schedule to the switch epoch, up to the end of the run. Both stages write to
    ``output/experiment`` (one ``summary.csv``, whose ``lr`` column equals a single run's epoch by epoch).

    ``switch_epoch`` counts the epochs train.py's loop runs (with ``--warmup-prefix``, the warmup epochs come first).

    Args:
        train_py: path of timm's train.py.
        model: a GCP model name (``resnet50_gcp_isqrt``) or its family (``resnet50_gcp``).
        train_args: train.py's other arguments (data, batch size, lr, schedule, ...), the same for both stages.
        launcher: the command prefix that runs a module (``python -m`` or ``torchrun --nproc_per_node 8``).

    Returns:
        [stage 1 argv, stage 2 argv].

    Raises:
        ValueError: a switch epoch outside (0, epochs); not a GCP model; an argument the protocol sets itself; a
            schedule a resumed run cannot continue (``UNRESUMABLE_SCHEDULES``: plateau), named in the message.
    """
    if not 0 < switch_epoch < epochs:
        raise ValueError(f'switch_epoch must be in (0, epochs={epochs}), got {switch_epoch}')
    name = parse_gcp_name(model)
    family = name.family if name is not None else model
    if not family.endswith('_gcp') or ':' in family:
        raise ValueError(f'{model!r} is not a GCP model name or family (expected e.g. resnet50_gcp_isqrt)')
    for flag in ('--model', '--epochs', '--resume', '--output', '--experiment', '--start-epoch'):
        if any(a == flag or a.startswith(flag + '=') for a in train_args):
            raise ValueError(f'{flag} is set by the hybrid protocol; do not pass it in train_args')
    sched = schedule_name(train_args)
    if sched in UNRESUMABLE_SCHEDULES:
        raise ValueError(f'the {sched!r} learning-rate schedule cannot be split into the two stages of the hybrid '
            f'protocol: {UNRESUMABLE_SCHEDULES[sched]}')
    first, last = (parse_gcp_name(f'{family}_{m}').arch for m in (from_method, to_method))  # unknown method: error
    common = [*train_args, '--output', output, '--experiment', experiment, '--epochs', str(epochs)]
    stage1 = [*launcher, 'timm_gcp.run_timm_script', '--stop-epoch', str(switch_epoch), train_py, *common,
              '--model', first]
    stage2 = [*launcher, 'timm_gcp.run_timm_script', train_py, *common, '--model', last, '--resume',
              os.path.join(output, experiment, 'last.pth.tar')]
    return [stage1, stage2]


if __name__ == '__main__':
    sys.exit(main())

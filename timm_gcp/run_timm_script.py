"""Run timm's scripts (``train.py``, ``validate.py``, ``inference.py``) unmodified with the GCP models registered.

timm has no plugin discovery, and only ``train.py`` has an import hook (``--device-modules timm_gcp``). This launcher
imports ``timm_gcp`` first and then runs the script as ``__main__`` with ``runpy``, so it serves all three, also under
``torchrun``::

    python -m timm_gcp.run_timm_script PATH/TO/validate.py --model resnet50_gcp_pade --pretrained /data/imagenet
    torchrun --nproc_per_node 8 -m timm_gcp.run_timm_script PATH/TO/train.py --model resnet50_gcp_isqrt ...

It warns when the script's checkout (``timm/version.py`` next to the script) and the installed timm differ in version:
the scripts follow timm's main branch and may use APIs the installed release lacks (or no longer has).
"""
import logging
import os
import re
import runpy
import sys
import warnings
from typing import List, Optional, Sequence

from .models.naming import is_gcp_name, parse_gcp_name

__all__ = ['main', 'checkout_version', 'check_script_args', 'run_script', 'hybrid_stage_commands']

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


def run_script(script_path: str, script_args: Sequence[str]) -> None:
    """Import ``timm_gcp`` and run ``script_path`` as ``__main__`` with ``sys.argv = [script_path, *script_args]``.

    Raises:
        FileNotFoundError: the script does not exist.
        ValueError: options that cannot work with the GCP model named (see ``check_script_args``).
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
        runpy.run_path(script_path, run_name='__main__')
    finally:
        sys.argv, sys.path[:] = old_argv, old_path


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        print('\nusage: python -m timm_gcp.run_timm_script SCRIPT.py [SCRIPT ARGS...]')
        return 0 if argv else 2
    try:
        run_script(argv[0], argv[1:])
    except (FileNotFoundError, ValueError) as e:
        print(f'run_timm_script: error: {e}', file=sys.stderr)
        return 2
    return 0



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

    Stage 1 trains ``<family>_gcp_<from_method>`` for epochs [0, switch_epoch); stage 2 builds
    ``<family>_gcp_<to_method>`` (the same parameter names: a change of function, not of weights) and resumes stage
    1's ``last.pth.tar`` with its optimizer, epoch and learning-rate schedule, up to ``epochs``. Both stages write to
    ``output/experiment`` (one ``summary.csv``). The schedule must not depend on the total number of epochs (``step``
    or ``multistep``): stage 1 is run with ``--epochs switch_epoch``.

    Args:
        train_py: path of timm's train.py.
        model: a GCP model name (``resnet50_gcp_isqrt``) or its family (``resnet50_gcp``).
        launcher: the command prefix that runs a module (``python -m`` or ``torchrun --nproc_per_node 8``).

    Returns:
        [stage 1 argv, stage 2 argv].
    """
    if not 0 < switch_epoch < epochs:
        raise ValueError(f'switch_epoch must be in (0, epochs={epochs}), got {switch_epoch}')
    name = parse_gcp_name(model)
    family = name.family if name is not None else model
    if not family.endswith('_gcp') or ':' in family:
        raise ValueError(f'{model!r} is not a GCP model name or family (expected e.g. resnet50_gcp_isqrt)')
    for flag in ('--model', '--epochs', '--resume', '--output', '--experiment'):
        if any(a == flag or a.startswith(flag + '=') for a in train_args):
            raise ValueError(f'{flag} is set by the hybrid protocol; do not pass it in train_args')
    base = [*launcher, 'timm_gcp.run_timm_script', train_py, *train_args, '--output', output, '--experiment',
            experiment]
    first, last = (parse_gcp_name(f'{family}_{m}').arch for m in (from_method, to_method))  # unknown method: error
    stage1 = base + ['--model', first, '--epochs', str(switch_epoch)]
    stage2 = base + ['--model', last, '--epochs', str(epochs), '--resume',
                     os.path.join(output, experiment, 'last.pth.tar')]
    return [stage1, stage2]


if __name__ == '__main__':
    sys.exit(main())

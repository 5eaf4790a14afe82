"""timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) run on the GCP models.

The file is fetched the way a user would get it, ``pip download --no-deps --no-binary :all: timm==<installed>``, once
per timm version into a cache directory (``$TIMM_GCP_CACHE``, else ``$XDG_CACHE_HOME/timm-gcp``, else
``~/.cache/timm-gcp``); only ``tests/test_models.py`` and its ``conftest.py`` are unpacked (the sdist's ``timm``
package must not shadow the installed one). The run loads the plugin first (``pytest -p timm_gcp``).

    python tests/helpers/timm_suite.py                  # one method per family (what tests/test_timm_suite.py runs)
    python tests/helpers/timm_suite.py --all-methods    # every registered GCP model
"""
import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from typing import List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKERS = ('base', 'forward', 'backward', 'cfg', 'cfg_nonstd', 'torchscript', 'features', 'fxforward', 'fxbackward',
    'timeout')
# timm's non-standard cfg test asserts that a model built with num_classes=0 outputs num_features values. For a ViT
# that holds (pooled token = token width); for a GCP head it cannot: the pooled vector has d(d+1)/2 values while
# forward_features keeps the token width (the same test also asserts that). tests/test_timm_suite.py runs the rest of
# that test's contract on these models with timm's own helpers.
NON_STD_TOKEN_FAMILIES = ('vit_small_patch16_224_gcp', 'deit_small_patch16_224_gcp')
# The heads without a matrix root, on a CNN in their paper's layout and on the token backbones (Swin: NHWC maps;
# DeiT: tokens with a class token, whose logits SoT adds)
OTHER_HEAD_MODELS = ('resnet50_ls1_gcp_dropcov', 'swin_tiny_patch4_window7_224_gcp_dropcov',
    'swin_tiny_patch4_window7_224_gcp_sot', 'deit_small_patch16_224_gcp_sot')


def cache_dir() -> str:
    root = os.environ.get('TIMM_GCP_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'timm-gcp')
    return root


def fetch_timm_tests(version: Optional[str] = None) -> str:
    """Directory holding ``test_models.py`` of timm ``version`` (default: the installed one), downloading and
    unpacking the sdist on first use.

    Raises:
        RuntimeError: pip could not download the sdist (the message holds pip's output).
    """
    if version is None:
        import timm
        version = timm.__version__
    dest = os.path.join(cache_dir(), f'timm-{version}-tests')
    if os.path.isfile(os.path.join(dest, 'test_models.py')):
        return dest
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        proc = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', f'timm=={version}',
             '-d', tmp, '--quiet'], capture_output=True, text=True, timeout=600)
        sdist = [f for f in os.listdir(tmp) if f.endswith('.tar.gz')]
        if proc.returncode != 0 or not sdist:
            raise RuntimeError(f'pip download of the timm {version} sdist failed:\n{proc.stdout}{proc.stderr}')
        staging = os.path.join(tmp, 'tests')
        os.makedirs(staging)
        with tarfile.open(os.path.join(tmp, sdist[0])) as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and os.path.basename(os.path.dirname(member.name)) == 'tests' and base in (
                        'test_models.py', 'conftest.py'):
                    with tar.extractfile(member) as src, open(os.path.join(staging, base), 'wb') as out:
                        out.write(src.read())
        with open(os.path.join(staging, 'pytest.ini'), 'w') as f:
            f.write('[pytest]\nmarkers =\n' + ''.join(f'    {m}: timm marker\n' for m in MARKERS))
        try:
            os.replace(staging, dest)  # atomic: a concurrent or interrupted run never sees a half-written directory
        except OSError:
            if not os.path.isfile(os.path.join(dest, 'test_models.py')):  # not a concurrent run that finished first
                raise
    return dest


def selection(all_methods: bool = False) -> str:
    """The ``-k`` expression: one method per family (methods taken in turn, so each is used) and the DropCov/SoT
    models of ``OTHER_HEAD_MODELS``, TorchScript (refused by the GCP models, with the reason) and pretrained
    downloads left out."""
    import timm
    from timm_gcp import METHODS
    from timm_gcp.models import parse_gcp_name
    names = sorted(n for n in timm.list_models('*_gcp_*') if parse_gcp_name(n) is not None)
    if not all_methods:
        families = sorted({parse_gcp_name(n).family for n in names})
        methods = list(METHODS)
        names = [f'{f}_{methods[i % len(methods)]}' for i, f in enumerate(families)] + list(OTHER_HEAD_MODELS)
    skip = [f'(test_model_default_cfgs_non_std and {n})' for n in names if parse_gcp_name(n).family in
        NON_STD_TOKEN_FAMILIES]
    expr = f'({" or ".join(names)}) and not torchscript and not pretrained'
    return expr + ''.join(f' and not {s}' for s in skip)


def run(extra: Sequence[str] = (), all_methods: bool = False) -> subprocess.CompletedProcess:
    """Run timm's ``test_models.py`` on the GCP models in a subprocess; returns the finished process."""
    where = fetch_timm_tests()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'timm_gcp', '-p', 'no:cacheprovider', '-W', 'ignore',
        'test_models.py', '-k', selection(all_methods), *extra]
    return subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--all-methods', action='store_true', help='every GCP model, not one method per family')
    args, extra = parser.parse_known_args(argv)
    proc = run(extra, all_methods=args.all_methods)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep='\n')
    return proc.returncode


if __name__ == '__main__':
    sys.exit(main())

"""Fixtures shared by the tools' tests (training, evaluation, publishing, conversion), and the CPU threads each
pytest-xdist worker may use."""
import os

import pytest
import torch

from helpers.data import EVAL_COUNTS, write_class_folders, write_image_folder


def pytest_configure(config):
    """Under pytest-xdist (``-n``), share the CPUs between the workers instead of giving each worker all of them:
    torch's intra-op threads, and ``OMP_NUM_THREADS`` for the subprocesses the tests start."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        threads = max(1, cpus // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault('OMP_NUM_THREADS', str(threads))


# the longest test module (timm's own model tests in a subprocess, about 3 minutes): collected first, so that under
# pytest-xdist one worker starts on it while the others share the rest, instead of it running alone at the end
LONGEST_FIRST = ('test_timm_suite.py',)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: every other test keeps its place


@pytest.fixture(scope='module')
def eval_folder(tmp_path_factory):
    """An ImageFolder root whose validation/ split holds the classes ant (2 images), bee (3) and cat (5)."""
    return write_class_folders(tmp_path_factory.mktemp('data'), EVAL_COUNTS)


@pytest.fixture
def image_folder(tmp_path):
    """A fresh ImageFolder root with train/ and validation/ splits of 2 classes, 6 random 40 px images each."""
    return write_image_folder(tmp_path / 'data', classes=2, per_class=6, size=40)

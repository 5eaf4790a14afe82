"""Fixtures shared by the tools' tests (training, evaluation, publishing, conversion)."""
import pytest

from helpers.data import EVAL_COUNTS, write_class_folders, write_image_folder


@pytest.fixture(scope='module')
def eval_folder(tmp_path_factory):
    """An ImageFolder root whose validation/ split holds the classes ant (2 images), bee (3) and cat (5)."""
    return write_class_folders(tmp_path_factory.mktemp('data'), EVAL_COUNTS)


@pytest.fixture
def image_folder(tmp_path):
    """A fresh ImageFolder root with train/ and validation/ splits of 2 classes, 6 random 40 px images each."""
    return write_image_folder(tmp_path / 'data', classes=2, per_class=6, size=40)

"""Image-folder datasets that measure the data they name: no substituted samples, no symlink loops, 16-bit images
scaled.

timm's ``ImageDataset`` swaps in the next sample when an image cannot be read (so evaluation would count another
image, often of another class, in its place), its folder reader follows every symbolic link (a link back into the
tree repeats the tree until the path is too long, and adds classes), and ``convert('RGB')`` clips 16-bit images at
255. :class:`CheckedImageDataset` and :class:`FolderReader` keep timm's interface (``reader``, ``transform``,
``filename``) and fix those three:

* ``on_error='raise'`` (evaluation): an unreadable image is an :class:`UnreadableImageError` naming the file.
  ``on_error='skip'`` (training): the file is skipped (the next readable image takes its place in the batch) with a
  warning naming it, and :meth:`CheckedImageDataset.take_skipped` counts them for the end-of-epoch report.
* Linked folders that lead back into the tree (or to a folder holding it) are not followed; a warning names them.
* 16-bit images (PIL modes ``I;16*`` and ``I``) are scaled to 8 bits (value / 257) before the colour conversion.
"""
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset
from timm.data.readers.class_map import load_class_map
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key

from .._compat import search_split

__all__ = ['UnreadableImageError', 'find_images', 'FolderReader', 'CheckedImageDataset', 'create_checked_dataset']

_logger = logging.getLogger(__name__)

_ON_ERROR = ('raise', 'skip')
_LOAD_ERRORS = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises for a file it cannot read


class UnreadableImageError(ValueError):
    """An image of the dataset cannot be read or decoded; the message names the file."""


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def find_images(folder: str, class_to_idx: Optional[Dict[str, int]] = None) -> Tuple[List[Tuple[str, int]],
                                                                                     Dict[str, int]]:
    """The images under ``folder`` with their labels (leaf folder name), as timm's ``find_images_and_targets``, except
    that a linked folder whose target is inside the tree or holds it is not followed (a warning names the link).

    Returns:
        (sorted ``(path, label)`` pairs, ``class_to_idx``).
    """
    types = get_img_extensions(as_set=True)
    root_real = os.path.realpath(folder)
    found: List[Tuple[str, str]] = []
    for dirpath, subdirs, files in os.walk(folder, topdown=True, followlinks=True):
        for d in list(subdirs):
            link = os.path.join(dirpath, d)
            if not os.path.islink(link):
                continue
            target = os.path.realpath(link)
            if _inside(target, root_real) or _inside(root_real, target):
                _logger.warning(f'not following the link {link} -> {os.readlink(link)}: it leads back into the data '
                                f'tree {folder} (its images would be counted again)')
                subdirs.remove(d)
        label = os.path.basename(os.path.relpath(dirpath, folder)) if dirpath != folder else ''
        found.extend((os.path.join(dirpath, f), label) for f in files if os.path.splitext(f)[1].lower() in types)
    if class_to_idx is None:
        labels = sorted({label for _, label in found}, key=natural_key)
        class_to_idx = {c: i for i, c in enumerate(labels)}
    samples = sorted(((p, class_to_idx[label]) for p, label in found if label in class_to_idx),
                     key=lambda s: natural_key(s[0]))
    return samples, class_to_idx


class FolderReader(ReaderImageFolder):
    """timm's image-folder reader (same ``samples``, ``class_to_idx``, ``filename``) over :func:`find_images`."""

    def __init__(self, root: str, class_map: str = ''):
        super(ReaderImageFolder, self).__init__()  # timm's __init__ would walk the tree its own way
        self.root = root
        self.samples, self.class_to_idx = find_images(root, load_class_map(class_map, root) if class_map else None)
        if not self.samples:
            raise ValueError(f'Found 0 images in subfolders of {root}. Supported image extensions are '
                               f'{", ".join(get_img_extensions())}')


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit images (``I;16*``, and ``I`` as 16-bit PNGs open) scaled to 8 bits; ``convert`` would clip them."""
    if not img.mode.startswith('I'):
        return img
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode='L')


class CheckedImageDataset(ImageDataset):
    """timm's ``ImageDataset`` that never substitutes a sample silently.

    Args:
        root: the folder (or tar) the reader reads.
        reader: a timm reader (:class:`FolderReader` for folders).
        on_error: ``'raise'``: an unreadable image raises :class:`UnreadableImageError` naming it (evaluation);
            ``'skip'``: it is skipped with a warning naming it and counted (training).
    """

    def __init__(self, root: str, reader: Any, on_error: str = 'raise', input_img_mode: str = 'RGB', **kwargs: Any):
        if on_error not in _ON_ERROR:
            raise ValueError(f'on_error must be one of {_ON_ERROR}, got {on_error!r}')
        super().__init__(root, reader=reader, input_img_mode=input_img_mode, **kwargs)
        self.on_error = on_error
        self._skipped = torch.zeros(1, dtype=torch.long).share_memory_()  # counted in DataLoader workers too

    def _load(self, index: int) -> Tuple[Any, Any]:
        img, target, *_ = self.reader[index]
        with img if hasattr(img, 'read') else open(img, 'rb') as f:
            img = Image.open(f)
            img.load()
        img = _to_8bit(img)
        if self.input_img_mode:
            img = img.convert(self.input_img_mode)
        return img, target

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        n = len(self.reader)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                img, target = self._load(i)
                break
            except _LOAD_ERRORS as e:
                name = self.filename(i, absolute=True)
                if self.on_error == 'raise':
                    raise UnreadableImageError(f'cannot read the image {name}: {e}') from e
                _logger.warning(f'skipping the unreadable image {name}: {e}')
                self._skipped += 1
        else:
            raise UnreadableImageError(f'none of the {n} images under {self.reader.root} can be read')
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def exclude_unreadable(self) -> List[str]:
        """Read every image once and drop the unreadable ones from the dataset (evaluation behind an explicit flag);
        returns their paths. Only for folder readers (:class:`FolderReader`), whose sample list can be edited.

        Raises:
            ValueError: the reader is not a folder reader.
        """
        if not isinstance(self.reader, FolderReader):
            raise ValueError(f'excluding unreadable images needs an image folder, not {type(self.reader).__name__}')
        bad: List[str] = []
        for i in range(len(self.reader)):
            try:
                self._load(i)
            except _LOAD_ERRORS as e:
                bad.append(self.filename(i, absolute=True))
                _logger.warning(f'excluding the unreadable image {bad[-1]}: {e}')
        if bad:
            gone = set(bad)
            self.reader.samples = [s for s in self.reader.samples if s[0] not in gone]
        return bad

    def take_skipped(self) -> int:
        """How many unreadable images were skipped since the last call (in every DataLoader worker); resets."""
        n = int(self._skipped.item())
        self._skipped.zero_()
        return n


def create_checked_dataset(
        name: str,
        root: str,
        split: str,
        on_error: str,
        class_map: Optional[str] = None,
        **kwargs: Any,
) -> Any:
    """timm's ``create_dataset`` for ``name`` (``''``: an image folder), with folder and tar datasets read by
    :class:`CheckedImageDataset` (folders through :class:`FolderReader`); other datasets are timm's own.

    ``kwargs`` go to timm's ``create_dataset`` for the datasets it builds.
    """
    if not name and os.path.isdir(root):
        folder = search_split(root, split)
        return CheckedImageDataset(folder, FolderReader(folder, class_map or ''), on_error=on_error)
    ds = create_dataset(name, root=root, split=split, class_map=class_map, **kwargs)
    if type(ds) is ImageDataset:  # a tar of images: same reader, no substitution
        return CheckedImageDataset(ds.reader.root if hasattr(ds.reader, 'root') else root, ds.reader,
                                   on_error=on_error)
    return ds

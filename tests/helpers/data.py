"""Small on-disk data and process helpers the tests share (no network)."""
import os
import socket
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The classes of the ``eval_folder`` fixture: unbalanced, so top-1 tells which class a constant model predicts.
EVAL_COUNTS = {'ant': 2, 'bee': 3, 'cat': 5}


def write_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 40,
                       splits: Sequence[str] = ('train', 'validation')) -> Path:
    """A timm/torchvision ImageFolder with the given split folders of random RGB PNGs, classes ``class0``, ..."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return root


def write_class_folders(root: Path, counts: Mapping[str, int], split: str = 'validation',
                        size=(40, 30)) -> Path:
    """``root/split/<class>/<i>.png`` with ``counts[class]`` plain-colour images each (image i of a class has red
    level 20 * i), for evaluation tests whose expected accuracy follows from the counts."""
    from PIL import Image
    for c, n in counts.items():
        os.makedirs(root / split / c)
        for i in range(n):
            Image.new('RGB', size, color=(20 * i, 80, 160)).save(root / split / c / f'{i}.png')
    return root


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The environment of a subprocess that must import this checkout's timm_gcp."""
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env.update(extra)
    return env


def free_port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def load_checkpoint(path) -> dict:
    """A checkpoint written by the tests or by our tools (trusted: full unpickling)."""
    return torch.load(path, map_location='cpu', weights_only=False)


def finite_checkpoint(path, keys: Optional[Sequence[str]] = None) -> bool:
    """Whether every floating tensor of the checkpoint's state dicts is finite."""
    ckpt = load_checkpoint(path)
    for key in keys or ('state_dict', 'state_dict_ema'):
        for v in (ckpt.get(key) or {}).values():
            if v.is_floating_point() and not torch.isfinite(v).all():
                return False
    return True

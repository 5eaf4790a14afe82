"""Small on-disk data the tests write themselves (no network)."""
from pathlib import Path


def write_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 40) -> Path:
    """A timm/torchvision ImageFolder with ``train`` and ``validation`` splits of random RGB PNGs."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for c in range(classes):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return root

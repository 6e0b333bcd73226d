"""Small ImageNet-layout folders of real JPEG files, for tests that read a user's data."""

from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_jax.data import embedded

WNIDS = ('n01440764', 'n01443537', 'n01484850', 'n01491361')  # tench, goldfish, white shark, tiger shark


def write_imagenet_folder(root: Path, *, per_class: int = 6, val_per_class: int = 2, size=(300, 240),
                          wnids=WNIDS) -> Path:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: photo-sized q90 JPEGs with texture.

    Each class is one of the embedded set's drawings (so a net can learn them),
    upscaled to ``size`` (w, h) with per-pixel noise, as photos cost to decode.
    """
    rng = np.random.default_rng(0)
    for split, n in (('train', per_class), ('val', val_per_class)):
        for c, wnid in enumerate(wnids):
            d = Path(root) / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = embedded.draw_example(2 * c, np.random.default_rng([7, c, i, split == 'val']), 48)
                big = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), np.float32)
                big += rng.normal(0, 8, big.shape)
                Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(
                    d / f'{wnid}_{i}.JPEG', quality=90)
    return Path(root)

"""Small ImageNet-layout folders of real JPEG files, for tests that read a user's data."""

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from alexnet_jax.data import embedded

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")  # tench, goldfish, white shark, tiger shark


def write_imagenet_folder(
    root: Path, *, per_class: int = 6, val_per_class: int = 2, size=(300, 240), wnids=WNIDS
) -> Path:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: photo-sized q90 JPEGs with texture.

    Each class is one of the embedded set's drawings (so a net can learn them),
    upscaled to ``size`` (w, h) with per-pixel noise, as photos cost to decode.
    """
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            d = Path(root) / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = embedded.draw_example(2 * c, np.random.default_rng([7, c, i, split == "val"]), 48)
                big = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), np.float32)
                big += rng.normal(0, 8, big.shape)
                Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(d / f"{wnid}_{i}.JPEG", quality=90)
    return Path(root)


def write_meta_mat(path: Path, ids: dict, words: dict | None = None, inner_node: bool = True) -> None:
    """A devkit-shaped meta.mat: a 'synsets' struct array of the leaf classes ``{wnid: ILSVRC2012_ID}``
    in id order, plus an inner WordNet node (children > 0, id 1001) that is no class."""
    rows = sorted((i, w, (words or {}).get(w, w), 0) for w, i in ids.items())
    if inner_node:
        rows.append((1001, "n00001740", "entity", 3))
    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.empty((len(rows), 1), dtype=dt)
    for k, (i, w, text, nc) in enumerate(rows):
        synsets[k, 0] = (np.array([[i]], np.uint16), np.array([w]), np.array([text]), np.array([[nc]], np.uint8))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"synsets": synsets})

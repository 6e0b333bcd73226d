"""The embedded default dataset: deterministic, ImageNet layout, needs spatial and colour features."""

import hashlib

import numpy as np
from PIL import Image

from alexnet_jax.data import embedded as E


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_determinism(tmp_path):
    a = E.ensure_embedded_dataset(tmp_path / "a", num_train_per_class=3, num_val_per_class=2, image_size=32)
    b = E.ensure_embedded_dataset(tmp_path / "b", num_train_per_class=3, num_val_per_class=2, image_size=32)
    assert tree_digest(a) == tree_digest(b)
    assert (
        E.ensure_embedded_dataset(tmp_path / "a", num_train_per_class=3, num_val_per_class=2, image_size=32) == a
    )  # second call reuses it
    classes = sorted(p.name for p in (a / "train").iterdir())
    assert len(classes) == 10 and len(classes) % 2 == 0
    assert classes == sorted(p.name for p in (a / "val").iterdir())
    files = sorted((a / "train" / classes[0]).iterdir())
    assert len(files) == 3 and all(f.suffix == ".JPEG" for f in files)
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
    names = (a / "class_names.txt").read_text().splitlines()
    assert names[0].split(" ", 1) == [classes[0], "disk, red over blue"]
    # Validation images are other draws than the training ones.
    tr = {f.read_bytes() for f in (a / "train").rglob("*.JPEG")}
    assert not tr & {f.read_bytes() for f in (a / "val").rglob("*.JPEG")}
    assert not list(tmp_path.glob("*/.tmp_images_*"))


def _draw(split_id, n, size=48):
    x, y = [], []
    for c in range(len(E.CLASSES)):
        for i in range(n):
            x.append(E.draw_example(c, np.random.default_rng([0, split_id, c, i]), size))
            y.append(c)
    return np.stack(x).astype(np.float64) / 255, np.array(y)


def test_mean_colour_is_not_enough_but_spatial_colour_features_are():
    xtr, ytr = _draw(0, 80)
    xva, yva = _draw(1, 40)

    def nearest_centroid(ftr, fva):
        cent = np.stack([ftr[ytr == c].mean(0) for c in range(10)])
        return (((fva[:, None] - cent[None]) ** 2).sum(-1).argmin(1) == yva).mean()

    def pooled(x, k=8):  # 6x6 grid of average colours: where each colour is
        n, h, w, c = x.shape
        return x.reshape(n, h // k, k, w // k, k, c).mean((2, 4)).reshape(n, -1)

    def ridge(ftr, fva, lam=1.0):
        a, b = np.c_[ftr, np.ones(len(ftr))], np.c_[fva, np.ones(len(fva))]
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(10)[ytr])
        return ((b @ w).argmax(1) == yva).mean()

    mean_colour = nearest_centroid(xtr.mean((1, 2)), xva.mean((1, 2)))
    mean_colour_ridge = ridge(xtr.mean((1, 2)), xva.mean((1, 2)))
    grey_spatial = ridge(pooled(xtr.mean(-1, keepdims=True)), pooled(xva.mean(-1, keepdims=True)))
    colour_spatial = ridge(pooled(xtr), pooled(xva))
    chance = 0.1
    assert mean_colour < chance + 0.06 and mean_colour_ridge < chance + 0.06
    assert colour_spatial > 2.5 * chance
    assert colour_spatial > grey_spatial + 0.05  # colour matters beyond the outline

"""Normalisation in the jitted step (data.device) against the float64 reference in _reference.py."""

import _reference as R
import jax
import numpy as np
import pytest

from alexnet_jax.data import device
from alexnet_jax.data import transforms as T


def element(img, label=3):
    return {"image": img, "label": np.int32(label), "mask": np.bool_(True)}


def random_stats(rng, size):
    """A mean image and PCA eigens with no symmetry a transposed or reordered use could hide behind."""
    a = rng.normal(size=(3, 3))
    cov = a @ a.T / 30
    lam, vec = np.linalg.eigh(cov)
    return rng.uniform(0, 255, (size, size, 3)).astype(np.float32), lam[::-1].copy(), vec[:, ::-1].copy()


def stack(elements):
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def test_training_views_equal_the_papers_order():
    """Random crops, mirrors and lighting, normalised on the device = mean subtracted from the whole image first."""
    rng = np.random.default_rng(0)
    size, crop, n = 8, 5, 16
    mean, lam, vec = random_stats(rng, size)
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    tf = T.RandomCropFlip(crop, flip=True, lighting_std=0.1)
    els = [tf.random_map(element(imgs[i], i), np.random.default_rng(100 + i)) for i in range(n)]
    assert 0 < sum(bool(e["flip"]) for e in els) < n  # both kinds of view are checked
    batch = stack(els)
    out = np.asarray(jax.jit(lambda b: device.normalize(b, mean, lam, vec, lighting=True))(batch))
    assert out.dtype == np.float32
    paper = np.stack(
        [
            R.paper_view(imgs[i], mean, *map(int, e["crop_yx"]), crop, bool(e["flip"]), e["alpha"], lam, vec)
            for i, e in enumerate(els)
        ]
    )
    np.testing.assert_allclose(out, paper, rtol=1e-5, atol=1e-3)
    # The reference's two forms agree: windows of the mean on the crops = the paper's order on whole images.
    np.testing.assert_allclose(R.normalize_batch(batch, mean, lam, vec, with_lighting=True), paper, atol=1e-9)


def test_no_mean_and_no_lighting():
    rng = np.random.default_rng(3)
    mean, lam, vec = random_stats(rng, 6)
    imgs = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    tf = T.RandomCropFlip(4, flip=True, lighting_std=0.1)
    batch = stack([tf.random_map(element(im), np.random.default_rng(i)) for i, im in enumerate(imgs)])
    out = np.asarray(device.normalize(batch, None, lam, vec, lighting=False))
    np.testing.assert_array_equal(out, batch["image"].astype(np.float32))
    out = np.asarray(device.normalize(batch, None, lam, vec, lighting=True))
    np.testing.assert_allclose(out, R.normalize_batch(batch, None, lam, vec, with_lighting=True), atol=1e-3)


def test_ten_views_from_the_whole_image_equal_the_papers():
    rng = np.random.default_rng(1)
    mean, lam, vec = random_stats(rng, 9)
    imgs = rng.integers(0, 256, (3, 9, 9, 3), dtype=np.uint8)
    paper = np.stack([R.ten_views(im, mean, 6) for im in imgs])
    # Whole images (the evaluation loader's mode 'whole'), cut into the views on the device.
    whole = np.asarray(jax.jit(lambda im: device.eval_views(im, mean, 6))(imgs))
    assert whole.shape == (3, 10, 6, 6, 3)
    np.testing.assert_allclose(whole, paper, atol=1e-3)


def test_pca_lighting_noise_statistics():
    """Offsets projected on the eigenvectors, divided by 255*lambda_i, are N(0, 0.1) and independent."""
    rng = np.random.default_rng(2)
    _, lam, vec = random_stats(rng, 4)
    zero = np.zeros((4, 4, 3), np.uint8)
    tf = T.RandomCropFlip(crop=4, flip=False, lighting_std=0.1)
    n = 4000
    batch = stack([tf.random_map(element(zero), np.random.default_rng(i)) for i in range(n)])
    out = np.asarray(device.normalize(batch, None, lam, vec, lighting=True))
    offsets = out[:, 0, 0, :].astype(np.float64)  # the same offset on every pixel of an image
    assert np.allclose(out, offsets[:, None, None, :], atol=1e-4)
    alpha_hat = (offsets @ vec) / (255 * lam)  # coordinates along the eigenvectors
    # Standard error of a std estimate with n=4000 is about 0.1/sqrt(2n) = 0.0011.
    np.testing.assert_allclose(alpha_hat.std(0), 0.1, atol=0.006)
    np.testing.assert_allclose(alpha_hat.mean(0), 0.0, atol=0.006)
    corr = np.corrcoef(alpha_hat.T)
    assert np.all(np.abs(corr[np.triu_indices(3, 1)]) < 0.06)
    # Each use draws anew: two different rngs for the same image give different offsets.
    assert len({tuple(np.round(o, 6)) for o in offsets[:50]}) == 50


@pytest.mark.parametrize("flip", [False, True])
def test_reference_subtracts_the_mirrored_window(flip):
    """The reference itself, on numbers small enough to check by eye."""
    mean = np.arange(4 * 4 * 3, dtype=np.float64).reshape(4, 4, 3)
    img = np.full((4, 4, 3), 100, np.uint8)
    out = R.paper_view(img, mean, 1, 1, 2, flip)
    window = mean[1:3, 1:3]
    np.testing.assert_array_equal(out, 100 - (window[:, ::-1] if flip else window))
    np.testing.assert_allclose(R.lighting([1, 0, 0], [0.5, 0, 0], np.eye(3)), [127.5, 0, 0])

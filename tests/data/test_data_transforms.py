"""Crops, flips, mean subtraction and PCA lighting against NumPy written here."""

import numpy as np
import pytest

from alexnet_jax.data import transforms as T


def coded_image(h, w):
    """uint8 image whose pixel (y, x) encodes its own position: R=y, G=x, B=y+x."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y, x, (y + x) % 256], -1).astype(np.uint8)


def element(img, label=3):
    return {'image': img, 'label': np.int32(label), 'mask': np.bool_(True)}


def test_random_crop_flip_matches_slicing_and_covers_all_positions():
    img = coded_image(12, 10)
    tf = T.RandomCropFlip(crop=7, flip=True, lighting_std=0.1)
    seen_y, seen_x, flips = set(), set(), []
    for i in range(400):
        out = tf.random_map(element(img), np.random.default_rng(i))
        y, x = out['crop_yx']
        expected = img[y:y + 7, x:x + 7]
        if out['flip']:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out['image'], expected)
        assert out['image'].dtype == np.uint8 and out['label'] == 3
        # The crop really is where the coded pixels say it is.
        col0 = x + 6 if out['flip'] else x
        assert out['image'][0, 0, 0] == y and out['image'][0, 0, 1] == col0
        seen_y.add(int(y)), seen_x.add(int(x)), flips.append(bool(out['flip']))
    assert seen_y == set(range(12 - 7 + 1)) and seen_x == set(range(10 - 7 + 1))
    assert 0.4 < np.mean(flips) < 0.6


def test_no_flip_when_disabled_and_same_rng_same_view():
    img = coded_image(9, 9)
    tf = T.RandomCropFlip(crop=5, flip=False, lighting_std=0.0)
    outs = [tf.random_map(element(img), np.random.default_rng(i)) for i in range(50)]
    assert not any(o['flip'] for o in outs)
    assert all(np.all(o['alpha'] == 0) for o in outs)
    a = tf.random_map(element(img), np.random.default_rng(7))
    b = tf.random_map(element(img), np.random.default_rng(7))
    np.testing.assert_array_equal(a['image'], b['image'])


def test_center_crop():
    img = coded_image(256, 256)
    out = T.CenterCrop(224).map(element(img))
    np.testing.assert_array_equal(out['image'], img[16:240, 16:240])
    out = T.CenterCrop(4).map(element(coded_image(9, 7)))
    assert tuple(out['crop_yx']) == (2, 1)


def test_ten_crop_positions_paper_size():
    views = T.ten_crop_params((256, 256), 224)
    # Written out by hand: four corners, centre, then the same five mirrored.
    five = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    assert views == [(y, x, False) for y, x in five] + [(y, x, True) for y, x in five]


def test_ten_crop_views_are_the_slices():
    img = coded_image(11, 13)
    out = T.TenCrop(6).map(element(img))
    assert out['image'].shape == (10, 6, 6, 3)
    corners = {(0, 0), (0, 7), (5, 0), (5, 7)}
    got = {tuple(map(int, yx)) for yx in out['crop_yx'][:4]}
    assert got == corners
    for k in range(10):
        y, x = out['crop_yx'][k]
        ref = img[y:y + 6, x:x + 6]
        ref = ref[:, ::-1] if k >= 5 else ref
        np.testing.assert_array_equal(out['image'][k], ref)
    np.testing.assert_array_equal(out['crop_yx'][5:], out['crop_yx'][:5])


def random_stats(rng, size):
    a = rng.normal(size=(3, 3))
    cov = a @ a.T / 30
    lam, vec = np.linalg.eigh(cov)
    return rng.uniform(0, 255, (size, size, 3)).astype(np.float32), lam[::-1].copy(), vec[:, ::-1].copy()


def test_normalize_matches_numpy():
    rng = np.random.default_rng(0)
    size, crop, n = 8, 5, 6
    mean, lam, vec = random_stats(rng, size)
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    tf = T.RandomCropFlip(crop, flip=True, lighting_std=0.1)
    els = [tf.random_map(element(imgs[i], i), np.random.default_rng(100 + i)) for i in range(n)]
    batch = {k: np.stack([e[k] for e in els]) for k in els[0]}
    out = T.Normalize(mean, lam, vec, lighting=True).map(batch)
    assert out['image'].dtype == np.float32
    for i, e in enumerate(els):
        y, x = e['crop_yx']
        # Independent: the paper's order -- subtract the mean from the whole image, then crop/flip, then lighting.
        centred = imgs[i].astype(np.float64) - mean
        view = centred[y:y + crop, x:x + crop]
        if e['flip']:
            view = np.fliplr(view)
        shift = np.zeros(3)
        for j in range(3):
            shift += vec[:, j] * e['alpha'][j] * lam[j]
        np.testing.assert_allclose(out['image'][i], view + 255 * shift, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(out['label'], np.arange(n))


def test_normalize_ten_crop_uses_matching_mean_views():
    rng = np.random.default_rng(1)
    mean, lam, vec = random_stats(rng, 9)
    img = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
    el = T.TenCrop(6).map(element(img))
    batch = {k: v[None] for k, v in el.items()}
    out = T.Normalize(mean, lam, vec, lighting=False).map(batch)['image'][0]
    ref = img.astype(np.float64) - mean
    for k, (y, x, f) in enumerate(T.ten_crop_params((9, 9), 6)):
        v = ref[y:y + 6, x:x + 6]
        np.testing.assert_allclose(out[k], v[:, ::-1] if f else v, atol=1e-3)


def test_pca_lighting_noise_statistics():
    """Offsets projected on the eigenvectors, divided by 255*lambda_i, are N(0, 0.1) and independent."""
    rng = np.random.default_rng(2)
    _, lam, vec = random_stats(rng, 4)
    zero = np.zeros((4, 4, 3), np.uint8)
    tf = T.RandomCropFlip(crop=4, flip=False, lighting_std=0.1)
    n = 4000
    els = [tf.random_map(element(zero), np.random.default_rng(i)) for i in range(n)]
    batch = {k: np.stack([e[k] for e in els]) for k in els[0]}
    out = T.Normalize(None, lam, vec, lighting=True).map(batch)['image']
    offsets = out[:, 0, 0, :].astype(np.float64)  # the same offset on every pixel of an image
    assert np.allclose(out, offsets[:, None, None, :], atol=1e-4)
    alpha_hat = (offsets @ vec) / (255 * lam)  # coordinates along the eigenvectors
    std = alpha_hat.std(0)
    # Standard error of a std estimate with n=4000 is about 0.1/sqrt(2n) = 0.0011.
    np.testing.assert_allclose(std, 0.1, atol=0.006)
    np.testing.assert_allclose(alpha_hat.mean(0), 0.0, atol=0.006)
    corr = np.corrcoef(alpha_hat.T)
    assert np.all(np.abs(corr[np.triu_indices(3, 1)]) < 0.06)
    # Each use draws anew: two different rngs for the same image give different offsets.
    assert len({tuple(np.round(o, 6)) for o in offsets[:50]}) == 50


@pytest.mark.parametrize('flip', [False, True])
def test_crop_hwc(flip):
    img = coded_image(5, 6)
    out = T.crop_HWC(img, 1, 2, 3, flip)
    ref = np.array([[img[1 + r, 2 + c] for c in range(3)] for r in range(3)])
    np.testing.assert_array_equal(out, ref[:, ::-1] if flip else ref)

"""Crops, flips and the ten test views against NumPy written here (their normalisation: test_data_device)."""

import numpy as np
import pytest

from alexnet_jax.data import transforms as T


def coded_image(h, w):
    """uint8 image whose pixel (y, x) encodes its own position: R=y, G=x, B=y+x."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y, x, (y + x) % 256], -1).astype(np.uint8)


def element(img, label=3):
    return {"image": img, "label": np.int32(label), "mask": np.bool_(True)}


def test_random_crop_flip_matches_slicing_and_covers_all_positions():
    img = coded_image(12, 10)
    tf = T.RandomCropFlip(crop=7, flip=True, lighting_std=0.1)
    seen_y, seen_x, flips = set(), set(), []
    for i in range(400):
        out = tf.random_map(element(img), np.random.default_rng(i))
        y, x = out["crop_yx"]
        expected = img[y : y + 7, x : x + 7]
        if out["flip"]:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out["image"], expected)
        assert out["image"].dtype == np.uint8 and out["label"] == 3
        # The crop really is where the coded pixels say it is.
        col0 = x + 6 if out["flip"] else x
        assert out["image"][0, 0, 0] == y and out["image"][0, 0, 1] == col0
        seen_y.add(int(y)), seen_x.add(int(x)), flips.append(bool(out["flip"]))
    assert seen_y == set(range(12 - 7 + 1)) and seen_x == set(range(10 - 7 + 1))
    assert 0.4 < np.mean(flips) < 0.6


def test_no_flip_when_disabled_and_same_rng_same_view():
    img = coded_image(9, 9)
    tf = T.RandomCropFlip(crop=5, flip=False, lighting_std=0.0)
    outs = [tf.random_map(element(img), np.random.default_rng(i)) for i in range(50)]
    assert not any(o["flip"] for o in outs)
    assert all(np.all(o["alpha"] == 0) for o in outs)
    a = tf.random_map(element(img), np.random.default_rng(7))
    b = tf.random_map(element(img), np.random.default_rng(7))
    np.testing.assert_array_equal(a["image"], b["image"])


def test_center_crop():
    img = coded_image(256, 256)
    out = T.CenterCrop(224).map(element(img))
    np.testing.assert_array_equal(out["image"], img[16:240, 16:240])
    out = T.CenterCrop(4).map(element(coded_image(9, 7)))
    assert tuple(out["crop_yx"]) == (2, 1)


def test_ten_crop_positions_paper_size():
    views = T.ten_crop_params((256, 256), 224)
    # Written out by hand: four corners, centre, then the same five mirrored.
    five = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    assert views == [(y, x, False) for y, x in five] + [(y, x, True) for y, x in five]


@pytest.mark.parametrize("flip", [False, True])
def test_crop_hwc(flip):
    img = coded_image(5, 6)
    out = T.crop_HWC(img, 1, 2, 3, flip)
    ref = np.array([[img[1 + r, 2 + c] for c in range(3)] for r in range(3)])
    np.testing.assert_array_equal(out, ref[:, ::-1] if flip else ref)

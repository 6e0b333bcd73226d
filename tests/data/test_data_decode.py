"""The fast JPEG path (libjpeg-turbo into NumPy, for JPEGs already at the decode size, as every packed
record is) gives Pillow's pixels exactly, and leaves everything else, damaged files included, to Pillow."""

import io

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import sources
from alexnet_jax.errors import DecodeError


def photo(size=256, seed=0):
    """Smooth shapes plus noise: costs what a photo costs to decode, with detail in every block."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy), xx * yy], -1) * 100 + 128
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def jpeg(img, **kw):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", **kw)
    return buf.getvalue()


CASES = {
    "rgb 4:2:0 q95 (prepare's encoding)": lambda: jpeg(photo(), quality=95, subsampling=2),
    "rgb 4:4:4 q90": lambda: jpeg(photo(seed=1), quality=90, subsampling=0),
    "rgb 4:2:2 q75": lambda: jpeg(photo(seed=2), quality=75, subsampling=1),
    "greyscale": lambda: jpeg(photo(seed=3)[..., 0]),
    "progressive": lambda: jpeg(photo(seed=4), quality=90, progressive=True),
}


@pytest.mark.parametrize("name", CASES)
def test_fast_path_gives_pillows_pixels(name):
    data = CASES[name]()
    fast = sources._decode_square_jpeg(data, 256)
    assert fast is not None  # it did take the fast path
    slow = sources.decode_with_pillow(data, 256)
    assert fast.dtype == np.uint8 and fast.shape == (256, 256, 3)
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(sources.decode_image(data, 256), slow)


def test_everything_else_goes_to_pillow():
    img = photo(300)
    cmyk = io.BytesIO()
    Image.fromarray(photo()).convert("CMYK").save(cmyk, format="JPEG")
    png = io.BytesIO()
    Image.fromarray(photo()).save(png, format="PNG")
    others = {"another size": jpeg(img), "CMYK": cmyk.getvalue(), "PNG named .JPEG": png.getvalue()}
    for name, data in others.items():
        assert sources._decode_square_jpeg(data, 256) is None, name
        np.testing.assert_array_equal(sources.decode_image(data, 256), sources.decode_with_pillow(data, 256))
    # CMYK comes out as RGB, in Pillow's conversion.
    assert sources.decode_image(others["CMYK"], 256).shape == (256, 256, 3)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_jpegs_still_raise_decode_error(damage):
    good = CASES["rgb 4:2:0 q95 (prepare's encoding)"]()
    data = {"truncated": good[: len(good) // 2], "garbage": good[:600] + bytes(range(256)) * 40, "empty": b""}[damage]
    assert sources._decode_square_jpeg(data, 256) is None  # libjpeg's warning is an error here
    with pytest.raises(DecodeError):
        sources.decode_image(data, 256)

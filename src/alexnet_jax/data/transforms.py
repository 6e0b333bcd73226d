"""The paper's augmentation (Section 4.1) on the host: uint8 crops and mirrors, and what they were.

Each example carries its crop's position (``crop_yx``), whether it was
mirrored (``flip``) and its lighting coefficients (``alpha``), so the jitted
step can subtract the same window of the mean image and add the lighting
(:mod:`alexnet_jax.data.device`): the host never touches a float.
"""

from __future__ import annotations

import grain
import numpy as np

# ---------------------------------------------------------------------------
# Pure functions


def center_offset(size_hw: tuple[int, int], crop: int) -> tuple[int, int]:
    h, w = size_hw
    return (h - crop) // 2, (w - crop) // 2


def crop_HWC(img_HWC: np.ndarray, y: int, x: int, crop: int, flip: bool = False) -> np.ndarray:
    """The ``crop x crop`` window at (y, x), mirrored left-right if ``flip`` (a view when not mirrored)."""
    out = img_HWC[y : y + crop, x : x + crop]
    return mirror_HWC(out) if flip else out


def mirror_HWC(img_HWC: np.ndarray) -> np.ndarray:
    """Left-right mirror as a new contiguous array.

    One channel at a time: NumPy copies a reversed (W, 3) row 3 bytes at a
    time, ~6x slower than a reversed single-channel plane (410 vs 65 us for a
    224x224 uint8 image), and the training crops are mirrored half the time.
    """
    out = np.empty(img_HWC.shape, img_HWC.dtype)
    for c in range(img_HWC.shape[-1]):
        out[..., c] = img_HWC[:, ::-1, c]
    return out


def random_crop_params(
    rng: np.random.Generator, size_hw: tuple[int, int], crop: int, allow_flip: bool
) -> tuple[int, int, bool]:
    """Uniform top-left corner over all valid positions and a fair coin for the mirror."""
    h, w = size_hw
    y = int(rng.integers(0, h - crop + 1))
    x = int(rng.integers(0, w - crop + 1))
    flip = bool(rng.integers(0, 2)) if allow_flip else False
    return y, x, flip


def ten_crop_params(size_hw: tuple[int, int], crop: int) -> list[tuple[int, int, bool]]:
    """The paper's test views: top-left, top-right, bottom-left, bottom-right, centre, then their mirrors."""
    h, w = size_hw
    cy, cx = center_offset(size_hw, crop)
    five = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), (cy, cx)]
    return [(y, x, False) for y, x in five] + [(y, x, True) for y, x in five]


# ---------------------------------------------------------------------------
# grain transforms (per example unless said otherwise)


class RandomCropFlip(grain.transforms.RandomMap):
    """Training view: random ``crop`` window, random mirror, and this use's lighting alpha.

    The rng grain passes is derived from (seed, index in the repeated stream), so
    every use of an image in every epoch gets its own, reproducible draw.
    """

    def __init__(self, crop: int, flip: bool = True, lighting_std: float = 0.1):
        self.crop, self.flip, self.lighting_std = crop, flip, lighting_std

    def random_map(self, element, rng: np.random.Generator):
        img = element["image"]
        y, x, flip = random_crop_params(rng, img.shape[:2], self.crop, self.flip)
        alpha = rng.normal(0.0, self.lighting_std, size=3) if self.lighting_std > 0 else np.zeros(3)
        return {
            "image": crop_HWC(img, y, x, self.crop, flip),  # a view unless mirrored: batching copies it once
            "label": element["label"],
            "mask": element["mask"],
            "crop_yx": np.array([y, x], np.int32),
            "flip": np.bool_(flip),
            "alpha": alpha.astype(np.float32),
        }


class CenterCrop(grain.transforms.Map):
    """Single centre view for evaluation."""

    def __init__(self, crop: int):
        self.crop = crop

    def map(self, element):
        img = element["image"]
        y, x = center_offset(img.shape[:2], self.crop)
        return {
            "image": np.ascontiguousarray(crop_HWC(img, y, x, self.crop)),
            "label": element["label"],
            "mask": element["mask"],
            "crop_yx": np.array([y, x], np.int32),
            "flip": np.bool_(False),
            "alpha": np.zeros(3, np.float32),
        }


class Whole(grain.transforms.Map):
    """The whole resized image, for evaluation views cut on the device (:func:`device.eval_views`)."""

    def map(self, element):
        return {"image": element["image"], "label": element["label"], "mask": element["mask"]}

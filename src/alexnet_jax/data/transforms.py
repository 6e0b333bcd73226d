"""The paper's augmentation (Section 4.1) as pure NumPy functions and grain transforms.

Images stay uint8 through cropping and flipping; each example carries the
crop's position (``crop_yx``), whether it was mirrored (``flip``) and its
lighting coefficients (``alpha``). Only the last step, :class:`Normalize`,
turns a whole batch into float32: ``flip(crop(img)) - flip(crop(mean))`` plus
the PCA lighting offset, i.e. exactly ``flip(crop(img - mean)) + offset``.

Lighting units: the 3x3 RGB covariance and its eigenvalues ``eigval`` are
computed on pixel values scaled to [0, 1] (the convention under which
``alpha ~ N(0, 0.1)`` gives offsets of a few grey levels, as in Caffe and
fb.resnet.torch); the offset ``eigvec @ (alpha * eigval)`` is multiplied by
255 before being added to 0..255 pixels.
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
    out = img_HWC[y:y + crop, x:x + crop]
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


def random_crop_params(rng: np.random.Generator, size_hw: tuple[int, int], crop: int,
                       allow_flip: bool) -> tuple[int, int, bool]:
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


def lighting_offset(alpha_N3: np.ndarray, eigval_3: np.ndarray, eigvec_33: np.ndarray) -> np.ndarray:
    """Per-image RGB offsets in 0..255 units: ``255 * P @ (alpha * lambda)``; columns of P are eigenvectors."""
    return 255.0 * (np.asarray(alpha_N3, np.float64) * eigval_3) @ np.asarray(eigvec_33, np.float64).T


def normalize_views(img_NHWC: np.ndarray, mean_HWC: np.ndarray | None, crop_yx_N2: np.ndarray,
                    flip_N: np.ndarray, offset_N3: np.ndarray | None,
                    mean_mirrored_HWC: np.ndarray | None = None) -> np.ndarray:
    """uint8 crops -> float32: subtract the matching (cropped, mirrored) mean image, add lighting.

    ``mean_mirrored_HWC`` (``mean_HWC[:, ::-1]`` made contiguous) is only a speed-up:
    a mirrored crop at x of the mean is the plain crop at ``W - crop - x`` of it.
    """
    n, crop = img_NHWC.shape[0], img_NHWC.shape[1]
    out = np.empty(img_NHWC.shape, np.float32)
    offsets = np.zeros((n, 3), np.float32) if offset_N3 is None else offset_N3.astype(np.float32)
    if mean_HWC is None:
        np.add(img_NHWC, offsets[:, None, None, :], out=out)
        return out
    width = mean_HWC.shape[1]
    for i in range(n):
        y, x = int(crop_yx_N2[i, 0]), int(crop_yx_N2[i, 1])
        if flip_N[i] and mean_mirrored_HWC is not None:
            m = mean_mirrored_HWC[y:y + crop, width - crop - x:width - x]
        else:
            m = crop_HWC(mean_HWC, y, x, crop, bool(flip_N[i]))
        # img - (mean - offset): one float pass over the image instead of three.
        np.subtract(img_NHWC[i], m - offsets[i], out=out[i])
    return out


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
        img = element['image']
        y, x, flip = random_crop_params(rng, img.shape[:2], self.crop, self.flip)
        alpha = rng.normal(0.0, self.lighting_std, size=3) if self.lighting_std > 0 else np.zeros(3)
        return {
            'image': crop_HWC(img, y, x, self.crop, flip),  # a view unless mirrored: batching copies it once
            'label': element['label'],
            'mask': element['mask'],
            'crop_yx': np.array([y, x], np.int32),
            'flip': np.bool_(flip),
            'alpha': alpha.astype(np.float32),
        }


class CenterCrop(grain.transforms.Map):
    """Single centre view for evaluation."""

    def __init__(self, crop: int):
        self.crop = crop

    def map(self, element):
        img = element['image']
        y, x = center_offset(img.shape[:2], self.crop)
        return {'image': np.ascontiguousarray(crop_HWC(img, y, x, self.crop)),
                'label': element['label'], 'mask': element['mask'],
                'crop_yx': np.array([y, x], np.int32), 'flip': np.bool_(False),
                'alpha': np.zeros(3, np.float32)}


class TenCrop(grain.transforms.Map):
    """Ten views ``(10, crop, crop, 3)`` in :func:`ten_crop_params` order."""

    def __init__(self, crop: int):
        self.crop = crop

    def map(self, element):
        img = element['image']
        params = ten_crop_params(img.shape[:2], self.crop)
        views = np.stack([crop_HWC(img, y, x, self.crop, f) for y, x, f in params])
        return {'image': views, 'label': element['label'], 'mask': element['mask'],
                'crop_yx': np.array([[y, x] for y, x, _ in params], np.int32),
                'flip': np.array([f for _, _, f in params]),
                'alpha': np.zeros((10, 3), np.float32)}


class Whole(grain.transforms.Map):
    """The whole resized image, for evaluation views cut on the device (:func:`device.eval_views`)."""

    def map(self, element):
        return {'image': element['image'], 'label': element['label'], 'mask': element['mask']}


class Normalize(grain.transforms.Map):
    """Batch-level last step: float32 images, mean-subtracted, lighting added; drops bookkeeping fields.

    Works for ``(B, H, W, 3)`` and ten-crop ``(B, 10, H, W, 3)`` batches.
    """

    def __init__(self, mean_HWC: np.ndarray | None, eigval: np.ndarray | None,
                 eigvec: np.ndarray | None, lighting: bool):
        self.mean_HWC = None if mean_HWC is None else np.asarray(mean_HWC, np.float32)
        self.mean_mirrored_HWC = None if mean_HWC is None else np.ascontiguousarray(self.mean_HWC[:, ::-1])
        self.eigval, self.eigvec, self.lighting = eigval, eigvec, lighting

    def map(self, batch):
        img = batch['image']
        lead, hwc = img.shape[:-3], img.shape[-3:]
        flat = img.reshape((-1,) + hwc)
        alpha = batch['alpha'].reshape(-1, 3)
        offset = (lighting_offset(alpha, self.eigval, self.eigvec)
                  if self.lighting and self.eigval is not None else None)
        out = normalize_views(flat, self.mean_HWC, batch['crop_yx'].reshape(-1, 2),
                              batch['flip'].reshape(-1), offset, self.mean_mirrored_HWC)
        return {'image': out.reshape(lead + hwc), 'label': batch['label'].astype(np.int32),
                'mask': batch['mask']}

"""The paper's input normalisation in float64 NumPy, written apart from the code it checks.

The loader sends uint8 views and the jitted step normalises them
(alexnet_jax.data.device); these are the numbers it must give. Two forms:

* :func:`paper_view`: from the whole image, in the paper's order (Section 2
  and 4.1): subtract the mean image, take the crop, mirror it, add the PCA
  lighting. Needs the uncropped image.
* :func:`normalize_batch`: from the loader's batch of crops and their
  ``crop_yx``/``flip``/``alpha``, one example at a time: the crop minus the
  same (mirrored) window of the mean image, plus the lighting. Equal to the
  first because cropping and mirroring commute with the subtraction.

Lighting: ``255 * sum_j alpha_j * eigval_j * eigvec[:, j]`` (columns are
eigenvectors, eigenvalues on [0, 1] pixels), the same offset on every pixel.
"""

import numpy as np


def lighting(alpha_3, eigval_3, eigvec_33) -> np.ndarray:
    """The RGB offset, in 0..255 units, written as the paper's sum over the three principal components."""
    shift = np.zeros(3)
    for j in range(3):
        shift += np.asarray(eigvec_33, np.float64)[:, j] * float(alpha_3[j]) * float(eigval_3[j])
    return 255.0 * shift


def paper_view(
    image_HWC, mean_HWC, y: int, x: int, crop: int, flip: bool, alpha_3=None, eigval_3=None, eigvec_33=None
) -> np.ndarray:
    """One model input from the whole uint8 image: (image - mean), cropped at (y, x), mirrored, + lighting."""
    centred = np.asarray(image_HWC, np.float64)
    if mean_HWC is not None:
        centred = centred - np.asarray(mean_HWC, np.float64)
    view = centred[y : y + crop, x : x + crop]
    if flip:
        view = np.fliplr(view)
    if alpha_3 is not None:
        view = view + lighting(alpha_3, eigval_3, eigvec_33)
    return view


def ten_views(image_HWC, mean_HWC, crop: int) -> np.ndarray:
    """The paper's ten test views ``(10, crop, crop, 3)``: four corners and the centre, then the five mirrored."""
    h, w = image_HWC.shape[:2]
    five = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), ((h - crop) // 2, (w - crop) // 2)]
    return np.stack([paper_view(image_HWC, mean_HWC, y, x, crop, f) for f in (False, True) for y, x in five])


def normalize_batch(batch: dict, mean_HWC, eigval_3=None, eigvec_33=None, *, with_lighting: bool) -> np.ndarray:
    """A loader batch of uint8 crops ``(..., crop, crop, 3)`` -> the float64 model inputs."""
    image = np.asarray(batch["image"])
    lead, (crop, _, _) = image.shape[:-3], image.shape[-3:]
    images = image.reshape((-1,) + image.shape[-3:]).astype(np.float64)
    yx = np.asarray(batch["crop_yx"]).reshape(-1, 2)
    flips = np.asarray(batch["flip"]).reshape(-1)
    alphas = np.asarray(batch["alpha"]).reshape(-1, 3)
    out = np.empty_like(images)
    for i in range(len(images)):
        y, x = int(yx[i, 0]), int(yx[i, 1])
        view = images[i]
        if mean_HWC is not None:
            window = np.asarray(mean_HWC, np.float64)[y : y + crop, x : x + crop]
            view = view - (np.fliplr(window) if flips[i] else window)
        if with_lighting:
            view = view + lighting(alphas[i], eigval_3, eigvec_33)
        out[i] = view
    return out.reshape(lead + image.shape[-3:])

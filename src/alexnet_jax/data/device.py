"""The last pipeline step, on the accelerator: uint8 batches in, float32 model inputs out.

The loader sends uint8 crops with each view's ``crop_yx``, ``flip`` and ``alpha`` (a quarter of the
bytes, no float work on the host); :func:`normalize`, in the jitted step, subtracts the mean image's
matching window and adds the PCA lighting (tests/data/_reference.py: the same in float64, paper order).
Units: ``eigval`` is on [0, 1] pixels (where ``alpha ~ N(0, 0.1)`` moves a pixel a few grey levels, as
in Caffe and fb.resnet.torch), so ``eigvec @ (alpha * eigval)`` is scaled by 255 for 0..255 pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(batch: dict, mean_image, eigval, eigvec, *, lighting: bool = True) -> jax.Array:
    """``batch['image']`` uint8 (..., h, w, 3) -> float32: minus the matching mean-image view, plus lighting.

    ``mean_image`` None skips mean subtraction; ``lighting`` False (evaluation) skips the PCA noise.
    """
    image = batch["image"]
    hwc = image.shape[-3:]
    lead = image.shape[:-3]
    img = image.reshape((-1,) + hwc).astype(jnp.float32)
    out = img
    if mean_image is not None:
        mean = jnp.asarray(mean_image, jnp.float32)

        def view(yx, flip):
            m = jax.lax.dynamic_slice(mean, (yx[0], yx[1], 0), hwc)
            return jnp.where(flip, m[:, ::-1], m)

        out = out - jax.vmap(view)(batch["crop_yx"].reshape(-1, 2), batch["flip"].reshape(-1))
    if lighting:
        alpha = batch["alpha"].reshape(-1, 3).astype(jnp.float32)
        offset = 255.0 * (alpha * jnp.asarray(eigval, jnp.float32)) @ jnp.asarray(eigvec, jnp.float32).T
        out = out + offset[:, None, None, :]
    return out.reshape(lead + hwc)


def eval_views(image_BSSC: jax.Array, mean_image, crop: int) -> jax.Array:
    """Whole ``resize x resize`` uint8 images -> the paper's ten test views, float32 ``(B, 10, crop, crop, 3)``.

    Each image crosses once (1.3x a centre crop's bytes, not 10x); the views are static slices in
    :func:`transforms.ten_crop_params` order, so view 4 is the centre crop.
    """
    from alexnet_jax.data.transforms import ten_crop_params

    img = image_BSSC.astype(jnp.float32)
    if mean_image is not None:
        img = img - jnp.asarray(mean_image, jnp.float32)
    views = []
    for y, x, flip in ten_crop_params(img.shape[1:3], crop):
        v = img[:, y : y + crop, x : x + crop]
        views.append(v[:, :, ::-1] if flip else v)
    return jnp.stack(views, axis=1)

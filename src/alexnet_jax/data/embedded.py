"""The embedded default dataset: 10 classes the package draws itself, no download (docs/training.md).

A class is a shape (disk, square, triangle, cross, ring) with red over blue or blue over red. Shapes of
about equal area and the same two colours in both arrangements make the mean colour useless: a model must
see *where* each colour is and *what outline* it fills; jitter, pose, clutter in the same colours and
noise make it a real, if small, problem. Images are real JPEGs in the ImageNet folder layout, so the
default run takes every step an ImageNet run does, preparation included.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disk", "square", "triangle", "cross", "ring")
ARRANGEMENTS = ("red_over_blue", "blue_over_red")
CLASSES = tuple(f"{s}_{a}" for s in SHAPES for a in ARRANGEMENTS)  # 10, even: towers split them
VERSION = 1
# Hue (0..1) of the two colours; both arrangements use both.
_RED, _BLUE = 0.0, 0.62
# Scale per shape that makes its area about that of the unit disk (pi).
_AREA_SCALE = {"disk": 1.0, "square": 0.886, "triangle": 1.55, "cross": 1.19, "ring": 1.25}


def default_root() -> Path:
    """``$ALEXNET_JAX_DATA/embedded`` or ``~/.cache/alexnet_jax/embedded``."""
    base = os.environ.get("ALEXNET_JAX_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "alexnet_jax")
    return Path(base) / "embedded"


def _hsv(rng: np.random.Generator, hue: float, hue_jitter: float = 0.05) -> np.ndarray:
    h = (hue + rng.uniform(-hue_jitter, hue_jitter)) % 1.0
    s, v = rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` of radius ``r`` in centred, rotated coordinates (v points down)."""
    r = r * _AREA_SCALE[shape]
    if shape == "disk":
        return u**2 + v**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= r
    if shape == "triangle":  # apex up at v = -r, base at v = r / 2
        return (v <= r / 2) & (v >= -r + np.sqrt(3) * np.abs(u))
    if shape == "cross":
        w = r / 3
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if shape == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.6 * r) ** 2)
    raise ValueError(shape)


def draw_example(class_index: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One uint8 ``(size, size, 3)`` image of class ``CLASSES[class_index]``."""
    shape = SHAPES[class_index // 2]
    top_hue, bottom_hue = (_RED, _BLUE) if class_index % 2 == 0 else (_BLUE, _RED)

    # Background: any colour, low-ish saturation, with clutter in any colour.
    bg = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.5), rng.uniform(0.2, 0.9))) * 255
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(4, 10)):
        col = tuple(int(c) for c in rng.uniform(0, 255, 3))
        if rng.uniform() < 0.5:
            pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
            draw.line(pts, fill=col, width=int(rng.integers(1, 4)))
        else:
            cx, cy, rad = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, size / 10)
            draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=col)
    img = np.asarray(canvas, np.float64).copy()

    # The object: random position, scale, rotation; top half one colour, bottom the other.
    r = size * rng.uniform(0.17, 0.27)
    cx, cy = size / 2 + rng.uniform(-0.15, 0.15) * size, size / 2 + rng.uniform(-0.15, 0.15) * size
    theta = rng.uniform(-0.35, 0.35)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    mask = shape_mask(shape, u, v, r)
    top, bottom = _hsv(rng, top_hue), _hsv(rng, bottom_hue)
    img[mask & (v < 0)] = top
    img[mask & (v >= 0)] = bottom

    img *= rng.uniform(0.8, 1.2)  # global brightness
    img += rng.normal(0, 6.0, img.shape)  # sensor noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _class_names() -> list[str]:
    return [f"{s}, {a.replace('_', ' ')}" for s in SHAPES for a in ARRANGEMENTS]


def folder_name(class_index: int) -> str:
    """Folder names sort in class order, like ImageNet wnids."""
    return f"c{class_index:02d}_{CLASSES[class_index]}"


def generate(
    dst: str | os.PathLike,
    *,
    num_train_per_class: int = 300,
    num_val_per_class: int = 50,
    image_size: int = 96,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write the dataset as JPEG files under ``dst`` (ImageNet layout). Deterministic in ``seed``."""
    dst = Path(dst)
    for split_id, (split, n) in enumerate((("train", num_train_per_class), ("val", num_val_per_class))):
        for c in range(len(CLASSES)):
            d = dst / split / folder_name(c)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, c, i])
                Image.fromarray(draw_example(c, rng, image_size)).save(
                    d / f"{split}_{c:02d}_{i:05d}.JPEG", format="JPEG", quality=quality
                )
    with open(dst / "class_names.txt", "w") as f:
        for c, name in enumerate(_class_names()):
            f.write(f"{folder_name(c)} {name}\n")
    return dst


def ensure_embedded_dataset(
    root: str | os.PathLike | None = None,
    *,
    num_train_per_class: int = 300,
    num_val_per_class: int = 50,
    image_size: int = 96,
    seed: int = 0,
) -> Path:
    """The dataset's folder (``root/images_<settings>``), generated on first use.

    Generated into a temporary folder and renamed, so a crash or a concurrent
    caller never leaves a half-written dataset behind.
    """
    root = Path(root) if root is not None else default_root()
    params = dict(
        version=VERSION,
        num_train_per_class=num_train_per_class,
        num_val_per_class=num_val_per_class,
        image_size=image_size,
        seed=seed,
    )
    tag = f"v{VERSION}_n{num_train_per_class}-{num_val_per_class}_s{image_size}_seed{seed}"
    path = root / f"images_{tag}"
    if (path / "embedded.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_images_", dir=root))
    try:
        generate(
            tmp,
            num_train_per_class=num_train_per_class,
            num_val_per_class=num_val_per_class,
            image_size=image_size,
            seed=seed,
        )
        (tmp / "embedded.json").write_text(json.dumps(params, indent=1))
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "embedded.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path

"""scikit-learn's handwritten digits as a small real-image set in the ImageNet folder layout.

    pip install scikit-learn
    python scripts/write_digits.py --out data/digits

The 1,797 digits (8x8, 17 grey levels, scanned from 43 people's handwriting;
shipped inside scikit-learn, no download) are upscaled to 64x64 with bicubic
interpolation and written as greyscale JPEGs, as ImageNet's greyscale photos are:

    data/digits/train/digit_<k>/digit_<k>_<i>.JPEG    about 1,500 images
    data/digits/val/<i>.JPEG + val/val_labels.txt    30 per class, a flat folder with a labels file

The validation split is stratified and drawn with a fixed seed, so the set is the
same on every machine. Train the demo recipe on it with

    python launch.py --config=configs/demo.py --config.data.name=imagenet --config.data.root=data/digits \\
        --config.model.num_classes=10 --workdir=runs/digits
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

VAL_PER_CLASS = 30
SIZE = 64


def write(out: Path, seed: int = 0) -> tuple[int, int]:
    """Write the set under ``out``; (train images, val images)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) float in 0..16, (1797,)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), bool)
    for k in range(10):
        val[rng.choice(np.flatnonzero(labels == k), VAL_PER_CLASS, replace=False)] = True
    lines = []
    for i, (img, k) in enumerate(zip(images, labels)):
        pixels = Image.fromarray((img * (255 / 16)).round().astype(np.uint8), mode="L")
        pixels = pixels.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        if val[i]:
            path = out / "val" / f"{i:04d}.JPEG"
            lines.append(f"{path.name} digit_{k}")
        else:
            path = out / "train" / f"digit_{k}" / f"digit_{k}_{i:04d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels.save(path, quality=95)
    (out / "val" / "val_labels.txt").write_text("\n".join(lines) + "\n")
    return int((~val).sum()), int(val.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (train/ and val/ go inside)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the validation draw")
    a = ap.parse_args()
    out = Path(a.out)
    if (out / "train").exists() or (out / "val").exists():
        sys.exit(f"write_digits: {out} already holds train/ or val/; choose an empty --out")
    try:
        n_train, n_val = write(out, a.seed)
    except ImportError:
        sys.exit("write_digits: needs scikit-learn (pip install scikit-learn)")
    print(f"wrote {n_train} training and {n_val} validation JPEGs of 10 digit classes under {out}")


if __name__ == "__main__":
    main()

"""Classify image files with a checkpoint: the top-5 classes and their probabilities per image.

    python -m alexnet_jax.predict --checkpoint runs/bvlc_alexnet cat.jpg dog.png
    python -m alexnet_jax.predict --checkpoint runs/demo --views ten_crop --json out.json img/*.jpg

The checkpoint's own preprocessing is used (its resize, crop and mean image).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m alexnet_jax.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a training workdir, a checkpoints/<step> folder, or a "
                                                         "folder written by alexnet_jax.convert")
    ap.add_argument("--step", type=int, default=None, help="which step (default: the newest)")
    ap.add_argument("--views", choices=("center", "ten_crop"), default=None,
                    help="default: ten crops if the run evaluated them, else the centre crop")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--json", default=None, help="write {image: [{class, name, prob}, ...]} here instead of printing")
    ap.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    a = ap.parse_args(argv)
    from alexnet_jax.checkpoint import CheckpointError
    from alexnet_jax.inference import Classifier, ImageError

    try:
        pred = Classifier(a.checkpoint, step=a.step, views=a.views).predict(a.images, top_k=a.top_k)
    except (CheckpointError, ImageError) as e:
        sys.exit(f"predict: {e}")
    if a.json is None:
        print(pred)
        return
    out = {src: [{"class": c, "name": n, "prob": float(p)} for c, n, p in zip(cs, ns, ps)]
           for src, cs, ns, ps in zip(pred.sources, pred.classes, pred.names, pred.top_probs)}
    try:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    except OSError as e:
        sys.exit(f"predict: cannot write --json={a.json}: {e}")


if __name__ == "__main__":
    main()

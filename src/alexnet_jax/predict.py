"""Classify image files with a checkpoint: the top-5 classes and their probabilities per image.

    python -m alexnet_jax.predict --checkpoint=runs/bvlc_alexnet cat.jpg dog.png
    python -m alexnet_jax.predict --checkpoint=runs/demo --views=ten_crop --json=out.json img/*.jpg

The checkpoint's own preprocessing is used (its resize, crop and mean image).
The images are the arguments after the flags, or ``--images FILE`` (repeatable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from alexnet_jax import cli, paths

_PROG = cli.program("predict")


def define_flags(fv: flags.FlagValues) -> None:
    paths.DEFINE_path(
        "checkpoint",
        None,
        "A training run's workdir, a checkpoints/<step> folder, or a folder written by alexnet_jax.convert.",
        flag_values=fv,
    )
    flags.DEFINE_integer("step", None, "Which checkpoint step (default: the newest).", flag_values=fv)
    flags.DEFINE_enum(
        "views",
        None,
        ["center", "ten_crop"],
        "Default: ten crops if the run evaluated them, else the centre crop.",
        flag_values=fv,
    )
    flags.DEFINE_integer("top_k", 5, "How many classes to give per image.", lower_bound=1, flag_values=fv)
    paths.DEFINE_path(
        "json", None, "Write {image: [{class, name, prob}, ...]} to this file instead of printing.", flag_values=fv
    )
    paths.DEFINE_multi_path(
        "images",
        None,
        "An image file (JPEG, PNG, ...), as well as or instead of the files after the flags",
        flag_values=fv,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m alexnet_jax.predict ARGS`` (and ``alexnet-predict``); ``argv`` defaults to ``sys.argv[1:]``."""
    argv = [_PROG, *(sys.argv[1:] if argv is None else argv)]
    cli.run_main(_PROG, lambda: _main(argv))


def _main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    define_flags(fv)
    if cli.wants_help(argv):
        cli.print_help(_PROG, __doc__, fv)
    after = cli.parse_flags(_PROG, fv, argv, positional=True)
    images = [*(fv.images or []), *map(paths.absolute_str, after)]  # --images FILE first, then the files after
    cli.require(_PROG, fv, "checkpoint", what=" and image files")
    if not images:
        cli.usage_error(_PROG, "give image files to classify (after the flags, or --images FILE)")
    from alexnet_jax.errors import CheckpointError, ImageError
    from alexnet_jax.inference import Classifier

    try:
        pred = Classifier(fv.checkpoint, step=fv.step, views=fv.views).predict(images, top_k=fv.top_k)
    except (CheckpointError, ImageError) as e:
        sys.exit(f"{_PROG}: {e}")
    if fv.json is None:
        print(pred)
        return
    out = {
        src: [{"class": c, "name": n, "prob": float(p)} for c, n, p in zip(cs, ns, ps)]
        for src, cs, ns, ps in zip(pred.sources, pred.classes, pred.names, pred.top_probs)
    }
    try:
        Path(fv.json).write_text(json.dumps(out, indent=1) + "\n")
    except OSError as e:
        sys.exit(f"{_PROG}: cannot write --json={fv.json}: {e}")


if __name__ == "__main__":
    main()

"""A weights-only copy of a checkpoint: the parameters, config, classes and mean image, no optimizer
state (a third of the size with momentum), loaded like any other checkpoint.

    python -m alexnet_jax.export --checkpoint runs/paper --out runs/paper-weights [--step N]

Training cannot resume from the copy; evaluation, ``Classifier`` and the figures use it unchanged.
"""

from __future__ import annotations

import argparse
import sys


def export(checkpoint: str, out: str, step: int | None = None):
    """Write the weights-only copy of ``checkpoint`` (its ``step``, default the newest) to ``out``."""
    import jax

    from alexnet_jax import checkpoint as ckpt_lib

    step_dir, number = ckpt_lib.find_step_dir(checkpoint, step)
    number = ckpt_lib.read_step(step_dir) if number is None else number
    params = ckpt_lib.read_params(step_dir, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    classes, names, stats = ckpt_lib.read_dataset(step_dir)
    origin = ckpt_lib.read_origin(step_dir) or {}
    return ckpt_lib.write_weights_only(
        out, number, jax.device_get(params), config=ckpt_lib.read_config(step_dir),
        dataset={"classes": classes, "class_names": names, "stats": stats},
        origin={**origin, "exported_from": str(step_dir)})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m alexnet_jax.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a training workdir or a checkpoints/<step> folder")
    ap.add_argument("--out", required=True, help="folder to write (new or empty)")
    ap.add_argument("--step", type=int, default=None, help="which step (default: the newest)")
    a = ap.parse_args(argv)
    from alexnet_jax.checkpoint import CheckpointError

    try:
        step_dir = export(a.checkpoint, a.out, a.step)
    except CheckpointError as e:
        sys.exit(f"export: {e}")
    print(f"Wrote {step_dir} (weights only).")


if __name__ == "__main__":
    main()

"""A weights-only copy of a checkpoint: the parameters, config, classes and mean image, no optimizer
state (a third of the size with momentum), loaded like any other checkpoint.

    python -m alexnet_jax.export --checkpoint=runs/paper --out=runs/paper-weights [--step=N]

Training cannot resume from the copy; evaluation, ``Classifier`` and the figures use it unchanged.
"""

from __future__ import annotations

import sys

from absl import flags

from alexnet_jax import cli, paths

_PROG = cli.program("export")


def export(checkpoint: str, out: str, step: int | None = None):
    """Write the weights-only copy of ``checkpoint`` (its ``step``, default the newest) to ``out``."""
    import jax

    from alexnet_jax import checkpoint as ckpt_lib

    step_dir, number = paths.find_step_dir(checkpoint, step)
    items = ckpt_lib.read_weights(step_dir, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    state = jax.device_get(items["state"])
    return ckpt_lib.write_weights_only(
        out,
        int(state["step"]) if number is None else number,
        state["params"],
        config=ckpt_lib.read(step_dir, "config")["config"],
        dataset=items["dataset"],
        stats=items["dataset_stats"],
        origin={**(items["origin"] or {}), "exported_from": str(step_dir)},
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m alexnet_jax.export ARGS`` (and ``alexnet-export``); ``argv`` defaults to ``sys.argv[1:]``."""
    argv = [_PROG, *(sys.argv[1:] if argv is None else argv)]
    cli.run_main(_PROG, lambda: _main(argv))


def _main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    paths.DEFINE_path("checkpoint", None, "A training run's workdir or a checkpoints/<step> folder.", flag_values=fv)
    paths.DEFINE_path("out", None, "The folder to write (new or empty).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Which checkpoint step (default: the newest).", flag_values=fv)
    if cli.wants_help(argv):
        cli.print_help(_PROG, __doc__, fv)
    cli.parse_flags(_PROG, fv, argv)
    cli.require(_PROG, fv, "checkpoint", "out")
    from alexnet_jax.errors import CheckpointError

    try:
        step_dir = export(fv.checkpoint, fv.out, fv.step)
    except CheckpointError as e:
        sys.exit(f"{_PROG}: {e}")
    print(f"Wrote {step_dir} (weights only).")


if __name__ == "__main__":
    main()

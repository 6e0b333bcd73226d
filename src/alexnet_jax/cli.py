"""The command line of ``launch.py``: a config file, its overrides, a workdir.

``launch.py`` is only ``cli.launch(sys.argv)``. The flags are defined by
:func:`define_flags` on a ``FlagValues`` the caller chooses, so the tests
parse exactly what a user types through exactly this code
(:func:`parse_command_line`), without starting a run.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

# What a bad command line raises, from ml_collections, absl or the config file itself.
BAD_COMMAND_LINE = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)
_BAD = BAD_COMMAND_LINE


def describe(e: Exception) -> str:
    """One line for what is wrong with a command line (config_flags reports a missing key as a bare name)."""
    return f"no such config key: {str(e).strip(chr(34))}" if isinstance(e, (KeyError, AttributeError)) else str(e)


def _explain(e: Exception):
    what = describe(e)
    sys.exit(f"launch.py: bad command line: {what}\n"
             "Config keys are those of the --config file, e.g. --config.model.lrn=False.")


def define_flags(flag_values: flags.FlagValues, argv: list[str]):
    """``--config`` (a ``get_config()`` file, locked, overridable field by field) and ``--workdir``.

    ``argv`` is the whole command line: config_flags reads the overrides from
    it as soon as the flag is defined.
    """
    try:
        config = config_flags.DEFINE_config_file("config", "configs/demo.py", "Run config (a get_config() file).",
                                                 flag_values=flag_values, sys_argv=list(argv))
    except _BAD as e:
        _explain(e)
    workdir = flags.DEFINE_string("workdir", "runs/demo", "Directory for checkpoints and metrics.",
                                  flag_values=flag_values)
    return config, workdir


def _config_value(config_flag):
    try:
        config = config_flag.value
        config.get("model")  # a config file that failed to load raises only when first touched
    except _BAD as e:  # e.g. a --config file that does not exist
        _explain(e)
    return config


def parse_command_line(argv: list[str]):
    """``(config, workdir)`` from a ``launch.py`` command line (``argv[0]`` is the program name)."""
    fv = flags.FlagValues()
    config_flag, workdir_flag = define_flags(fv, argv)
    try:
        rest = fv(list(argv))
    except _BAD as e:
        _explain(e)
    if len(rest) > 1:
        sys.exit(f"launch.py: bad command line: unexpected arguments {rest[1:]}")
    return _config_value(config_flag), workdir_flag.value


def lr_on_command_line(argv: list[str]) -> bool:
    """Whether ``--config.optim.lr`` was typed: on resume that is a manual LR drop; its absence is not."""
    return any(a == "--config.optim.lr" or a.startswith("--config.optim.lr=") for a in argv[1:])


def launch(argv: list[str]) -> None:
    """Parse, then train (or resume); every expected failure ends in one line on stderr."""
    config_flag, workdir_flag = define_flags(flags.FLAGS, argv)

    def main(rest):
        if len(rest) > 1:
            raise app.UsageError(f"Unexpected arguments: {rest[1:]}")
        logging.set_verbosity(logging.WARNING)
        config = _config_value(config_flag)
        from alexnet_jax import ConfigError, train
        from alexnet_jax.checkpoint import CheckpointError
        from alexnet_jax.data import DatasetError, release_shared_memory
        from alexnet_jax.preemption import EXIT_PREEMPTED
        from alexnet_jax.train import EXIT_DIVERGED

        try:
            result = train.train_and_evaluate(config, workdir_flag.value,
                                              manual_lr=config.optim.lr if lr_on_command_line(argv) else None)
        except ConfigError as e:
            sys.exit(f"launch.py: bad config: {e}")
        except train.Diverged as e:
            print(f"launch.py: {e}", file=sys.stderr)
            sys.exit(EXIT_DIVERGED)  # its own status: a runner (alexnet_jax.ablate) records it as a result
        except (DatasetError, CheckpointError, train.TrainingError) as e:
            sys.exit(f"launch.py: {e}")
        finally:
            release_shared_memory()  # no 'leaked shared_memory' warnings from the loader at exit
        if result.get("stopped_by"):
            sys.exit(EXIT_PREEMPTED)  # saved; the same command resumes

    def parse(args):
        try:
            return flags.FLAGS(args)
        except _BAD as e:
            _explain(e)

    app.run(main, argv=list(argv), flags_parser=parse)

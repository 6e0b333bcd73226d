"""The command line of every entry point: ``launch.py``'s config file and overrides, and what all share.

``launch.py`` is only ``cli.launch(sys.argv)``; the tests parse what a user types through the same code
(:func:`parse_command_line`). The ``--config`` file's ``get_config()`` runs here outside any ``try``
(:func:`parse_with_config`): what it raises is a bug in it and keeps its traceback. ml_collections then
only applies the ``--config.FIELD=VALUE`` overrides to that config, so whatever absl or ml_collections
refuse is a mistake on the command line: one line on stderr, exit status 2.
"""

from __future__ import annotations

import inspect
import os
import runpy
import sys
from collections.abc import Callable
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import paths
from alexnet_jax.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    CheckpointError,
    ConfigError,
    DatasetError,
    Diverged,
    StoppedBeforeTraining,
    TrainingError,
)

flags.disclaim_key_flags()  # a flag defined here is its caller's (--help lists it with the caller's flags)

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
KEY_HINT = "; the keys are those of the --config file, e.g. --config.model.lrn=False"
TRAIN_USAGE = """Train AlexNet, or resume the run in --workdir from its newest checkpoint.

    {prog} --config=configs/demo.py --workdir=runs/demo
    {prog} --config=configs/paper.py --config.data.root=/path/to/imagenet --workdir=runs/paper

Ctrl-C or SIGTERM saves at the step in flight and exits 75; the same command resumes."""
CONFIG_HELP = """--config.FIELD=VALUE: any field of the --config file, e.g. --config.model.towers=1,
  --config.data.root=/path/to/imagenet (ml_collections syntax; a wrong key or type is refused)."""


def program(module: str) -> str:
    """The name messages start with: the console script's (``alexnet-evaluate``) when run as one,
    else ``python -m alexnet_jax.<module>``."""
    name = os.path.basename(sys.argv[0] if sys.argv else "")
    return name if name.startswith("alexnet-") else f"python -m alexnet_jax.{module}"


def usage_error(prog: str, message: str) -> NoReturn:
    """A bad command line: one line on stderr, exit status 2."""
    print(f"{prog}: bad command line: {message} (--help lists the flags)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def require(prog: str, fv: flags.FlagValues, *names: str, what: str = "") -> None:
    """A usage error unless every flag in ``names`` was given a value."""
    missing = [f"--{n}" for n in names if fv[n].value is None]
    if missing:
        usage_error(prog, f"give {' and '.join(missing)}{what}")


def wants_help(argv: list[str]) -> bool:
    """Whether a help flag is among the program's own arguments (those before a ``--``)."""
    return any(a in HELP_ARGS for a in argv[1 : (argv + ["--"]).index("--")])


def print_help(prog: str, doc: str | None, fv: flags.FlagValues, extra: str = "") -> NoReturn:
    """``--help``: the module's docstring (its usage lines), the flags defined on ``fv``, ``extra``; exit 0."""
    text = fv.get_help(include_special_flags=False)  # absl's format, less its per-module headings
    listed = "\n".join(line for line in text.splitlines() if line.startswith("  "))
    parts = [f"usage: {prog} [flags]", doc, "flags (--flag=value or --flag value):", listed, extra]
    print("\n\n".join(p.strip("\n") for p in parts if p))
    sys.exit(0)


def parse_flags(
    prog: str,
    fv: flags.FlagValues,
    argv: list[str],
    *,
    positional: bool = False,
    known_only: bool = False,
    config: ml_collections.ConfigDict | None = None,
    key_hint: str = KEY_HINT,
) -> list[str]:
    """Parse ``argv`` into ``fv``; returns the positional arguments (refused unless ``positional``). With
    ``config``: ``--config.FIELD=VALUE`` overrides its fields, and it is locked. Whatever absl and
    ml_collections refuse is a usage error; ``key_hint`` follows a 'no such config key' message."""
    try:
        if config is not None:  # config_flags reads the overrides from argv as the flag is defined
            config_flags.DEFINE_config_dict("config", config, "The run config.", flag_values=fv, sys_argv=argv)
        rest = fv(argv, known_only=known_only)[1:]
    except (flags.Error, KeyError, AttributeError) as e:  # flags.Error: an unknown flag, a value of the wrong
        # type, an override of a field after one inside it; KeyError, AttributeError: an override key the config lacks
        while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError("'lrm'"))
            e = e.args[0]
        message = "; ".join(str(e.args[0] if e.args else e).splitlines())
        usage_error(prog, message if isinstance(e, flags.Error) else f"no such config key: {message}{key_hint}")
    if rest and not positional:
        usage_error(prog, f"unexpected arguments {rest}")
    return rest


def parse_with_config(prog: str, fv: flags.FlagValues, argv: list[str], default: str, doc: str, extra: str):
    """The ``--config=PATH`` (or ``PATH:ARG``: ``get_config(ARG)``) file's config, default ``default``, with
    the overrides on ``argv`` and ``fv``'s flags parsed (:func:`parse_flags`); ``--help``: ``doc``, ``fv``'s
    flags and ``--config``, then ``extra``. A file that cannot be read, or an argument its ``get_config()``
    does not take, is a usage error; its code runs outside any ``try``: what it raises keeps its traceback."""
    if wants_help(argv):
        flags.DEFINE_string("config", default, "Run config (a get_config() file).", flag_values=fv)
        print_help(prog, doc, fv, extra)
    spec, rest, args = default, [], iter(argv)
    for a in args:
        name, eq, value = a.partition("=")
        if name == "--config":
            spec = value if eq else next(args, "")
        else:
            rest.append(a)
    path, *arg = spec.split(":", 1)
    try:
        open(path).close()
    except OSError as e:
        usage_error(prog, f"cannot read the config file: {e}")
    get_config = runpy.run_path(path)["get_config"]
    try:
        inspect.signature(get_config).bind(*arg)
    except TypeError as e:
        usage_error(prog, f"--config={spec}: get_config() of {path}: {e}")
    config = get_config(*arg)
    parse_flags(prog, fv, rest, config=config)
    return config


def parse_command_line(argv: list[str], fv: flags.FlagValues | None = None):
    """``(config, workdir)`` from a ``launch.py`` command line (``argv[0]`` is the program name), parsed
    into ``fv`` (default: new ``FlagValues``)."""
    fv = flags.FlagValues() if fv is None else fv
    prog = os.path.basename(argv[0])
    workdir = paths.DEFINE_path("workdir", "runs/demo", "Directory for checkpoints and metrics.", flag_values=fv)
    config = parse_with_config(prog, fv, argv, "configs/demo.py", TRAIN_USAGE.format(prog=prog), CONFIG_HELP)
    return config, workdir.value


def lr_on_command_line(argv: list[str]) -> bool:
    """Whether ``--config.optim.lr`` was typed: on resume that is a manual LR drop; its absence is not."""
    return any(a.partition("=")[0] == "--config.optim.lr" for a in argv[1:])


def launch(argv: list[str]) -> None:
    """Parse, then train (or resume); every expected failure ends in one line on stderr."""
    from alexnet_jax.preemption import SignalsHeld

    def main(_):
        from alexnet_jax import train
        from alexnet_jax.data import release_shared_memory
        from alexnet_jax.preemption import sigint_blocked_in_new_workers

        logging.set_verbosity(logging.WARNING)
        try:
            with sigint_blocked_in_new_workers():
                manual_lr = config.optim.lr if lr_on_command_line(argv) else None
                result = train.train_and_evaluate(config, workdir, manual_lr=manual_lr)
        except (StoppedBeforeTraining, ConfigError, DatasetError, CheckpointError, TrainingError) as e:
            # Diverged: a status of its own, which a runner (alexnet_jax.ablate) records as a result;
            # PassInterrupted (the statistics pass, its sums kept) and StoppedBeforeTraining: their exit_code.
            print(f"{prog}: {'bad config: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
            sys.exit(EXIT_DIVERGED if isinstance(e, Diverged) else getattr(e, "exit_code", 1))
        finally:
            release_shared_memory()  # no 'leaked shared_memory' warnings from the loader at exit
        if result.get("stopped_by"):
            sys.exit(EXIT_PREEMPTED)  # saved; the same command resumes

    prog = os.path.basename(argv[0])
    with SignalsHeld():  # a signal before the training loop waits for a safe point (see SignalsHeld)
        config, workdir = parse_command_line(argv)  # on FlagValues of its own: absl's flags are not launch.py's
        app.run(main, argv=argv[:1])


def run_main(prog: str, body: Callable[[], int | None]) -> int | None:
    """Run an entry point's ``body``: Ctrl-C ends it with one line and status 130, no traceback, and
    the shared memory of any data loader it built is released first (no 'leaked shared_memory' warning)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if "grain" in sys.modules:  # a loader may have run
            from alexnet_jax.data import release_shared_memory

            release_shared_memory()


def main() -> None:
    """The ``alexnet-train`` console script: ``launch.py`` as an installed command, in the checkout."""
    sys.path.insert(0, os.getcwd())  # config files import configs.paper, as under python launch.py
    launch(sys.argv)

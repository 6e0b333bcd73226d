"""The command line of ``launch.py``: a config file, its overrides, a workdir.

``launch.py`` is only ``cli.launch(sys.argv)``. The flags are defined by
:func:`define_flags` on a ``FlagValues`` the caller chooses, so the tests
parse exactly what a user types through exactly this code
(:func:`parse_command_line`), without starting a run.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

# What a bad command line raises, from ml_collections, absl or the config file itself (ImportError: a config
# file importing a module that is not there).
BAD_COMMAND_LINE = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, ImportError)
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


TRAIN_USAGE = """Train AlexNet, or resume the run in --workdir from its newest checkpoint.

    {prog} --config=configs/demo.py --workdir=runs/demo
    {prog} --config=configs/paper.py --config.data.root=/path/to/imagenet --workdir=runs/paper

Ctrl-C or SIGTERM saves at the step in flight and exits 75; the same command resumes."""
CONFIG_HELP = """--config.FIELD=VALUE: any field of the --config file, e.g. --config.model.towers=1,
  --config.data.root=/path/to/imagenet (ml_collections syntax; a wrong key or type is refused)."""


def launch(argv: list[str]) -> None:
    """Parse, then train (or resume); every expected failure ends in one line on stderr."""
    if wants_help(argv):
        fv = flags.FlagValues()
        define_flags(fv, argv)
        prog = "launch.py" if argv and argv[0].endswith("launch.py") else "alexnet-train"
        print_help(prog, TRAIN_USAGE.format(prog=prog), fv, CONFIG_HELP)
    config_flag, workdir_flag = define_flags(flags.FLAGS, argv)

    def main(rest):
        if len(rest) > 1:
            raise app.UsageError(f"Unexpected arguments: {rest[1:]}")
        logging.set_verbosity(logging.WARNING)
        config = _config_value(config_flag)
        from alexnet_jax import ConfigError, train
        from alexnet_jax.checkpoint import CheckpointError
        from alexnet_jax.data import DatasetError, release_shared_memory
        from alexnet_jax.data.errors import PassInterrupted
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
        except PassInterrupted as e:  # the statistics pass, stopped: its sums are kept, the same command goes on
            print(f"launch.py: {e}", file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
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


# ---------------------------------------------------------------------------
# What every entry point shares: --help, flag spelling, usage errors, Ctrl-C.

EXIT_USAGE = 2  # a bad command line (argparse's status, kept by the programs that used it)
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it
HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def program(module: str) -> str:
    """The name messages start with: the console script's (``alexnet-evaluate``) when run as one,
    else ``python -m alexnet_jax.<module>``."""
    import os

    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("alexnet-") else f"python -m alexnet_jax.{module}"


def require(prog: str, fv: flags.FlagValues, *names: str, what: str = "") -> None:
    """A usage error unless every flag in ``names`` was given a value."""
    missing = [f"--{n}" for n in names if fv[n].value is None]
    if missing:
        usage_error(prog, f"give {' and '.join(missing)}{what}")


def own_args(argv: list[str]) -> list[str]:
    """The program's own arguments: those after ``argv[0]`` and before a ``--``."""
    args = list(argv[1:])
    return args[:args.index("--")] if "--" in args else args


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_ARGS for a in own_args(argv))


def flag_lines(fv: flags.FlagValues) -> str:
    """The flags defined on ``fv``, one entry each (absl's own format, without its per-module headings)."""
    text = fv.get_help(include_special_flags=False)
    return "\n".join(line for line in text.splitlines() if line.startswith("  "))


def print_help(prog: str, doc: str | None, fv: flags.FlagValues, extra: str = "") -> None:
    """``--help``: the module's docstring (its usage lines), the program's own flags; exit 0."""
    parts = [f"usage: {prog} [flags]", (doc or "").strip(), "flags (--flag=value or --flag value; "
             "--flag_name and --flag-name are the same):", flag_lines(fv)]
    if extra:
        parts.append(extra.strip("\n"))
    print("\n\n".join(p for p in parts if p))
    sys.exit(0)


def usage_error(prog: str, message: str) -> NoReturn:
    """A bad command line: one line on stderr, exit status 2."""
    print(f"{prog}: bad command line: {message} (--help lists the flags)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def checkpoint_path(prog: str, checkpoint: str | None, workdir: str | None, what: str) -> str:
    """``--checkpoint``, or its deprecated name ``--workdir`` (with a note); both, differing, or neither: exit 2."""
    if workdir is not None:
        if checkpoint is not None and checkpoint != workdir:
            usage_error(prog, f"--workdir={workdir} and --checkpoint={checkpoint}: give one "
                        "(--workdir is a deprecated name for --checkpoint)")
        print(f"{prog}: --workdir is deprecated: use --checkpoint={workdir}", file=sys.stderr)
    path = checkpoint or workdir
    if path is None:
        usage_error(prog, f"give --checkpoint=PATH: {what}")
    return path


def dashes_to_underscores(argv: list[str], fv: flags.FlagValues) -> list[str]:
    """``--num-images=8`` as ``--num_images=8`` where the underscore form is a flag of ``fv``
    (argparse's spelling, kept working); nothing after a ``--``."""
    out, own = [argv[0]], True
    for a in argv[1:]:
        if a == "--":
            own = False
        elif own and a.startswith("--") and "-" in a[2:].split("=", 1)[0]:
            name, eq, value = a[2:].partition("=")
            fixed = name.replace("-", "_")
            if name not in fv and fixed in fv:
                a = f"--{fixed}{eq}{value}"
        out.append(a)
    return out


def parse_flags(prog: str, fv: flags.FlagValues, argv: list[str], *, positional: bool = False) -> list[str]:
    """Parse ``argv`` into ``fv``; returns the positional arguments (refused unless ``positional``).
    Any error is a usage error (one line, exit 2)."""
    try:
        rest = fv(dashes_to_underscores(list(argv), fv))
    except BAD_COMMAND_LINE as e:
        usage_error(prog, describe(e))
    if rest[1:] and not positional:
        usage_error(prog, f"unexpected arguments {rest[1:]}")
    return rest[1:]


def run_main(prog: str, body: Callable[[], int | None]) -> int | None:
    """Run an entry point's ``body``: Ctrl-C ends it with one line and status 130, no traceback, and
    the shared memory of any data loader it built is released first (no 'leaked shared_memory' warning)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        release_loader_memory()


def release_loader_memory() -> None:
    """``alexnet_jax.data.release_shared_memory()`` where a grain loader ran in this process."""
    if "grain" in sys.modules:
        from alexnet_jax.data import release_shared_memory

        release_shared_memory()


def main() -> None:
    """The ``alexnet-train`` console script: ``launch.py`` as an installed command.

    ``python launch.py`` has the checkout on ``sys.path`` (the config files import
    ``configs.paper``); a console script has its own folder there instead, so the
    working directory is put first, as ``python -m`` does.
    """
    configs_importable(sys.argv)
    launch(sys.argv)


def configs_importable(argv: list[str]) -> None:
    """The working directory first on ``sys.path``, as under ``python -m`` or ``python launch.py`` from the
    checkout: config files import ``configs.paper``. (A console script has its own folder there instead.)
    A ``--config`` file in a ``configs/`` folder elsewhere: the folder above that one too."""
    import os
    from pathlib import Path

    folders = [os.getcwd()]
    args = own_args(argv)
    for i, a in enumerate(args):
        path = a.split("=", 1)[1] if a.startswith("--config=") else (
            args[i + 1] if a == "--config" and i + 1 < len(args) else None)
        if path and Path(path.split(":", 1)[0]).absolute().parent.name == "configs":
            folders.append(str(Path(path.split(":", 1)[0]).absolute().parent.parent))
    for folder in reversed(folders):
        if folder not in sys.path:
            sys.path.insert(0, folder)

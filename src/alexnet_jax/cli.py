"""The command line of every entry point: ``launch.py``'s config file and overrides, and what all share.

``launch.py`` is only ``cli.launch(sys.argv)``. Flags are defined on a
``FlagValues`` the caller chooses, so the tests parse exactly what a user types
through exactly this code (:func:`parse_command_line`) without starting a run.
A mistake on the command line ends in one line and exit status 2; an exception
raised by a config file's own code is a bug and keeps its traceback
(:func:`command_line_mistake` tells the two apart).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import paths
from alexnet_jax.errors import EXIT_INTERRUPTED, EXIT_USAGE, Diverged, TrainingError

LAUNCH_DEFAULT_CONFIG = "configs/demo.py"
_KEY_HINT = "; the keys are those of the --config file, e.g. --config.model.lrn=False"


def _launch_prog(argv: list[str]) -> str:
    return "launch.py" if argv and argv[0].endswith("launch.py") else "alexnet-train"


def define_flags(flag_values: flags.FlagValues, argv: list[str]):
    """``--config`` (a ``get_config()`` file, locked, overridable field by field) and ``--workdir``.

    ``argv`` is the whole command line: config_flags reads the overrides from
    it as soon as the flag is defined.
    """
    try:
        config = config_flags.DEFINE_config_file(
            "config",
            LAUNCH_DEFAULT_CONFIG,
            "Run config (a get_config() file).",
            flag_values=flag_values,
            sys_argv=list(argv),
        )
    except Exception as e:
        _exit_on_mistake(e, argv)
        raise
    workdir = paths.DEFINE_path(
        "workdir", "runs/demo", "Directory for checkpoints and metrics.", flag_values=flag_values
    )
    return config, workdir


def _exit_on_mistake(e: Exception, argv: list[str]) -> None:
    exit_on_command_line_mistake(_launch_prog(argv), e, config_files(argv, LAUNCH_DEFAULT_CONFIG), _KEY_HINT)


def _config_value(config_flag, argv: list[str]):
    try:
        config = config_flag.value
        config.get("model")  # a config file that could not be read raises only when first touched
    except Exception as e:  # e.g. a --config file that does not exist
        _exit_on_mistake(e, argv)
        raise
    return config


def parse_command_line(argv: list[str]):
    """``(config, workdir)`` from a ``launch.py`` command line (``argv[0]`` is the program name)."""
    fv = flags.FlagValues()
    config_flag, workdir_flag = define_flags(fv, argv)
    try:
        rest = fv(list(argv))
    except Exception as e:
        _exit_on_mistake(e, argv)
        raise
    if len(rest) > 1:
        usage_error(_launch_prog(argv), f"unexpected arguments {rest[1:]}")
    return _config_value(config_flag, argv), workdir_flag.value


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
        prog = _launch_prog(argv)
        print_help(prog, TRAIN_USAGE.format(prog=prog), fv, CONFIG_HELP)
    config_flag, workdir_flag = define_flags(flags.FLAGS, argv)

    def main(rest):
        if len(rest) > 1:
            raise app.UsageError(f"Unexpected arguments: {rest[1:]}")
        logging.set_verbosity(logging.WARNING)
        config = _config_value(config_flag, argv)
        from alexnet_jax import train
        from alexnet_jax.data import release_shared_memory
        from alexnet_jax.errors import (
            EXIT_DIVERGED,
            EXIT_PREEMPTED,
            CheckpointError,
            ConfigError,
            DatasetError,
            PassInterrupted,
            StoppedBeforeTraining,
        )
        from alexnet_jax.preemption import sigint_blocked_in_new_workers

        try:
            with sigint_blocked_in_new_workers():
                result = train.train_and_evaluate(
                    config, workdir_flag.value, manual_lr=config.optim.lr if lr_on_command_line(argv) else None
                )
        except StoppedBeforeTraining as e:
            print(f"launch.py: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except ConfigError as e:
            sys.exit(f"launch.py: bad config: {e}")
        except Diverged as e:
            print(f"launch.py: {e}", file=sys.stderr)
            sys.exit(EXIT_DIVERGED)  # its own status: a runner (alexnet_jax.ablate) records it as a result
        except PassInterrupted as e:  # the statistics pass, stopped: its sums are kept, the same command goes on
            print(f"launch.py: {e}", file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        except (DatasetError, CheckpointError, TrainingError) as e:
            sys.exit(f"launch.py: {e}")
        finally:
            release_shared_memory()  # no 'leaked shared_memory' warnings from the loader at exit
        if result.get("stopped_by"):
            sys.exit(EXIT_PREEMPTED)  # saved; the same command resumes

    def parse(args):
        try:
            return flags.FLAGS(args)
        except Exception as e:
            _exit_on_mistake(e, argv)
            raise

    from alexnet_jax.preemption import SignalsHeld

    with SignalsHeld():  # a signal before the training loop waits for a safe point (see SignalsHeld)
        app.run(main, argv=list(argv), flags_parser=parse)


# ---------------------------------------------------------------------------
# What every entry point shares: --help, flag spelling, usage errors, Ctrl-C.

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def program(module: str) -> str:
    """The name messages start with: the console script's (``alexnet-evaluate``) when run as one,
    else ``python -m alexnet_jax.<module>``."""
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
    return args[: args.index("--")] if "--" in args else args


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_ARGS for a in own_args(argv))


def flag_lines(fv: flags.FlagValues) -> str:
    """The flags defined on ``fv``, one entry each (absl's own format, without its per-module headings)."""
    text = fv.get_help(include_special_flags=False)
    return "\n".join(line for line in text.splitlines() if line.startswith("  "))


def print_help(prog: str, doc: str | None, fv: flags.FlagValues, extra: str = "") -> None:
    """``--help``: the module's docstring (its usage lines), the program's own flags; exit 0."""
    parts = [
        f"usage: {prog} [flags]",
        (doc or "").strip(),
        "flags (--flag=value or --flag value; --flag_name and --flag-name are the same):",
        flag_lines(fv),
    ]
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
            usage_error(
                prog,
                f"--workdir={workdir} and --checkpoint={checkpoint}: give one "
                "(--workdir is a deprecated name for --checkpoint)",
            )
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


def parse_flags(
    prog: str, fv: flags.FlagValues, argv: list[str], *, positional: bool = False, config_files: Sequence[str] = ()
) -> list[str]:
    """Parse ``argv`` into ``fv``; returns the positional arguments (refused unless ``positional``).
    A command-line mistake is a usage error (one line, exit 2); ``config_files``: those a config flag
    of ``fv`` loads while parsing, whose own exceptions are bugs (see :func:`command_line_mistake`)."""
    try:
        rest = fv(dashes_to_underscores(list(argv), fv))
    except Exception as e:
        exit_on_command_line_mistake(prog, e, config_files)
        raise
    if rest[1:] and not positional:
        usage_error(prog, f"unexpected arguments {rest[1:]}")
    return rest[1:]


# ---------------------------------------------------------------------------
# A mistake on the command line, or a bug?
#
# What absl and ml_collections (1.1) raise for a command line they refuse:
# * ``flags.Error``: an unknown flag, a value of the wrong type (``IllegalFlagValueError``), an override
#   before ``--config`` or one overwriting another (``FlagOrderError``), a field type that cannot be
#   overridden (``UnsupportedOperationError``);
# * ``KeyError`` or ``AttributeError`` from ml_collections' own code: an override key the config lacks;
# * ``OSError`` from ml_collections' own code, when the config is first used: a config file it could
#   not read (it keeps the error until then).
# A config file's code runs inside the same calls: what it raises (an ``AttributeError`` from a typo in
# ``get_config()``; a ``TypeError`` or ``ValueError``, which absl wraps in an ``IllegalFlagValueError``)
# is told apart by the frames it passed through, which include that file's. One case cannot be: a
# FileNotFoundError from a config file's top-level code, which ml_collections reports as the file not
# found, without its frames (the one-line message then names the file that is missing).

_ML_COLLECTIONS = os.path.dirname(os.path.abspath(ml_collections.__file__))


def _chain(e: BaseException):
    """``e`` and the exceptions it was raised from or while handling."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _ran_in(e: BaseException, files: Sequence[str]) -> bool:
    """Whether ``e`` (or an exception it came from) passed through the code of one of ``files``."""
    wanted = {os.path.realpath(f) for f in files}
    return any(
        os.path.realpath(frame.f_code.co_filename) in wanted
        for x in _chain(e)
        for frame, _ in traceback.walk_tb(x.__traceback__)
    )


def _raised_by_ml_collections(e: BaseException) -> bool:
    frames = list(traceback.walk_tb(e.__traceback__))  # the last: where it was raised
    return bool(frames) and os.path.abspath(frames[-1][0].f_code.co_filename).startswith(_ML_COLLECTIONS + os.sep)


def _message(e: BaseException) -> str:
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError('lrm'))
        e = e.args[0]
    return e.args[0] if e.args and isinstance(e.args[0], str) else str(e)


def command_line_mistake(e: BaseException, config_files: Sequence[str] = ()) -> str | None:
    """What is wrong with the command line, in one line, if ``e`` is how absl or ml_collections refuse
    it (see above); None for anything else, such as an exception from the code of one of
    ``config_files``: a bug, to be raised with its traceback."""
    if _ran_in(e, config_files):
        return None
    if isinstance(e, flags.Error):
        lines = str(e).strip().splitlines() or [type(e).__name__]
        return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
    if not _raised_by_ml_collections(e):
        return None
    if isinstance(e, (KeyError, AttributeError)):
        return "no such config key: " + "; ".join(_message(e).strip('"').splitlines())
    if isinstance(e, OSError):
        root = [x for x in _chain(e) if isinstance(x, OSError)][-1]
        return f"cannot read the config file: {str(root).strip().splitlines()[-1].strip()}"
    return None


def exit_on_command_line_mistake(
    prog: str, e: BaseException, config_files: Sequence[str] = (), key_hint: str = ""
) -> None:
    """A usage error (one line, exit 2) if ``e`` is a command-line mistake; else nothing: the caller
    re-raises. ``key_hint`` follows a 'no such config key' message."""
    what = command_line_mistake(e, config_files)
    if what is not None:
        usage_error(prog, what + (key_hint if what.startswith("no such config key") else ""))


def config_files(argv: list[str], default: str | None = None) -> list[str]:
    """The files ``--config`` names on ``argv`` (an ``:argument`` after the path dropped), and ``default``."""
    args, found = own_args(argv), []
    for i, a in enumerate(args):
        name, eq, value = a.lstrip("-").partition("=")
        if a.startswith("-") and name == "config":
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if value:
                found.append(value.split(":", 1)[0])
    return found + ([default] if default else [])


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
    """The ``alexnet-train`` console script: ``launch.py`` as an installed command."""
    configs_importable(sys.argv)
    launch(sys.argv)


def configs_importable(argv: list[str]) -> None:
    """The working directory first on ``sys.path``, as under ``python -m`` or ``python launch.py`` from the
    checkout: config files import ``configs.paper``. (A console script has its own folder there instead.)
    A ``--config`` file in a ``configs/`` folder elsewhere: the folder above that one too."""
    from pathlib import Path

    folders = [os.getcwd()]
    for path in config_files(argv):
        if Path(path).absolute().parent.name == "configs":
            folders.append(str(Path(path).absolute().parent.parent))
    for folder in reversed(folders):
        if folder not in sys.path:
            sys.path.insert(0, folder)

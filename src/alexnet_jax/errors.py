"""Every exception the package raises on purpose, and the exit statuses the commands end with.

Each is raised at a boundary (a config, a folder, a file, a command line) with a
message that says what is wrong and what to do; the commands print that one line
and exit with the status below. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal

EXIT_USAGE = 2  # a bad command line (argparse's status)
EXIT_DIVERGED = 3  # launch.py: the loss became NaN/Inf (alexnet_jax.ablate records it as a result)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved (or kept what was done); the same command goes on
EXIT_INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C, as a shell reports it


class ConfigError(ValueError):
    """A config field has a value the network, a layout or a mesh cannot be built with."""


class TrainingError(RuntimeError):
    """The run stopped for a reason the researcher must act on (message says what)."""


class Diverged(TrainingError):
    """The training loss became NaN or infinite: the run cannot go on with these settings."""


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used (see the message for what to do)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; ``step`` is the one lost, ``last_good`` the newest on disk."""

    def __init__(self, message: str, *, step: int | None, last_good: int | None):
        super().__init__(message)
        self.step, self.last_good = step, last_good


class ConvertError(ValueError):
    """Weights from elsewhere (Caffe's, torchvision's) cannot become a checkpoint: the message says which file
    and why."""


class ImageError(ValueError):
    """An input image cannot be used (the message names it and says what would work)."""


class DatasetError(ValueError):
    """The data on disk is not what the pipeline needs; the message says why."""


class DecodeError(Exception):
    """One image could not be decoded (it is skipped, never fatal)."""


class PassInterrupted(DatasetError):
    """A long pass (statistics, ``prepare``) was stopped by SIGTERM or Ctrl-C; what it finished is kept.

    ``exit_code`` is 75 (as a preempted training run): the same command continues.
    """

    exit_code = EXIT_PREEMPTED

    def __init__(self, message: str, signal_name: str = "SIGTERM", done: int = 0):
        super().__init__(message)
        self.signal_name, self.done = signal_name, done


class StoppedBeforeTraining(Exception):
    """A signal came before the first training step: nothing was trained, nothing needs saving."""

    def __init__(self, signal_name: str):
        super().__init__(
            f"stopped by {signal_name} before the first training step; nothing was written to "
            "the checkpoints. The same command starts again."
        )
        self.signal_name = signal_name
        self.exit_code = EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


class CompileForError(RuntimeError):
    """Compiling for a GPU cannot be done here; the message says why and what to do."""


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir (the message names it)."""

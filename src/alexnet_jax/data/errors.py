"""The data package's two errors, in a module of their own so every other module can raise them."""


class DatasetError(ValueError):
    """The data on disk is not what the pipeline needs; the message says why."""


class DecodeError(Exception):
    """One image could not be decoded (it is skipped, never fatal)."""


class PassInterrupted(DatasetError):
    """A long pass (statistics, ``prepare``) was stopped by SIGTERM or Ctrl-C; what it finished is kept.

    ``exit_code`` is 75 (EX_TEMPFAIL, as a preempted training run): the same command continues.
    """

    exit_code = 75

    def __init__(self, message: str, signal_name: str = "SIGTERM", done: int = 0):
        super().__init__(message)
        self.signal_name, self.done = signal_name, done

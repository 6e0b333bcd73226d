"""The data package's two errors, in a module of their own so every other module can raise them."""


class DatasetError(ValueError):
    """The data on disk is not what the pipeline needs; the message says why."""


class DecodeError(Exception):
    """One image could not be decoded (it is skipped, never fatal)."""

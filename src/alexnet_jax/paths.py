"""Paths as users type them, made absolute once, where they enter the program.

Orbax and TensorStore refuse relative paths, and a relative path saved in a config
means something else once the process runs from another folder. So every path a
user gives (a flag, a config field, an argument of the Python API) goes through
:func:`absolute` at the boundary: ``~`` expanded, made absolute against the
working directory, ``./`` and trailing ``/`` dropped, symlinks and spaces kept as
they are. URLs (``gs://...``, ``s3://...``) pass through unchanged.
"""

from __future__ import annotations

import os
import re

import ml_collections
from absl import flags
from etils import epath

from alexnet_jax.errors import CheckpointError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# The config fields that name files or folders (the data section's); launch.py's --workdir is a flag.
CONFIG_PATH_FIELDS = ("data.root", "data.packed_dir", "data.stats_path", "data.cache_dir")


def is_url(path: str | os.PathLike) -> bool:
    return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike) -> epath.Path:
    """``path`` made absolute against the working directory (``~`` expanded); a URL unchanged."""
    text = os.fspath(path)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def absolute_str(path: str | os.PathLike | None) -> str | None:
    """:func:`absolute` as a string (for configs and flags); None stays None, a URL as it is."""
    if path is None or is_url(path):
        return None if path is None else os.fspath(path)
    return os.fspath(absolute(path))


def absolute_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config with its path fields (``CONFIG_PATH_FIELDS``) absolute: a copy where one changes,
    else the config itself."""
    changes = {}
    for field in CONFIG_PATH_FIELDS:
        section, name = field.split(".")
        if section in config and name in config[section] and config[section][name]:
            value = absolute_str(config[section][name])
            if value != config[section][name]:
                changes[section, name] = value
    if not changes:
        return config
    config = config.copy_and_resolve_references()
    for (section, name), value in changes.items():
        config[section][name] = value
    return config


class _PathParser(flags.ArgumentParser):
    """A flag value is a path: parsed to its absolute form (so every entry point gets the same)."""

    syntactic_help = "a path"

    def parse(self, argument):
        return absolute_str(argument) if argument not in (None, "") else argument

    def flag_type(self):
        return "path"


def DEFINE_path(name: str, default: str | None, help: str, flag_values: flags.FlagValues, **kwargs):
    """An absl flag holding a path, made absolute when parsed (relative to where the command runs)."""
    return flags.DEFINE(
        _PathParser(), name, default, help, flag_values=flag_values, serializer=flags.ArgumentSerializer(), **kwargs
    )


def DEFINE_multi_path(name: str, default, help: str, flag_values: flags.FlagValues, **kwargs):
    """A repeatable path flag (e.g. ``--images``), each value made absolute."""
    return flags.DEFINE_multi(
        _PathParser(), flags.ArgumentSerializer(), name, default, help, flag_values=flag_values, **kwargs
    )


# ---------------------------------------------------------------------------
# A checkpoint as users name it: a run's workdir, its checkpoints/ folder or one step folder.

_GIVE = "Give a run's workdir (holding checkpoints/<step>/), its checkpoints/ folder or one checkpoints/<step>/ folder."


def _is_step_dir(p: epath.Path) -> bool:  # finished writes only (no tmp folders, no half-written steps on GCS)
    import orbax.checkpoint as ocp

    return (p / "state").is_dir() and (p / "config").is_dir() and ocp.utils.is_checkpoint_finalized(p)


def find_step_dir(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int | None]:
    """``path`` (workdir, checkpoints folder or step folder) -> (step folder, step number)."""
    root = absolute(path)  # Orbax reads absolute paths only
    if not root.exists():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the path does not exist. {_GIVE}")
    if _is_step_dir(root):
        number = int(root.name) if root.name.isdigit() else None
        if None not in (step, number) and step != number:
            raise CheckpointError(
                f"{str(path)!r} is step {number}'s checkpoint; give its parent to choose step {step}."
            )
        return root, number
    ckpt_dir = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    steps = sorted(int(c.name) for c in ckpt_dir.iterdir() if c.name.isdigit() and _is_step_dir(c))
    if not steps:
        raise CheckpointError(
            f"No finished checkpoint under {str(path)!r}. {_GIVE} "
            "A run writes its first checkpoint after checkpoint_every steps (or an epoch)."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"No checkpoint of step {step} under {str(ckpt_dir)!r}; the steps there are {steps}.")
    return ckpt_dir / str(step), step

"""Orbax checkpoints: train state, data-iterator state, config and LR history, saved together.

``<workdir>/checkpoints/<step>/`` holds ``state`` (a plain Orbax PyTree, readable without this package),
``data``, ``config`` (JSON, so a checkpoint alone rebuilds the model), ``control`` (the LR drops),
``dataset``/``dataset_stats`` (classes, mean image, eigens: inference needs no training data) and, for
imported weights, ``origin``. No failure touches the state in memory or an earlier checkpoint: an unreadable
one is moved to ``checkpoints_damaged/``, a failed write raises ``CheckpointWriteError`` and the caller may go
on. With several processes every method is collective and only process 0 moves files; a failure one host
alone sees is agreed on by all, never waited out (``distributed.WriteBarrier``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from alexnet_jax import distributed, paths
from alexnet_jax.errors import CheckpointError, CheckpointWriteError

log = logging.getLogger(__name__)


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else type(error).__name__}"


def _reason(error: BaseException) -> str:
    """The OS's words where an OS error is at the root (TensorStore gives only its number), else ``_describe``."""
    found = re.search(r"\[Errno (\d+)\]|os_error_code='?(\d+)", "".join(traceback.format_exception(error)))
    if found is None:
        return _describe(error)
    code = int(found[1] or found[2])
    return f"{os.strerror(code)} (errno {code})"


class Checkpointer:
    """Writes through one ``CheckpointManager``: the newest ``keep`` steps and the best on val/top1_error."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        # Probe before Orbax starts (its background clean-up must not outlive a refused start),
        # on every process, and agree: one host that cannot write stops them all, at once.
        error = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{jax.process_index()}-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            error = e
        failing = distributed.processes_with(error is not None)
        if failing:
            raise CheckpointError(
                f"Cannot write checkpoints to {self.directory}: "
                f"{error or f'process(es) {failing} cannot (see their messages)'}. Make the folder "
                "writable (or free the disk) on every host, or give another --workdir."
            ) from error
        self._barrier = distributed.WriteBarrier() if jax.process_count() > 1 else None
        cm = ocp.checkpoint_managers
        best = cm.BestN(
            get_metric_fn=lambda m: m["val/top1_error"], reverse=True, n=1, keep_checkpoints_without_metrics=False
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy([cm.LatestN(n=keep), best]),
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,  # half-written saves of a killed run; never a finished one
            async_options=ocp.options.AsyncOptions(barrier_sync_fn=self._barrier) if self._barrier else None,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending = None  # the step whose asynchronous write may still be running
        self.last_good = max(self.steps(), default=None)  # newest fully written step

    def save(self, step: int, state, *, data_state, config, control, metrics=None, dataset=None, origin=None):
        """Start writing ``step`` (in the background) once the previous write has finished; ``state`` is only read.

        ``dataset``: ``{'classes', 'class_names', 'stats'}`` (stats: dict of arrays or None); ``origin``: where
        imported weights came from (JSON). ``CheckpointWriteError`` when the previous write failed or this one
        cannot start.
        """
        earlier = self._finish_pending()
        if self._barrier:
            self._barrier.step = step
        try:
            stats = dataset and dataset.get("stats")
            json_items = dict(data=data_state, config=config, control=control, origin=origin)
            json_items["dataset"] = dataset and {**dataset, "stats": None if stats is None else sorted(stats)}
            items = {k: ocp.args.JsonSave(v) for k, v in json_items.items() if v is not None}
            if stats is not None:
                items["dataset_stats"] = ocp.args.StandardSave({k: np.asarray(v) for k, v in stats.items()})
            items["state"] = ocp.args.StandardSave(state)
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:
            error = self._failed(step, e)
            if earlier:  # both lost: say so for each, in order
                error = CheckpointWriteError(f"{earlier} {error}", step=step, last_good=self.last_good)
            raise error from e
        self._pending = step
        if earlier:
            raise earlier

    def wait(self) -> None:
        """Block until the running write is on disk; ``CheckpointWriteError`` if it failed."""
        error = self._finish_pending()
        if error:
            raise error

    def _finish_pending(self) -> CheckpointWriteError | None:
        """Wait for the running write and return (not raise) the error it met, if any."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            return self._failed(step, e)
        if step is not None:
            self.last_good = step

    def _failed(self, step, error) -> CheckpointWriteError:
        if self._barrier and step is not None:  # release the processes waiting for this write
            self._barrier.abort(step)
        self.manager.reload()  # forget what the failed attempt registered; the disk is the truth
        good = (
            f"the newest good checkpoint is step {self.last_good}, in {self.directory}"
            if self.last_good is not None
            else "no checkpoint has been written yet"
        )
        return CheckpointWriteError(
            f"Could not write the checkpoint for step {step} to {self.directory}: {_reason(error)}. The training "
            f"state in memory is intact and no earlier checkpoint was touched; {good}. Free disk space or make "
            "the folder writable.",
            step=step,
            last_good=self.last_good,
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state) -> dict | None:
        """The newest readable checkpoint (step, state, data, config, control), or None when there is none.

        ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with shardings) says where the arrays go, whatever
        layout they were saved from. A step any process cannot read is moved aside and the one before is tried.
        """
        me = jax.process_index()
        for step in reversed(self.steps()):
            step_dir, error = self.directory / str(step), None
            try:
                restored = read(step_dir, "data", "config", "control", state=ocp.args.StandardRestore(abstract_state))
            except Exception as e:
                error = e
                if me:  # process 0 moves it aside; only this process knows why
                    log.warning("Process %d cannot read the checkpoint at step %d: %s", me, step, _describe(e))
            if not distributed.on_any_process(error is not None):  # all processes fall back together
                return {"step": step, **restored}
            if me == 0:
                dst = self.directory.with_name("checkpoints_damaged") / f"{step}-{int(time.time())}"
                dst.parent.mkdir(exist_ok=True)
                shutil.move(step_dir, dst)
                why = _describe(error) if error else "unreadable on another process"
                log.warning(
                    "Checkpoint at step %d is damaged (%s); moved it to %s and falling back to the previous one.",
                    step,
                    why,
                    dst,
                )
            if jax.process_count() > 1:  # the others wait until it is moved
                multihost_utils.sync_global_devices(f"alexnet_jax set aside checkpoint {step}")
            self.manager.reload()
            self.last_good = max(self.steps(), default=None)
        return None

    def close(self) -> None:
        """Finish the running write (a failure is logged: ``wait()`` first to have it raised) and release."""
        error = self._finish_pending()
        try:
            self.manager.close()
        except Exception as e:  # that must not hide the error the run is already reporting
            log.warning("Closing the checkpoint manager failed after an earlier error: %s", _describe(e))
        if error:
            log.warning("%s", error)


# ---------------------------------------------------------------------------
# Reading one step folder without a manager: what inference and evaluation need.


def read(step_dir: epath.Path, *names: str, **args) -> dict:
    """Items of a step folder: JSON ones by name, the others by their ``ocp.args`` restore arguments.

    Each process reads on its own (no barrier inside): a checkpoint only some processes cannot read
    must not leave the others waiting; ``Checkpointer.restore_latest`` has them agree afterwards.
    """
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"alexnet_jax_read_{me}"
    )
    items = ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in names}, **args)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=alone) as reader:
        return dict(reader.restore(step_dir, args=items))


_WHAT_TO_GIVE = (
    "a run's workdir (holding checkpoints/<step>/), its checkpoints/ folder, "  # where to point it
    "or one checkpoints/<step>/ folder"
)


def _is_step_dir(p: epath.Path) -> bool:  # finished writes only (no tmp folders, no half-written steps on GCS)
    return (p / "state").is_dir() and (p / "config").is_dir() and ocp.utils.is_checkpoint_finalized(p)


def find_step_dir(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int | None]:
    """``path`` (workdir, checkpoints folder or step folder) -> (step folder, step number)."""
    root = paths.absolute(path)  # Orbax reads absolute paths only
    if not root.exists():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the path does not exist. Give {_WHAT_TO_GIVE}.")
    if _is_step_dir(root):
        number = int(root.name) if root.name.isdigit() else None
        if step is not None and number is not None and step != number:
            raise CheckpointError(
                f"{str(path)!r} is the checkpoint of step {number}, not step {step}; "
                "give its parent folder to choose a step."
            )
        return root, number
    ckpt_dir = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    steps = sorted(int(c.name) for c in ckpt_dir.iterdir() if c.name.isdigit() and _is_step_dir(c))
    if not steps:
        raise CheckpointError(
            f"No finished checkpoint under {str(path)!r}. Give {_WHAT_TO_GIVE}. "
            "A run writes its first checkpoint after checkpoint_every steps (or an epoch)."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"No checkpoint of step {step} under {str(ckpt_dir)!r}; the steps there are {steps}.")
    return ckpt_dir / str(step), step


def read_config(step_dir: epath.Path) -> dict:
    """The run's whole config, as saved with the step."""
    return read(step_dir, "config")["config"]


def saved_params(step_dir: epath.Path) -> Any:
    """The saved parameter tree's metadata (shapes and dtypes), read without the arrays."""
    state_dir = step_dir / "state"
    try:
        saved = ocp.StandardCheckpointHandler().metadata(state_dir).tree
    except Exception as e:
        raise CheckpointError(f"Cannot read the checkpoint in {str(state_dir)!r} ({_describe(e)}).") from e
    if "params" not in (saved or {}):
        raise CheckpointError(f"{str(state_dir)!r} holds no 'params': not an alexnet_jax train state.")
    return saved["params"]


def read_params(step_dir: epath.Path, sharding) -> tuple[int, Any]:
    """The state's step and its parameters placed with ``sharding`` (the optimizer state stays on disk)."""
    params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved_params(step_dir))
    target = {"step": jax.ShapeDtypeStruct((), np.int32), "params": params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        state = read(step_dir, state=ocp.args.PyTreeRestore(target, restore_args, partial_restore=True))["state"]
    except Exception as e:
        raise CheckpointError(
            f"Cannot read the parameters in {str(step_dir / 'state')!r} ({_describe(e)}); the checkpoint may be damaged."
        ) from e
    return int(state["step"]), state["params"]


def read_origin(step_dir: epath.Path) -> dict | None:
    """Where imported weights came from (``python -m alexnet_jax.convert``); None for a trained run."""
    return read(step_dir, "origin")["origin"] if (step_dir / "origin").is_dir() else None


def read_dataset(step_dir: epath.Path) -> tuple[list[str], list[str], dict | None]:
    """``(classes, class_names, stats)`` as the run saved them; stats: mean image and RGB eigens, or None."""
    if not (step_dir / "dataset").is_dir():
        raise CheckpointError(
            f"{str(step_dir)!r} has no dataset item (class names, mean image): not written by "
            "alexnet_jax's train_and_evaluate, or damaged."
        )
    info = read(step_dir, "dataset")["dataset"]
    stats = info["stats"] and read(step_dir, dataset_stats=ocp.args.StandardRestore())["dataset_stats"]
    return info["classes"], info["class_names"], stats and {k: np.asarray(v) for k, v in stats.items()}


def write_weights_only(out: str | os.PathLike, step: int, params, *, config: dict, dataset: dict, origin=None) -> Path:
    """A checkpoint folder ``out`` holding parameters without optimizer state (imported or exported
    weights): ``load_checkpoint``, the ``Classifier`` and evaluation read it like any other; training
    cannot resume from it. Refuses a folder that already holds checkpoints. Returns the step folder."""
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise CheckpointError(f"{out} already holds checkpoints; give an empty or new folder.")
    ckpt = Checkpointer(out, keep=1, asynchronous=False)
    try:
        state = {"step": np.int32(step), "params": params}
        ckpt.save(step, state, data_state={}, config=config, control={}, dataset=dataset, origin=origin)
        ckpt.wait()
    finally:
        ckpt.close()
    return ckpt.directory / str(step)

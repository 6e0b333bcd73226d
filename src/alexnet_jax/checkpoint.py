"""Orbax checkpoints: train state, data-iterator state, config and LR history, saved together.

``<workdir>/checkpoints/<step>/`` holds ``state`` (a plain Orbax PyTree, readable without this package),
``data``, ``config`` (JSON, so a checkpoint alone rebuilds the model), ``control`` (the LR drops),
``dataset``/``dataset_stats`` (classes, mean image, eigens: inference needs no training data) and, for
imported weights, ``origin``. No failure touches the state in memory or an earlier checkpoint: an unreadable
one is moved to ``checkpoints_damaged/``, a failed write raises ``CheckpointWriteError`` and the caller may go
on. With several processes every method is collective and only process 0 moves files; a failure one host
alone sees is agreed on by all, never waited out (``distributed.WriteBarrier``).

What stays here because Orbax does not do it: the write probe (Orbax meets a read-only folder only in its
background thread, after the run has started), the OS's reason for a failed write (TensorStore gives only
the errno's number in its text), setting a damaged step aside (Orbax's reader raises and stops), and the
processes agreeing on each of these.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from alexnet_jax import distributed
from alexnet_jax.errors import CheckpointError, CheckpointWriteError

log = logging.getLogger(__name__)


def _reason(error: BaseException) -> str:
    """The OS's words where an OS error is at the root (TensorStore gives only its number), else the first line."""
    found = re.search(r"\[Errno (\d+)\]|os_error_code='?(\d+)", "".join(traceback.format_exception(error)))
    if found:
        code = int(found[1] or found[2])
        return f"{os.strerror(code)} (errno {code})"
    first = str(error).strip().partition("\n")[0][:300]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _drop_closed_loop_noise() -> None:
    """After a failed read, TensorStore still calls back into the event loop Orbax has closed, and the
    futures it leaves are collected unread, at any time after: Python prints each as a traceback around
    the real error (which is raised as usual). From the first read on, this process drops those two kinds,
    and only those."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_noise", False):
        return

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            previous(u)

    hook.drops_closed_loop_noise = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda r: "exception was never retrieved" not in r.getMessage())


class Checkpointer:
    """Writes through one ``CheckpointManager``: the newest ``keep`` steps and the best on val/top1_error."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        # Probe on every process before Orbax starts (its background clean-up must not outlive a refused
        # start) and agree: one host that cannot write stops them all, at once.
        error = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{jax.process_index()}-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            error = e
        if failing := distributed.processes_with(error is not None):
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

    def save(self, step, state, *, data, config, control, dataset=None, origin=None, stats=None, metrics=None):
        """Start writing ``step`` (in the background) once the previous write has finished; ``state`` is only read.

        ``data`` (iterator state), ``config``, ``control`` (LR drops), ``dataset`` (classes, class names) and
        ``origin`` (of imported weights) are JSON; ``stats`` arrays (mean image, RGB eigens); None is left out.
        ``CheckpointWriteError`` names each step lost: the previous write's, this one's if it cannot start.
        """
        earlier = self._finish_pending()
        if self._barrier:
            self._barrier.step = step
        json_items = dict(data=data, config=config, control=control, dataset=dataset, origin=origin)
        items = {k: ocp.args.JsonSave(v) for k, v in json_items.items() if v is not None}
        if stats is not None:
            items["dataset_stats"] = ocp.args.StandardSave(stats)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardSave(state), **items)
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:
            raise self._failed(step, e, earlier) from e
        self._pending = step
        if earlier:
            raise earlier

    def wait(self) -> None:
        """Block until the running write is on disk; ``CheckpointWriteError`` if it failed."""
        if error := self._finish_pending():
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

    def _failed(self, step, error, earlier=None) -> CheckpointWriteError:
        if self._barrier and step is not None:  # release the processes waiting for this write
            self._barrier.abort(step)
        self.manager.reload()  # forget what the failed attempt registered; the disk is the truth
        good = (
            f"the newest good checkpoint is step {self.last_good}, in {self.directory}"
            if self.last_good is not None
            else "no checkpoint has been written yet"
        )
        text = (
            f"Could not write the checkpoint for step {step} to {self.directory}: {_reason(error)}. The training "
            f"state in memory is intact and no earlier checkpoint was touched; {good}. Free disk space or make "
            "the folder writable."
        )
        return CheckpointWriteError(f"{earlier} {text}" if earlier else text, step=step, last_good=self.last_good)

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
                    log.warning("Process %d cannot read the checkpoint at step %d: %s", me, step, _reason(e))
            if not distributed.on_any_process(error is not None):  # all processes fall back together
                return {"step": step, **restored}
            if me == 0:
                dst = self.directory.with_name("checkpoints_damaged") / f"{step}-{int(time.time())}"
                dst.parent.mkdir(exist_ok=True)
                shutil.move(step_dir, dst)
                why = _reason(error) if error else "unreadable on another process"
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
        if error := self._finish_pending():
            log.warning("%s", error)
        try:  # Orbax raises a failed write's error again here: it must not hide the one the run reports
            self.manager.close()
        except Exception as e:
            log.warning("Closing the checkpoint manager: %s", _reason(e))


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
    _drop_closed_loop_noise()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=alone) as reader:
        return dict(reader.restore(step_dir, args=items))


def read_weights(step_dir: epath.Path, sharding, check=lambda saved_params: None) -> dict:
    """A step folder's ``dataset``, ``dataset_stats`` (or None), ``origin`` (or None) and ``state``:
    its step and parameters, placed with ``sharding``. The optimizer state stays on disk. ``check`` sees the
    saved parameters' shapes and dtypes before any array is read."""
    if not (step_dir / "dataset").is_dir():
        raise CheckpointError(
            f"{str(step_dir)!r} has no dataset item (class names, mean image): not written by "
            "alexnet_jax's train_and_evaluate, or damaged."
        )
    try:
        _drop_closed_loop_noise()
        saved = ocp.StandardCheckpointHandler().metadata(step_dir / "state").tree["params"]
    except Exception as e:
        raise CheckpointError(
            f"Cannot read {str(step_dir / 'state')!r} ({_reason(e)}): not an alexnet_jax train state, or damaged."
        ) from e
    check(saved)
    try:
        params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)
        target = {"step": jax.ShapeDtypeStruct((), np.int32), "params": params}
        state = ocp.args.PyTreeRestore(
            target, ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        extra = {"dataset_stats": ocp.args.StandardRestore()} if (step_dir / "dataset_stats").is_dir() else {}
        items = read(step_dir, *[n for n in ("dataset", "origin") if (step_dir / n).is_dir()], state=state, **extra)
    except Exception as e:
        raise CheckpointError(
            f"Cannot read the checkpoint in {str(step_dir)!r} ({_reason(e)}); it may be damaged."
        ) from e
    return {"origin": None, "dataset_stats": None, **items}


def write_weights_only(out: str | os.PathLike, step: int, params, **items) -> Path:
    """A checkpoint folder ``out`` holding parameters without optimizer state (imported or exported
    weights), with ``items`` as ``Checkpointer.save`` takes them. ``load_checkpoint``, the ``Classifier``
    and evaluation read it like any other; training cannot resume from it. Returns the step folder."""
    out = Path(out)
    if any((out / "checkpoints").glob("*")):
        raise CheckpointError(f"{out} already holds checkpoints; give an empty or new folder.")
    ckpt = Checkpointer(out, keep=1, asynchronous=False)
    try:
        ckpt.save(step, {"step": np.int32(step), "params": params}, data={}, control={}, **items)
        ckpt.wait()
    finally:
        ckpt.close()
    return ckpt.directory / str(step)

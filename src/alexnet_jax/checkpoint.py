"""Orbax checkpoints: train state, data-iterator state, config and LR history, saved together.

``<workdir>/checkpoints/<step>/`` holds ``state`` (a plain Orbax PyTree, readable without this package),
``data``, ``config`` (JSON, so a checkpoint alone rebuilds the model), ``control`` (the LR drops) and
``dataset``/``dataset_stats`` (classes, mean image, eigens: inference needs no training data). No failure
touches the state in memory or an earlier checkpoint: an unreadable one is moved to ``checkpoints_damaged/``,
a failed write raises ``CheckpointError`` and the caller may go on. With several processes every method is
collective and only process 0 moves files; a failure one host alone sees is agreed on by all, never waited
out (``distributed.WriteBarrier``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from alexnet_jax import distributed, paths
from alexnet_jax.errors import CheckpointError, CheckpointWriteError

log = logging.getLogger(__name__)

BEST_METRIC = "val/top1_error"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _reason(error: BaseException) -> str:
    """The OS's words when an OS error is at the root (Orbax and TensorStore wrap them), else the first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"{os.strerror(seen.errno)} (errno {seen.errno})"
        code = re.search(r"os_error_code='?(\d+)", str(seen))
        if code:
            return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__}: {_first_line(error)}"


class Checkpointer:
    def __init__(self, workdir: str | Path, *, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.damaged_dir = Path(workdir).absolute() / "checkpoints_damaged"
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=keep),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        self._barrier = distributed.WriteBarrier() if jax.process_count() > 1 else None
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=asynchronous,
            create=True,
            cleanup_tmp_directories=True,  # half-written saves of a killed run; never a finished one
            async_options=ocp.options.AsyncOptions(barrier_sync_fn=self._barrier) if self._barrier else None,
        )
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
            what = f"{error}" if error is not None else f"process(es) {failing} cannot (see their messages)"
            raise CheckpointError(
                f"Cannot write checkpoints to {self.directory}: {what}. Make the folder "
                "writable (or free the disk) on every host, or give another --workdir."
            ) from error
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        # Reading is done by each process on its own (no barrier inside): a checkpoint that only
        # some processes cannot read must not leave the others waiting in Orbax's restore barrier.
        # The processes agree on the outcome afterwards, in one collective (restore_latest).
        me = jax.process_index()
        self._reader = ocp.Checkpointer(
            ocp.CompositeCheckpointHandler(),
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"alexnet_jax_read_{me}"
            ),
        )
        self._pending: int | None = None  # the step whose asynchronous write may still be running
        self.last_good: int | None = max(self.steps(), default=None)  # newest fully written step

    def save(self, step: int, state: Any, **items) -> None:
        """Start writing ``step`` (in the background) once the previous write has finished.

        ``items`` as for ``_start_save``. Raises ``CheckpointWriteError`` when the
        previous write failed or this one cannot start; ``state`` is only read.
        """
        earlier = self._finish_pending()
        if self._barrier is not None:
            self._barrier.step = step
        try:
            self._start_save(step, state, **items)
        except Exception as e:
            if self._barrier is not None:  # the others may already wait for this write in the background
                self._barrier.abort(step)
            self.manager.reload()  # forget what the failed attempt registered; the disk is the truth
            error = self._write_error(step, e)
            if earlier is not None:  # both lost: say so for each, in order
                error = CheckpointWriteError(f"{earlier} {error}", step=step, last_good=self.last_good)
            raise error from e
        self._pending = step
        if earlier is not None:
            raise earlier

    def _start_save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict,
        config: dict,
        control: dict,
        metrics: dict | None = None,
        dataset: dict | None = None,
        origin: dict | None = None,
    ) -> None:
        """``dataset``: ``{'classes', 'class_names', 'stats'}`` (stats: dict of arrays or None).
        ``origin``: where imported weights came from and how their inputs are prepared (JSON)."""
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            control=ocp.args.JsonSave(control),
        )
        if dataset is not None:
            stats = dataset.get("stats")
            items["dataset"] = ocp.args.JsonSave(
                {
                    "classes": list(dataset["classes"]),
                    "class_names": list(dataset["class_names"]),
                    "stats": sorted(stats) if stats is not None else None,
                }
            )
            if stats is not None:
                items["dataset_stats"] = ocp.args.StandardSave({k: np.asarray(v) for k, v in stats.items()})
        if origin is not None:
            items["origin"] = ocp.args.JsonSave(origin)
        self.manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=metrics,
            force=True,
        )

    def wait(self) -> None:
        """Block until the running write is on disk; ``CheckpointWriteError`` if it failed."""
        error = self._finish_pending()
        if error is not None:
            raise error

    def _finish_pending(self) -> CheckpointWriteError | None:
        """Wait for the running write and return (not raise) the error it met, if any."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if self._barrier is not None and step is not None:  # release the processes waiting for us
                self._barrier.abort(step)
            self.manager.reload()
            return self._write_error(step, e)
        if step is not None:
            self.last_good = step
        return None

    def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
        good = (
            f"the newest good checkpoint is step {self.last_good}, in {self.directory}"
            if self.last_good is not None
            else "no checkpoint has been written yet"
        )
        return CheckpointWriteError(
            f"Could not write the checkpoint for step {step} to {self.directory}: "
            f"{_reason(error)}. The training state in memory is intact and "
            f"no earlier checkpoint was touched; {good}. Free disk space or make the folder writable.",
            step=step,
            last_good=self.last_good,
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any of them was told to stop (several hosts)."""
        return self.manager.reached_preemption(step)

    def restore_latest(self, abstract_state: Any) -> dict | None:
        """The newest readable checkpoint as a dict, or None when there is none.

        ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with shardings) says
        where the arrays go, whatever layout they were saved from.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._reader.restore(
                    self.directory / str(step),
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore(),
                        control=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:
                restored = e
                if jax.process_index() != 0:  # process 0 moves it aside; only this process knows why
                    log.warning(
                        "Process %d cannot read the checkpoint at step %d: %s: %s",
                        jax.process_index(),
                        step,
                        type(e).__name__,
                        _first_line(e),
                    )
            if distributed.on_any_process(isinstance(restored, Exception)):  # all processes fall back together
                self._set_aside(step, restored if isinstance(restored, Exception) else None)
                continue
            return {
                "step": step,
                "state": restored["state"],
                "data": restored["data"],
                "config": restored["config"],
                "control": restored["control"],
            }
        return None

    def _set_aside(self, step: int, error: Exception | None) -> None:
        """Move a damaged step out of the way (process 0 only; the others wait for it)."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            self.damaged_dir.mkdir(parents=True, exist_ok=True)
            dst = self.damaged_dir / f"{step}-{int(time.time())}"
            shutil.move(str(src), str(dst))
            why = (
                f"{type(error).__name__}: {_first_line(error)}"
                if error is not None
                else "unreadable on another process"
            )
            log.warning(
                "Checkpoint at step %d is damaged (%s); moved it to %s and falling back to the previous one.",
                step,
                why,
                dst,
            )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"alexnet_jax set aside checkpoint {step}")
        self.manager.reload()
        self.last_good = max(self.steps(), default=None)

    def close(self) -> None:
        """Finish the running write (a failure is logged: ``wait()`` first to have it raised) and release."""
        error = self._finish_pending()
        try:
            self._reader.close()
            self.manager.close()
        except Exception as e:
            # that must not hide the error the run is already reporting.
            log.warning("Closing the checkpoint manager failed after an earlier error: %s", _first_line(e))
        if error is not None:
            log.warning("%s", error)


# ---------------------------------------------------------------------------
# Reading one step folder without a manager: what inference and evaluation need.

_WHAT_TO_GIVE = (
    "a run's workdir (holding checkpoints/<step>/), its checkpoints/ folder, "  # where to point it
    "or one checkpoints/<step>/ folder"
)


def _is_step_dir(p: epath.Path) -> bool:
    return (p / "state").is_dir() and (p / "config").is_dir()


def find_step_dir(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int | None]:
    """``path`` (workdir, checkpoints folder or step folder) -> (step folder, step number).

    Only finished writes count (no tmp folders, no half-written steps on GCS).
    """
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
    steps = sorted(
        int(c.name)
        for c in ckpt_dir.iterdir()
        if c.name.isdigit() and c.is_dir() and _is_step_dir(c) and ocp.utils.is_checkpoint_finalized(c)
    )
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
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config")


def saved_params(step_dir: epath.Path) -> Any:
    """The saved parameter tree's metadata (shapes and dtypes), read without the arrays."""
    state_dir = step_dir / "state"
    try:
        saved = ocp.StandardCheckpointHandler().metadata(state_dir).tree
    except Exception as e:
        raise CheckpointError(
            f"Cannot read the checkpoint in {str(state_dir)!r} ({type(e).__name__}: {_first_line(e)})."
        ) from e
    if saved is None or "params" not in saved:
        raise CheckpointError(f"{str(state_dir)!r} holds no 'params': not an alexnet_jax train state.")
    return saved["params"]


def read_params(step_dir: epath.Path, sharding) -> Any:
    """Only the parameters (the optimizer state stays on disk), placed with ``sharding``."""
    target = {
        "params": jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved_params(step_dir)
        )
    }
    try:
        return ocp.PyTreeCheckpointer().restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            ),
        )["params"]
    except Exception as e:
        raise CheckpointError(
            f"Cannot read the parameters in {str(step_dir / 'state')!r} "
            f"({type(e).__name__}: {_first_line(e)}); the checkpoint may be damaged."
        ) from e


def read_step(step_dir: epath.Path) -> int:
    """The step a state holds (for a step folder copied under another name)."""
    meta = ocp.StandardCheckpointHandler().metadata(step_dir / "state").tree["step"]
    return int(
        ocp.PyTreeCheckpointer().restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item={"step": jax.ShapeDtypeStruct(meta.shape, meta.dtype)},
                restore_args={"step": ocp.RestoreArgs(restore_type=np.ndarray)},
                partial_restore=True,
            ),
        )["step"]
    )


def read_origin(step_dir: epath.Path) -> dict | None:
    """Where imported weights came from (``python -m alexnet_jax.convert``); None for a trained run."""
    if not (step_dir / "origin").is_dir():
        return None
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "origin")


def read_dataset(step_dir: epath.Path) -> tuple[list[str], list[str], dict | None]:
    """``(classes, class_names, stats)`` as the run saved them; stats: mean image and RGB eigens, or None."""
    if not (step_dir / "dataset").is_dir():
        raise CheckpointError(
            f"{str(step_dir)!r} has no dataset item (class names, mean image): not written by "
            "alexnet_jax's train_and_evaluate, or damaged."
        )
    info = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "dataset")
    stats = None
    if info["stats"] is not None:
        stats = {k: np.asarray(v) for k, v in ocp.StandardCheckpointer().restore(step_dir / "dataset_stats").items()}
    return info["classes"], info["class_names"], stats


def write_weights_only(
    out: str | os.PathLike, step: int, params: Any, *, config: dict, dataset: dict, origin: dict | None = None
) -> Path:
    """A checkpoint folder ``out`` holding parameters without optimizer state (imported or exported
    weights): ``load_checkpoint``, the ``Classifier`` and evaluation read it like any other; training
    cannot resume from it. Refuses a folder that already holds checkpoints. Returns the step folder."""
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise CheckpointError(f"{out} already holds checkpoints; give an empty or new folder.")
    ckpt = Checkpointer(out, keep=1, asynchronous=False)
    try:
        ckpt.save(
            step,
            {"step": np.int32(step), "params": params},
            data_state={},
            config=config,
            control={},
            dataset=dataset,
            origin=origin,
        )
        ckpt.wait()
    finally:
        ckpt.close()
    return ckpt.directory / str(step)

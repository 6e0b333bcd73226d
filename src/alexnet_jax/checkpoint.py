"""Orbax checkpoints: train state, data-iterator state, config and LR history, together.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config,control,dataset,dataset_stats}``.
``state`` is an ordinary Orbax PyTree (``step``, ``params``, ``opt_state``, ``rng``),
so two plain Orbax calls read it anywhere; ``config`` is the run's config as JSON, so a
checkpoint alone rebuilds the model. ``dataset`` (class ids and names, JSON) and
``dataset_stats`` (mean image, RGB eigens) are what inference needs on a machine
without the training data. Saving is asynchronous; the last K checkpoints and the
best by validation top-1 error are kept.

A checkpoint that cannot be read (truncated or missing files) is moved aside
to ``<workdir>/checkpoints_damaged/`` with a warning, never deleted, and the
previous one is used.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

BEST_METRIC = "val/top1_error"


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used (see the message for what to do)."""


class Checkpointer:
    def __init__(self, workdir: str | Path, *, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.damaged_dir = Path(workdir).absolute() / "checkpoints_damaged"
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=asynchronous, create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointError(f"Cannot use checkpoint directory {self.directory}: {e}") from e

    def save(self, step: int, state: Any, *, data_state: dict, config: dict, control: dict,
             metrics: dict | None = None, dataset: dict | None = None) -> None:
        """``dataset``: ``{'classes', 'class_names', 'stats'}`` (stats: dict of arrays or None)."""
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            control=ocp.args.JsonSave(control),
        )
        if dataset is not None:
            stats = dataset.get("stats")
            items["dataset"] = ocp.args.JsonSave({
                "classes": list(dataset["classes"]), "class_names": list(dataset["class_names"]),
                "stats": sorted(stats) if stats is not None else None})
            if stats is not None:
                items["dataset_stats"] = ocp.args.StandardSave({k: np.asarray(v) for k, v in stats.items()})
        self.manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=metrics,
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> dict | None:
        """The newest readable checkpoint as a dict, or None when there is none.

        ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with shardings) says
        where the arrays go, whatever layout they were saved from.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore(),
                        control=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
                self._set_aside(step, e)
                continue
            return {"step": step, "state": restored["state"], "data": restored["data"],
                    "config": restored["config"], "control": restored["control"]}
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        src = self.directory / str(step)
        self.damaged_dir.mkdir(parents=True, exist_ok=True)
        dst = self.damaged_dir / f"{step}-{int(time.time())}"
        shutil.move(str(src), str(dst))
        self.manager.reload()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("Checkpoint at step %d is damaged (%s: %s); moved it to %s and falling back to "
                    "the previous one.", step, type(error).__name__, first_line[:300], dst)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

"""Several processes (hosts) as one run, on JAX's distributed runtime (gloo on CPU).

Every process runs the same command and finds the others through process 0's ``host:port``, from the
``distributed`` config section, the ``JAX_*`` environment (``ENV``) or JAX's own detection (``auto``);
the how-to is docs/fault-tolerance.md. The mesh spans every process's devices, each process feeds its
own rows of each global batch (:func:`process_batch_shard`), and anything decided on one process
(``DROP_LR``) is broadcast from process 0, so all take the same steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import jax
import numpy as np

from alexnet_jax.errors import ConfigError

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def settings(cfg=None, environ: Mapping[str, str] = os.environ) -> dict | None:
    """The explicit multi-process settings (config first, then environment), or None for one process.

    Raises ConfigError when only some are given, naming what is missing.
    """
    cfg = cfg or {}
    got = {}
    for field, var in ENV.items():
        value = cfg.get(field) if cfg.get(field) is not None else environ.get(var)
        if value not in (None, ""):
            got[field] = value
    if not got:
        return None
    missing = [f"distributed.{f} (or ${ENV[f]})" for f in ENV if f not in got]
    if missing:
        raise ConfigError(
            f"A multi-process run needs the coordinator address, the number of processes and "
            f"this process's id; missing: {', '.join(missing)}."
        )
    try:
        n, i = int(got["num_processes"]), int(got["process_id"])
    except ValueError:
        raise ConfigError(
            f"num_processes and process_id must be integers, got {got['num_processes']!r} and {got['process_id']!r}."
        ) from None
    if not 0 <= i < n:
        raise ConfigError(f"process_id={i} must be in [0, num_processes={n}).")
    if ":" not in str(got["coordinator_address"]):
        raise ConfigError(
            f"coordinator_address={got['coordinator_address']!r} must be host:port "
            "(process 0's host, any free port all processes agree on)."
        )
    return {"coordinator_address": str(got["coordinator_address"]), "num_processes": n, "process_id": i}


def initialize(cfg=None, environ: Mapping[str, str] = os.environ) -> bool:
    """Join the multi-process run the config or environment describes; True if there is one.

    Must run before anything starts JAX's backend (as ``use_virtual_cpu_devices``).
    Calling it again in the same process (a second ``train.train_and_evaluate``) is a no-op.
    """
    explicit = settings(cfg, environ)
    auto = bool((cfg or {}).get("auto", False))
    if explicit is None and not auto:
        return False
    if jax.distributed.is_initialized():
        return True
    from alexnet_jax._jax_internals import backends_are_initialized  # no public query for this

    if backends_are_initialized():
        raise RuntimeError(
            "A multi-process run must join the distributed runtime before JAX starts its backend; "
            "call alexnet_jax.train.train_and_evaluate (or distributed.initialize) first thing."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes exchange over TCP
    timeout = int((cfg or {}).get("timeout_s") or 300)
    if explicit is None:
        jax.distributed.initialize(initialization_timeout=timeout)  # SLURM, Open MPI, TPU, k8s detection
    else:
        jax.distributed.initialize(**explicit, initialization_timeout=timeout)
    return True


def process_batch_shard(mesh) -> tuple[int, int]:
    """``(shard_index, shard_count)``: this process feeds block ``shard_index`` of ``shard_count``
    equal, contiguous blocks of rows of every global batch.

    The rows are those of the ``data`` positions this process's devices hold, so processes that share
    positions (a tower pair split across hosts) read the same block.
    """
    from alexnet_jax.parallel import DATA_AXIS

    data_size = mesh.shape[DATA_AXIS]
    axis = mesh.axis_names.index(DATA_AXIS)
    me = jax.process_index()
    rows = sorted(
        {
            int(np.unravel_index(k, mesh.devices.shape)[axis])
            for k, d in enumerate(mesh.devices.flat)
            if d.process_index == me
        }
    )
    if not rows:
        raise ConfigError(
            f"Process {me} holds no device of the mesh {dict(mesh.shape)}; every process "
            "must take part (check mesh.data against the number of devices)."
        )
    n = len(rows)
    if rows != list(range(rows[0], rows[0] + n)) or rows[0] % n or data_size % n:
        raise ConfigError(
            f"Process {me} holds data positions {rows} of {data_size}: not one aligned block, "
            "so it cannot read a contiguous slice of the batch. Give every process the same "
            "number of devices."
        )
    return rows[0] // n, data_size // n


def main_first(fn):
    """``fn()`` on process 0, then (after a barrier) on the others: files it makes are made once."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("alexnet_jax main_first")
    return out if jax.process_index() == 0 else fn()


def broadcast_from_main(value: float | None) -> float | None:
    """Process 0's ``value`` on every process, bit for bit (None travels as NaN); one collective."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    bits = np.array([np.nan if value is None else value], np.float64).view(np.uint32)  # no x64 needed
    with jax.transfer_guard("allow"):  # the collective's own copies, inside the training loop's guard
        out = float(np.asarray(multihost_utils.broadcast_one_to_all(bits), np.uint32).view(np.float64)[0])
    return None if np.isnan(out) else out


def requested_drop_everywhere(workdir) -> float | None:
    """``optim.requested_drop`` read by process 0 only (it removes the file), its answer on all."""
    from alexnet_jax import optim

    error = None
    if jax.process_index() == 0:
        try:
            factor = optim.requested_drop(workdir)
        except ValueError as e:
            factor, error = -1.0, e
    else:
        factor = None
    factor = broadcast_from_main(factor)
    if factor == -1.0:  # process 0 could not read the file: every process stops with its message
        raise error or ValueError(f"process 0 could not read {optim.DROP_FILE} in {workdir}; see its message")
    return factor


def processes_with(flag: bool) -> list[int]:
    """The processes whose ``flag`` is set (one small collective when there are several)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    from jax.experimental import multihost_utils

    with jax.transfer_guard("allow"):  # the collective's own copies, inside the training loop's guard
        return [int(i) for i in np.flatnonzero(np.asarray(multihost_utils.process_allgather(np.int32(flag))))]


def on_any_process(flag: bool) -> bool:
    """``flag`` OR-ed over all processes."""
    return bool(processes_with(flag))


class WriteBarrier:
    """Orbax's end-of-write barrier for checkpoints (run in its background save thread), made abortable.

    Orbax's own barrier waits up to 20 minutes for a process whose part of the write failed, then leaves
    the processes out of step. Here each arrival is a key in JAX's key-value store, and a failed process
    posts an abort for the step (``abort``): the others fail the same write, and all report the same step.
    """

    PREFIX = "alexnet_jax/checkpoint_write"

    def __init__(self):
        from alexnet_jax._jax_internals import distributed_client  # the runtime's key-value store

        self.client = distributed_client()
        self.step: int | None = None  # the step whose write is running

    def abort(self, step: int) -> None:
        self.client.key_value_set(f"{self.PREFIX}/abort/{step}/{jax.process_index()}", "1", allow_overwrite=True)

    def __call__(self, *, key: str, timeout_ms: int) -> None:
        here = f"{self.PREFIX}/arrived/{key}/"
        self.client.key_value_set(f"{here}{jax.process_index()}", "1", allow_overwrite=True)
        deadline = time.monotonic() + timeout_ms / 1000
        while len(self.client.key_value_dir_get(here)) < jax.process_count():
            failed = self.client.key_value_dir_get(f"{self.PREFIX}/abort/{self.step}/")
            if failed:
                who = sorted(int(k.rsplit("/", 1)[1]) for k, _ in failed)
                raise RuntimeError(f"process(es) {who} could not write their part of step {self.step}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Timed out after {timeout_ms / 1000:.0f} s waiting for every process "
                    f"to finish writing step {self.step}"
                )
            time.sleep(0.02)

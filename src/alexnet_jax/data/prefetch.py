"""Host batches onto the mesh, a few ahead, from a thread: the one prefetcher, for training and evaluation.

Each host batch becomes global arrays sharded over the mesh's ``data`` axis (``to_global``: the
one host-to-device copy of the loops, named so under a transfer guard). A thread reads the loader
and copies while the steps in flight run, so neither sits between two steps.
"""

from __future__ import annotations

import queue
import threading
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

BATCH_KEYS = ("image", "label", "mask", "crop_yx", "flip", "alpha")  # the last three: what the step normalises with


def to_global(batch: dict, mesh) -> dict:
    """This process's slice of the batch -> global arrays sharded over 'data' (an explicit transfer)."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    with jax.transfer_guard_host_to_device("allow"):
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()
            if k in BATCH_KEYS
        }


class DevicePrefetch:
    """Yields ``to_global(batch)`` for each batch of ``batches``, ``depth`` ahead, read on a thread.

    ``with_state``: yields ``(batch, batches.get_state() after it)`` instead. The thread runs ahead, so
    checkpoint a step with the state that came with its batch, not ``batches.get_state()``. A loader
    error is raised by the ``next`` that would have returned that batch. ``close`` (or leave the
    ``with`` block) before closing the loader: nothing else may read it meanwhile. ``waited``: the
    seconds ``next`` has spent waiting for the loader (the loop was input-bound then).
    """

    _END = object()

    def __init__(self, batches, mesh, depth: int = 2, *, with_state: bool = False):
        self._source, self._mesh, self._with_state, self.waited = batches, mesh, with_state, 0.0
        self._iter = batches if hasattr(batches, "__next__") else iter(batches)  # a loader, or a list
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="alexnet_jax-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                batch = to_global(next(self._iter), self._mesh)
                self._put((batch, self._source.get_state()) if self._with_state else batch)
        except StopIteration:
            self._put(self._END)
        except BaseException as e:
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        start = time.perf_counter()
        item = self._queue.get()
        self.waited += time.perf_counter() - start
        if item is self._END:
            self._stop.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Stopping when the cluster asks: on SIGTERM or Ctrl-C the run finishes the step in flight,
saves a checkpoint at that step and exits with ``EXIT_PREEMPTED``; the same command resumes.

One process catches the signal itself. Several must agree on the step, however many got the signal,
so there it goes through JAX's preemption service (the SIGTERM notifier ``jax.distributed.initialize``
installs; Orbax's ``reached_preemption``): a Ctrl-C is handed to it as a SIGTERM. A second Ctrl-C
exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

from alexnet_jax.errors import StoppedBeforeTraining

# Exit status of a run stopped by a signal after saving: EX_TEMPFAIL ("try again"), so a
# requeue script can tell "stopped, run me again" (75) from "done" (0) and "broken" (1).


class StopOnSignal:
    """Context manager for the training loop; ``due(step)``, asked once per step, names the signal.

    ``due`` returns ``'SIGTERM'`` or ``'SIGINT'`` at the step to save and stop at, else None.
    ``reached_sync_point``: the multi-process agreement (Orbax's ``reached_preemption``), None for one
    process. Handlers are installed only in the main thread and restored on exit.
    """

    def __init__(self, reached_sync_point: Callable[[int], bool] | None = None):
        self.reached_sync_point = reached_sync_point
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
        if held_signal() is not None:  # sent during start-up: stop before training, there is nothing to save
            raise StoppedBeforeTraining(held_signal())
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread; a run in a thread has no handlers
        signals = [signal.SIGINT]
        if self.reached_sync_point is None:  # several processes: SIGTERM belongs to JAX's notifier
            signals.append(signal.SIGTERM)
        for s in signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # asked twice: stop now, whatever is half done
            os.write(2, f"\n{name} again: exiting at once, without saving.\n".encode())
            os._exit(128 + signum)
        self.received = name
        os.write(
            2,
            f"\n{name}: finishing the step in flight, then saving a checkpoint and stopping "
            f"(send it again to exit at once).\n".encode(),
        )
        if self.reached_sync_point is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells every process

    def due(self, step: int) -> str | None:
        if self.reached_sync_point is None:
            return self.received
        if self.reached_sync_point(step):  # every process gets True at the same step
            return self.received or "SIGTERM"
        return None


# ---------------------------------------------------------------------------
# Before the loop: a signal is held until a safe point takes it.

_held: SignalsHeld | None = None


class SignalsHeld:
    """While entered (main thread), SIGINT and SIGTERM are recorded, not raised: a program's start-up
    (imports, compiling, scanning folders) has no safe point to stop at, and a ``KeyboardInterrupt``
    there prints tracebacks or lands in a C callback. The next safe point takes the signal:
    :func:`held_signal` for the folder scan and the passes, :class:`StopOnSignal` for training. A second
    signal exits at once. ``launch.py`` blocks both signals before its imports; entering unblocks them,
    so one sent during the imports arrives here.
    """

    def __init__(self):
        self.name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> SignalsHeld:
        global _held
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._on_signal)
            _held = self
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        return self

    def __exit__(self, *exc) -> None:
        global _held
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous, _held = {}, None

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.name is not None:
            os.write(2, f"\n{name} again: exiting at once.\n".encode())
            os._exit(128 + signum)
        self.name = name
        os.write(2, f"\n{name}: stopping at the next safe point (send it again to exit at once).\n".encode())


def held_signal() -> str | None:
    """The signal a :class:`SignalsHeld` has recorded and nothing has taken yet, else None."""
    return _held.name if _held is not None else None


@contextlib.contextmanager
def sigint_blocked_in_new_workers():
    """Worker processes started in here begin life with SIGINT blocked. A Ctrl-C reaches the whole
    process group; a worker still importing its modules (seconds, before its own init ignores SIGINT)
    would print a KeyboardInterrupt traceback of its own. Blocked, the signal waits and is then dropped by
    that init; in this process it is blocked only while ``Process.start`` runs, and delivered right after."""
    import multiprocessing.process

    cls = multiprocessing.process.BaseProcess
    original = cls.start

    def start(self):
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            original(self)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    cls.start = start
    try:
        yield
    finally:
        cls.start = original

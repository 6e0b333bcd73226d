"""Stopping when the cluster asks: on SIGTERM or Ctrl-C the run finishes the step in flight,
saves a checkpoint at that step and exits with ``EXIT_PREEMPTED``; the same command resumes.

Schedulers stop jobs with SIGTERM and, a grace period later, SIGKILL (preemption,
time limits, ``scancel``, spot instances). One process catches the signal itself.
Several processes must agree on the step to save at, so there the signal goes
through JAX's preemption service: ``jax.distributed.initialize`` installs a
SIGTERM notifier, and Orbax's ``CheckpointManager.reached_preemption(step)``
(JAX's ``reached_preemption_sync_point``) answers True on every process at the
same step, however many of them got the signal. A Ctrl-C in a multi-process
run is handed to that notifier as a SIGTERM. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

# Exit status of a run stopped by a signal after saving: EX_TEMPFAIL ("try again"), so a
# requeue script can tell "stopped, run me again" (75) from "done" (0) and "broken" (1).
EXIT_PREEMPTED = 75


class StopOnSignal:
    """Context manager for the training loop; ``due(step)`` is asked once per step.

    ``due`` returns the signal's name (``'SIGTERM'``, ``'SIGINT'``) at the step
    where the run should save and stop, else None. ``reached_sync_point(step)``
    is the multi-process agreement (Orbax's ``reached_preemption``); None for one
    process. Handlers are installed only in the main thread and restored on exit.
    """

    def __init__(self, reached_sync_point: Callable[[int], bool] | None = None):
        self.reached_sync_point = reached_sync_point
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
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
        os.write(2, f"\n{name}: finishing the step in flight, then saving a checkpoint and stopping "
                    f"(send it again to exit at once).\n".encode())
        if self.reached_sync_point is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells every process

    def due(self, step: int) -> str | None:
        if self.reached_sync_point is None:
            return self.received
        if self.reached_sync_point(step):  # every process gets True at the same step
            return self.received or "SIGTERM"
        return None

"""Stopping when the cluster asks: on SIGTERM or Ctrl-C the run finishes the step in flight,
saves a checkpoint at that step and exits with ``EXIT_PREEMPTED``; the same command resumes.

One process catches the signal itself. Several must agree on the step, however many got the signal,
so there it goes through JAX's preemption service (the SIGTERM notifier ``jax.distributed.initialize``
installs; Orbax's ``reached_preemption``): a Ctrl-C is handed to it as a SIGTERM. A second Ctrl-C
exits at once.
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

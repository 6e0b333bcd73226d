"""Progress of a long pass over images (statistics, ``prepare``): a bar on a terminal, plain lines in a log.

On a terminal it is rich's live bar. Off a terminal (SLURM, ``nohup``, ``> log``)
a bar prints nothing until the end, so it prints a plain line instead every
``every_s`` seconds (30; ``$ALEXNET_JAX_PROGRESS_EVERY_S`` overrides) and one at
the end, the way :class:`alexnet_jax.progress.TrainProgress` does for training::

    statistics: 12,345/1,281,167 images (1%), 410 img/s, ETA 51m
"""

from __future__ import annotations

import os
import sys
import time

EVERY_S = 30.0


def duration(seconds: float) -> str:
    """``45s``, ``5m30s``, ``51m``, ``2h05m``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(max(seconds, 0) + 0.5)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m >= 10:
        return f"{m}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class PassProgress:
    """``update(done)`` with the images done so far (``start`` of them before this run, if resumed)."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        enabled: bool = True,
        start: int = 0,
        every_s: float | None = None,
        unit: str = "images",
        stream=None,
    ):
        self.label, self.total, self.enabled, self.unit = label, int(total), enabled, unit
        self.start = self.done = int(start)
        self._t0 = self._last = time.perf_counter()
        self.every_s = float(os.environ.get("ALEXNET_JAX_PROGRESS_EVERY_S", EVERY_S)) if every_s is None else every_s
        self.stream = stream or sys.stdout
        self.bar = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(file=self.stream)
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
            )
            self._task = self.bar.add_task(label, total=self.total, completed=self.start)
            self.bar.start()
        elif self.start:
            self._print(
                f"{label}: resuming at {self.start:,}/{self.total:,} {unit} "
                f"({self._percent(self.start)}), done by an earlier run"
            )

    def _percent(self, n: int) -> str:
        return f"{100 * n // max(self.total, 1)}%"

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def line(self, done: int, final: bool = False) -> str:
        """The plain progress line for ``done`` images, now."""
        elapsed = time.perf_counter() - self._t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        head = f"{self.label}: {done:,}/{self.total:,} {self.unit} ({self._percent(done)}), {rate:,.0f} img/s"
        if final:
            return f"{head}, took {duration(elapsed)}"
        return f"{head}, ETA {duration((self.total - done) / rate) if rate > 0 else '?'}"

    def update(self, done: int) -> None:
        self.done = int(done)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self._task, completed=self.done)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            self._print(self.line(self.done))

    def close(self, finished: bool = True) -> None:
        """Stop the bar; off a terminal, the last line (when the pass finished)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif finished:
            self._print(self.line(self.done, final=True))

    def __enter__(self) -> PassProgress:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self.close(finished=exc_type is None)

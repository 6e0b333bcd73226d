"""The progress a researcher watches: step, loss, learning rate, images/s, time left.

On a terminal it is a live bar. When stdout is not a terminal (SLURM logs,
``nohup``, a pipe) a bar would print nothing until the end, so it writes a
plain line every ``plain_every_s`` seconds instead, and at the last step.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class TrainProgress:
    def __init__(
        self,
        total_steps: int,
        start_step: int,
        batch_size: int,
        enabled: bool = True,
        console: Console | None = None,
        plain_every_s: float = 30.0,
    ):
        self.enabled, self.batch_size, self.total, self._bound = enabled, batch_size, total_steps, ""
        self._t, self._step = time.perf_counter(), start_step
        if not enabled:
            return
        self.console = console or Console()
        self.live = self.console.is_terminal
        self._plain_every, self._plain_t, self._plain_step = plain_every_s, self._t, start_step
        if not self.live:
            return
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s{task.fields[bound]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.bar.add_task(
            "train", total=total_steps, completed=start_step, loss="-", lr="-", ips="-", bound=""
        )
        self.bar.start()

    def update(self, step: int, *, loss: float, lr: float, input_wait: float | None = None) -> None:
        """``input_wait``: the share of the last window spent waiting for input; over 10% says input-bound."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if input_wait is not None:
            self._bound = f"  input-bound ({100 * input_wait:.0f}% waiting for data)" if input_wait > 0.1 else ""
        if self.live:
            ips = (step - self._step) * self.batch_size / max(now - self._t, 1e-9)
            self._t, self._step = now, step
            self.bar.update(
                self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.3g}", ips=f"{ips:,.0f}", bound=self._bound
            )
            return
        if now - self._plain_t < self._plain_every and step < self.total:
            return
        steps = step - self._plain_step
        rate = steps / max(now - self._plain_t, 1e-9)  # steps/s over the interval since the last line
        left = (self.total - step) / rate if rate > 0 else float("nan")
        self.console.print(
            f"train step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)  "
            f"loss {loss:.4f}  lr {lr:.3g}  {rate * self.batch_size:,.0f} img/s  "
            f"left {_duration(left) if left == left else '?'}{self._bound}",
            highlight=False,
            soft_wrap=True,
        )
        self._plain_t, self._plain_step = now, step

    def note(self, text: str) -> None:
        if self.enabled:
            (self.bar.console if self.live else self.console).print(text, soft_wrap=not self.live)

    def close(self) -> None:
        if self.enabled and self.live:
            self.bar.stop()

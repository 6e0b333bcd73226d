"""The progress bar a researcher watches: step, loss, learning rate, images/s, ETA."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool = True):
        self.enabled, self.batch_size = enabled, batch_size
        self._t, self._step = time.perf_counter(), start_step
        if not enabled:
            return
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step,
                                      loss="-", lr="-", ips="-")
        self.bar.start()

    def update(self, step: int, *, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        ips = (step - self._step) * self.batch_size / max(now - self._t, 1e-9)
        self._t, self._step = now, step
        self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.3g}", ips=f"{ips:,.0f}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()

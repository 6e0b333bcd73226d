"""Where training metrics go: ``metrics.jsonl``, TensorBoard event files, the progress line,
and the checks that stop a run (a non-finite loss, too many bad input batches)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
from rich.markup import escape


class TrainingError(RuntimeError):
    """The run stopped for a reason the researcher must act on (message says what)."""


class MetricWriter:
    """``<workdir>/metrics.jsonl`` (one object per line) and TensorBoard event files."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # optional: metrics.jsonl has everything
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) if not isinstance(v, str) else v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if not isinstance(v, str):
                    self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


class StepMetrics:
    """Each step's metrics, still on the devices until ``process`` fetches them (one sync for many).

    The loop adds a step's metrics after dispatching it and processes the earlier
    ones then, so fetching never waits for the step just queued. ``process``
    writes every ``log_every``-th row (and the last one fetched), updates the
    progress line, reports batches with NaN/Inf inputs (the step skipped them)
    and raises ``TrainingError`` on a non-finite loss or more than ``max_bad``
    bad batches. ``resume_hint()`` says where the run can resume from.
    """

    def __init__(self, writer: MetricWriter, progress, *, log_every: int, max_bad: int,
                 resume_hint: Callable[[], str]):
        self.writer, self.progress, self.log_every, self.max_bad = writer, progress, log_every, max_bad
        self.resume_hint = resume_hint
        self.pending: list[tuple[int, dict]] = []
        self.bad_batches = 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def process(self, *, keep_newest: int = 0) -> None:
        """Fetch and act on all pending steps but the ``keep_newest`` most recent."""
        cut = len(self.pending) - keep_newest
        if cut <= 0:
            return
        rows, self.pending = jax.device_get(self.pending[:cut]), self.pending[cut:]
        good = [(s, m) for s, m in rows if self._check(s, m)]
        for s, m in good:
            if s % self.log_every == 0 or s == rows[-1][0]:
                self.writer.write(s, m)
        if good:
            s, m = good[-1]
            self.progress.update(s, loss=float(m["train/loss"]), lr=float(m["train/lr"]))

    def _check(self, s: int, m: dict) -> bool:
        bad = int(m["train/nonfinite_inputs"])
        if bad:
            self.bad_batches += 1
            self.progress.note(escape(
                f"Step {s}: its input batch (batch {s - 1} of the training stream) has {bad} NaN/Inf values; "
                f"the step was skipped and the parameters left unchanged ({self.bad_batches} bad batch(es) "
                f"so far, at most {self.max_bad})."))
            self.writer.write(s, {"train/nonfinite_inputs": bad})
            if self.bad_batches > self.max_bad:
                raise TrainingError(
                    f"{self.bad_batches} input batches had NaN/Inf values, the last at step {s}; stopping. "
                    f"{self.resume_hint()}. Check the data (and stats.npz), or raise --config.max_bad_batches.")
            return False
        if not math.isfinite(float(m["train/loss"])):
            raise TrainingError(
                f"The training loss became {float(m['train/loss'])} at step {s}; stopping. "
                f"{self.resume_hint()}. Lower --config.optim.lr, or check the data for NaN/Inf inputs.")
        return True

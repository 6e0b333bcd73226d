"""Where training metrics go: ``metrics.jsonl``, TensorBoard event files, the progress line,
and the checks that stop a run (a non-finite loss, too many bad input batches)."""

from __future__ import annotations

import collections
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
from rich.markup import escape

from alexnet_jax.errors import Diverged, TrainingError


class MetricWriter:
    """``<workdir>/metrics.jsonl`` (one object per line) and TensorBoard event files.

    ``resume_step``: the step the run continues from. Rows an interrupted run wrote
    after it are moved to ``metrics.after-step-<N>-<time>.jsonl`` (``note`` says so),
    and the new event file starts with TensorBoard's purge marker at step N + 1, so
    that both hold each step once.
    """

    def __init__(self, workdir: Path, enabled: bool = True, *, resume_step: int = 0):
        self.enabled, self.note = enabled, None
        if not enabled:
            return
        path = workdir / "metrics.jsonl"
        self.note = _move_rows_after(path, resume_step)
        self.jsonl = open(path, "a")  # noqa: SIM115  kept open until close()
        tb_dir = workdir / "tensorboard"
        earlier = tb_dir.is_dir() and any(tb_dir.iterdir())
        try:
            self.tb = _EventFile(tb_dir, purge_step=resume_step + 1 if earlier else None)
        except ImportError:  # optional: metrics.jsonl has everything
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) if not isinstance(v, str) else v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.scalars(int(step), {k: float(v) for k, v in metrics.items() if not isinstance(v, str)})

    def flush(self) -> None:
        """Onto the disk: the event file's buffer would die with a killed process."""
        if self.enabled and self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


class _EventFile:
    """A TensorBoard event file written as rows come (tensorboardX's ``SummaryWriter`` queues
    events for a thread, and a killed process loses the queue however often it is flushed).

    ``purge_step``: TensorBoard's restart marker; its reader hides the events of
    earlier files at this step and after, as a resumed run writes them again.
    """

    def __init__(self, logdir: Path, *, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        self._event, self._scalar = Event, scalar
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(logdir / "events"), filename_suffix=f".{os.getpid()}")
        if purge_step is not None:
            self._writer.write_event(
                Event(step=purge_step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START))
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        for tag, value in values.items():
            self._writer.write_event(self._event(step=step, wall_time=now, summary=self._scalar(tag, value)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _move_rows_after(path: Path, step: int) -> str | None:
    """Keep the rows of steps <= ``step`` in ``path``; move the rest (and any cut-off line) aside."""
    if not path.exists():
        return None
    keep, later = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            row_step = None  # a line cut off by a kill
        (keep if row_step is not None and row_step <= step and line.endswith("\n") else later).append(line)
    if not later:
        return None
    aside = path.with_name(f"metrics.after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    aside.write_text("".join(later))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return f"metrics.jsonl: moved the {len(later)} row(s) an interrupted run wrote after step {step} to {aside.name}."


class DivergenceGuard:
    """Stops the run on a non-finite loss, or on more than ``max_bad`` input batches with NaN/Inf values.

    The train step skips a batch with bad inputs (the parameters stay as they were);
    the guard reports it and counts. ``resume_hint()`` says where the run can resume from.
    """

    def __init__(self, writer: MetricWriter, progress, *, max_bad: int, resume_hint: Callable[[], str]):
        self.writer, self.progress, self.max_bad, self.resume_hint = writer, progress, max_bad, resume_hint
        self.bad_batches = 0

    def passes(self, s: int, m: dict) -> bool:
        """False for a skipped step (bad inputs); raises when the run must stop."""
        bad = int(m["train/nonfinite_inputs"])
        if bad:
            self.bad_batches += 1
            self.progress.note(
                escape(
                    f"Step {s}: its input batch (batch {s - 1} of the training stream) has {bad} NaN/Inf values; "
                    f"the step was skipped and the parameters left unchanged ({self.bad_batches} bad batch(es) "
                    f"so far, at most {self.max_bad})."
                )
            )
            self.writer.write(s, {"train/nonfinite_inputs": bad})
            if self.bad_batches > self.max_bad:
                raise TrainingError(
                    f"{self.bad_batches} input batches had NaN/Inf values, the last at step {s}; stopping. "
                    f"{self.resume_hint()}. Check the data (and stats.npz), or raise --config.max_bad_batches."
                )
            return False
        if not math.isfinite(float(m["train/loss"])):
            raise Diverged(
                f"The training loss became {float(m['train/loss'])} at step {s}; stopping. "
                f"{self.resume_hint()}. Lower --config.optim.lr, or check the data for NaN/Inf inputs."
            )
        return True


class PendingMetrics:
    """Each step's metrics, left on the devices until fetched, many steps with one sync.

    ``add`` queues a step's metrics once it is dispatched; every ``log_every`` steps it
    first fetches the ones queued before, so a fetch never waits for the step just
    queued. ``fetch`` takes all (the loop calls it before reading the state, so a
    NaN loss stops the run before it is saved). Each row goes through ``guard``;
    every ``log_every``-th is written, the newest with the window's ``perf/images_per_s`` (global
    images per second since the last fetch; the first window starts after compilation;
    ``restart_clock`` leaves evaluations and checkpoints out), ``perf/step_time_s`` and
    ``perf/input_wait_share``: the share of the window's wall time the loop waited for its next
    batch (``input_wait()``: seconds waited so far). Over ``INPUT_BOUND`` the progress line says so.
    """

    INPUT_BOUND = 0.1

    def __init__(
        self,
        writer: MetricWriter,
        progress,
        guard: DivergenceGuard,
        *,
        log_every: int,
        batch_size: int,
        input_wait: Callable[[], float] = lambda: 0.0,
    ):
        self.writer, self.progress, self.guard = writer, progress, guard
        self.log_every, self.batch_size, self.input_wait = log_every, batch_size, input_wait
        self.pending: list[tuple[int, dict]] = []
        self._clock: tuple[float, int, float] | None = None  # (time, step, seconds waited) at the last fetch

    def add(self, step: int, metrics: dict) -> None:
        if (step - 1) % self.log_every == 0:
            self.fetch()
        self.pending.append((step, metrics))

    def fetch(self) -> None:
        if not self.pending:
            return
        rows, self.pending = jax.device_get(self.pending), []
        now, newest, waited = time.perf_counter(), rows[-1][0], self.input_wait()
        perf = {}
        if self._clock is not None and newest > self._clock[1]:
            wall = max(now - self._clock[0], 1e-9)
            perf = {
                "perf/images_per_s": (newest - self._clock[1]) * self.batch_size / wall,
                "perf/step_time_s": wall / (newest - self._clock[1]),
                "perf/input_wait_share": min(max((waited - self._clock[2]) / wall, 0.0), 1.0),
            }
        self._clock = (now, newest, waited)
        good = [(s, m) for s, m in rows if self.guard.passes(s, m)]
        for s, m in good:
            if s % self.log_every == 0 or s == newest:
                self.writer.write(s, {**m, **perf} if s == newest else m)
        if good:
            s, m = good[-1]
            self.progress.update(
                s, loss=float(m["train/loss"]), lr=float(m["train/lr"]), input_wait=perf.get("perf/input_wait_share")
            )

    def restart_clock(self) -> None:
        """The next interval starts now."""
        if self._clock is not None:
            self._clock = (time.perf_counter(), self._clock[1], self.input_wait())


_EVAL_IN_FLIGHT = 4


def error_rates(eval_step, params, batches, mesh) -> dict:
    """Error rates over one pass of ``batches`` (``make_eval_step``'s counts, each divided by the images
    counted, ``n``); the batches are copied two ahead and the counts fetched once at the end, every other
    host-device transfer refused (a transfer guard)."""
    from alexnet_jax.data.prefetch import DevicePrefetch

    counts = []
    with jax.transfer_guard("disallow"), DevicePrefetch(batches, mesh) as on_device:
        for batch in on_device:
            counts.append(eval_step(params, batch))  # dispatched, not waited on
            if len(counts) > _EVAL_IN_FLIGHT:  # bounded: a fast loader cannot queue the split on the devices
                counts[-_EVAL_IN_FLIGHT - 1]["n"].block_until_ready()
        totals = collections.Counter()
        for out in jax.device_get(counts):  # the one fetch of the pass
            totals.update({name: int(count) for name, count in out.items()})
    n = totals.pop("n")
    return {**{name: wrong / max(n, 1) for name, wrong in totals.items()}, "n": n}

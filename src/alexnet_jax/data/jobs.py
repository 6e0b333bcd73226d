"""A pass of jobs over worker processes: progress per image, and a clean stop on SIGTERM or Ctrl-C.

Preparation (:mod:`packing`) and the statistics pass (:mod:`stats`) both run
this way. A pass can take hours, so stopping must keep what is finished and
leave no half-dead workers: the workers ignore the signals and the main
process kills them at a safe point, then raises :class:`PassInterrupted`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

from alexnet_jax.data.passprogress import PassProgress
from alexnet_jax.errors import DatasetError, PassInterrupted

_counter = None  # (per-worker counts, this worker's slot), or a one-slot list inline
_inline_stop = None  # inline (workers=0): the pass's _StopRequest, checked between images by tick()


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def tick() -> None:
    """One image done (called by a job function, outside its per-image error handling). Inline, a
    pending SIGTERM/Ctrl-C is raised here, between two images: the job is abandoned, its result unused."""
    if _counter is not None:
        counts, i = _counter
        counts[i] += 1  # this process's own slot: no lock, nothing a killed worker could leave held
    if _inline_stop is not None:
        _inline_stop.check()


def run_jobs(
    fn,
    jobs: list,
    workers: int,
    total: int,
    progress: bool,
    label: str = "preparing",
    on_result=None,
    done_before: int = 0,
) -> None:
    """``on_result(fn(job))`` for every job, on ``workers`` processes, with progress over ``total`` images.

    ``fn`` calls :func:`tick` once per image; ``done_before`` images were done by an earlier (resumed) run.
    One job per worker at a time, so results are reduced as they come; their order is not the jobs'. A
    worker's exception is raised here. SIGTERM or Ctrl-C: results received have gone through
    ``on_result``, the workers (which ignore both) are killed, and :class:`PassInterrupted` is raised.
    """
    global _inline_stop
    on_result = on_result or (lambda result: None)
    bar = PassProgress(label, done_before + total, enabled=progress, start=done_before)
    stop = _StopRequest()
    finished = False
    try:
        with stop:
            if workers <= 0:
                counts = [0]
                _init_worker((counts, 0))
                try:
                    for job in jobs:
                        stop.check()
                        _inline_stop = stop
                        result = fn(job)
                        _inline_stop = None
                        on_result(result)
                        bar.update(done_before + counts[0])
                    stop.check()
                finally:
                    _inline_stop = None
                    _init_worker(None)
            else:
                _run_in_workers(fn, jobs, workers, on_result, lambda n: bar.update(done_before + n), stop)
        finished = True
    except PassInterrupted as e:
        e.done = bar.done
        raise
    finally:
        bar.close(finished)


class _StopRequest:
    """While entered (main thread only): SIGTERM and SIGINT set ``name`` instead of ending the process;
    :meth:`check` raises :class:`PassInterrupted` at safe points (the loops here, and :func:`tick`
    inline). Never raised from the handler itself: a job's ``except`` could take it for a bad image.
    """

    def __init__(self):
        self.name, self._previous = None, {}

    def _on_signal(self, signum, frame) -> None:
        import signal

        if self.name is None:
            self.name = signal.Signals(signum).name

    def check(self) -> None:
        if self.name:
            raise PassInterrupted(f"stopped by {self.name}", self.name)

    def __enter__(self):
        import signal
        import threading

        from alexnet_jax.preemption import held_signal

        self.name = held_signal()  # one sent before the pass began (e.g. during the folder scan) stops it at once
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def _worker_main(fn, conn, counts, index: int) -> None:
    """A worker process: jobs from ``conn`` until None; each answered with ('ok', result) or ('error', exc)."""
    import signal
    import threading
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides; it kills us when it stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def end_with_parent():  # a main process killed outright (SIGKILL) leaves no orphan working on
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=end_with_parent, daemon=True).start()
    _init_worker((counts, index))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            conn.send(("ok", fn(job)))
        except BaseException as e:
            try:
                conn.send(("error", e))
            except Exception:
                conn.send(("error", RuntimeError(traceback.format_exc())))


def _start_workers(ctx, fn, counts, workers: int) -> tuple[list, list]:
    """``workers`` spawned processes running :func:`_worker_main`, and the main process's ends of their pipes.

    They start with SIGINT and SIGTERM ignored (an ignored signal stays ignored
    across the exec, and Python keeps it so), so a signal sent to the whole
    process group while one is still importing can neither kill it nor print
    its traceback. The price: one that reaches this process in those few
    milliseconds (about 20 ms a worker) is lost.
    """
    import signal
    import threading

    handlers = (
        {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        if (threading.current_thread() is threading.main_thread())
        else {}
    )
    procs, conns = [], []
    try:
        for i in range(workers):
            here, there = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(fn, there, counts, i), daemon=True, name=f"alexnet_jax-pass-{i}")
            p.start()
            there.close()
            procs.append(p)
            conns.append(here)
    except BaseException:
        _stop_workers(procs, conns, clean=False)
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return procs, conns


def _stop_workers(procs: list, conns: list, clean: bool) -> None:
    for p in procs:
        if clean:
            p.join(timeout=5)
        if p.is_alive():
            p.kill()  # SIGKILL: the workers ignore SIGTERM and SIGINT
        p.join()
    for c in conns:
        c.close()


def _run_in_workers(fn, jobs: list, workers: int, on_result, report, stop: _StopRequest) -> None:
    """The jobs on ``workers`` spawned processes, one job each at a time; stops when ``stop.name`` is set."""
    from multiprocessing.connection import wait

    # spawn: safe even when the caller already runs JAX threads.
    ctx = mp.get_context("spawn")
    workers = max(1, min(workers, len(jobs)))
    counts = ctx.RawArray("q", workers)  # images done, one slot per worker (no lock to be left held)
    procs, conns = _start_workers(ctx, fn, counts, workers)
    clean = False
    try:
        todo = list(reversed(jobs))
        busy = [False] * workers
        for i in range(workers):
            if todo:
                conns[i].send(todo.pop())
                busy[i] = True
        while any(busy):
            stop.check()
            ready = wait(
                [conns[i] for i in range(workers) if busy[i]] + [procs[i].sentinel for i in range(workers) if busy[i]],
                timeout=0.25,
            )
            for i in range(workers):
                if not busy[i]:
                    continue
                if conns[i] in ready or conns[i].poll():
                    try:
                        kind, value = conns[i].recv()
                    except EOFError:
                        kind, value = "died", None
                    if kind == "ok":
                        busy[i] = False
                        on_result(value)
                        if todo and not stop.name:
                            conns[i].send(todo.pop())
                            busy[i] = True
                        continue
                    if kind == "error":
                        raise value
                if not procs[i].is_alive():
                    time.sleep(0.2)  # killed along with us by a signal to the group: that is a stop
                    stop.check()
                    raise DatasetError(
                        f"a worker process died (exit code {procs[i].exitcode}), e.g. killed "
                        "for lack of memory; run again with fewer workers"
                    )
            report(sum(counts))
        stop.check()  # asked while the last jobs ran: the jobs not started are not done
        report(sum(counts))
        for c in conns:
            c.send(None)
        clean = True
    finally:
        _stop_workers(procs, conns, clean)


def stop_if_signalled(what: str) -> None:
    """A safe point: a SIGTERM or Ctrl-C held since start-up stops ``what`` here, as it stops a pass."""
    from alexnet_jax.preemption import held_signal

    name = held_signal()
    if name is not None:
        raise PassInterrupted(
            f"{what} stopped by {name}; nothing was written, and the same command starts it again.", name
        )

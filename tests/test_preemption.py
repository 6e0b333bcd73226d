"""A cluster stopping the job: SIGTERM / Ctrl-C save at the step in flight and the same command
resumes exactly; one run per workdir; metrics that hold each step once across resumes.

Every run is a real ``launch.py`` process and every signal a real one.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import TINY, launch, metrics, read_state, tensorboard_steps

ROOT = Path(__file__).resolve().parents[1]


def start(workdir, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        [sys.executable, "launch.py", "--config=configs/demo.py", f"--workdir={workdir}", *TINY, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, proc, timeout=300):
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def train_rows(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return [r for r in metrics(workdir) if "train/loss" in r] if path.exists() else []


# SIGINT's save-and-exit from a terminal is also in test_clean_exits_with_loader_workers; its exact resume is slow.
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_mid_epoch_saves_that_step_and_the_same_command_resumes_exactly(tmp_path, sig):
    n = 60
    args = (f"--config.total_steps={n}", "--config.checkpoint_every=1000")  # no checkpoint but the signal's
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    p = start(broken, *args)
    wait_for(lambda: len(train_rows(broken)) >= 5, p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 75, (p.returncode, err[-3000:])  # EXIT_PREEMPTED: saved, run me again
    name = signal.Signals(sig).name
    stopped = int(out.split(f"Stopped by {name} at step ")[1].split(";")[0])
    assert 5 <= stopped < n and f"{name}: finishing the step in flight" in err
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == [str(stopped)]
    assert "Traceback" not in err and "leaked" not in err
    assert (broken / "LOCK").read_text() == ""  # released

    r = launch(broken, *args)  # the same command
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(step {stopped}," in r.stdout
    r = launch(straight, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_state(straight, n), read_state(broken, n)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit
    assert [r["step"] for r in train_rows(broken)] == list(range(1, n + 1))  # each step once
    assert tensorboard_steps(broken) == list(range(1, n + 1))
    assert [r["train/loss"] for r in train_rows(broken)] == [r["train/loss"] for r in train_rows(straight)]


def test_second_ctrl_c_exits_at_once(tmp_path):
    """The first SIGINT asks for a save at the step in flight; a second one, before that is done, exits at once."""
    wd, err_path = tmp_path / "run", tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with open(err_path, "w") as err:  # a file, read while the run goes on
        p = subprocess.Popen(
            [
                sys.executable,
                "launch.py",
                "--config=configs/demo.py",
                f"--workdir={wd}",
                *TINY,
                "--config.total_steps=100000",
                "--config.checkpoint_every=100000",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
    wait_for(lambda: len(train_rows(wd)) >= 3, p)
    p.send_signal(signal.SIGINT)
    wait_for(lambda: "finishing the step in flight" in err_path.read_text(), p, timeout=60)
    p.send_signal(signal.SIGINT)  # (two sent at once would arrive as one)
    p.wait(timeout=120)
    assert p.returncode == 128 + signal.SIGINT, (p.returncode, err_path.read_text()[-3000:])
    assert "SIGINT again: exiting at once, without saving." in err_path.read_text()


def test_one_run_per_workdir_and_a_dead_holders_lock_is_taken_over(tmp_path):
    wd = tmp_path / "run"
    first = start(wd, "--config.total_steps=100000", "--config.checkpoint_every=100000")
    wait_for(lambda: len(train_rows(wd)) >= 3, first)
    holder = json.loads((wd / "LOCK").read_text())
    second = launch(wd, "--config.total_steps=2")
    assert second.returncode == 1, second.stderr[-3000:]
    assert (
        f"Another run is using --workdir={wd}: pid {first.pid} on host {holder['host']}, started {holder['started']}"
    ) in second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # the holder is untouched
    written = len(train_rows(wd))

    first.kill()  # SIGKILL: no clean-up, the LOCK file keeps its holder
    first.communicate()
    assert json.loads((wd / "LOCK").read_text())["pid"] == first.pid
    third = launch(wd, "--config.total_steps=2", "--config.checkpoint_every=100000")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"Took over the lock of a run that is no longer alive (pid {first.pid} on host" in third.stdout
    # The dead run never saved: the new one starts from step 0, and moved the dead run's rows aside.
    assert "an interrupted run wrote after step 0" in third.stdout
    assert [r["step"] for r in train_rows(wd)] == [1, 2]
    (aside,) = wd.glob("metrics.after-step-0-*.jsonl")
    assert len(aside.read_text().splitlines()) >= written
    assert tensorboard_steps(wd) == [1, 2]


@pytest.mark.slow  # three runs of two processes: about 2 minutes on 2 cores
def test_two_processes_stop_at_one_step_when_only_one_is_signalled(tmp_path):
    """SIGTERM to process 1 alone: JAX's preemption service tells process 0, both save the same step
    together and exit 75, and the same two commands resume to the parameters of a run never stopped."""
    import test_distributed as dist

    n = 40
    args = (f"--config.total_steps={n}", "--config.checkpoint_every=1000")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run = dist.start(broken, 2, 2, *args)
    wait_for(lambda: len(train_rows(broken)) >= 3, run.procs[0])
    holder = json.loads((broken / "LOCK").read_text())
    assert holder["pid"] == run.procs[0].pid  # one lock for the run, held by process 0
    run.procs[1].send_signal(signal.SIGTERM)
    (rc0, out0, err0), (rc1, out1, err1) = run.finish()
    assert (rc0, rc1) == (75, 75), (out0[-2000:], err0[-3000:], out1[-2000:], err1[-3000:])
    at = [int(out.split("Stopped by SIGTERM at step ")[1].split(";")[0]) for out in (out0, out1)]
    assert at[0] == at[1] and 3 <= at[0] < n, at  # the same step on both
    assert "process 1: Stopped by SIGTERM" in out1
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == [str(at[0])]
    for err in (err0, err1):
        assert "Traceback" not in err and "leaked" not in err

    dist.ok(dist.launch(broken, 2, 2, *args))  # the same commands: resume
    dist.ok(dist.launch(straight, 2, 2, *args))
    a, b = dist.read_state(straight, n), dist.read_state(broken, n)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit
    assert [r["step"] for r in train_rows(broken)] == list(range(1, n + 1))


WORKERS = ("--config.data.num_workers=1", "--config.eval_ten_crop=True", "--config.eval_every=4")  # as the demo


def quiet_end(text):
    """What a clean exit must not print: a traceback or the resource tracker's leak report."""
    for bad in ("Traceback", "leaked", "resource_tracker"):
        assert bad not in text, text[-3000:]


def test_clean_exits_with_loader_workers(tmp_path):
    """A normal end, a Ctrl-C from a terminal (SIGINT to the whole process group, grain's worker
    processes included) and an early config error, each with a decoding worker process: no
    traceback, no leaked shared memory, and the Ctrl-C still saves and resumes."""
    wd = tmp_path / "run"
    r = launch(wd, *WORKERS, "--config.total_steps=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done at step 8" in r.stdout
    quiet_end(r.stdout + r.stderr)

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    wd2 = tmp_path / "ctrl-c"
    args = (*TINY, *WORKERS, "--config.total_steps=200", "--config.checkpoint_every=1000")
    p = subprocess.Popen(
        [sys.executable, "launch.py", "--config=configs/demo.py", f"--workdir={wd2}", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # its own process group, as a terminal gives a job
    wait_for(lambda: len(train_rows(wd2)) >= 6, p)  # past an evaluation: eval batches were in flight
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 75, (p.returncode, err[-3000:])
    stopped = int(out.split("Stopped by SIGINT at step ")[1].split(";")[0])
    assert sorted(c.name for c in (wd2 / "checkpoints").iterdir()) == [str(stopped)]
    quiet_end(out + err)

    r = launch(tmp_path / "bad", *WORKERS, "--config.model.lrn_convention=caffe")
    assert r.returncode == 1 and "lrn_convention" in r.stderr, r.stderr[-3000:]
    quiet_end(r.stdout + r.stderr)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def test_ctrl_c_in_the_first_seconds_is_one_line_and_130(tmp_path):
    """A Ctrl-C from a terminal (SIGINT to the process group) during launch.py's imports, and again while
    its loader workers start: one line, no traceback from the process or a worker, nothing saved."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for when in ("imports", "workers"):
        wd = tmp_path / when
        p = subprocess.Popen(
            [
                sys.executable,
                "launch.py",
                "--config=configs/demo.py",
                f"--workdir={wd}",
                *TINY,
                "--config.data.num_workers=2",
                "--config.total_steps=50",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        if when == "imports":
            time.sleep(0.3)
        else:  # a grain worker process exists: it is importing its modules
            wait_for(lambda: len(children(p.pid)) >= 2, p)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=300)
        quiet_end(out + err)
        assert "KeyboardInterrupt" not in err, err
        if p.returncode == 130:
            (line,) = [ln for ln in err.splitlines() if ln.startswith("launch.py:")]
            assert "stopped by SIGINT before the first training step" in line, err
            assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())
        else:  # the loop had begun: it saved the step in flight, as a Ctrl-C in training does
            assert when == "workers" and p.returncode == 75, (p.returncode, err)
            assert "Stopped by SIGINT at step 1" in out, out

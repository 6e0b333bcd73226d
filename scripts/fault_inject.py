"""Kill a demo run again and again, restart it each time, and check it ends where an unkilled run ends.

    python scripts/fault_inject.py                      # 10 kills, about 5-10 minutes on 2 CPU cores
    python scripts/fault_inject.py --kills 20 --seed 3

First the run goes through once, uninterrupted. Then the same run, in a fresh
workdir, is started with launch.py and SIGKILLed (the whole process group, no
warning) at random moments, and restarted with the same command each time until
it finishes. The kills alternate between two kinds:

* ``random``: after a random wall-clock delay, anywhere from start-up to the end;
* ``write``: the moment an asynchronous checkpoint write is seen in progress
  (a ``*.orbax-checkpoint-tmp*`` folder), plus up to 50 ms.

Checkpoints are frequent (``--checkpoint-every``) so that many kills land in
or near a write. At the end the script compares every array of the final state
(parameters, momentum, learning rate, step, RNG) and every step's loss with the
uninterrupted run, prints a table of the kills and the verdict, and writes the
same as JSON to ``<workdir>/fault_inject.json``. Exit status 0 means equal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(workdir: Path, args) -> list[str]:
    return [
        sys.executable,
        "launch.py",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.total_steps={args.steps}",
        f"--config.checkpoint_every={args.checkpoint_every}",
        "--config.eval_ten_crop=False",
        "--config.data.num_workers=0",
        "--config.log_every=1",
        *args.extra,
    ]


def start(workdir: Path, args, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        # Own session: the kill takes the run and anything it started, as a lost machine would.
        return subprocess.Popen(
            command(workdir, args), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def on_disk(workdir: Path) -> tuple[list[int], dict[str, int]]:
    """Finished checkpoint steps, and temporary (being written, or cut off) folders with their inodes."""
    d = workdir / "checkpoints"
    if not d.is_dir():
        return [], {}
    steps, tmp = [], {}
    for e in os.scandir(d):
        if e.name.isdigit():
            steps.append(int(e.name))
        elif "orbax-checkpoint-tmp" in e.name:
            tmp[e.name] = e.inode()
    return sorted(steps), tmp


def last_step(workdir: Path, skip_lines: int) -> int | None:
    """The last step this start logged to metrics.jsonl (lines after ``skip_lines``), if any."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines()[skip_lines:] if x.endswith("}")]
    return max((r["step"] for r in rows if "train/loss" in r), default=None)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def resumed_step(log: Path) -> int | None:
    m = re.search(r"Resumed from \S+ \(step (\d+)", log.read_text(errors="replace"))
    return int(m.group(1)) if m else None


def kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def read_state(workdir: Path, step: int):
    """The saved state through plain Orbax, onto this process's CPU (any layout it was written from)."""
    import logging

    import jax
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)  # "no _CHECKPOINT_METADATA" in a sub-item: expected
    path = workdir / "checkpoints" / str(step) / "state"
    here = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
    return ocp.StandardCheckpointer().restore(path, target)


def losses(workdir: Path) -> dict[int, float]:
    """Each step's training loss; a step trained again after a kill keeps its last value."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs before the run may finish")
    ap.add_argument("--steps", type=int, default=120, help="training steps of the demo run")
    ap.add_argument("--checkpoint-every", type=int, default=3, help="steps between (asynchronous) checkpoints")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "fault_inject")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    ap.add_argument("--max-attempts", type=int, default=60, help="give up after this many starts")
    ap.add_argument("extra", nargs="*", help="more launch.py overrides, e.g. --config.model.width=0.125")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = args.workdir
    if base.exists():
        shutil.rmtree(base)
    straight, killed, logs = base / "uninterrupted", base / "killed", base / "logs"
    logs.mkdir(parents=True)

    t0 = time.monotonic()
    p = start(straight, args, logs / "uninterrupted.log")
    first_step_at = None  # start-up time: until the first step is logged
    while p.poll() is None:
        if first_step_at is None and last_step(straight, 0) is not None:
            first_step_at = time.monotonic() - t0
        time.sleep(0.01)
    if p.returncode != 0:
        print(f"the uninterrupted run failed; see {logs / 'uninterrupted.log'}")
        return 2
    full = time.monotonic() - t0
    startup = first_step_at or full / 2
    per_step = max(full - startup, 0.0) / args.steps  # evaluations and writes included
    print(f"uninterrupted run: {args.steps} steps in {full:.0f} s (start-up {startup:.0f} s)")

    rows, attempt = [], 0
    while True:
        attempt += 1
        if attempt > args.max_attempts:
            print(f"gave up after {args.max_attempts} starts")
            return 2
        log = logs / f"attempt{attempt:02d}.log"
        before, stale = on_disk(killed)
        skip = lines(killed / "metrics.jsonl")
        p = start(killed, args, log)
        t_start = time.monotonic()
        kind = None
        if len(rows) < args.kills:
            kind = "random" if len(rows) % 2 == 0 else "write"
        if kind == "random":  # anywhere in start-up, restore, or the first third of what is left
            left = args.steps - (max(before) if before else 0)
            deadline = t_start + rng.uniform(0, startup + per_step * left / 3)
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        elif kind == "write":
            # A write of a checkpoint after the first new one: the run has made progress by then.
            floor = (max(before) if before else 0) + args.checkpoint_every
            while p.poll() is None:
                _, tmp = on_disk(killed)
                if any(
                    int(re.match(r"\d+", n).group()) > floor
                    for n in tmp
                    if re.match(r"\d+", n) and stale.get(n) != tmp[n]
                ):
                    time.sleep(rng.uniform(0, 0.05))
                    break
                time.sleep(0.002)
        else:  # all kills done: let this start finish the run
            p.wait()
        if p.poll() is not None:  # it finished (or failed) before the kill
            if p.returncode != 0:
                print(f"attempt {attempt} exited with {p.returncode}; see {log}")
                return 2
            if kind is not None:
                print(f"the run finished before kill {len(rows) + 1}; use more --steps")
            break
        steps, tmp = on_disk(killed)
        kill_at = time.monotonic() - t_start
        kill_group(p)
        rows.append(
            {
                "kill": len(rows) + 1,
                "kind": kind,
                "after_s": round(kill_at, 2),
                "fresh": not before,
                "resumed_from": resumed_step(log),
                "last_step_logged": last_step(killed, skip),
                "finished_ckpts": steps[-3:],
                "writes_in_flight": sorted(n for n in tmp if stale.get(n) != tmp[n]),
            }
        )

    # Attempt k ended with kill k. The next start that got as far as restoring must have resumed
    # from the newest checkpoint finished at the kill (or one that finished while it was dying).
    resumed = {i: resumed_step(logs / f"attempt{i:02d}.log") for i in range(1, attempt + 1)}
    for row in rows:
        nxt = next((resumed[i] for i in range(row["kill"] + 1, attempt + 1) if resumed[i] is not None), None)
        row["next_resumed_from"] = nxt
        row["resumed_newest"] = nxt is not None and nxt >= max(row["finished_ckpts"], default=0)
    final_log = logs / f"attempt{attempt:02d}.log"
    damaged = sorted(os.listdir(killed / "checkpoints_damaged")) if (killed / "checkpoints_damaged").exists() else []

    import jax
    import numpy as np

    a, b = read_state(straight, args.steps), read_state(killed, args.steps)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    same_structure = [k for k, _ in la] == [k for k, _ in lb]
    max_diff = (
        max(
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            for (_, x), (_, y) in zip(la, lb)
        )
        if same_structure
        else float("nan")
    )
    bitwise = same_structure and all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))
    loss_a, loss_b = losses(straight), losses(killed)
    same_losses = loss_a == loss_b and len(loss_a) == args.steps

    print()
    print(
        "| kill | kind | after (s) | this start resumed from | last step it trained | newest finished "
        "checkpoints | write in flight | next restore from |"
    )
    print("|---:|---|---:|---:|---:|---|---|---:|")
    for r in rows:
        began = (
            "fresh"
            if r["fresh"]
            else (r["resumed_from"] if r["resumed_from"] is not None else "(killed before restoring)")
        )
        print(
            f"| {r['kill']} | {r['kind']} | {r['after_s']} | {began} | {r['last_step_logged'] or '-'} | "
            f"{r['finished_ckpts']} | {', '.join(r['writes_in_flight']) or '-'} | {r['next_resumed_from']} |"
        )
    in_write = sum(1 for r in rows if r["writes_in_flight"])
    verdict = {
        "kills": len(rows),
        "kills_during_a_write": in_write,
        "starts": attempt,
        "every_restart_resumed_from_the_newest_finished_checkpoint": all(r["resumed_newest"] for r in rows),
        "final_start_resumed_from": resumed_step(final_log),
        "damaged_set_aside": damaged,
        "final_state_bitwise_equal": bitwise,
        "max_abs_diff": max_diff,
        "losses_equal_every_step": same_losses,
        "uninterrupted_s": round(full, 1),
        "total_s": round(time.monotonic() - t0, 1),
    }
    print()
    for k, v in verdict.items():
        print(f"{k}: {v}")
    (base / "fault_inject.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "kills": rows, "verdict": verdict}, indent=2)
    )
    ok = bitwise and same_losses and len(rows) >= args.kills and all(r["resumed_newest"] for r in rows)
    print(
        "\nRESULT: "
        + ("the killed-and-restarted run ended with exactly the uninterrupted run's state" if ok else "MISMATCH")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

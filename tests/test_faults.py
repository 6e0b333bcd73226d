"""What long runs meet: a full disk, a read-only checkpoint folder, a batch with NaN inputs.

The disks are real: a small tmpfs (full) or a read-only bind mount, made in a private mount
namespace (``unshare -rm``), so nothing needs root and nothing outside the test changes.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from alexnet_jax import optim, steps, train
from alexnet_jax.data import prefetch
from alexnet_jax.errors import TrainingError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import TINY, metrics, read_state, tiny_config  # noqa: E402


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_work(),
    reason="needs unprivileged user and mount namespaces (unshare -rm) to make a "
    "real full or read-only disk without root",
)


def in_namespace(mount: str, argv: list[str], timeout=600):
    """Run ``argv`` after the shell commands ``mount``, in a private user + mount namespace."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    script = f'{mount} && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# A script for the namespace. Nothing races: the checkpoint folder is a tmpfs that holds one
# and a half checkpoints (sized from the reference run's own step-2 checkpoint), so step 2 is
# written and every later save meets a full disk, whatever the speed of the machine.
#  1. A reference run on an ordinary disk, 12 steps, a checkpoint every 2.
#  2. The same run on the small disk: each failed save is reported and training goes on; the run
#     ends with a CheckpointError because step 12 could not be saved.
#  3. The disk is made larger (a tmpfs remount) and the same run is started again: it resumes
#     from step 2 and ends with step 12 as the reference did.
#  4. One Checkpointer, as a run holds it: a save meets the full disk, the disk grows, and the
#     next save of the same Checkpointer succeeds.
FULL_DISK_RUN = textwrap.dedent("""
    import json, math, os, subprocess, sys
    import jax
    import numpy as np
    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, "tests")
    from test_train import read_state, tiny_config
    from alexnet_jax import train
    from alexnet_jax.checkpoint import Checkpointer, CheckpointError, CheckpointWriteError

    ref, wd = sys.argv[1], sys.argv[2]
    ckpts = os.path.join(wd, "checkpoints")
    cfg = dict(total_steps=12, checkpoint_every=2, keep_checkpoints=20)
    train.train_and_evaluate(tiny_config(**cfg), ref)

    def used(path):  # bytes in whole pages, as tmpfs counts them
        return sum(-(-os.path.getsize(os.path.join(d, f)) // 4096) * 4096
                   for d, _, files in os.walk(path) for f in files)

    def mount(options):
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", ckpts], check=True)

    def same(step):  # bit for bit, on the small disk and the ordinary one
        a, b = jax.tree.leaves(read_state(ref, step)), jax.tree.leaves(read_state(wd, step))
        return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))

    size = math.ceil(1.5 * used(os.path.join(ref, "checkpoints", "2")))
    mount(f"size={size}")
    out = {"size": size}
    try:
        train.train_and_evaluate(tiny_config(**cfg), wd)
        out["first"] = "no error"
    except CheckpointError as e:
        out["first"] = str(e)
    out["steps_after_first"] = sorted(int(p) for p in os.listdir(ckpts) if p.isdigit())
    out["same_2"] = same(2)

    mount("remount,size=64m")
    out["second"] = train.train_and_evaluate(tiny_config(**cfg), wd)["step"]
    out["same_12"] = same(12)

    subprocess.run(["umount", ckpts], check=True)  # 4: a fresh small disk for one Checkpointer
    mount(f"size={size}")
    state = read_state(ref, 2)
    items = dict(data={"next_batch": 2}, config={}, control={})
    ck = Checkpointer(wd, keep=20)
    ck.save(2, state, **items)
    ck.wait()
    try:
        ck.save(4, state, **items)
        ck.wait()
        out["lost"] = "no error"
    except CheckpointWriteError as e:
        out["lost"] = [e.step, e.last_good, str(e)]
    mount("remount,size=64m")
    ck.save(6, state, **items)
    ck.wait()
    ck.close()
    out["steps_after_grow"] = sorted(int(p) for p in os.listdir(ckpts) if p.isdigit())
    out["same_6"] = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                        zip(jax.tree.leaves(state), jax.tree.leaves(read_state(wd, 6))))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
@needs_namespaces
def test_full_disk_is_reported_training_goes_on_and_no_good_checkpoint_is_touched(tmp_path):
    ref, wd = tmp_path / "reference", tmp_path / "run"
    (wd / "checkpoints").mkdir(parents=True)
    r = in_namespace("true", [sys.executable, "-c", FULL_DISK_RUN, str(ref), str(wd)])
    (tmp_path / "stdout.txt").write_text(r.stdout)
    (tmp_path / "stderr.txt").write_text(r.stderr)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (f"full output in {tmp_path}", r.stdout[-3000:], r.stderr[-5000:])
    out = json.loads(lines[-1][len("RESULT ") :])

    # 2. Every save after step 2 met the full disk; each was reported with its step, the OS's
    # reason and the newest good checkpoint, and training went on to step 12.
    # (A save that fails as it starts is reported at once; one that fails in the background at the
    # next save, so the metric's step may be the next one: the text names the step that was lost.)
    # The second run resumed from step 2 and moved the first run's later rows aside (each step once).
    (aside,) = wd.glob("metrics.after-step-2-*.jsonl")
    first_run = [json.loads(line) for line in aside.read_text().splitlines()]
    errors = [m["checkpoint/error"] for m in first_run if "checkpoint/error" in m]
    assert not any("checkpoint/error" in m for m in metrics(wd))  # the second run saved every time
    lost = [int(s) for text in errors for s in re.findall(r"checkpoint for step (\d+)", text)]
    assert sorted(lost) in ([4, 6, 8, 10], [4, 6, 8, 10, 12]), errors
    for text in errors:
        for one in re.split(r"(?=Could not write)", text)[1:]:
            assert re.search(
                r"^Could not write the checkpoint for step \d+ to .*: No space left on device "
                r"\(errno 28\)\. The training state in memory is intact.*newest good checkpoint "
                r"is step 2\b",
                one,
            ), one
    assert "Could not write the checkpoint for step 12" in out["first"], out["first"]
    assert "reached step 12" in out["first"] and "newest good checkpoint is step 2" in out["first"]
    assert "run the same command again" in out["first"]
    assert out["steps_after_first"] == [2] and out["same_2"], "the good checkpoint was touched"
    # The failed saves changed nothing in memory: steps 1-12 trained exactly as on an ordinary disk.
    lw = {m["step"]: m["train/loss"] for m in metrics(wd) + first_run if "train/loss" in m and m["step"] <= 2}
    lw |= {m["step"]: m["train/loss"] for m in first_run if "train/loss" in m}
    lr = {m["step"]: m["train/loss"] for m in metrics(ref) if "train/loss" in m}
    assert len(lr) == 12 and lw == lr

    # 3. Run again on the grown disk: it resumed from step 2 and ended bit-identical to the reference.
    assert out["second"] == 12 and out["same_12"]

    # 4. The same Checkpointer tries again after a failed save and succeeds once there is room.
    step, last_good, text = out["lost"]
    assert (step, last_good) == (4, 2) and "No space left on device" in text, out["lost"]
    assert out["steps_after_grow"] == [2, 6] and out["same_6"]


@needs_namespaces
def test_read_only_checkpoint_folder_stops_at_start_with_a_clear_message(tmp_path):
    from alexnet_jax.checkpoint import Checkpointer

    wd = tmp_path / "run"
    good = Checkpointer(wd)  # a good checkpoint from an earlier run (any tree will do here)
    good.save(2, {"w": np.arange(6, dtype=np.float32)}, data={"next_batch": 2}, config={}, control={})
    good.close()
    before = read_state(wd, 2)
    ck = wd / "checkpoints"
    r = in_namespace(
        f"mount --bind {ck} {ck} && mount -o remount,bind,ro {ck}",
        [
            sys.executable,
            "launch.py",
            "--config=configs/demo.py",
            f"--workdir={wd}",
            *TINY,
            "--config.total_steps=4",
            "--config.checkpoint_every=2",
        ],
    )
    assert r.returncode != 0
    assert f"Cannot write checkpoints to {ck}" in r.stderr and "Read-only file system" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["2"]
    same_tree(read_state(wd, 2), before)


def test_batch_with_nan_input_is_skipped_and_counted_in_its_step():
    from alexnet_jax import AlexNet, make_mesh

    model = AlexNet(width=0.125, image_size=64, num_classes=10, init_std=0.05)
    mesh = make_mesh(towers=2, data=2)
    tx = optim.make_optimizer(tiny_config().optim)
    state, shardings = steps.create_train_state(model, tx, 0, mesh)
    step = steps.make_train_step(model, tx, mesh, shardings)
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.normal(0, 50, (8, 64, 64, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
            "mask": np.ones(8, bool),
        }
        for _ in range(3)
    ]
    batches[1]["image"][5, 10, 20, 1] = np.nan
    batches[1]["image"][6, 0, 0, 0] = np.inf
    seen, snapshots = [], []
    for b in batches:
        state, m = step(state, prefetch.to_global(b, mesh))
        seen.append(int(m["train/nonfinite_inputs"]))
        snapshots.append(jax.device_get((state.params, state.opt_state)))
    assert seen == [0, 2, 0]
    assert int(state.step) == 3  # the step is counted (the data and dropout keys stay aligned)
    same_tree(snapshots[1], snapshots[0])  # nothing moved at the bad step
    w0, w2 = snapshots[0][0]["towers"]["fc8"]["kernel"], snapshots[2][0]["towers"]["fc8"]["kernel"]
    assert np.isfinite(w2).all() and not np.array_equal(w0, w2)  # and the next good batch trains


def test_run_reports_each_bad_batch_with_its_step_then_stops(tmp_path):
    """A stats file with a NaN in the mean image makes every batch bad: reported, skipped, then a stop."""
    from alexnet_jax.data import resolve

    cfg = tiny_config()
    stats = dict(resolve(cfg.data).stats)
    stats["mean_image"] = stats["mean_image"].copy()
    stats["mean_image"][36, 36, 0] = np.nan  # inside every 64-pixel crop of the 72-pixel images
    np.savez(tmp_path / "stats.npz", **stats)
    wd = tmp_path / "run"
    with pytest.raises(
        TrainingError,
        match=r"3 input batches had NaN/Inf values, the last at step 3.*"
        r"last good checkpoint, step 2",
    ):
        train.train_and_evaluate(
            tiny_config(
                **{
                    "total_steps": 6,
                    "checkpoint_every": 2,
                    "max_bad_batches": 2,
                    "data.stats_path": str(tmp_path / "stats.npz"),
                }
            ),
            wd,
        )
    bad = {m["step"]: m["train/nonfinite_inputs"] for m in metrics(wd) if "train/nonfinite_inputs" in m}
    assert bad == {1: 32, 2: 32, 3: 32}  # one NaN per image, 32 images per batch
    saved = read_state(wd, 2)  # the checkpoint after two skipped steps: the initial parameters, finite
    assert int(saved["step"]) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(saved["params"]))

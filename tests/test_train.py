"""Training: exact resume across a killed process, LR drops that survive restarts,
damaged checkpoints, and a NaN loss that stops the run cleanly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alexnet_jax import optim, parallel, steps, train
from alexnet_jax.data import prefetch
from alexnet_jax.errors import TrainingError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402

TINY = [
    "--config.model.width=0.125",
    "--config.batch_size=32",
    "--config.eval_batch_size=100",
    "--config.data.num_workers=0",
    "--config.eval_ten_crop=False",
    "--config.log_every=1",
    "--config.optim.plateau_patience=0",
    "--config.optim.drop_epochs=()",
]


def tiny_config(**overrides):
    c = demo.get_config()
    c.model.width = 0.125
    c.batch_size, c.eval_batch_size = 32, 100
    c.data.num_workers = 0
    c.eval_ten_crop = False
    c.log_every = 1
    c.optim.plateau_patience = 0
    c.optim.drop_epochs = ()
    c.mesh.cpu_devices = 8  # what the test process already has (conftest)
    c.mesh.data = 2  # a 2 x 2 mesh
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def launch(workdir, *args, kill_at=None):
    """launch.py as a user types it; or, with ``kill_at="N"`` (once checkpoint N is on disk) or
    ``kill_at="N:mid-write"`` (while checkpoint N is being written), the same command line run by
    tests/_killed_launch.py, which SIGKILLs the process there."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    program = ["launch.py"] if kill_at is None else ["tests/_killed_launch.py", str(kill_at)]
    return subprocess.run(
        [sys.executable, *program, "--config=configs/demo.py", f"--workdir={workdir}", *TINY, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_state(workdir, step):
    """Two plain Orbax calls: what a notebook without this package's helpers would do."""
    path = Path(workdir) / "checkpoints" / str(step) / "state"
    return ocp.StandardCheckpointer().restore(path)


def tensorboard_steps(workdir, tag="train/loss"):
    """The steps TensorBoard itself shows for ``tag`` (its reader applies the purge markers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(workdir) / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_is_exact(tmp_path):
    """Killed once while checkpoint 6 is being written and once right after it is on disk: each
    restart resumes from the step it names, and the end matches an unkilled run bit for bit."""
    n, every = 9, 3
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = (f"--config.total_steps={n}", f"--config.checkpoint_every={every}")
    r = launch(straight, *args)
    assert r.returncode == 0, r.stderr[-3000:]

    r = launch(broken, *args, kill_at="6:mid-write")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert "killed mid-write" in r.stderr
    held = sorted(p.name for p in (broken / "checkpoints").iterdir())
    assert "3" in held and "6" not in held and any(h.startswith("6.orbax-checkpoint-tmp") for h in held), held
    r = launch(broken, *args, kill_at="6")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert "(step 3," in r.stdout, r.stdout[-2000:]
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (broken / "checkpoints").iterdir())
    r = launch(broken, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 6," in r.stdout, r.stdout[-2000:]

    a, b = read_state(straight, n), read_state(broken, n)
    assert int(a["step"]) == int(b["step"]) == n
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit
    # The mid-run state differs from the end: the comparison above is not vacuous.
    mid = read_state(broken, 6)
    assert not np.array_equal(mid["params"]["towers"]["fc8"]["kernel"], b["params"]["towers"]["fc8"]["kernel"])

    # And the next batch each run would see is the same.
    from alexnet_jax.data import build_train_iter

    def next_batch(workdir):
        data_state = json.loads((Path(workdir) / "checkpoints" / str(n) / "data" / "metadata").read_text())
        it = build_train_iter(tiny_config().data, batch_size=32, seed=0, image_size=64, num_workers=0)
        it.set_state(data_state)
        return next(it)

    ba, bb = next_batch(straight), next_batch(broken)
    np.testing.assert_array_equal(ba["image"], bb["image"])
    np.testing.assert_array_equal(ba["label"], bb["label"])
    # Same losses step by step, including across the kill.
    la = {m["step"]: m["train/loss"] for m in metrics(straight) if "train/loss" in m}
    lb = {m["step"]: m["train/loss"] for m in metrics(broken) if "train/loss" in m}
    assert la == lb and len(la) == n
    # Each step once, in metrics.jsonl and in what TensorBoard shows: the rows the first killed run
    # wrote after checkpoint 3 (steps 4-6) were moved aside when the second run resumed from 3.
    assert [m["step"] for m in metrics(broken) if "train/loss" in m] == list(range(1, n + 1))
    (aside,) = broken.glob("metrics.after-step-3-*.jsonl")
    assert [json.loads(x)["step"] for x in aside.read_text().splitlines() if "train/loss" in x] == [4, 5, 6]
    assert tensorboard_steps(broken) == list(range(1, n + 1))


def lr_by_step(workdir):
    return {m["step"]: m["train/lr"] for m in metrics(workdir) if "train/lr" in m}


def test_the_training_loop_refuses_implicit_transfers(tmp_path):
    """The loop runs under jax.transfer_guard('disallow'): the LR drop at step 3 (epoch 0.03) is an explicit
    device_put, the checkpoint an explicit read; an implicit host-to-device copy there is an error."""
    refused = []

    def inside_the_loop(step, ckpt):
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jnp.asarray(1.0) + 1  # what an unnamed copy in the loop would do
        refused.append(step)

    r = train.train_and_evaluate(
        tiny_config(**{"total_steps": 4, "optim.drop_epochs": (0.03,), "checkpoint_every": 4}),
        tmp_path / "run",
        after_checkpoint=inside_the_loop,
    )
    assert refused == [4] and r["lr"] == pytest.approx(0.001)
    assert [d["reason"].split()[0] for d in r["lr_drops"]] == ["scheduled"]


@pytest.mark.slow
def test_scheduled_requested_and_resume_drops_survive_restarts(tmp_path):
    wd = tmp_path / "run"
    # 3000 images / 32 = 93 steps per epoch: epoch 0.03 is crossed at step 3.
    r1 = train.train_and_evaluate(
        tiny_config(**{"total_steps": 4, "optim.drop_epochs": (0.03,), "checkpoint_every": 4}), wd
    )
    assert [d["reason"].split()[0] for d in r1["lr_drops"]] == ["scheduled"]
    assert r1["lr"] == pytest.approx(0.001)
    (wd / "DROP_LR").write_text("2")  # the researcher asks for a drop by 2 while it runs
    r2 = train.train_and_evaluate(
        tiny_config(**{"total_steps": 6, "optim.drop_epochs": (0.03,), "checkpoint_every": 2}), wd
    )
    assert not (wd / "DROP_LR").exists()
    assert r2["lr"] == pytest.approx(0.0005)
    r3 = train.train_and_evaluate(
        tiny_config(**{"total_steps": 8, "optim.drop_epochs": (0.03,), "optim.lr": 1e-4, "checkpoint_every": 2}),
        wd,
        manual_lr=1e-4,
    )
    assert r3["lr"] == pytest.approx(1e-4)
    assert [d["reason"].split()[0] for d in r3["lr_drops"]] == ["scheduled", "requested", "resume"]
    # A requeue without the manual LR keeps it (the config's 0.01 is not a request), and one that
    # repeats the same request does not drop again.
    r4 = train.train_and_evaluate(
        tiny_config(**{"total_steps": 9, "optim.drop_epochs": (0.03,), "checkpoint_every": 1}), wd
    )
    r5 = train.train_and_evaluate(
        tiny_config(**{"total_steps": 10, "optim.drop_epochs": (0.03,), "optim.lr": 1e-4, "checkpoint_every": 1}),
        wd,
        manual_lr=1e-4,
    )
    assert r4["lr"] == r5["lr"] == pytest.approx(1e-4)
    assert len(r5["lr_drops"]) == 3
    lr = lr_by_step(wd)  # the LR each step trained with
    assert [lr[s] for s in range(1, 11)] == pytest.approx([0.01] * 3 + [0.001] * 2 + [0.0005] + [1e-4] * 4)


def test_lr_typed_at_resume_is_a_manual_drop_and_a_requeue_without_it_keeps_it(tmp_path):
    """The README's `--config.optim.lr=0.001 when resuming`, as typed, then the same command without it."""
    wd = tmp_path / "run"
    for total, extra in ((2, []), (3, ["--config.optim.lr=0.001"]), (4, [])):
        r = launch(wd, f"--config.total_steps={total}", "--config.checkpoint_every=1", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    lr = lr_by_step(wd)
    assert [lr[s] for s in range(1, 5)] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    drops = [m for m in metrics(wd) if "lr_drop/to" in m]
    assert [(d["step"], d["lr_drop/to"], d["lr_drop/reason"]) for d in drops] == [
        (2, 0.001, "resume with --config.optim.lr")
    ]


@pytest.mark.slow
def test_plateau_drops_and_keeps_after_restart(tmp_path):
    wd = tmp_path / "run"
    cfg = dict(
        **{
            "eval_every": 2,
            "checkpoint_every": 2,
            "optim.plateau_patience": 1,
            "optim.plateau_min_delta": 1.0,
            "optim.plateau_max_drops": 1,
        }
    )
    r = train.train_and_evaluate(tiny_config(total_steps=6, **cfg), wd)  # evals at 2 (best), 4 (stalled: drop), 6
    assert [d["step"] for d in r["lr_drops"]] == [4]
    r = train.train_and_evaluate(tiny_config(total_steps=10, **cfg), wd)  # at most one plateau drop
    assert [d["step"] for d in r["lr_drops"]] == [4]
    lr = lr_by_step(wd)
    assert [lr[s] for s in range(1, 11)] == pytest.approx([0.01] * 4 + [0.001] * 6)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back(tmp_path, caplog):
    wd = tmp_path / "run"
    train.train_and_evaluate(tiny_config(total_steps=4, checkpoint_every=2), wd)
    state_dir = wd / "checkpoints" / "4" / "state"
    files = sorted(p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 1000)
    assert files, "expected array files in the checkpoint"
    for f in files:  # truncate every sizeable file
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with caplog.at_level("WARNING"):
        r = train.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every=2), wd)
    assert "Checkpoint at step 4 is damaged" in caplog.text
    assert any(p.name.startswith("4-") for p in (wd / "checkpoints_damaged").iterdir())
    assert r["step"] == 6
    # Resumed from step 2, not from scratch: the damaged run's rows for steps 3-4 were moved aside,
    # and the new run logged them again: each step once.
    assert [m["step"] for m in metrics(wd) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]
    (aside,) = wd.glob("metrics.after-step-2-*.jsonl")
    assert [json.loads(x)["step"] for x in aside.read_text().splitlines() if "train/loss" in x] == [3, 4]

    # A checkpoint with a missing file: same.
    (wd / "checkpoints" / "6" / "control").rename(wd / "gone")
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every=2), wd)
    assert "Checkpoint at step 6 is damaged" in caplog.text


@pytest.mark.slow
def test_resume_refuses_another_network_but_allows_speed_knobs(tmp_path):
    wd = tmp_path / "run"
    train.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every=2), wd)
    with pytest.raises(TrainingError, match=r"different model config \(fields \['lrn'\]\)"):
        train.train_and_evaluate(tiny_config(**{"total_steps": 4, "model.lrn": False}), wd)
    r = train.train_and_evaluate(tiny_config(**{"total_steps": 4, "checkpoint_every": 2, "data.num_threads": 1}), wd)
    assert r["step"] == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    wd = tmp_path / "run"
    train.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every=2), wd)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*last good checkpoint, step 2"):
        train.train_and_evaluate(
            tiny_config(**{"total_steps": 8, "checkpoint_every": 2, "optim.lr": 1e30}), wd, manual_lr=1e30
        )
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    state = read_state(wd, 2)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state["params"]))


def test_checkpointer_keeps_last_k_and_the_best(tmp_path):
    from alexnet_jax.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path, keep=2)
    errors = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.6, 5: 0.7}  # step 2 is the best, then it gets worse
    for step, err in errors.items():
        ck.save(
            step,
            {"w": np.full((3,), step, np.float32)},
            data={"next_batch": step},
            config={"seed": 0},
            control={},
            metrics={"val/top1_error": err},
        )
    ck.wait()
    assert ck.steps() == [2, 4, 5]
    ck.close()


def test_eval_step_counts_match_numpy_for_center_and_ten_crop():
    from alexnet_jax import AlexNet, make_mesh

    model = AlexNet(width=0.125, image_size=64, num_classes=10, init_std=0.05)
    mesh = make_mesh(towers=2, data=2)
    rng = np.random.default_rng(0)
    imgs_center = rng.normal(0, 50, (8, 64, 64, 3)).astype(np.float32)
    imgs_ten = rng.normal(0, 50, (8, 10, 64, 64, 3)).astype(np.float32)
    label = rng.integers(0, 10, 8).astype(np.int32)
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)  # two padding rows must not count
    c, _ = steps.create_train_state(model, optim.make_optimizer(tiny_config().optim), 0, mesh)
    params = c.params
    step = steps.make_eval_step(model, mesh, parallel.state_shardings(c, mesh).params)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    for images in (imgs_center, imgs_ten):
        flat = images.reshape((-1, 64, 64, 3))
        logits = np.asarray(apply(params, flat), np.float64)  # one device, independent of the mesh
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).reshape(8, -1, 10)
        centre = p[:, 4] if p.shape[1] == 10 else p[:, 0]  # view 4 of the ten is the centre crop
        if p.shape[1] == 10:  # labels at the edge of the centre view's top 5: another view would count otherwise
            rank = np.argsort(-centre, axis=1)
            label = np.where(np.arange(8) % 2 == 0, rank[:, 4], rank[:, 5]).astype(np.int32)
        got = jax.device_get(step(params, prefetch.to_global({"image": images, "label": label, "mask": mask}, mesh)))

        def wrong(q):
            rank = np.argsort(-q, axis=1)
            return (np.sum((rank[:, 0] != label) & mask), np.sum(~np.any(rank[:, :5] == label[:, None], axis=1) & mask))

        assert (int(got["n"]), int(got["top1_error"]), int(got["top5_error"])) == (6, *wrong(centre))
        if p.shape[1] == 10:
            assert (int(got["top1_error_ten_crop"]), int(got["top5_error_ten_crop"])) == wrong(p.mean(1))
            assert wrong(centre) != wrong(p.mean(1)) and wrong(centre) != wrong(p[:, 0])  # both protocols seen


def test_trains_twice_in_one_process_after_jax_has_started(tmp_path):
    """A notebook's case: after ``jax.devices()`` (one CPU device), train_and_evaluate trains on the
    device JAX has, says so in one line, and a second run in the same process gives the first's result
    (the same config and seed: nothing is left behind by the first)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    p = subprocess.run(
        [sys.executable, "tests/_train_twice.py", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    first, second = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert first["devices"] == 1 and first["step"] == second["step"] == 3
    assert first["top1"] == second["top1"]
    note = "Training on the 1 CPU device(s) JAX has: JAX had already started in this process"
    assert p.stdout.count(note) == 2, p.stdout[-3000:]
    assert "leaked shared_memory" not in p.stderr  # the loader's shared memory went with each run
    for run in ("first", "second"):
        assert (tmp_path / run / "checkpoints" / "3").is_dir()

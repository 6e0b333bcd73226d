"""Several processes as one run: two processes with 2 virtual CPU devices each train exactly as one
process with 4 devices does, on the same ('data', 'tower') = (2, 2) mesh and the same global batch.

Everything runs through launch.py, as a user on two hosts would run it, with the coordinator on
localhost and gloo for the CPU collectives. The two-process run is also stopped half-way and
resumed, so its checkpoint is written and read by both processes together, and a DROP_LR request
(read by process 0 only) must reach both.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.model.width=0.125", "--config.batch_size=32", "--config.eval_batch_size=100",
        "--config.data.num_workers=0", "--config.eval_ten_crop=False", "--config.log_every=1",
        "--config.optim.plateau_patience=0", "--config.optim.drop_epochs=()", "--config.mesh.data=2",
        "--config.checkpoint_every=2", "--config.distributed.timeout_s=120"]
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, processes: int, devices: int, *args, timeout=300):
    """``processes`` copies of launch.py, ``devices`` virtual CPU devices each; their (rc, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base["JAX_PLATFORMS"] = "cpu"
    port = free_port()
    procs = []
    for i in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, "launch.py", "--config=configs/demo.py", f"--workdir={workdir}", *TINY,
             f"--config.mesh.cpu_devices={devices}", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def ok(results):
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{out[-2000:]}\n{err[-4000:]}"


def read_state(workdir, step):
    """Plain Orbax, onto this process's first device (the writers' devices do not exist here)."""
    import jax

    path = Path(workdir) / "checkpoints" / str(step) / "state"
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
    return ocp.StandardCheckpointer().restore(path, target)


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    for wd in (one, two):
        (wd / "DROP_LR").write_text("2")  # read after step 1: the LR halves from step 2 on
    single = launch(one, 1, 4, f"--config.total_steps={STEPS}")
    ok(single)
    first = launch(two, 2, 2, f"--config.total_steps={STEPS // 2}")
    ok(first)
    second = launch(two, 2, 2, f"--config.total_steps={STEPS}")  # resumes from step 2, collectively
    ok(second)
    return {"one": one, "two": two, "single": single, "first": first, "second": second}


@pytest.mark.slow  # three launches, two of them of two processes: about 2 minutes on 2 cores
def test_two_processes_end_with_the_parameters_of_one(runs):
    import jax

    a, b = read_state(runs["one"], STEPS), read_state(runs["two"], STEPS)
    assert int(a["step"]) == int(b["step"]) == STEPS
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                for x, y in zip(leaves_a, leaves_b))
    print(f"max |param difference| one vs two processes: {worst:.3g}")
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # The parameters moved: the comparison is not between two copies of the initialisation.
    start = read_state(runs["two"], STEPS // 2)
    assert not np.allclose(start["params"]["towers"]["fc8"]["kernel"], b["params"]["towers"]["fc8"]["kernel"])


@pytest.mark.slow  # three launches, two of them of two processes: about 2 minutes on 2 cores
def test_same_losses_and_lr_drop_every_step(runs):
    la = {m["step"]: (m["train/loss"], m["train/lr"]) for m in metrics(runs["one"]) if "train/loss" in m}
    lb = {m["step"]: (m["train/loss"], m["train/lr"]) for m in metrics(runs["two"]) if "train/loss" in m}
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5)
    assert [lb[s][1] for s in range(1, STEPS + 1)] == pytest.approx([0.01, 0.005, 0.005, 0.005])
    assert not (runs["two"] / "DROP_LR").exists()


@pytest.mark.slow  # three launches, two of them of two processes: about 2 minutes on 2 cores
def test_only_process_zero_reports(runs):
    steps = [m["step"] for m in metrics(runs["two"]) if "train/loss" in m]
    assert len(steps) == len(set(steps)) == STEPS  # one writer: no step twice
    (rc0, out0, _), (rc1, out1, _) = runs["second"]
    assert f"Done at step {STEPS}" in out0 and "Resumed from" in out0
    assert "Done at step" not in out1 and "Resumed from" not in out1 and "alexnet_jax" not in out1
    assert "mesh {'data': 2, 'tower': 2}" in runs["first"][0][1]


def test_settings_come_from_config_then_environment_and_must_be_complete():
    from alexnet_jax import ConfigError
    from alexnet_jax.distributed import settings

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert settings(None, {}) is None  # nothing said: one process
    assert settings(None, env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert settings({"process_id": 0}, env)["process_id"] == 0  # the config wins over the environment
    with pytest.raises(ConfigError, match=r"missing: distributed.num_processes \(or \$JAX_NUM_PROCESSES\)"):
        settings(None, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ConfigError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        settings(None, {**env, "JAX_PROCESS_ID": "2"})
    with pytest.raises(ConfigError, match="must be host:port"):
        settings(None, {**env, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"})


def test_one_process_reads_the_whole_batch():
    from alexnet_jax import make_mesh
    from alexnet_jax.distributed import broadcast_from_main, process_batch_shard

    assert process_batch_shard(make_mesh(towers=2, data=4)) == (0, 1)
    assert broadcast_from_main(2.5) == 2.5 and broadcast_from_main(None) is None

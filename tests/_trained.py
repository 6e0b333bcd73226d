"""Short demo runs shared by the inference, figure and notebook tests, and the subprocesses they start.

``runs(tmp_path_factory)`` trains twice, once per layout, each in a fresh
process: on a 2-device mesh (1 x 2) and on a 2 x 2 mesh. After training,
each process computes class probabilities for fixed images the way its own
evaluation does (``steps.make_input_fn`` + ``mesh_forward`` on its mesh, the
dataset statistics from the data folder) and writes them to
``<workdir>/reference.npz``. ``predict_in_fresh_process`` then loads the
checkpoints with ``alexnet_jax.load_checkpoint`` in a process with another
device count and classifies the same images.

Run as a script: ``python tests/_trained.py train WORKDIR DEVICES DATA_AXIS`` or
``python tests/_trained.py predict DEVICES OUT.npz WORKDIR...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
LAYOUTS = {"1x2": (2, 1), "2x2": (4, 2)}  # name: (devices, data axis)
_cache: dict = {}


def demo_config(devices: int, data_axis: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import tiny_config  # the tiny demo run the training tests use

    return tiny_config(
        **{
            "total_steps": STEPS,
            "eval_every": 3,  # validation points at steps 3 and 6 for the curves
            "optim.drop_epochs": (0.03,),  # 93 steps per epoch: the LR is divided at step 3
            "mesh.cpu_devices": devices,
            "mesh.data": data_axis,
        }
    )


def photo_paths() -> list[str]:
    """Sample images matplotlib installs with itself: a photograph (JPEG) and a rendered picture (RGBA PNG)."""
    from matplotlib import cbook

    return [
        str(cbook.get_sample_data(name, asfileobj=False))
        for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
    ]


def val_images(config, count: int = 10):
    """One validation image per class, decoded by the pipeline: uint8 (count, resize, resize, 3)."""
    import numpy as np

    from alexnet_jax import data as data_lib
    from alexnet_jax.data import sources

    data = data_lib.resolve(config.data)
    src = sources.DecodedSource(data.records["val"], config.data.resize_size, on_error="mask")
    step = len(src) // count
    return np.stack([src[i * step]["image"] for i in range(count)])


def _train(workdir: str, devices: int, data_axis: int) -> None:
    import jax
    import numpy as np

    from alexnet_jax import data as data_lib
    from alexnet_jax import optim, parallel, steps, train
    from alexnet_jax.checkpoint import Checkpointer
    from alexnet_jax.data import sources
    from alexnet_jax.model import from_config
    from alexnet_jax.parallel import DATA_AXIS, make_mesh, mesh_forward

    config = demo_config(devices, data_axis)
    train.train_and_evaluate(config, workdir)

    # What this process's evaluation computes, on its own mesh, with its own data statistics.
    model = from_config(config.model)
    mesh = make_mesh(towers=model.towers, data=data_axis)
    tx = optim.make_optimizer(config.optim)
    shapes = jax.eval_shape(lambda: steps.create_train_state(model, tx, config.seed, mesh)[0])
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, parallel.state_shardings(shapes, mesh)
    )
    ckpt = Checkpointer(workdir)
    params = ckpt.restore_latest(abstract)["state"].params
    ckpt.close()
    data = data_lib.resolve(config.data)
    forward = jax.jit(mesh_forward(model, mesh, train=False))
    resize, crop = config.data.resize_size, config.data.crop_size
    images = list(val_images(config)) + [sources.decode_image(Path(p).read_bytes(), resize) for p in photo_paths()]
    out = {"val_images": np.stack(images[:-2])}
    sys.path.insert(0, str(ROOT / "tests" / "data"))
    import _reference as R  # the paper's views in float64 NumPy, not the package's code

    mean = data.stats["mean_image"] if config.data.mean_subtraction else None
    c = (resize - crop) // 2
    cuts = {
        "center": lambda im: R.paper_view(im, mean, c, c, crop, False)[None],
        "ten_crop": lambda im: R.ten_views(im, mean, crop),
    }
    for mode, cut in cuts.items():
        views = [cut(im).astype(np.float32) for im in images]
        n = len(views) + (-len(views)) % mesh.shape[DATA_AXIS]
        x = np.stack(views + [views[0]] * (n - len(views)))
        x = x.reshape((-1,) + x.shape[-3:])
        probs = np.asarray(jax.nn.softmax(forward({"params": params}, x, None).astype("float32")))
        out[f"probs_{mode}"] = probs.reshape(n, -1, probs.shape[-1]).mean(axis=1)[: len(images)]
    np.savez(Path(workdir) / "reference.npz", **out)


def _predict(out: str, workdirs: list[str]) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from alexnet_jax import Classifier, load_checkpoint

    result = {"devices": np.int32(len(jax.devices()))}
    for i, wd in enumerate(workdirs):
        ref = np.load(Path(wd) / "reference.npz")
        ckpt = load_checkpoint(wd)
        clf = Classifier(ckpt)
        images = list(ref["val_images"]) + photo_paths()
        for mode in ("center", "ten_crop"):
            result[f"{i}_probs_{mode}"] = clf.predict(images, views=mode).probs
        result[f"{i}_mesh"] = np.array([] if ckpt.mesh is None else list(ckpt.mesh.devices.shape))
        # The README's two plain-Orbax lines read the same parameters here too.
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
            f"{ckpt.path}/state", args=ocp.args.StandardRestore(fallback_sharding=one)
        )
        same = jax.tree_util.tree_map(
            lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), state["params"], ckpt.params
        )
        result[f"{i}_plain_orbax_equal"] = np.bool_(all(jax.tree_util.tree_leaves(same)))
    np.savez(out, **result)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _call_all(*commands: list[str]) -> None:
    """Run the commands as concurrent processes (much of each is single-threaded compiling)."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *args],
            cwd=ROOT,
            env=_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for args in commands
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for args, p, (out, err) in zip(commands, procs, outputs):
        if p.returncode:
            raise RuntimeError(f"{args} failed ({p.returncode}):\n{out[-2000:]}\n{err[-4000:]}")


def runs(tmp_path_factory) -> dict[str, Path]:
    """The two trained workdirs, made once per test session."""
    if "runs" not in _cache:
        base = tmp_path_factory.mktemp("demo_runs")
        made = {name: base / name for name in LAYOUTS}
        _call_all(*[["train", str(made[name]), str(d), str(a)] for name, (d, a) in LAYOUTS.items()])
        _cache["runs"] = made
    return _cache["runs"]


def predict_in_fresh_processes(jobs: dict[int, Path], workdirs: list[Path]) -> None:
    """For each ``devices: out.npz``, a process with that many devices classifies with every checkpoint."""
    _call_all(*[["predict", str(d), str(out), *map(str, workdirs)] for d, out in jobs.items()])


if __name__ == "__main__":
    cmd = sys.argv[1]
    import jax

    if cmd == "train":
        _train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "predict":
        jax.config.update("jax_num_cpu_devices", int(sys.argv[2]))
        _predict(sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(f"unknown command {cmd!r}")

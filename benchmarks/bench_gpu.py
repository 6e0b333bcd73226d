"""What one GPU (or whatever JAX runs on) does with this code, in one run: a table per part and one JSON.

    python benchmarks/bench_gpu.py --json gpu.json           # the paper net, batch 128/256/512
    python benchmarks/bench_gpu.py --quick --json quick.json # a tiny net and folder: under 3 minutes on a 2-core CPU

(a) Step rate with the batch already on the device (synthetic uint8 crops, the
    paper config's input path: mean image and PCA lighting inside the step):
    float32 and bfloat16, ops 'fast' and 'plain', each batch size, on one device
    (mesh.tower=1), plus the towers layout (one tower per device) where there are
    two devices or more (on a CPU, two virtual devices are made for it). With
    compile time, XLA's memory estimate of the compiled step and the device's
    peak memory so far (``n/a`` where the backend keeps no statistics).
(b) The same net in PyTorch on the same device, when torch is importable
    (benchmarks/torch_alexnet.py: grouped convolutions, channels_last, bf16 by
    autocast), eager and ``torch.compile`` (not with --quick). Each (a) row that
    has a PyTorch row of the same batch and dtype gets ``vs_torch_eager`` and
    ``vs_torch_compile``: our images/s over theirs.
(c) The loader alone, from packed shards of a synthetic ImageNet-layout folder
    this script writes and prepares itself, in both record formats ('jpeg':
    256x256 JPEGs decoded per image; 'raw': uint8 pixels, no decoding), at 1, 4,
    8 and 16 worker processes (as many as there are cores), and in this process
    (one core, no worker). ``workers_needed`` is (a)'s rate for the end-to-end
    settings over one worker's rate.
(d) ``launch.py`` end to end on those shards (a subprocess, as a user runs it),
    with the settings of one (a) row: images/s between log points after
    compilation (``perf/images_per_s`` in metrics.jsonl), and
    ``end_to_end_share``, that over (a)'s rate.

Numbers from a shared machine are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

# The two sizes: the paper's, and one a 2-core CPU runs in minutes.
SIZES = {
    "full": dict(
        width=1.0,
        image_size=224,
        resize=256,
        batches=(128, 256, 512),
        classes=1000,
        train_per_class=8,
        val_per_class=1,
        photo=(320, 280),
        min_steps=10,
        min_s=2.0,
        loader_s=10.0,
        e2e_steps=400,
        log_every=25,
    ),
    "quick": dict(
        width=0.125,
        image_size=64,
        resize=72,
        batches=(32,),
        classes=10,
        train_per_class=40,
        val_per_class=2,
        photo=(96, 84),
        min_steps=5,
        min_s=0.5,
        loader_s=1.5,
        e2e_steps=60,
        log_every=10,
    ),
}


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def _table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n{title}")
    cells = [
        [
            (
                "n/a"
                if r.get(c) is None
                else (
                    f"{r[c]:,.3g}"
                    if isinstance(r[c], float) and abs(r[c]) < 10
                    else f"{r[c]:,.0f}"
                    if isinstance(r[c], float)
                    else str(r[c])
                )
            )
            for c in cols
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


# ---------------------------------------------------------------------------- (a) step rate on the device


def _stats(resize: int) -> dict:
    r = np.random.default_rng(0)
    return {
        "mean_image": r.uniform(0, 255, (resize, resize, 3)).astype(np.float32),
        "eigval": np.float32([0.2, 0.02, 0.005]),
        "eigvec": np.linalg.qr(r.normal(size=(3, 3)))[0].astype(np.float32),
    }


def _config(size: dict, dtype: str, ops: str, num_classes: int):
    from configs import paper

    c = paper.get_config()
    c.model.width, c.model.image_size, c.model.num_classes = size["width"], size["image_size"], num_classes
    c.model.dtype, c.model.ops = dtype, ops
    c.data.resize_size, c.data.crop_size = size["resize"], size["image_size"]
    return c


def step_rate(size: dict, *, batch: int, dtype: str, ops: str, layout: str, num_classes: int, keep: bool = False):
    """Images/s of the compiled train step on one synthetic uint8 batch that stays on the device.

    With ``keep``: ``(row, again)``, ``again()`` timing the same compiled step once more (images/s).
    """
    import jax
    import jax.numpy as jnp

    from alexnet_jax import optim, parallel, steps
    from alexnet_jax.model import from_config

    cfg = _config(size, dtype, ops, num_classes)
    model = from_config(cfg.model)
    devices = jax.devices()
    mesh = (
        parallel.make_mesh(towers=1, data=1, devices=devices[:1])
        if layout == "one device"
        else parallel.make_mesh(towers=model.towers, data=1, devices=devices[: model.towers])
    )
    tx = optim.make_optimizer(cfg.optim)
    state, shardings = steps.create_train_state(model, tx, 0, mesh)
    S, R = size["image_size"], size["resize"]
    k = jax.random.split(jax.random.key(1), 3)
    batch_ = jax.device_put(
        {
            "image": jax.random.randint(k[0], (batch, S, S, 3), 0, 256).astype(jnp.uint8),
            "label": jax.random.randint(k[1], (batch,), 0, num_classes),
            "mask": jnp.ones((batch,), bool),
            "crop_yx": jax.random.randint(k[2], (batch, 2), 0, R - S + 1),
            "flip": jnp.arange(batch) % 2 == 0,
            "alpha": jnp.full((batch, 3), 0.1, jnp.float32),
        },
        parallel.batch_sharding(mesh),
    )
    step = steps.make_train_step(model, tx, mesh, shardings, steps.make_input_fn(cfg.data, _stats(R)))
    t = time.perf_counter()
    compiled = step.lower(state, batch_).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    xla_mb = (
        None
        if mem is None
        else (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
        / 2**20
    )
    box = {"state": state}

    def timed() -> tuple[float, float]:
        """(seconds per step, last loss): two warm-up steps, then at least min_steps and min_s."""
        st = box["state"]
        for _ in range(2):
            st, m = compiled(st, batch_)
        jax.block_until_ready(m)
        n, t = 0, time.perf_counter()
        while n < size["min_steps"] or time.perf_counter() - t < size["min_s"]:
            st, m = compiled(st, batch_)
            n += 1
            if n % 5 == 0:
                jax.block_until_ready(m)
        jax.block_until_ready(m)
        box["state"] = st
        return (time.perf_counter() - t) / n, float(m["train/loss"])

    dt, loss = timed()
    stats = devices[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    row = {
        "layout": layout,
        "devices": mesh.size,
        "batch": batch,
        "dtype": dtype,
        "ops": ops,
        "img_s": batch / dt,
        "step_ms": dt * 1e3,
        "compile_s": compile_s,
        "xla_MB": xla_mb,
        "peak_MB": None if peak is None else peak / 2**20,
        "loss_finite": bool(np.isfinite(loss)),
    }
    if not keep:
        box.clear()
        return row
    return row, lambda: batch / timed()[0]


# ---------------------------------------------------------------------------- (b) PyTorch


def torch_rates(size: dict, batches, dtypes, num_classes: int, compile_too: bool) -> list[dict]:
    try:
        import torch
        from torch_alexnet import TorchAlexNet
    except ImportError:
        print("\n(b) PyTorch: not importable here; `pip install torch` to add it")
        return []
    import jax

    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    rows = []
    for mode in ("eager", "compile") if compile_too else ("eager",):
        for dtype in dtypes:
            for batch in batches:
                torch.manual_seed(0)
                net = (
                    TorchAlexNet(towers=2, num_classes=num_classes, width=size["width"], image_size=size["image_size"])
                    .to(dev)
                    .to(memory_format=torch.channels_last)
                )
                opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                x = torch.randn(batch, 3, size["image_size"], size["image_size"], device=dev).to(
                    memory_format=torch.channels_last
                )
                y = torch.randint(0, num_classes, (batch,), device=dev)

                def step():
                    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                        loss = torch.nn.functional.cross_entropy(net(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    return loss

                fn = torch.compile(step) if mode == "compile" else step
                sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
                t = time.perf_counter()
                fn(), fn()
                sync()
                warm_s = time.perf_counter() - t
                n, t = 0, time.perf_counter()
                while n < size["min_steps"] or time.perf_counter() - t < size["min_s"]:
                    fn()
                    n += 1
                sync()
                dt = (time.perf_counter() - t) / n
                rows.append(
                    {
                        "torch": mode,
                        "device": dev,
                        "batch": batch,
                        "dtype": dtype,
                        "img_s": batch / dt,
                        "step_ms": dt * 1e3,
                        "warmup_s": warm_s,
                    }
                )
    return rows


# ---------------------------------------------------------------------------- (c) the loader


def _write_class(args) -> None:
    root, c, size = args
    from PIL import Image

    g = np.random.default_rng(c)
    w, h = size["photo"]
    for split, n in (("train", size["train_per_class"]), ("val", size["val_per_class"])):
        d = Path(root) / split / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            small = Image.fromarray(g.integers(0, 256, (12, 12, 3), dtype=np.uint8))
            a = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.int16)
            a = np.clip(a + g.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)  # photo-like detail
            Image.fromarray(a).save(d / f"n{c:08d}_{i}.JPEG", quality=90)


def write_folder(root: Path, size: dict) -> Path:
    """A synthetic ImageNet-layout folder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, larger than the
    stored size (so preparation rescales and re-encodes, as for real photos)."""
    import multiprocessing as mp

    with ProcessPoolExecutor(min(_cores(), 8), mp_context=mp.get_context("spawn")) as ex:  # JAX runs: no fork
        list(ex.map(_write_class, [(str(root), c, size) for c in range(size["classes"])]))
    return root


def _loader_config(size: dict, packed: Path, workers: int):
    c = _config(size, "float32", "auto", size["classes"]).data
    c.packed_dir, c.num_workers = str(packed), workers
    return c


def loader_rate(size: dict, packed: Path, workers: int, batch: int) -> float:
    """Training batches/s from the packed shards (decode, crop, flip, batch), in images/s."""
    from alexnet_jax import data as data_lib

    it = data_lib.build_train_iter(
        _loader_config(size, packed, workers), batch_size=batch, seed=0, image_size=size["image_size"]
    )
    try:
        for _ in range(3 + workers):  # every worker started and warm
            next(it)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < size["loader_s"]:
            next(it)
            n += 1
        return n * batch / (time.perf_counter() - t)
    finally:
        it.close()


def decode_rate(packed: Path, records: str, resize: int) -> float:
    """Records/s of reading one record's pixels (``sources.decode_record_pixels``) on this core."""
    from alexnet_jax.data import prepare, sources

    recs = prepare.packed_records(packed, "train")
    payloads = [recs[i][2] for i in range(min(len(recs), 256))]
    t, n = time.perf_counter(), 0
    while n < 3 * len(payloads) or time.perf_counter() - t < 1.0:
        sources.decode_record_pixels(payloads[n % len(payloads)], resize, records)
        n += 1
    return n / (time.perf_counter() - t)


# ---------------------------------------------------------------------------- (d) launch.py end to end


def end_to_end(
    size: dict, packed: Path, workdir: Path, *, batch: int, dtype: str, workers: int, num_classes: int
) -> dict:
    steps_ = size["e2e_steps"]
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        "--config=configs/paper.py",
        f"--config.data.packed_dir={packed}",
        f"--config.model.width={size['width']}",
        f"--config.model.image_size={size['image_size']}",
        f"--config.data.resize_size={size['resize']}",
        f"--config.data.crop_size={size['image_size']}",
        f"--config.model.num_classes={num_classes}",
        f"--config.model.dtype={dtype}",
        f"--config.batch_size={batch}",
        f"--config.data.num_workers={workers}",
        "--config.mesh.tower=1",
        "--config.mesh.data=1",
        f"--config.total_steps={steps_}",
        f"--config.log_every={size['log_every']}",
        "--config.eval_every=1000000",
        "--config.checkpoint_every=1000000",
        "--config.eval_ten_crop=False",
        f"--workdir={workdir}",
    ]
    t = time.perf_counter()
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"},
    )
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"launch.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/images_per_s"] for r in rows if "perf/images_per_s" in r]
    if not rates:
        raise RuntimeError("launch.py wrote no perf/images_per_s rows; raise e2e_steps")
    return {
        "command": " ".join(cmd[1:]),
        "steps": steps_,
        "intervals": len(rates),
        "img_s": float(np.median(rates)),
        "wall_s": wall,
    }


# ---------------------------------------------------------------------------- the run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny net and folder: under 3 minutes on a 2-core CPU")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--batches", type=int, nargs="*", help="batch sizes for (a)/(b) (default 128 256 512)")
    p.add_argument("--workdir", type=Path, help="folder for the synthetic data and the run (default: a temporary one)")
    p.add_argument(
        "--e2e-records",
        nargs="*",
        choices=("jpeg", "raw"),
        help="record formats (d) trains from (default: both; with --quick, jpeg)",
    )
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'c' for the loader alone")
    p.add_argument("--classes", type=int, help="classes of the synthetic folder (default 1000; --quick 10)")
    p.add_argument("--per-class", type=int, help="training images per class (default 8; --quick 40)")
    p.add_argument("--no-torch", action="store_true", help="leave out (b)")
    p.add_argument("--no-torch-compile", action="store_true", help="(b) eager only")
    a = p.parse_args(argv)
    size = dict(SIZES["quick" if a.quick else "full"])
    if a.batches:
        size["batches"] = tuple(a.batches)
    if a.classes:
        size["classes"] = a.classes
    if a.per_class:
        size["train_per_class"] = a.per_class

    # One GPU, two JAX processes (this one and launch.py in (d)): neither may take 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from alexnet_jax.devices import prepare_devices

    prepare_devices(2)  # on a CPU only: two virtual devices for the towers layout
    import jax

    backend = jax.default_backend()
    devices = jax.devices()
    out = {
        "backend": backend,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "cores": _cores(),
        "jax": jax.__version__,
        "size": "quick" if a.quick else "full",
        "model": {k: size[k] for k in ("width", "image_size", "resize")},
        "num_classes": size["classes"],
    }
    print(
        f"bench_gpu: {len(devices)} x {devices[0].device_kind} ({backend}), {_cores()} cores, "
        f"jax {jax.__version__}, {out['size']} size (width {size['width']}, {size['image_size']}px crops)"
    )
    nc = size["classes"]
    main_dtype = "float32" if backend == "cpu" else "bfloat16"
    auto_ops = "fast" if backend == "cpu" else "plain"  # what model.ops='auto' picks here

    e2e_batch = max(size["batches"])
    rows, again, torch_rows = [], None, []
    if "a" in a.parts:
        for d in ("float32", "bfloat16"):
            for o in ("fast", "plain"):
                for b in size["batches"]:
                    kw = dict(batch=b, dtype=d, ops=o, layout="one device", num_classes=nc)
                    if (b, d, o) == (e2e_batch, main_dtype, auto_ops) and "d" in a.parts:
                        row, again = step_rate(size, **kw, keep=True)  # (d)'s reference: timed again beside it
                    else:
                        row = step_rate(size, **kw)
                    rows.append(row)
        if len(devices) >= 2:
            rows += [
                step_rate(size, batch=b, dtype=main_dtype, ops=auto_ops, layout="towers", num_classes=nc)
                for b in size["batches"]
            ]
    if "b" in a.parts and not a.no_torch:
        torch_rows = torch_rates(
            size, size["batches"], ("float32", "bfloat16"), nc, compile_too=not (a.quick or a.no_torch_compile)
        )
    for r in rows:
        for mode in ("eager", "compile"):
            ref = [
                t for t in torch_rows if t["torch"] == mode and t["batch"] == r["batch"] and t["dtype"] == r["dtype"]
            ]
            r[f"vs_torch_{mode}"] = r["img_s"] / ref[0]["img_s"] if ref and r["layout"] == "one device" else None
    out["step"], out["torch"] = rows, torch_rows
    if rows:
        _table(
            "(a) train step, batch on the device (img/s; vs_torch_*: ours / PyTorch's)",
            rows,
            [
                "layout",
                "devices",
                "batch",
                "dtype",
                "ops",
                "img_s",
                "step_ms",
                "compile_s",
                "xla_MB",
                "peak_MB",
                "vs_torch_eager",
                "vs_torch_compile",
            ],
        )
    if torch_rows:
        _table(
            "(b) PyTorch, same net (grouped convs, channels_last, bf16 autocast)",
            torch_rows,
            ["torch", "device", "batch", "dtype", "img_s", "step_ms", "warmup_s"],
        )
    if not set("cd") & set(a.parts):
        return _finish(a, out)

    from alexnet_jax.data import prepare, sources

    ref = next(
        (
            r["img_s"]
            for r in rows
            if r["layout"] == "one device"
            and r["batch"] == e2e_batch
            and r["dtype"] == main_dtype
            and r["ops"] == auto_ops
        ),
        None,
    )
    worker_counts = [w for w in (1, 4, 8, 16) if w <= _cores()]
    with tempfile.TemporaryDirectory() as tmp:
        base = a.workdir or Path(tmp)
        t = time.perf_counter()
        src = write_folder(base / "imagenet", size)
        out["folder_s"] = time.perf_counter() - t
        loader, packed = [], {}
        for records in sources.RECORD_FORMATS:
            t = time.perf_counter()
            packed[records] = prepare.prepare(
                src, base / f"packed-{records}", size=size["resize"], records=records, progress=False
            )
            prep_s = time.perf_counter() - t
            if "c" not in a.parts:
                continue
            disk = sum(f.stat().st_size for f in packed[records].glob("train-*.array_record"))
            n_train = prepare.read_metadata(packed[records])["splits"]["train"]["num_examples"]
            row = {
                "records": records,
                "workers": "0 (this process)",
                "img_s": loader_rate(size, packed[records], 0, e2e_batch),
                "decode_per_s": decode_rate(packed[records], records, size["resize"]),
                "bytes_per_image": disk / n_train,
                "prepare_s": prep_s,
            }
            loader.append(row)
            one = None
            for w in worker_counts:
                r = loader_rate(size, packed[records], w, e2e_batch)
                one = r if w == 1 else one
                loader.append({"records": records, "workers": w, "img_s": r})
            row["workers_needed"] = ref / one if ref and one else None
        out["loader"] = loader
        if loader:
            _table(
                f"(c) loader alone, packed shards, {size['image_size']}px crops of {size['resize']}px records, "
                f"batch {e2e_batch} (workers_needed: one worker's rate into (a)'s "
                f"{'n/a' if ref is None else f'{ref:,.0f}'} img/s at {main_dtype}, ops {auto_ops})",
                loader,
                ["records", "workers", "img_s", "decode_per_s", "bytes_per_image", "workers_needed", "prepare_s"],
            )

        e2e_rows = []
        if "d" in a.parts:
            e2e_workers = max(1, min(_cores() - 1, 16))  # a core left for the training process
            for records in a.e2e_records or (("jpeg",) if a.quick else sources.RECORD_FORMATS):
                before = again() if again else None  # (a)'s step timed right before and right after:
                e2e = end_to_end(
                    size,
                    packed[records],
                    base / f"run-{records}",
                    batch=e2e_batch,
                    dtype=main_dtype,
                    workers=e2e_workers,
                    num_classes=nc,
                )
                after = again() if again else None  # a busy machine slows both sides alike
                resident = (before + after) / 2 if again else None
                e2e.update(
                    records=records,
                    workers=e2e_workers,
                    batch=e2e_batch,
                    dtype=main_dtype,
                    ops=f"auto ({auto_ops})",
                    device_resident_img_s=resident,
                    device_resident_before_after=[before, after],
                    end_to_end_share=e2e["img_s"] / resident if resident else None,
                )
                e2e_rows.append(e2e)
        out["end_to_end"] = e2e_rows
    if e2e_rows:
        _table(
            "(d) launch.py end to end on the shards, one device (device_resident_img_s: (a)'s step, timed just "
            "before and after)",
            e2e_rows,
            [
                "records",
                "workers",
                "batch",
                "dtype",
                "ops",
                "img_s",
                "device_resident_img_s",
                "end_to_end_share",
                "wall_s",
            ],
        )
        for e2e in e2e_rows:
            if e2e["end_to_end_share"] is not None:
                print(
                    f"end_to_end_share {e2e['end_to_end_share']:.3f} ({e2e['records']} records): launch.py's "
                    "img/s over the device-resident rate of the same step"
                )
    return _finish(a, out)


def _finish(a, out: dict) -> dict:
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")
    return out


if __name__ == "__main__":  # grain starts its workers as fresh processes: they must not rerun this
    main()

"""Speed and memory of AlexNet training and inference: ours beside PyTorch, in one run.

Run (PyTorch is optional; without it the reference columns are empty):

    pip install torch==2.13.0     # CPU build; benchmark only, not a package dependency
    python benchmarks/bench_train.py                     # paper net, batch 128
    python benchmarks/bench_train.py --batch 32 --rounds 2 --no-torch-compile   # a quicker look

Prints one table: images/s of the whole training step (forward, backward,
update) and of inference, peak memory, and the share of the machine's matmul
rate each reaches (model FLOPs per image x images/s / the rate of a large
float32 matmul timed in this run), for the paper net on the two-device tower
mesh, on one device, and for the one-tower ablation, each beside the same
architecture in PyTorch (grouped convolutions, same batch and threads; eager
and ``torch.compile``). Then compile times and step time against batch size.

Timing: every case is compiled and warmed up first; then rounds run all cases
one after another, and each reports its fastest round, so a busy machine
slows all of them alike rather than whichever ran at the wrong moment.
Peak memory is measured in a fresh subprocess per case (peak RSS after two
steps, ``VmHWM`` from ``/proc/self/status``), as a CPU has no allocator statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CASES = {  # name: (model kwargs, mesh (data, tower) or None for one device)
    "paper net, tower mesh 1x2": ({}, (1, 2)),
    "paper net, one device": ({}, (1, 1)),
    "one-tower net, one device": ({"towers": 1}, (1, 1)),
}


def _threads() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------- JAX


def jax_case(name: str, batch: int, dtype: str = "float32"):
    """(train_fn, infer_fn, compile seconds, XLA's memory estimate in MB) for one case."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from alexnet_jax import optim
    from alexnet_jax.model import AlexNet
    from alexnet_jax.parallel import make_mesh, mesh_forward
    from alexnet_jax.steps import create_train_state, make_train_step

    kwargs, (data, tower) = CASES[name]
    model = AlexNet(**kwargs, dtype=dtype)
    devices = jax.devices()[: data * tower]
    mesh = make_mesh(towers=tower, data=data, devices=devices)
    tx = optim.make_optimizer(
        ml_collections.ConfigDict(dict(lr=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False))
    )
    state, shardings = create_train_state(model, tx, 0, mesh)
    step = make_train_step(model, tx, mesh, shardings)
    rng = jax.random.key(1)
    batch_ = {
        "image": jax.random.normal(rng, (batch, 224, 224, 3), jnp.float32),
        "label": jax.random.randint(rng, (batch,), 0, model.num_classes),
        "mask": jnp.ones((batch,), bool),
    }
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    batch_ = jax.device_put(batch_, NamedSharding(mesh, P("data")))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mem_mb = (
        None
        if mem is None
        else (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
        / 2**20
    )
    forward = jax.jit(mesh_forward(model, mesh, train=False))
    infer_compiled = forward.lower({"params": state.params}, batch_["image"], None).compile()
    holder = {"state": state}

    def train():
        holder["state"], metrics = compiled(holder["state"], batch_)
        jax.block_until_ready(metrics["train/loss"])

    def infer():
        jax.block_until_ready(infer_compiled({"params": holder["state"].params}, batch_["image"], None))

    return train, infer, compile_s, mem_mb, model, holder


def jax_matmul_rate(n: int = 4096) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    best = min(_timed(lambda: jax.block_until_ready(f(a))) for _ in range(5))
    return 2 * n**3 / best


# ---------------------------------------------------------------------------- PyTorch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_case(name: str, batch: int, compiled: bool):
    import torch
    import torch.nn.functional as F
    from torch_alexnet import TorchAlexNet

    torch.set_num_threads(_threads())
    kwargs, _ = CASES[name]
    net = TorchAlexNet(**kwargs)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    train_net = torch.compile(net) if compiled else net

    def train():
        net.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(train_net(x), y).backward()
        opt.step()

    def infer():
        net.eval()
        with torch.no_grad():
            train_net(x)

    t0 = time.perf_counter()
    train()
    infer()
    return train, infer, time.perf_counter() - t0, net


def torch_matmul_rate(n: int = 4096) -> float:
    import torch

    torch.set_num_threads(_threads())
    a = torch.randn(n, n)
    a @ a
    return 2 * n**3 / min(_timed(lambda: a @ a) for _ in range(5))


def check_same_architecture(model, params, name: str) -> float:
    """Max |torch - ours| / max |ours| of eval logits with our weights copied in."""
    import jax
    import numpy as np
    import torch
    from torch_alexnet import TorchAlexNet, load_from_jax

    kwargs, _ = CASES[name]
    net = TorchAlexNet(**kwargs).eval()
    load_from_jax(net, jax.device_get(params))
    x = np.random.default_rng(0).normal(0, 50, (2, 224, 224, 3)).astype(np.float32)
    ours = np.asarray(model.apply({"params": jax.device_get(params)}, x))
    with torch.no_grad():
        theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


# ---------------------------------------------------------------------------- helpers


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rounds(fns: dict, rounds: int) -> dict:
    """Fastest of ``rounds`` calls per function, the functions taking turns."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], _timed(fn))
    return best


def memory_probe(case: str, impl: str, batch: int, dtype: str) -> None:
    """Subprocess entry: two training steps, then print peak RSS in MB as JSON."""
    if impl == "jax":
        train, *_ = jax_case(case, batch, dtype)
    else:
        train, *_ = torch_case(case, batch, compiled=impl == "torch.compile")
    train()
    train()
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across fork+exec.
    with open("/proc/self/status") as status:
        hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": hwm_kb / 1024}))


def peak_rss(case: str, impl: str, args) -> float | None:
    cmd = [
        sys.executable,
        __file__,
        "--memory-probe",
        case,
        impl,
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
        "--cpu-devices",
        str(args.cpu_devices),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_rss_mb"]
    print(f"  (memory probe {case} / {impl} failed: {out.stderr.strip().splitlines()[-1:]})")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per case (the fastest is kept)")
    ap.add_argument("--scaling", type=int, nargs="*", default=[32, 64, 128], help="batch sizes to scale over")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--cpu-devices", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-probe", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # CPU only; before JAX starts
    if args.memory_probe:
        memory_probe(*args.memory_probe, args.batch, args.dtype)
        return

    from alexnet_jax.summary import flops_per_image

    use_torch = not args.no_torch and torch_available()
    impls = (
        ["jax"]
        + (["torch eager"] if use_torch else [])
        + (["torch.compile"] if use_torch and not args.no_torch_compile else [])
    )
    devices = jax.devices()
    cases = [c for c in CASES if CASES[c][1][0] * CASES[c][1][1] <= len(devices)]
    print(
        f"# {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), {_threads()} threads, "
        f"batch {args.batch}, {args.dtype}, jax {jax.__version__}"
        + (f", torch {__import__('torch').__version__}" if use_torch else ", no torch")
    )

    rate = jax_matmul_rate()
    rate_src = "jax"
    if use_torch:
        t_rate = torch_matmul_rate()
        if t_rate > rate:
            rate, rate_src = t_rate, "torch"
    print(f"# matmul rate (4096^2 float32, best of jax/torch: {rate_src}): {rate / 1e9:.1f} GFLOP/s")

    train_fns, infer_fns, compile_s, xla_mem, flops, xcheck = {}, {}, {}, {}, {}, {}
    for case in cases:
        train, infer, c_s, mem, model, holder = jax_case(case, args.batch, args.dtype)
        train()
        infer()
        train_fns[(case, "jax")], infer_fns[(case, "jax")] = train, infer
        compile_s[(case, "jax")], xla_mem[case] = c_s, mem
        flops[case] = (flops_per_image(model, train=True), flops_per_image(model, train=False))
        if use_torch:
            xcheck[case] = check_same_architecture(model.clone(dtype="float32"), holder["state"].params, case)
            for impl in impls[1:]:
                t_train, t_infer, c_s, _ = torch_case(case, args.batch, compiled=impl == "torch.compile")
                train_fns[(case, impl)], infer_fns[(case, impl)] = t_train, t_infer
                compile_s[(case, impl)] = c_s

    train_s = _rounds(train_fns, args.rounds)
    infer_s = _rounds(infer_fns, args.rounds)
    mem = {}
    if not args.no_memory:
        for key in train_fns:
            mem[key] = peak_rss(*key, args)

    rows = []
    head = (
        "case",
        "impl",
        "train img/s",
        "vs torch eager",
        "infer img/s",
        "vs torch eager",
        "peak RSS MB",
        "train % of matmul",
        "infer % of matmul",
    )
    for case in cases:
        for impl in impls:
            key = (case, impl)
            tr, inf = args.batch / train_s[key], args.batch / infer_s[key]
            ref = (case, "torch eager")
            rows.append(
                (
                    case,
                    impl,
                    f"{tr:.1f}",
                    f"{train_s[ref] / train_s[key]:.2f}x" if ref in train_s else "",
                    f"{inf:.1f}",
                    f"{infer_s[ref] / infer_s[key]:.2f}x" if ref in infer_s else "",
                    f"{mem[key]:.0f}" if mem.get(key) else "",
                    f"{100 * tr * flops[case][0] / rate:.0f}%",
                    f"{100 * inf * flops[case][1] / rate:.0f}%",
                )
            )
    _print_table(head, rows)
    print()
    print(
        "model GFLOP/image (train = 3x forward): "
        + ", ".join(f"{c}: {flops[c][0] / 1e9:.2f} / {flops[c][1] / 1e9:.2f}" for c in cases)
    )
    print(
        "compile / first-call seconds: "
        + ", ".join(f"{c} [{i}]: {compile_s[(c, i)]:.1f}" for c in cases for i in impls)
    )
    print(
        "XLA's own memory estimate of the JAX train step (MB): "
        + ", ".join(f"{c}: {xla_mem[c]:.0f}" for c in cases if xla_mem[c] is not None)
    )
    if xcheck:
        print(
            "same architecture check, max |torch - ours| / max |ours| on eval logits: "
            + ", ".join(f"{c}: {v:.1e}" for c, v in xcheck.items())
        )

    if args.scaling:
        case = cases[0]
        fns = {}
        for b in args.scaling:
            fns[(b, "jax")] = jax_case(case, b, args.dtype)[0]
            fns[(b, "jax")]()
            if use_torch:
                fns[(b, "torch eager")] = torch_case(case, b, compiled=False)[0]
        times = _rounds(fns, args.rounds)
        print(f"\nstep time vs batch, {case}:")
        rows = []
        for b in args.scaling:
            j = times[(b, "jax")]
            t = times.get((b, "torch eager"))
            rows.append(
                (
                    str(b),
                    f"{j:.3f}",
                    f"{b / j:.1f}",
                    f"{t:.3f}" if t else "",
                    f"{b / t:.1f}" if t else "",
                    f"{t / j:.2f}x" if t else "",
                )
            )
        _print_table(("batch", "jax s/step", "jax img/s", "torch eager s/step", "torch img/s", "ratio"), rows)


def _print_table(head, rows) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()

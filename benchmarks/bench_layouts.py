"""Step time of the device layouts, side by side in one run: towers vs data vs hybrid, on 2 and 4 devices.

    python benchmarks/bench_layouts.py                         # paper net, batch 128, virtual CPU devices
    python benchmarks/bench_layouts.py --width 0.5 --batch 64  # a quicker look
    python benchmarks/bench_layouts.py --net owt               # the "one weird trick" net

What it shows is what each layout costs, not a goal. On a CPU the "devices" are
virtual (``--cpu-devices``, all sharing the same cores), so a collective is a
memory copy and more devices do not add compute: the step times compare the
layouts' overheads, and the bytes column (from ``python -m alexnet_jax.costs``)
says what they would send over a real interconnect. On GPUs the same script
runs on the real devices.

Timing: every case is compiled and warmed up first; then rounds run all cases
one after another, and each reports its fastest round, so a busy machine slows
all of them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--net", choices=["paper", "owt"], default="paper")
    ap.add_argument("--width", type=float, default=1.0, help="model.width (1.0: full size)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--devices", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per round")
    ap.add_argument("--cpu-devices", type=int, default=4, help="virtual CPU devices when there is no accelerator")
    a = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", max(a.cpu_devices, max(a.devices)))  # the CPU backend's only
    import numpy as np

    from alexnet_jax import optim
    from alexnet_jax.costs import layer_costs, rounded
    from alexnet_jax.data.prefetch import to_global
    from alexnet_jax.model import from_config
    from alexnet_jax.parallel import make_mesh
    from alexnet_jax.steps import create_train_state, make_train_step

    sys.path.insert(0, str(ROOT))
    from configs import owt, paper

    cfg = (paper if a.net == "paper" else owt).get_config()
    cfg.model.width = a.width
    model = from_config(cfg.model)
    tx = optim.make_optimizer(cfg.optim)
    rng = np.random.default_rng(0)
    s = model.image_size
    batch = {
        "image": rng.integers(0, 255, (a.batch, s, s, 3)).astype(np.float32) - 120,
        "label": rng.integers(0, model.num_classes, a.batch).astype(np.int32),
        "mask": np.ones(a.batch, bool),
    }
    cases = {}
    for n in a.devices:
        for layout in ("towers", "data", "hybrid"):
            if layout == "towers" and (model.towers == 1 or n % model.towers):
                continue  # one tower: the towers layout is the data layout
            tower = model.towers if layout == "towers" else 1
            mesh = make_mesh(towers=tower, data=n // tower, devices=jax.devices()[:n])
            try:
                state, shardings = create_train_state(model, tx, 0, mesh, layout)
                step = make_train_step(model, tx, mesh, shardings, layout=layout)
            except ValueError as e:  # e.g. the hybrid layout's units do not split
                print(f"{layout} on {n}: skipped ({e})")
                continue
            start = time.perf_counter()
            state, m = step(state, to_global(batch, mesh))
            jax.block_until_ready(m)
            compile_s = time.perf_counter() - start
            c = rounded(layer_costs(model, layout, n, a.batch))["total"]
            cases[(layout, n)] = {
                "step": step,
                "state": state,
                "mesh": mesh,
                "compile_s": compile_s,
                "mb": (c["exchange_bytes_per_step"] + c["gradient_bytes_per_step"]) / 1e6,
                "best": float("inf"),
            }
    for _ in range(a.rounds):
        for case in cases.values():
            start = time.perf_counter()
            for _ in range(a.steps):
                case["state"], m = case["step"](case["state"], to_global(batch, case["mesh"]))
            jax.block_until_ready(m)
            case["best"] = min(case["best"], (time.perf_counter() - start) / a.steps)

    dev = jax.devices()[0]
    print(
        f"\n{a.net} net, width {a.width}, batch {a.batch}, {dev.platform} ({dev.device_kind}), "
        f"{os.cpu_count()} cores; fastest of {a.rounds} rounds of {a.steps} steps\n"
    )
    head = [
        "layout",
        "devices",
        "mesh (data x tower)",
        "step s",
        "images/s",
        "vs data, same devices",
        "MB sent per device per step",
        "compile s",
    ]
    rows = []
    for (layout, n), c in cases.items():
        ref = cases.get(("data", n))
        rows.append(
            [
                layout,
                str(n),
                f"{dict(c['mesh'].shape)['data']} x {dict(c['mesh'].shape)['tower']}",
                f"{c['best']:.3f}",
                f"{a.batch / c['best']:.1f}",
                f"{ref['best'] / c['best']:.2f}x" if ref else "-",
                f"{c['mb']:.1f}",
                f"{c['compile_s']:.1f}",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()

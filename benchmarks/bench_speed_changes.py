"""What each speed change in ``model.py`` buys: the training gradient of the paper net with
the changes switched on one by one, timed side by side in one process.

Run:  python benchmarks/bench_speed_changes.py [--batch 32] [--rounds 3]

Each row adds one change to the row above; the first row is the network written
the plain way (``jax.vmap`` of ``lax.conv`` and ``@`` over the towers,
``reduce_window`` max-pooling and its select-and-scatter gradient,
``x ** -0.75``). The plain versions are swapped in by replacing the functions
the ``Tower`` module calls; the maths of every row is the same. See
``benchmarks/NOTES.md`` for the prediction and result of each change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    import alexnet_jax.model as M
    from alexnet_jax.parallel import make_mesh, mesh_forward

    fast = {"tower_conv": M.tower_conv, "tower_dense": M.tower_dense, "_towers_matmul": M._towers_matmul,
            "max_pool": M.max_pool, "LRN": M.LRN}

    def plain_conv(x, kernel, stride, padding):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    class PowLRN(M.LRN):
        def __call__(self, x):  # LRN as first written: the paper's beta through a general power
            alpha = self.alpha if self.convention == "paper" else self.alpha / self.n
            half = self.n // 2
            s = jax.lax.reduce_window(jnp.square(x), 0.0, jax.lax.add, (1, 1, 1, self.n), (1, 1, 1, 1),
                                      ((0, 0), (0, 0), (0, 0), (half, half)))
            return x * (self.k + alpha * s) ** (-self.beta)

    plain = {
        "tower_conv": plain_conv,
        "tower_dense": lambda x, k: x @ k,
        "_towers_matmul": lambda x, k: jnp.einsum("tni,tio->tno", x, k),  # gradients by autodiff
        "max_pool": lambda x, w, s: nn.max_pool(x, (w, w), strides=(s, s)),
        "LRN": PowLRN,
    }
    steps = [
        ("plain: vmap of conv (grouped) and matmul, select-and-scatter pooling, pow LRN", set()),
        ("+ dense convolution per tower (tower_conv)", {"tower_conv"}),
        ("+ batched matmul per tower (tower_dense)", {"tower_conv", "tower_dense"}),
        ("+ its gradients as plain matmuls, no kernel transposes", {"tower_conv", "tower_dense", "_towers_matmul"}),
        ("+ max-pool gradient without select-and-scatter",
         {"tower_conv", "tower_dense", "_towers_matmul", "max_pool"}),
        ("+ LRN power as rsqrt products (all changes: the code as it is)", set(fast)),
    ]

    B = args.batch
    model = M.AlexNet()
    x = jax.random.normal(jax.random.key(0), (B, 224, 224, 3))
    y = jax.random.randint(jax.random.key(1), (B,), 0, 1000)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    layouts = {"one device": make_mesh(towers=1, data=1, devices=jax.devices()[:1]),
               "tower mesh 1x2": make_mesh(towers=2, data=1)}
    compiled = {}
    for label, on in steps:
        for name in fast:
            setattr(M, name, fast[name] if name in on else plain[name])
        for layout, mesh in layouts.items():
            forward = mesh_forward(model, mesh, train=True)

            def loss(p, x, y, forward=forward):
                logits = forward({"params": p}, x, jax.random.key(2))
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            compiled[(label, layout)] = jax.jit(jax.grad(loss)).lower(params, x, y).compile()
    for name in fast:
        setattr(M, name, fast[name])

    best = {k: float("inf") for k in compiled}
    for k, f in compiled.items():
        jax.block_until_ready(f(params, x, y))
    for _ in range(args.rounds):
        for k, f in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, x, y))
            best[k] = min(best[k], time.perf_counter() - t0)

    print(f"# paper net, forward+backward, batch {B}, fastest of {args.rounds} rounds, "
          f"{jax.devices()[0].device_kind}")
    print("| change | one device s | img/s | tower mesh 1x2 s | img/s |")
    print("|---|---|---|---|---|")
    for label, _ in steps:
        a, b = best[(label, "one device")], best[(label, "tower mesh 1x2")]
        print(f"| {label} | {a:.3f} | {B / a:.1f} | {b:.3f} | {B / b:.1f} |")


if __name__ == "__main__":
    main()

"""What each speed change in ``tower_ops.py`` buys: the training gradient of the paper net with
the changes switched on one by one, timed side by side in one process.

Run:  python benchmarks/bench_speed_changes.py [--batch 32] [--rounds 3]

Each row adds one change to the row above; the first row is the network written
the plain way (``jax.vmap`` of ``lax.conv`` and ``@`` over the towers,
``reduce_window`` max-pooling and its select-and-scatter gradient,
``x ** -0.75``: ``tower_ops.PLAIN``). Each row is a ``TowerOps`` bundle given to the
network's ``ops`` field, mixing ``PLAIN`` and ``FAST`` pieces; the maths and the
parameters of every row are the same. See ``benchmarks/NOTES.md`` for the
prediction and result of each change.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def autodiff_tower_dense(x_NI, kernel_IO):
    """``tower_ops.tower_dense`` without its custom gradient: the row before 'its gradients as plain matmuls'.

    The same vmap rule (the shared input broadcast to every tower, one batched
    matmul); the batched matmul is a plain einsum, whose kernel gradient autodiff
    computes transposed and transposes back.
    """
    import jax
    import jax.numpy as jnp

    @jax.custom_batching.custom_vmap
    def dense(x, kernel):
        return x @ kernel

    @dense.def_vmap
    def per_tower(axis_size, in_batched, x, kernel):
        x_batched, kernel_batched = in_batched
        if not kernel_batched:
            return x @ kernel, x_batched
        xs = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
        return jnp.einsum("tni,tio->tno", xs, kernel), True

    return dense(x_NI, kernel_IO)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from alexnet_jax.devices import prepare_devices

    prepare_devices(2)  # two virtual devices on a CPU; an accelerator is used as it is
    import jax
    import optax

    from alexnet_jax.model import AlexNet
    from alexnet_jax.parallel import make_mesh, mesh_forward
    from alexnet_jax.tower_ops import FAST, PLAIN, TowerConv, TowerDense

    def on(base, **pieces):
        return dataclasses.replace(base, **pieces)

    class AutodiffDense(TowerDense):  # tower_dense's batched matmul, its gradient left to autodiff
        matmul = staticmethod(autodiff_tower_dense)

    steps = [
        ("plain: vmap of conv (grouped) and matmul, select-and-scatter pooling, pow LRN", PLAIN),
        ("+ dense convolution per tower (tower_conv)", on(PLAIN, conv=TowerConv)),
        ("+ batched matmul per tower (tower_dense)", on(PLAIN, conv=TowerConv, dense=AutodiffDense)),
        ("+ its gradients as plain matmuls, no kernel transposes", on(PLAIN, conv=TowerConv, dense=TowerDense)),
        ("+ max-pool gradient without select-and-scatter", on(FAST, lrn_divide=PLAIN.lrn_divide)),
        ("+ LRN power as rsqrt products (all changes: the code as it is)", FAST),
    ]

    B = args.batch
    x = jax.random.normal(jax.random.key(0), (B, 224, 224, 3))
    y = jax.random.randint(jax.random.key(1), (B,), 0, 1000)
    params = jax.jit(AlexNet().init)(jax.random.key(0), x[:1])["params"]  # one tree for every row
    layouts = {"one device": make_mesh(towers=1, data=1, devices=jax.devices()[:1])}
    if len(jax.devices()) >= 2:  # one GPU: the one-device rows only
        layouts["tower mesh 1x2"] = make_mesh(towers=2, data=1, devices=jax.devices()[:2])
    compiled = {}
    for label, ops in steps:
        for layout, mesh in layouts.items():
            forward = mesh_forward(AlexNet(ops=ops), mesh, train=True)

            def loss(p, x, y, forward=forward):
                logits = forward({"params": p}, x, jax.random.key(2))
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            compiled[(label, layout)] = jax.jit(jax.grad(loss)).lower(params, x, y).compile()

    best = {k: float("inf") for k in compiled}
    for _k, f in compiled.items():
        jax.block_until_ready(f(params, x, y))
    for _ in range(args.rounds):
        for k, f in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, x, y))
            best[k] = min(best[k], time.perf_counter() - t0)

    print(f"# paper net, forward+backward, batch {B}, fastest of {args.rounds} rounds, {jax.devices()[0].device_kind}")
    print("| change | one device s | img/s | tower mesh 1x2 s | img/s |")
    print("|---|---|---|---|---|")
    for label, _ in steps:
        a, b = best[(label, "one device")], best.get((label, "tower mesh 1x2"))
        two = f"{b:.3f} | {B / b:.1f}" if b else "n/a (one device) | n/a"
        print(f"| {label} | {a:.3f} | {B / a:.1f} | {two} |")


if __name__ == "__main__":
    main()

"""The train and eval steps compiled for an NVIDIA GPU on a machine without one, and what XLA made of them.

JAX compiles ahead of time for devices it does not have: a GPU topology built from a target description
(``jax.experimental.topologies``) gives compile-only CUDA devices, and a mesh of them compiles the very
program a GPU would run: cuDNN convolutions, Triton GEMMs, asynchronous collectives, the memory plan.
This needs the ``gpu-compile`` extra (JAX's CUDA plugin, ``ptxas`` and ``libdevice``) and JAX started on
the CPU. Without a device XLA cannot autotune: convolution algorithms and GEMM tiles stay at their
defaults, so kernel choice and speed may differ on a real GPU; fusion and the memory plan do not depend
on tuning.

The target descriptions are written here from each GPU's published figures (SM count, clock, memory,
bandwidth, caches, compute capability). ``python -m alexnet_jax.costs --compile_for=h100`` prints the
analysis; ``docs/gpu.md`` has the figures for the paper's net.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.errors import CompileForError


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model, from its vendor's published figures."""

    name: str  # as nvidia-smi names it
    sms: int
    clock_ghz: float  # boost clock
    memory_bytes: int  # as nvidia-smi reports the total
    bandwidth: float  # HBM bytes/s
    l2_bytes: int
    compute_capability: tuple[int, int]
    shared_per_sm: int  # bytes of shared memory per SM, and the most one block may opt into
    shared_per_block_optin: int
    tflops_bf16: float  # dense tensor-core peak
    tflops_tf32: float  # dense tensor-core peak for float32 inputs (XLA's default precision on Ampere and later)


# fmt: off
GPUS = {  # the fields of Gpu, in order: one row per GPU, aligned
    "h100":    Gpu("NVIDIA H100 80GB HBM3",  132, 1.98, 81559 << 20,  3.35e12,  50 << 20, (9, 0), 233472, 232448, 989.4, 494.7),
    "h200":    Gpu("NVIDIA H200",            132, 1.98, 143771 << 20, 4.8e12,   50 << 20, (9, 0), 233472, 232448, 989.4, 494.7),
    "a100-80": Gpu("NVIDIA A100-SXM4-80GB",  108, 1.41, 81920 << 20,  2.039e12, 40 << 20, (8, 0), 167936, 166912, 312.0, 156.0),
    "a100-40": Gpu("NVIDIA A100-SXM4-40GB",  108, 1.41, 40960 << 20,  1.555e12, 40 << 20, (8, 0), 167936, 166912, 312.0, 156.0),
}
# fmt: on
JAX_MEMORY_FRACTION = 0.75  # JAX takes this share of GPU memory at start (XLA_PYTHON_CLIENT_MEM_FRACTION)


def target_config(gpu: Gpu) -> str:
    """``gpu`` as XLA's ``GpuTargetConfigProto`` text: the fields the compiler reads to plan kernels."""
    major, minor = gpu.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_per_sm}
  threads_per_core_limit: 2048
  core_count: {gpu.sms}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.bandwidth)}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes}
  shared_memory_per_block_optin: {gpu.shared_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{gpu.name}"
"""


def cuda_plugin_installed() -> bool:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (13, 12))


def devices(target: str, count: int) -> list:
    """``count`` compile-only devices of ``target`` (a key of ``GPUS``), on one host."""
    if target not in GPUS:
        raise CompileForError(f"unknown target {target!r}; choose one of {', '.join(GPUS)}")
    if not cuda_plugin_installed():
        raise CompileForError("compiling for a GPU needs the gpu-compile extra: pip install -e '.[gpu-compile]'")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            target, "cuda", target_config=target_config(GPUS[target]), topology=f"1x1x{count}"
        )
    except NotImplementedError as e:
        raise CompileForError(
            f"JAX's CUDA plugin did not start ({e}): run with JAX_PLATFORMS=cpu, set before "
            "JAX starts, to compile for a GPU on a machine without one"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileForError(f"this jaxlib cannot read the {target} target description ({first})") from None
    return list(topology.devices)


# ---------------------------------------------------------------------------
# The steps, compiled


def _stats(size: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "mean_image": rng.uniform(0, 255, (size, size, 3)).astype(np.float32),
        "eigval": np.array([0.2, 0.02, 0.005], np.float32),
        "eigvec": np.eye(3, dtype=np.float32),
    }


def compile_steps(config, devs: list, batch: int) -> dict:
    """``{'train': Compiled, 'eval': Compiled}`` for ``config`` (its model, optimizer, data and layout)
    on the devices ``devs``, with a global batch of ``batch``."""
    from alexnet_jax import optim, parallel, steps
    from alexnet_jax.model import from_config

    model = from_config(config.model)
    layout = config.mesh.parallelism
    data, tower = parallel.mesh_shape(model, layout, len(devs))
    if batch % data:
        raise CompileForError(f"--batch={batch} does not split over the {data} devices of the mesh's data axis")
    mesh = parallel.make_mesh(towers=tower, data=data, devices=devs)
    parallel.check_layout(model, mesh, layout)
    tx = optim.make_optimizer(config.optim)
    abstract = jax.eval_shape(lambda: steps.create_train_state(model, tx, 0, parallel.make_mesh(1, 1), layout)[0])
    shardings = parallel.state_shardings(abstract, mesh, layout)
    state = steps.abstract_state(abstract, shardings)
    inputs = steps.make_input_fn(config.data, _stats(config.data.resize_size))
    S, R = config.data.crop_size, config.data.resize_size
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA_AXIS))
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
    train_batch = {
        "image": sds((batch, S, S, 3), jnp.uint8),
        "label": sds((batch,), jnp.int32),
        "mask": sds((batch,), jnp.bool_),
        "crop_yx": sds((batch, 2), jnp.int32),
        "flip": sds((batch,), jnp.bool_),
        "alpha": sds((batch, 3), jnp.float32),
    }
    eval_batch = {
        "image": sds((batch, R, R, 3), jnp.uint8),
        "label": sds((batch,), jnp.int32),
        "mask": sds((batch,), jnp.bool_),
    }
    train = steps.make_train_step(model, tx, mesh, shardings, inputs, layout)
    evaluate = steps.make_eval_step(model, mesh, shardings.params, inputs, layout)
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a compile-only program cannot be read back
    try:
        return {
            "train": train.trace(state, train_batch).lower().compile(),
            "eval": evaluate.trace(state.params, eval_batch).lower().compile(),
        }
    except Exception as e:
        text = str(e)
        if "libdevice" in text or "PTX" in text or "ptxas" in text:
            raise CompileForError(
                "the CUDA compiler tools are missing (ptxas, libdevice): pip install -e '.[gpu-compile]'"
            ) from None
        raise
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)


# ---------------------------------------------------------------------------
# Reading the optimised program

_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_INSTR = re.compile(
    r"^\s+(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>\(.*?\)|\S+) (?P<op>[\w\-]+)\((?P<args>.*?)\)"
    r"(?P<rest>,.*)?$"
)
_NO_TRAFFIC = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")


def type_bytes(text: str) -> int:
    """Bytes of every array in an HLO type (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def entry_instructions(hlo: str) -> list[dict]:
    """The entry computation's instructions: name, result type, opcode, operand names, the rest."""
    lines = hlo.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY "))
    out = []
    for line in lines[start + 1 :]:
        if line.startswith("}"):
            break
        m = _INSTR.match(line)
        if m:
            out.append(
                {
                    "name": m["name"],
                    "type": m["type"],
                    "op": m["op"],
                    "args": re.findall(r"%([\w.\-]+)", m["args"]),
                    "rest": m["rest"] or "",
                }
            )
    return out


def _group_size(rest: str) -> int:
    groups = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if groups:
        return len(groups[1].split(","))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh[1]))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh[2]))
    return 1


def _op_name(rest: str) -> str:
    m = re.search(r'op_name="([^"]*)"', rest)
    return m[1].replace("jit(train_step)/", "").replace("jit(eval_step)/", "") if m else ""


def analyse(
    compiled,
    batch: int,
    devices: int = 1,
    gpu: Gpu | None = None,
    flops_per_image: float | None = None,
    dtype: str = "bfloat16",
) -> dict:
    """Memory, kernels, collectives and HBM traffic of one device's program (every device runs the same).

    HBM bytes are counted at kernel boundaries: each top-level op reads its operands and writes its
    result (an asynchronous collective reads at its start and writes at its end); what a fusion keeps
    in registers or shared memory is not traffic. Per image: all ``devices``' traffic over the global
    ``batch``; the rooflines are the whole mesh's images/s.
    """
    hlo = compiled.as_text()
    ops = entry_instructions(hlo)
    types = {o["name"]: o["type"] for o in ops}
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    rows, kernels, collectives = [], Counter(), {}
    for o in ops:
        op = o["op"]
        if op in _NO_TRAFFIC:
            continue
        base = op.removesuffix("-start").removesuffix("-done")
        if op.endswith("-done"):
            moved = type_bytes(o["type"])
        else:
            moved = sum(type_bytes(types.get(a, "")) for a in dict.fromkeys(o["args"]))
            if not op.endswith("-start"):
                moved += type_bytes(o["type"])
        rows.append({"name": o["name"], "op": op, "bytes": moved, "what": _op_name(o["rest"])})
        if op.endswith("-done"):
            continue
        if base in COLLECTIVES:
            group = _group_size(o["rest"])
            if group > 1:
                size = sum(type_bytes(types.get(a, "")) for a in o["args"]) if base == "reduce-scatter" else None
                if size is None:  # the result: the done op's type, or this op's when synchronous
                    size = type_bytes(o["type"]) if not op.endswith("-start") else _async_result(o["type"])
                factor = 2 if base == "all-reduce" else 1
                c = collectives.setdefault(base, {"count": 0, "bytes": 0, "sent_bytes": 0})
                c["count"] += 1
                c["bytes"] += size
                c["sent_bytes"] += round(factor * size * (group - 1) / group)
            continue
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]*)"', o["rest"])
            target = target[1] if target else ""
            if target.startswith("__cudnn$conv"):
                kernels["cudnn_convolutions"] += 1
            elif "gemm" in target or "matmul" in target:
                kernels["gemms"] += 1
            else:
                kernels["other_custom_calls"] += 1
        elif op == "fusion":
            kernels["fusions"] += 1
            if re.search(r'"kind":"__triton[\w]*gemm', o["rest"]):
                kernels["gemms"] += 1
        if any(word in o["rest"] for word in ("host_transfer", "xla_python_cpu_callback", "xla_ffi_python")):
            kernels["host_transfers"] += 1
        if op in ("send", "recv", "infeed", "outfeed"):
            kernels["host_transfers"] += 1
    hbm = sum(r["bytes"] for r in rows)
    out = {
        "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "peak_bytes_per_device": peak,
        "device_ops": len([r for r in rows if not r["op"].endswith("-done")]),
        "fusions": kernels["fusions"],
        "cudnn_convolutions": kernels["cudnn_convolutions"],
        "gemms": kernels["gemms"],
        "other_custom_calls": kernels["other_custom_calls"],
        "host_transfers": kernels["host_transfers"],
        "collectives": collectives,
        "hbm_bytes_per_step": hbm,
        "hbm_bytes_per_image": hbm * devices / batch,
        "top_ops": sorted(rows, key=lambda r: -r["bytes"])[:10],
    }
    if gpu is not None:
        usable = gpu.memory_bytes * JAX_MEMORY_FRACTION
        tflops = gpu.tflops_bf16 if dtype == "bfloat16" else gpu.tflops_tf32
        out |= {
            "device_memory_bytes": gpu.memory_bytes,
            "fits": peak <= usable,
            "roofline_images_per_s": {"memory": devices * gpu.bandwidth / out["hbm_bytes_per_image"]},
        }
        if flops_per_image:
            out["roofline_images_per_s"]["compute"] = devices * tflops * 1e12 / flops_per_image
    return out


def _async_result(start_type: str) -> int:
    """The result bytes of an ``X-start`` whose type is ``(operand(s), result(s))``."""
    if not start_type.startswith("("):
        return type_bytes(start_type)
    inner = start_type[1:-1]
    depth, cut = 0, None
    for i, ch in enumerate(inner):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            cut = i
            break
    return type_bytes(inner[cut + 1 :]) if cut is not None else type_bytes(start_type)


def dump(compiled: dict, folder: str | Path) -> list[Path]:
    """The optimised HLO text of each step into ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, c in compiled.items():
        path = folder / f"{name}_step.hlo.txt"
        path.write_text(c.as_text())
        written.append(path)
    return written

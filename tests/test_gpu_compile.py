"""The steps compiled for NVIDIA H100s on this CPU (compile-only CUDA devices; the gpu-compile extra).

What is read from each optimised GPU program, and against what:

* the cuDNN convolutions: 14 in the paper net's train step (5 forward, 5 kernel gradients, 4 input
  gradients: conv1's input needs none), 5 in the eval step, counted by hand from Figure 2;
* nothing leaves the device: no host transfer, no callback, no custom call but cuDNN's and cuBLAS's;
* the collectives: none on one device; elsewhere the bytes each device sends equal what
  ``costs.layer_costs`` works out from the layer shapes (which ``test_costs`` checks against the CPU
  program), up to the loss and metric values XLA adds outside the network;
* memory: each device's peak lies between its parameters and momentum and a bound worked out here
  from the parameter and activation sizes; the towers layout holds half the parameter bytes per device.
"""

import math

import numpy as np
import pytest

from alexnet_jax import gpu_compile as G
from alexnet_jax.costs import layer_costs, mesh_shape, rounded
from alexnet_jax.model import from_config
from alexnet_jax.summary import layer_rows

pytest.importorskip("jax_plugins.xla_cuda13", reason="needs the gpu-compile extra: pip install -e '.[gpu-compile]'")

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import owt, paper

BATCH = 64  # global; every layout splits it on 1, 2 and 8 devices
_cache: dict = {}


def config(net="paper", dtype="bfloat16", layout="towers"):
    c = (owt if net == "owt" else paper).get_config()
    c.model.dtype, c.mesh.parallelism = dtype, layout
    return c


def compiled(net, dtype, layout, devices):
    key = (net, dtype, layout, devices)
    if key not in _cache:
        c = config(net, dtype, layout)
        steps = G.compile_steps(c, G.devices("h100", devices), BATCH)
        _cache[key] = (c, {name: G.analyse(s, BATCH, devices) for name, s in steps.items()}, steps)
    return _cache[key]


def param_bytes_per_device(steps, name="train") -> int:
    """The bytes of the entry parameters that hold the network's parameters (``state.params``)."""
    ops = G.entry_instructions(steps[name].as_text())
    return sum(
        G.type_bytes(o["type"])
        for o in ops
        if o["op"] == "parameter" and 'op_name="state.params[' in o["rest"].replace("\\'", "'")
    )


def memory_bounds(c, devices) -> tuple[int, int]:
    """(lower, upper) bytes for one device's train step, from the parameter and activation sizes.

    Lower: the float32 parameters and momentum the device holds. Upper: those, their gradients and
    updated copies, a compute-dtype copy of each; plus, per image the device runs, every layer's
    output (the whole net's, all towers) kept in float32 for the backward pass with four more
    tensors of its size (its gradient, the ReLU and LRN intermediates, the pooling's), and the
    input crop and its float32 form.
    """
    model = from_config(c.model)
    data, tower = mesh_shape(model, c.mesh.parallelism, devices)
    rows = layer_rows(model)
    params = sum(r["params"] for r in rows) * 4
    held = params / (tower if c.mesh.parallelism == "towers" and tower > 1 else 1)
    if c.mesh.parallelism == "hybrid":  # the FC units are split over every device
        fc = sum(r["params"] for r in rows if r["layer"].startswith("fc")) * 4
        held = params - fc + fc / devices
    per_image = sum(model.towers * math.prod(r["per_tower"]) for r in rows) * 4 * 5
    per_image += c.data.crop_size**2 * 3 * (1 + 4)
    images = BATCH // data
    return int(2 * held), int(5 * held + 2 * params * (devices > 1) + images * per_image)


def check_program(c, analysis, steps, devices):
    net_convs = {"train": 14, "eval": 5}
    model = from_config(c.model)
    for name, a in analysis.items():
        assert a["cudnn_convolutions"] == net_convs[name], (name, a["cudnn_convolutions"])
        assert a["gemms"] >= 3 and a["fusions"] > 10, (name, a)
        assert a["host_transfers"] == 0 and a["other_custom_calls"] == 0, (name, a)
        text = steps[name].as_text()
        assert "callback" not in text and "host_transfer" not in text, name
        if devices == 1:
            assert not a["collectives"], (name, a["collectives"])
    lower, upper = memory_bounds(c, devices)
    peak = analysis["train"]["peak_bytes_per_device"]
    assert lower <= peak <= upper, (peak / 1e6, lower / 1e6, upper / 1e6)
    if devices > 1:  # what each device sends, against the costs worked out from the shapes
        total = rounded(layer_costs(model, c.mesh.parallelism, devices, BATCH))["total"]
        got = analysis["train"]["collectives"]
        sent = {kind: c["sent_bytes"] for kind, c in got.items()}
        slack = 2 * BATCH * model.num_classes * 4  # loss, accuracy and top-5 values outside the network
        # The exchanges, forward and back: XLA:GPU may turn a gather and its slice into an all-to-all.
        exchange = sent.get("all-gather", 0) + sent.get("reduce-scatter", 0) + sent.get("all-to-all", 0)
        assert abs(exchange - total["exchange_bytes_per_step"]) <= slack, (got, total)
        assert abs(sent.get("all-reduce", 0) - total["gradient_bytes_per_step"]) <= slack, (got, total)
        assert set(got) <= {"all-gather", "reduce-scatter", "all-reduce", "all-to-all"}, got


def test_the_paper_net_on_one_and_two_h100s():
    """The paper's own setting (two GPUs, one tower each) and one GPU, in bfloat16."""
    one, two = compiled("paper", "bfloat16", "towers", 1), compiled("paper", "bfloat16", "towers", 2)
    for devices, (c, analysis, steps) in ((1, one), (2, two)):
        check_program(c, analysis, steps, devices)
    assert param_bytes_per_device(two[2]) * 2 == param_bytes_per_device(one[2]) == 60_965_224 * 4
    # The exchanges the paper's two GPUs made: conv3's input, fc6's, fc7's and fc8's, forward and back.
    assert two[1]["train"]["collectives"]["all-gather"]["count"] >= 4
    assert two[1]["train"]["collectives"]["reduce-scatter"]["count"] == 4


PROGRAMS = [
    (layout, dtype, devices)
    for layout in ("towers", "data", "hybrid")
    for dtype in ("float32", "bfloat16")
    for devices in (1, 2, 8)
]


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("layout,dtype,devices", PROGRAMS, ids=[f"{a}-{b}-{c}gpu" for a, b, c in PROGRAMS])
def test_every_layout_compiles_for_h100s(layout, dtype, devices):
    net = "owt" if layout == "hybrid" and devices == 8 else "paper"  # 500 classes per tower do not split 8 ways
    c, analysis, steps = compiled(net, dtype, layout, devices)
    check_program(c, analysis, steps, devices)
    if layout == "towers" and devices > 1:
        assert param_bytes_per_device(steps) == 60_965_224 * 4 // 2
    if layout == "data":
        assert param_bytes_per_device(steps) == 60_965_224 * 4


def test_analysis_reads_an_hlo_text_by_hand():
    """The traffic rules on a three-op program: a fusion reads its operands and writes its result;
    an asynchronous all-gather reads at its start, writes at its end; parameters move nothing."""
    text = """HloModule m

ENTRY %main (p0: f32[4,8], p1: bf16[16]) -> bf16[2,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = bf16[16]{0} parameter(1)
  %fusion.1 = bf16[16]{0} fusion(%p0, %p1, %p0), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/conv1/add"}
  %all-gather-start = (bf16[16]{0}, bf16[2,16]{1,0}) all-gather-start(%fusion.1), replica_groups={{0,1}}
  ROOT %all-gather-done = bf16[2,16]{1,0} all-gather-done(%all-gather-start)
}
"""
    ops = G.entry_instructions(text)
    assert [o["op"] for o in ops] == ["parameter", "parameter", "fusion", "all-gather-start", "all-gather-done"]

    class Fake:
        def as_text(self):
            return text

        def memory_analysis(self):
            import types

            return types.SimpleNamespace(
                argument_size_in_bytes=160, output_size_in_bytes=64, alias_size_in_bytes=0, temp_size_in_bytes=32
            )

    a = G.analyse(Fake(), batch=4, devices=2)
    # fusion: reads 128 + 32 (p0 once), writes 32; all-gather: reads 32, writes 64.
    assert a["hbm_bytes_per_step"] == 128 + 32 + 32 + 32 + 64 and a["hbm_bytes_per_image"] == 288 * 2 / 4
    assert a["collectives"] == {"all-gather": {"count": 1, "bytes": 64, "sent_bytes": 32}}
    assert a["peak_bytes_per_device"] == 256 and a["fusions"] == 1 and a["top_ops"][0]["what"] == "conv1/add"
    assert np.isclose(a["hbm_bytes_per_image"], 144)


def test_the_command_as_docs_type_it(tmp_path):
    """docs/gpu.md's command as typed, in the repository root (with --json and --dump_hlo added)."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # as a user has it
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.costs",
            "--compile_for=h100",
            "--devices=1",
            "--dtype=bfloat16",
            "--batch=128",
            f"--json={tmp_path}/out/h100.json",
            f"--dump_hlo={tmp_path}/out/hlo",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert "Compiled for 1 x NVIDIA H100 80GB HBM3" in r.stdout and "cuDNN" in r.stdout
    got = json.loads((tmp_path / "out" / "h100.json").read_text())
    assert got["cudnn_convolutions"] == 14 and got["fits"] and got["collectives"] == {}
    assert got["hbm_bytes_per_image"] <= 40e6 and got["roofline_images_per_s"]["memory"] > 80_000  # NOTES section 5
    assert (tmp_path / "out" / "hlo" / "train_step.hlo.txt").read_text().count("__cudnn$conv") == 14


def test_clear_one_line_errors(tmp_path, monkeypatch, capsys):
    """Unknown target, a batch that does not split, a missing extra, a target this jaxlib cannot read."""
    from alexnet_jax import costs

    root = Path(__file__).resolve().parents[1]
    base = [f"--config={root / 'configs' / 'paper.py'}", "--dtype=bfloat16"]

    def fails(*args):
        with pytest.raises(SystemExit) as e:
            costs.main([*base, *args])
        err = capsys.readouterr().err
        assert e.value.code != 0 and "Traceback" not in err, err
        message = str(e.value.code) if isinstance(e.value.code, str) else err
        return message.strip()

    assert "h100" in fails("--compile_for=v100")  # a usage error listing the choices
    assert "does not divide over the mesh's data axis (8)" in fails(
        "--compile_for=h100", "--devices=8", "--batch=100", "--config.mesh.parallelism=data"
    )
    monkeypatch.setattr(G, "cuda_plugin_installed", lambda: False)
    assert "pip install -e '.[gpu-compile]'" in fails("--compile_for=h100", "--devices=1")
    monkeypatch.setattr(G, "cuda_plugin_installed", lambda: True)
    monkeypatch.setattr(G, "target_config", lambda gpu: "gpu_device_info { no_such_field: 1 }")
    assert "cannot read the h100 target description" in fails("--compile_for=h100", "--devices=1")


def test_a_cuda_plugin_without_a_gpu_is_a_cpu_machine():
    """With JAX's CUDA plugin installed (this extra) and no GPU, JAX starts on the CPU: the virtual CPU
    devices a run asks for are made, and the plugin's failed start is one line, not a traceback."""
    import os
    import subprocess

    code = (
        "from alexnet_jax.devices import prepare_devices\n"
        "why = prepare_devices(2)\n"
        "import jax\n"
        "print(jax.default_backend(), jax.device_count(), why)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu", "2", "None"], r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if "plugin" in line]) <= 1, r.stderr

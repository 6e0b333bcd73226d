"""A user's own ImageNet-layout folder from the command line, exactly as typed: raw, packed, stats_path, demo recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alexnet_jax.data import layout, prepare, sources

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
from _folders import write_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]
DEMO_ON_FOLDER = ["--config=configs/demo.py", "--config.data.name=imagenet", "--config.model.num_classes=4"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"))


def run(*args, cache, timeout=400, module=None):
    """``python launch.py ARGS`` (or ``python -m MODULE ARGS``) with the data cache in ``cache``."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["ALEXNET_JAX_DATA"] = str(cache)
    cmd = [sys.executable, *(["-m", module] if module else ["launch.py"]), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    r.text = r.stdout + r.stderr
    return r


def stats_files(cache):
    return sorted((Path(cache) / "stats").glob("*.npz"))


@pytest.mark.slow
@pytest.mark.heavy  # over a minute on 2 cores: .ci/run runs it when time allows
def test_paper_config_on_a_raw_folder(folder, tmp_path):
    """The README's headline command, with overrides for size only: statistics are made on first use."""
    r = run(
        "--config=configs/paper.py",
        f"--config.data.root={folder}",
        "--config.model.num_classes=4",
        "--config.model.width=0.0625",
        "--config.total_steps=2",
        f"--workdir={tmp_path / 'w'}",
        cache=tmp_path / "cache",
    )
    assert r.returncode == 0, r.text[-3000:]
    assert "computing the mean image (256x256)" in r.text and "Done at step 2" in r.stdout
    (path,) = stats_files(tmp_path / "cache")
    files = layout.scan_split(folder, "train")
    decoded = [sources.decode_image((Path(files.root) / f).read_bytes(), 256) for f in files.rel_paths]
    np.testing.assert_allclose(prepare.load_stats(path)["mean_image"], np.mean(decoded, 0, dtype=np.float64), atol=1e-3)
    metrics = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert {"val/top1_error", "val/top1_error_ten_crop"} <= set([m for m in metrics if "val/top1_error" in m][-1])


@pytest.mark.slow  # two full demo runs; the stats cache itself is in tests/data/test_data_stats.py
@pytest.mark.heavy  # over a minute on 2 cores: .ci/run runs it when time allows
def test_demo_recipe_on_a_users_folder_computes_stats_once(folder, tmp_path):
    first = run(
        *DEMO_ON_FOLDER,
        f"--config.data.root={folder}",
        "--config.total_steps=3",
        f"--workdir={tmp_path / 'a'}",
        cache=tmp_path / "cache",
    )
    assert first.returncode == 0, first.text[-3000:]
    assert "computing the mean image (72x72)" in first.text and "Done at step 3" in first.stdout
    assert "train step 3/3" in first.stdout  # plain progress lines: stdout is not a terminal
    (path,) = stats_files(tmp_path / "cache")
    assert prepare.load_stats(path)["mean_image"].shape == (72, 72, 3)
    again = run(
        *DEMO_ON_FOLDER,
        f"--config.data.root={folder}",
        "--config.total_steps=2",
        f"--workdir={tmp_path / 'b'}",
        cache=tmp_path / "cache",
    )
    assert again.returncode == 0, again.text[-3000:]
    assert "computing" not in again.text and stats_files(tmp_path / "cache") == [path]


@pytest.mark.slow
@pytest.mark.heavy  # over a minute on 2 cores: .ci/run runs it when time allows
def test_packed_form_and_stats_path_from_the_command_line(folder, tmp_path):
    packed = tmp_path / "packed"
    r = run(
        "--src",
        folder,
        "--dst",
        packed,
        "--size",
        72,
        "--quiet",
        cache=tmp_path / "cache",
        module="alexnet_jax.data.prepare",
    )
    assert r.returncode == 0, r.text[-3000:]
    for extra in (
        [f"--config.data.packed_dir={packed}"],  # format 'auto' follows packed_dir
        [f"--config.data.packed_dir={packed}", "--config.data.format=packed"],
        [f"--config.data.root={folder}", f"--config.data.stats_path={packed / 'stats.npz'}"],
    ):
        w = tmp_path / f"w{len(extra)}{extra[0][-6:]}"
        r = run(*DEMO_ON_FOLDER, *extra, "--config.total_steps=2", f"--workdir={w}", cache=tmp_path / "cache")
        assert r.returncode == 0, (extra, r.text[-3000:])
        assert "Done at step 2" in r.stdout and "computing" not in r.text
        saved = json.loads((w / "config.json").read_text())["data"]
        assert all(saved[a.split("=")[0].removeprefix("--config.data.")] == a.split("=")[1] for a in extra)
    assert not (tmp_path / "cache" / "stats").exists()  # nothing computed: the packed form's stats were used


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.data.stats_path=/no/such/stats.npz"], "--config.data.stats_path=/no/such/stats.npz"),
        (["--config.data.val_labels=/no/such/labels.txt"], "labels file '/no/such/labels.txt' does not exist"),
        (["--config.data.packed_dir=/no/such/packed"], "is not a finished packed dataset"),
        (["--config.data.format=folder", "--config.data.packed_dir=/x"], "add --config.data.format=packed"),
        (["--config.data.crop_size=300"], "crop_size=300 is larger than data.resize_size=256"),
    ],
)
def test_config_and_path_errors_come_before_any_scan(folder, tmp_path, args, message):
    root = [] if any("packed_dir" in a for a in args) else [f"--config.data.root={folder}"]
    r = run("--config=configs/paper.py", *root, *args, f"--workdir={tmp_path / 'w'}", cache=tmp_path / "cache")
    assert r.returncode != 0 and message in r.stderr, r.text[-3000:]
    assert "Traceback" not in r.stderr
    assert "alexnet_jax" not in r.stdout and not (tmp_path / "cache").exists()  # no devices, no scan, no stats


@pytest.mark.slow  # a full-width demo run; one device's forward is in test_parallel (1x1 mesh)
def test_one_device_runs_both_towers_and_says_so(tmp_path):
    r = run(
        "--config=configs/demo.py",
        "--config.mesh.cpu_devices=1",
        "--config.total_steps=2",
        "--config.eval_ten_crop=False",
        f"--workdir={tmp_path}",
        cache=tmp_path / "cache",
    )
    assert r.returncode == 0, r.text[-3000:]
    assert "1 cpu device(s) for 2 towers: every device runs all towers (--config.mesh.tower=1" in r.stdout
    assert "mesh {'data': 1, 'tower': 1}" in r.stdout


@pytest.mark.slow
@pytest.mark.heavy  # over a minute on 2 cores: .ci/run runs it when time allows
def test_the_gpu_commands_on_raw_records(folder, tmp_path):
    """README's and docs/gpu.md's GPU lines as typed (sizes overridden: 4 classes, a sixteenth of the
    widths, 2 steps, 1 worker), here on the 2 virtual CPU devices: raw records, bfloat16, the towers
    layout and then the data layout with its batch."""
    packed = tmp_path / "packed-raw"
    r = run(
        "--src",
        folder,
        "--dst",
        packed,
        "--records",
        "raw",
        cache=tmp_path / "cache",
        module="alexnet_jax.data.prepare",
    )
    assert r.returncode == 0, r.text[-3000:]
    assert json.loads((packed / "metadata.json").read_text())["records"] == "raw"
    size = [
        "--config.model.num_classes=4",
        "--config.model.width=0.0625",
        "--config.total_steps=2",
        "--config.data.num_workers=1",
    ]
    one_gpu = [
        "--config=configs/paper.py",
        f"--config.data.packed_dir={packed}",
        "--config.model.dtype=bfloat16",
        "--config.data.num_workers=12",
        f"--workdir={tmp_path / 'paper'}",
    ]
    eight = [
        "--config=configs/paper.py",
        f"--config.data.packed_dir={packed}",
        "--config.model.dtype=bfloat16",
        "--config.batch_size=1024",
        "--config.data.num_workers=32",
        "--config.mesh.parallelism=data",
        f"--workdir={tmp_path / 'paper8'}",
    ]
    for args, batch in ((one_gpu, []), (eight, ["--config.batch_size=8"])):
        r = run(*args, *size, *batch, cache=tmp_path / "cache")
        assert r.returncode == 0, r.text[-3000:]
        assert "Done at step 2" in r.stdout
        saved = json.loads((Path(args[-1].split("=", 1)[1]) / "config.json").read_text())
        assert saved["model"]["dtype"] == "bfloat16" and saved["model"]["ops"] == "auto"
        assert saved["data"]["packed_dir"] == str(packed)
    assert saved["mesh"]["parallelism"] == "data" and saved["batch_size"] == 8

"""``python -m alexnet_jax.evaluate``: a checkpoint's validation error, as a user runs it.

References: the ``Classifier`` (host-side crops, its own forward pass) on the
same decoded images, with errors counted in NumPy; and the same images in
another validation layout (the devkit's ground truth and meta.mat).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _trained
import numpy as np
import pytest

from alexnet_jax import CheckpointError, Classifier, load_checkpoint
from alexnet_jax.data import embedded, sources
from alexnet_jax.data.labels import devkit_file_name
from alexnet_jax.evaluate import evaluate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
from _folders import write_meta_mat  # noqa: E402

pytestmark = pytest.mark.xdist_group("trained_runs")  # one worker trains _trained.runs for all


def evaluate_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "alexnet_jax.evaluate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def errors(probs, labels):
    """Top-1 and top-5 error in float64 NumPy."""
    top5 = np.argsort(-probs.astype(np.float64), axis=1, kind="stable")[:, :5]
    return float(np.mean(top5[:, 0] != labels)), float(np.mean(~(top5 == labels[:, None]).any(axis=1)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _trained.runs(tmp_path_factory)["1x2"]


def test_command_matches_the_classifier_on_the_same_images(run, tmp_path):
    out = tmp_path / "val.json"
    p = evaluate_cli(f"--checkpoint={run}", f"--json={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    assert "ten crops" in p.stdout and f"{got['top1_error']:.4f}" in p.stdout
    # stdout is a pipe, as in a log: the pass ends with a plain progress line (count, rate, time taken).
    assert re.search(r"^evaluating: (\d+)/\1 images \(100%\), [\d,]+ img/s, took ", p.stdout, re.M), p.stdout

    # The images the run validated on, decoded, then classified by another code path.
    config = _trained.demo_config(2, 1)
    from alexnet_jax import data as data_lib

    val = data_lib.resolve(config.data).records["val"]
    src = sources.DecodedSource(val, config.data.resize_size, on_error="mask")
    images = [src[i]["image"] for i in range(len(src))]
    labels = np.array([src[i]["label"] for i in range(len(src))])
    assert got["n"] == got["images"] == len(images) == 500
    clf = Classifier(run, batch_size=100)
    n = len(images)
    for key, views in (("", "center"), ("_ten_crop", "ten_crop")):
        top1, top5 = errors(clf.predict(images, views=views).probs, labels)
        # Float rounding in two forward passes may flip a near-tie: at most one image of 500.
        assert abs(got[f"top1_error{key}"] - top1) * n <= 1, (views, got, top1)
        assert abs(got[f"top5_error{key}"] - top5) * n <= 1, (views, got, top5)


def test_devkit_layout_gives_the_class_folder_result(run, tmp_path):
    """The embedded set's JPEGs as the ILSVRC devkit ships them, and as class folders: equal results."""
    config = _trained.demo_config(2, 1)
    e = config.data.embedded
    folder = embedded.ensure_embedded_dataset(
        None,
        num_train_per_class=e.num_train_per_class,
        num_val_per_class=e.num_val_per_class,
        image_size=e.image_size,
        seed=e.seed,
    )
    files = sorted((folder / "val").rglob("*.*"))
    order = np.random.default_rng(0).permutation(len(files))
    flat = tmp_path / "flat"
    (flat / "val").mkdir(parents=True)
    ids = []
    classes = sorted(p.name for p in (folder / "val").iterdir())
    devkit_ids = {c: 1 + (3 * k + 2) % len(classes) for k, c in enumerate(classes)}  # not the sorted order
    for n, k in enumerate(order, start=1):
        shutil.copy(files[k], flat / "val" / devkit_file_name(n))
        ids.append(devkit_ids[files[k].parent.name])
    data = flat / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    write_meta_mat(data / "meta.mat", devkit_ids)

    out = tmp_path / "devkit.json"
    p = evaluate_cli(
        f"--checkpoint={run}",
        f"--json={out}",
        "--config.data.name=imagenet",
        "--config.data.format=folder",
        f"--config.data.root={flat}",
        "--views=center",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    devkit = json.loads(out.read_text())
    assert "top1_error_ten_crop" not in devkit

    saved = json.loads((run / "config.json").read_text())
    from alexnet_jax.evaluate import config_for_evaluation

    cfg = config_for_evaluation(saved)
    with cfg.unlocked():
        cfg.data.name, cfg.data.format, cfg.data.root = "imagenet", "folder", str(folder)
    by_class = evaluate_checkpoint(run, cfg, views="center")
    assert devkit["n"] == by_class["n"] == len(files)
    assert (devkit["top1_error"], devkit["top5_error"]) == (by_class["top1_error"], by_class["top5_error"])


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --checkpoint=PATH"),
        (["--checkpoint=/no/such/run"], "/no/such/run"),
        (["--config.data.no_such_key=1"], "no_such_key"),
        (["--json=/proc/no/such/dir/val.json"], "cannot write --json=/proc/no/such/dir/val.json"),
        (
            ["--config.data.name=imagenet", "--config.data.format=folder", "--config.data.root=/no/such/data"],
            "/no/such/data",
        ),
    ],
)
def test_bad_command_lines_say_what_is_wrong(run, args, message):
    if args and not args[0].startswith("--checkpoint"):
        args = [f"--checkpoint={run}", *args]
    p = evaluate_cli(*args)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def test_a_damaged_checkpoint_is_one_line_no_traceback_and_is_left_as_it_was(run, tmp_path):
    """Garbled array files: the command says which folder and that it may be damaged, in one line.
    TensorStore's late callbacks into Orbax's closed event loop print no 'ignored' tracebacks."""
    step = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    damaged = tmp_path / "damaged" / "checkpoints" / str(step)
    shutil.copytree(run / "checkpoints" / str(step), damaged)
    for f in (damaged / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the OCDBT data files
            f.write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in damaged.rglob("*") if p.is_file()}
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.evaluate", "--checkpoint=damaged"],  # relative, as typed
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m alexnet_jax.evaluate: Cannot read '") and "damaged" in last, last
    assert str(damaged / "state") in last, last
    with pytest.raises(CheckpointError, match="or damaged"):
        load_checkpoint(tmp_path / "damaged")
    assert {p: p.read_bytes() for p in damaged.rglob("*") if p.is_file()} == before

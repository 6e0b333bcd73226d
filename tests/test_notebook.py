"""The notebook runs top to bottom, headless, against a checkpoint from a short demo run."""

import os
import re
from pathlib import Path

import _trained
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

pytestmark = pytest.mark.xdist_group("trained_runs")  # one worker trains _trained.runs for all

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _trained.runs(tmp_path_factory)


def run_notebook(monkeypatch, checkpoint, figures):
    """Execute the notebook headless on ``checkpoint``; (the executed notebook, all its text output).

    The text holds the printed streams and the plain text of displayed outputs (what rich's
    console shows in a kernel, training's lines among it), colour codes removed.
    """
    monkeypatch.setenv("ALEXNET_JAX_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("ALEXNET_JAX_FIGURES", str(figures))
    monkeypatch.setenv("TMPDIR", str(figures.parent))  # the training cell's workdir (tempfile.mkdtemp)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel gets the default: one CPU device
    src = Path(__file__).resolve().parents[1] / "src"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    text = "\n".join(
        out.get("text", "") + out.get("data", {}).get("text/plain", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    return nb, ANSI.sub("", text)


@pytest.mark.slow  # a Jupyter kernel; the Classifier and figures it calls are in test_inference and test_viz
def test_notebook_loads_classifies_and_draws(runs, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("ALEXNET_JAX_TRAIN_STEPS", "3")
    nb, text = run_notebook(monkeypatch, runs["1x2"], figures)  # trained on 2 devices
    assert f"step {_trained.STEPS} from" in text
    assert "towers placed on one device" in text
    # "Train a few steps here": the run's recipe trains in the kernel on its one device, and loads back.
    assert "Training on the 1 CPU device(s) JAX has: JAX had already started in this process" in text
    assert re.search(r"trained to step 3: validation top-1 error 0\.\d{4}", text), text[-3000:]
    reloaded = re.search(r"reloaded step (\d+) from (\S+)", text)
    assert reloaded and int(reloaded[1]) == 3, text[-3000:]
    step_dir = Path(reloaded[2])
    assert step_dir.is_dir() and step_dir.name == "3" and tmp_path in step_dir.parents, step_dir
    assert "grace_hopper.jpg" in text and "disk, red over blue" in text
    assert "freshly drawn examples classified correctly" in text
    for name in ("conv1_kernels", "curves", "predictions", "neighbours", "layout_costs"):
        with Image.open(figures / f"{name}.png") as im:
            rgb = np.asarray(im.convert("RGB"))
            assert im.width >= 400 and im.height >= 250, (name, im.size)
        assert rgb.std() > 10 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50, name
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) == 5  # each figure shown inline as well


@pytest.mark.slow  # a Jupyter kernel on the full-size converted net
def test_notebook_with_a_converted_caffe_checkpoint(tmp_path, monkeypatch):
    """Figure 3 per tower for imported weights, and Figure 4 searching a gallery that excludes the queries."""
    from test_convert import v1_file

    from alexnet_jax import convert

    (tmp_path / "w.caffemodel").write_bytes(v1_file())
    convert.main(["--caffemodel", str(tmp_path / "w.caffemodel"), "--out", str(tmp_path / "ckpt")])
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (120 + 10 * i, 160, 3), dtype=np.uint8)).save(gallery / f"g{i}.png")
    figures = tmp_path / "figures"
    monkeypatch.setenv("ALEXNET_JAX_GALLERY", str(gallery))
    _, text = run_notebook(monkeypatch, tmp_path / "ckpt", figures)
    assert "step 0 from" in text and "1000 classes" in text and "227x227 crops" in text
    assert "no training curves" in text
    assert "no training here: the checkpoint's data is 'imagenet', not the embedded dataset" in text
    assert "Training on the" not in text
    for name in ("conv1_kernels", "predictions", "neighbours"):
        assert (figures / f"{name}.png").is_file(), name

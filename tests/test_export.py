"""python -m alexnet_jax.export: a weights-only copy that classifies exactly as the full checkpoint."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from test_train import tiny_config

from alexnet_jax import Classifier, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_export_is_a_third_of_the_size_and_classifies_the_same(tmp_path):
    run = tmp_path / "run"
    train.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every=2), run)
    r = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.export", "--checkpoint", str(run), "--out", str(tmp_path / "weights")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    full, light = run / "checkpoints" / "2", tmp_path / "weights" / "checkpoints" / "2"
    ratio = size(light / "state") / size(full / "state")
    print(f"weights-only state / full state: {ratio:.2f}")
    assert 0.3 < ratio < 0.6  # params alone; the full state adds SGD momentum (and the rng)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 80, 90, 3), dtype=np.uint8)
    a = Classifier(load_checkpoint(run, devices=jax.devices()[:2])).predict(images)
    b = Classifier(load_checkpoint(tmp_path / "weights", devices=jax.devices()[:2])).predict(images)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.names == b.names

    again = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.export", "--checkpoint", str(run), "--out", str(tmp_path / "weights")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr, again.stderr[-2000:]

"""Folder statistics made on first use: against NumPy, cached by dataset, computed once under concurrency."""

import fcntl
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import layout as LA
from alexnet_jax.data import prepare as P
from alexnet_jax.data import stats as ST
from alexnet_jax.errors import DatasetError

SIZE = 8


def write_pngs(root, n_per_class=5, seed=0):
    """Square SIZE x SIZE PNGs (lossless, no resize): the decoded pixels are the arrays written."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(3):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            a = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            a[..., 2] = a[..., 0] // 3 + a[..., 2] // 2  # correlated channels: a non-trivial covariance
            Image.fromarray(a).save(d / f"img_{i}.png")
            out.append(a)
    return np.stack(out)


def test_folder_stats_equal_numpy_float64(tmp_path):
    imgs = write_pngs(tmp_path / "src").astype(np.float64)
    files = LA.scan_split(tmp_path / "src", "train")
    path = ST.ensure_stats(files, SIZE, cache_dir=tmp_path / "cache", workers=2, progress=False)
    stats = P.load_stats(path)
    np.testing.assert_allclose(stats["mean_image"], imgs.mean(0), atol=1e-4)
    cov = np.cov(imgs.reshape(-1, 3).T / 255.0, bias=True)
    lam, vec = np.linalg.eigh(cov)
    np.testing.assert_allclose(stats["eigval"], lam[::-1], rtol=1e-4)
    for j in range(3):  # eigenvectors up to sign
        assert abs(abs(stats["eigvec"][:, j] @ vec[:, 2 - j]) - 1) < 1e-4
    assert int(stats["num_images"]) == 15
    assert path.parent == tmp_path / "cache" / "stats" and path.name.startswith(f"src-{SIZE}px-")


def test_cached_by_dataset_and_reused(tmp_path, caplog):
    write_pngs(tmp_path / "src")
    files = LA.scan_split(tmp_path / "src", "train")
    with caplog.at_level(logging.WARNING):
        first = ST.ensure_stats(files, SIZE, cache_dir=tmp_path / "c", workers=0, progress=False)
    assert "computing the mean image" in caplog.text
    mtime = first.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = ST.ensure_stats(
            LA.scan_split(tmp_path / "src", "train"), SIZE, cache_dir=tmp_path / "c", workers=0, progress=False
        )
    assert again == first and again.stat().st_mtime_ns == mtime and "computing" not in caplog.text
    # Another size, or a changed folder, is another dataset.
    assert ST.stats_file(files, SIZE + 1, tmp_path / "c") != first
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "src" / "train" / "n00000000" / "new.png")
    changed = ST.ensure_stats(
        LA.scan_split(tmp_path / "src", "train"), SIZE, cache_dir=tmp_path / "c", workers=0, progress=False
    )
    assert changed != first and int(P.load_stats(changed)["num_images"]) == 16


def test_two_processes_at_once_compute_once(tmp_path):
    """Two `prepare --stats_only` started together: one computes, the other waits and reads its file."""
    root = tmp_path / "src"
    rng = np.random.default_rng(1)
    for c in range(2):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(150):
            Image.fromarray(rng.integers(0, 256, (160, 120, 3), dtype=np.uint8)).save(d / f"{i}.JPEG", quality=90)
    cache = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "alexnet_jax.data.prepare",
        "--src",
        str(root),
        "--stats_only",
        "--size",
        "96",
        "--workers",
        "0",
        "--quiet",
        "--cache_dir",
        str(cache),
    ]
    lock_path = ST.stats_file(LA.scan_split(root, "train"), 96, cache).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True)
    logs = [tmp_path / f"log{i}" for i in range(2)]
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # both start while "someone else" computes
        procs = [
            subprocess.Popen(
                cmd,
                stdout=open(log, "w"),  # noqa: SIM115  the child process writes it
                stderr=subprocess.STDOUT,
            )
            for log in logs
        ]
        deadline = time.time() + 120
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [x.read_text() for x in logs]
            time.sleep(0.2)
    # Released: one of them takes the lock and computes, the other waits for it and reads its file.
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [x.read_text() for x in logs]
    text = "".join(log.read_text() for log in logs)
    assert text.count("computing the mean image") == 1, text
    paths = {
        ln.rsplit(": ", 1)[1] for log in logs for ln in log.read_text().splitlines() if ln.startswith("statistics")
    }
    assert len(paths) == 1 and int(P.load_stats(paths.pop())["num_images"]) == 300
    assert not [f for f in os.listdir(cache / "stats") if ".tmp" in f]


def test_unwritable_cache_says_what_to_do(tmp_path):
    write_pngs(tmp_path / "src")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match="--config.data.cache_dir"):
        ST.ensure_stats(LA.scan_split(tmp_path / "src", "train"), SIZE, cache_dir=blocker, workers=0, progress=False)

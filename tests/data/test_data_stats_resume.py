"""Long passes on a real tree: plain progress lines in a log, a clean stop on SIGTERM/Ctrl-C that the next
run continues from (to the very same statistics), and data.stats='published' (no pass at all)."""

import io
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _folders import write_imagenet_folder

from alexnet_jax.data import device
from alexnet_jax.data import layout as LA
from alexnet_jax.data import prepare as P
from alexnet_jax.data import stats as ST
from alexnet_jax.data.atomic import atomic_savez
from alexnet_jax.data.locate import resolve
from alexnet_jax.data.passprogress import PassProgress
from alexnet_jax.data.pipeline import build_train_iter, default_data_config
from alexnet_jax.errors import DatasetError

SIZE = 256  # photo-sized images at the paper's size: the pass takes seconds, long enough to stop
N = 120
LINE = re.compile(r"^statistics: [\d,]+/120 images \(\d+%\), [\d,]+ img/s, (ETA \S+|took \S+)$")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagenet_folder(tmp_path_factory.mktemp("tree") / "imagenet", per_class=N // 4, val_per_class=1)


def stats_cmd(src, cache, workers, *extra):
    return [
        sys.executable,
        "-m",
        "alexnet_jax.data.prepare",
        "--src",
        str(src),
        "--stats_only",
        "--size",
        str(SIZE),
        "--cache_dir",
        str(cache),
        "--workers",
        str(workers),
        *extra,
    ]


def env(**kw):
    return {**os.environ, "ALEXNET_JAX_PROGRESS_EVERY_S": "0", **kw}


def stop_when(proc, ready, sig, group=False, timeout=120):
    """Send ``sig`` once ``ready()`` is true (the process still running); return (rc, stdout, stderr)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_clean_stop(rc, err, what):
    assert rc == 75, err
    assert "leaked" not in err and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("stopped:")]
    assert what in line and "the same command continues" in line, err


def uninterrupted(folder, tmp_path):
    path = ST.ensure_stats(
        LA.scan_split(folder, "train"), SIZE, cache_dir=tmp_path / "whole", workers=0, progress=False
    )
    return P.load_stats(path)


def test_sigterm_to_the_process_group_mid_pass_then_resume_gives_the_same_stats(folder, tmp_path):
    """As SLURM stops a job: SIGTERM to every process (main and workers); the rerun continues, not restarts."""
    cache = tmp_path / "cache"
    files = LA.scan_split(folder, "train")
    final = ST.stats_file(files, SIZE, cache)
    partial = ST.partial_file(final)
    proc = subprocess.Popen(
        stats_cmd(folder, cache, 2, "--chunk_size", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        start_new_session=True,
    )
    rc, out, err = stop_when(proc, partial.is_file, signal.SIGTERM, group=True)
    assert_clean_stop(rc, err, "statistics pass stopped by SIGTERM")
    assert partial.is_file() and not final.exists()
    with np.load(partial) as z:
        summed = int(z["n_images"])
        assert 0 < summed < N and int(z["done"].sum()) * 2 == summed  # whole chunks of 2, nothing counted twice
    again = subprocess.run(stats_cmd(folder, cache, 1), capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 0, again.stderr
    assert final.is_file() and not partial.exists()
    got, want = P.load_stats(final), uninterrupted(folder, tmp_path)
    assert sorted(got) == sorted(want) and int(got["num_images"]) == N
    for k in want:  # the sums are exact integers in float64: the same bits as one uninterrupted pass
        assert np.array_equal(got[k], want[k]), k
    assert f"resuming at {summed}/{N} images" in again.stdout  # continued, not started over
    assert f"resuming: {summed} of {N} images already summed" in again.stderr


def test_ctrl_c_inline_stops_cleanly_and_progress_lines_go_to_the_log(folder, tmp_path):
    """Ctrl-C with --workers 0 (the pass in the main process); stdout is a pipe: plain lines, count and ETA."""
    cache = tmp_path / "cache"
    partial = ST.partial_file(ST.stats_file(LA.scan_split(folder, "train"), SIZE, cache))
    proc = subprocess.Popen(
        stats_cmd(folder, cache, 0, "--chunk_size", "3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    rc, out, err = stop_when(proc, partial.is_file, signal.SIGINT)
    assert_clean_stop(rc, err, "statistics pass stopped by SIGINT")
    assert "KeyboardInterrupt" not in err
    again = subprocess.run(stats_cmd(folder, cache, 0), capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 0, again.stderr
    lines = [ln for ln in (out + again.stdout).splitlines() if ln.startswith("statistics: ") and "resuming" not in ln]
    assert lines and all(LINE.match(ln) for ln in lines), lines
    assert any("ETA" in ln for ln in lines), lines
    assert again.stdout.splitlines()[-2].startswith(f"statistics: {N}/{N} images (100%)")
    for k, v in uninterrupted(folder, tmp_path).items():
        assert np.array_equal(P.load_stats(ST.stats_file(LA.scan_split(folder, "train"), SIZE, cache))[k], v), k


def test_progress_lines_off_a_terminal():
    out = io.StringIO()
    with PassProgress("statistics", 1_281_167, every_s=0, stream=out) as bar:
        time.sleep(0.01)
        bar.update(12_345)
        bar.update(1_281_167)
    first, last = out.getvalue().splitlines()
    assert re.match(r"statistics: 12,345/1,281,167 images \(0%\), [\d,]+ img/s, ETA \S+$", first), first
    assert re.match(r"statistics: 1,281,167/1,281,167 images \(100%\), [\d,]+ img/s, took \S+$", last), last
    quiet = io.StringIO()
    with PassProgress("statistics", 10, enabled=False, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_prepare_stopped_by_sigterm_exits_cleanly_and_resumes(tmp_path):
    src = write_imagenet_folder(tmp_path / "src", per_class=10, val_per_class=1)
    dst = tmp_path / "packed"
    cmd = [
        sys.executable,
        "-m",
        "alexnet_jax.data.prepare",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--size",
        "128",
        "--shard_size",
        "2",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True
    )
    rc, out, err = stop_when(proc, lambda: any(dst.glob("*.done.json")), signal.SIGTERM, group=True)
    assert_clean_stop(rc, err, "preparation stopped by SIGTERM")
    assert not (dst / P.METADATA).exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 0, again.stderr
    assert re.search(r"^prepare: 44/44 images \(100%\), [\d,]+ img/s, took \S+$", again.stdout, re.M), again.stdout
    assert P.read_metadata(dst)["splits"]["train"]["num_examples"] == 40


def published_cfg(root, cache):
    cfg = default_data_config()
    cfg.name, cfg.root, cfg.cache_dir, cfg.stats = "imagenet", str(root), str(cache), "published"
    cfg.resize_size, cfg.crop_size, cfg.num_workers = SIZE, 56, 0
    return cfg


def test_published_stats_need_no_pass(folder, tmp_path):
    cfg = published_cfg(folder, tmp_path / "cache")
    data = resolve(cfg)
    assert not (tmp_path / "cache").exists()  # no pass, no stats file, no partial sums
    s = data.stats
    assert s["mean_image"].shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(
        s["mean_image"], np.broadcast_to(np.float32(np.array([0.485, 0.456, 0.406]) * 255), (SIZE, SIZE, 3))
    )
    np.testing.assert_array_equal(s["eigval"], np.float32([0.2175, 0.0188, 0.0045]))
    np.testing.assert_array_equal(
        s["eigvec"], np.float32([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    )
    # The first principal component (the largest eigenvalue) is brightness: alpha on it alone moves R, G and B
    # alike (a transposed matrix would give -0.57, 0.72, 0.40: a colour shift).
    one = {
        "image": np.zeros((1, 1, 1, 3), np.uint8),
        "crop_yx": np.zeros((1, 2), np.int32),
        "flip": np.zeros(1, bool),
        "alpha": np.float32([[1.0, 0, 0]]),
    }
    offset = np.asarray(device.normalize(one, None, s["eigval"], s["eigvec"]))[0, 0, 0]
    np.testing.assert_allclose(offset, -255 * 0.2175 * np.array([0.5675, 0.5808, 0.5836]), rtol=1e-6)
    assert np.ptp(offset) < 0.03 * np.abs(offset).max()
    it = build_train_iter(cfg, batch_size=4, seed=0, num_workers=0, data=data)
    batch = next(it)
    it.close()
    assert batch["image"].shape == (4, 56, 56, 3) and not (tmp_path / "cache").exists()


def test_stats_field_is_checked(folder, tmp_path):
    cfg = published_cfg(folder, tmp_path / "cache")
    cfg.stats = "pubished"
    with pytest.raises(DatasetError, match=r"data.stats must be one of 'computed', 'published', got 'pubished'"):
        resolve(cfg)
    cfg.stats = "published"
    stats_npz = tmp_path / "stats.npz"
    atomic_savez(stats_npz, ST.published_stats(SIZE))
    cfg.stats_path = str(stats_npz)
    with pytest.raises(DatasetError, match=r"data.stats='published' .* data.stats_path=.* give one or the other"):
        resolve(cfg)
    assert default_data_config().stats == "computed"  # the paper's own mean image is the default


def test_computed_stats_are_unchanged_by_the_field(folder, tmp_path):
    """data.stats='computed' (the default) is the pass, cached: the same file ensure_stats makes."""
    cfg = published_cfg(folder, tmp_path / "cache")
    cfg.stats = "computed"
    cfg.prepare_workers = 0
    data = resolve(cfg, progress=False)
    path = ST.stats_file(LA.scan_split(folder, "train"), SIZE, tmp_path / "cache")
    assert path.is_file() and not ST.partial_file(path).exists()
    for k, v in P.load_stats(path).items():
        assert np.array_equal(data.stats[k], v), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_folder_scan_stops_as_during_the_pass(folder, tmp_path, monkeypatch, capsys, sig):
    """The signal arrives (a real one, to this process) while prepare lists the class folders: the same
    ``stopped:`` line and status 75 as a stopped pass, and nothing written to the cache."""
    listed = []

    def is_image_file(name, original=LA._is_image_file):
        if not listed:
            os.kill(os.getpid(), sig)  # delivered to prepare's handler now, mid-scan
        listed.append(name)
        return original(name)

    monkeypatch.setattr(LA, "_is_image_file", is_image_file)
    cache = tmp_path / "cache"
    rc = P.main(
        ["--src", str(folder), "--stats_only", "--size", str(SIZE), "--cache_dir", str(cache), "--workers", "0"]
    )
    err = capsys.readouterr().err
    assert rc == 75, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("stopped:")]
    assert f"folder scan stopped by {signal.Signals(sig).name}" in line and "the same command" in line, err
    assert "Traceback" not in err and not (cache.exists() and any(cache.rglob("*"))), list(cache.rglob("*"))
    assert 0 < len(listed) < N  # stopped inside the scan, not after it

"""The training set's mean image and RGB eigens (paper, Section 4.1): the sums, and a folder's cached pass.

Preparation (:mod:`packing`) and the folder pass here add the same exact per-image sums (integers in
float64: any order, and a resumed pass, give the same result), finished by :func:`finish_stats`. A
folder's result is cached under its path, resize size and file list, and a file lock lets one starting
process compute while the others wait. ``data.stats='published'`` skips the pass (:func:`published_stats`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from alexnet_jax.data import layout, sources
from alexnet_jax.data.atomic import atomic_savez, atomic_write_json
from alexnet_jax.data.jobs import run_jobs, tick
from alexnet_jax.errors import DatasetError, DecodeError, PassInterrupted

log = logging.getLogger(__name__)


def image_sums(img_HWC: np.ndarray) -> dict:
    """The sufficient statistics one uint8 image contributes."""
    x = img_HWC.astype(np.float64)
    px = x.reshape(-1, 3)
    return {"sum_image": x, "sum_rgb": px.sum(0), "sum_outer": px.T @ px, "n_images": 1, "n_pixels": px.shape[0]}


def add_sums(a: dict | None, b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in a}


def finish_stats(sums: dict) -> dict:
    """Sums -> mean image (0..255) and RGB covariance/eigens (on [0, 1] pixels), eigenvalues descending."""
    n_img, n_px = sums["n_images"], sums["n_pixels"]
    mean_image = sums["sum_image"] / n_img
    mu = sums["sum_rgb"] / n_px
    cov = (sums["sum_outer"] / n_px - np.outer(mu, mu)) / 255.0**2
    cov = (cov + cov.T) / 2
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    # A fixed sign per eigenvector (largest component positive) keeps runs comparable.
    eigvec = eigvec * np.sign(eigvec[np.abs(eigvec).argmax(0), np.arange(3)])
    return {
        "mean_image": mean_image.astype(np.float32),
        "rgb_mean": (mu / 255.0).astype(np.float32),
        "rgb_cov": cov.astype(np.float32),
        "eigval": eigval.astype(np.float32),
        "eigvec": eigvec.astype(np.float32),
        "num_images": np.int64(n_img),
    }


def load_stats(path: str | os.PathLike) -> dict:
    """stats.npz -> dict of arrays (``mean_image`` HWC float32, ``eigval`` (3,), ``eigvec`` (3, 3) columns)."""
    if not Path(path).is_file():
        raise DatasetError(f"no statistics file {str(path)!r}; run `python -m alexnet_jax.data.prepare`")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$ALEXNET_JAX_DATA``, else ``~/.cache/alexnet_jax``."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("ALEXNET_JAX_DATA") or Path.home() / ".cache" / "alexnet_jax")


def stats_file(files: layout.SplitFiles, size: int, cache_dir=None, warp: bool = False) -> Path:
    """Where the statistics of these training files at this size (and resize mode) live in the cache."""
    root = Path(files.root).resolve()
    what = {"root": str(root), "size": size, "files": files.rel_paths, **({"warp": True} if warp else {})}
    key = hashlib.sha256(json.dumps(what).encode())
    name = root.parent.name or "data"  # the dataset folder (root is its train/ folder)
    return cache_root(cache_dir) / "stats" / f"{name}-{size}px{'-warp' if warp else ''}-{key.hexdigest()[:16]}.npz"


# ImageNet's published statistics (data.stats='published'): no pass over the training set.
# Mean: the per-channel RGB mean of ImageNet training images on [0, 1] pixels, 0.485, 0.456, 0.406, as in
# torchvision's ImageNet normalisation and fb.resnet.torch (datasets/imagenet.lua: "Computed from random
# subset of ImageNet training images"); here x255, the constant image in our 0..255 units.
PUBLISHED_RGB_MEAN = (0.485, 0.456, 0.406)
# PCA lighting: fb.resnet.torch datasets/imagenet.lua `pca` (used by later reproductions, e.g. PyTorch
# ports of its Lighting transform). Its Lighting adds eigvec * (alpha * eigval) to [0, 1] pixels
# (rgb[i] = sum_j eigvec[i][j] * alpha[j] * eigval[j]), so the COLUMNS are the eigenvectors and eigval is on
# the [0, 1] pixel scale: our convention (device.normalize: 255 * eigvec @
# (alpha * eigval)), and the scale of the computed eigval (finish_stats divides the covariance by 255^2).
# The first column is the luminance direction (all three components about -0.58; the sign does not
# matter, alpha is symmetric about 0).
PUBLISHED_EIGVAL = (0.2175, 0.0188, 0.0045)
PUBLISHED_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def published_stats(size: int) -> dict:
    """The statistics ``data.stats='published'`` uses, in :func:`finish_stats`'s form.

    ``mean_image``: the constant ``size x size`` image of the published RGB mean (0..255);
    ``eigval``/``eigvec``: fb.resnet.torch's PCA (columns are eigenvectors, [0, 1] pixel scale).
    """
    mean = np.asarray(PUBLISHED_RGB_MEAN, np.float64)
    eigval = np.asarray(PUBLISHED_EIGVAL, np.float64)
    eigvec = np.asarray(PUBLISHED_EIGVEC, np.float64)
    return {
        "mean_image": np.broadcast_to(255.0 * mean, (size, size, 3)).astype(np.float32),
        "rgb_mean": mean.astype(np.float32),
        "rgb_cov": (eigvec @ np.diag(eigval) @ eigvec.T).astype(np.float32),
        "eigval": eigval.astype(np.float32),
        "eigvec": eigvec.astype(np.float32),
        "num_images": np.int64(0),
    }


def partial_file(stats_path: Path) -> Path:
    """Where an unfinished pass keeps its sums: beside the stats file, under the same fingerprint."""
    return stats_path.with_name(stats_path.stem + ".partial.npz")


def _sums_job(job: dict) -> dict:
    """Sums over one chunk of images (runs in a worker process)."""
    sums, skipped = None, []
    for rel in job["rel_paths"]:
        path = os.path.join(job["root"], rel)
        try:
            with open(path, "rb") as f:
                img = sources.decode_image(f.read(), job["size"], job.get("warp", False))
        except (OSError, DecodeError) as e:
            skipped.append([path, str(e)])
        else:
            sums = add_sums(sums, image_sums(img))
        tick()
    return {"index": job.get("index", 0), "sums": sums, "skipped": skipped}


SUM_KEYS = ("sum_image", "sum_rgb", "sum_outer", "n_images", "n_pixels")
SAVE_EVERY_S = 10.0  # the sums so far are saved when a chunk finishes this long after the last save


def _read_partial(path: Path, num_files: int) -> dict | None:
    """The saved state of an unfinished pass over these files, or None (absent, unreadable or another pass)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            state = {k: z[k] for k in z.files}
        if int(state["num_files"]) != num_files:
            raise ValueError(f"{int(state['num_files'])} files, not {num_files}")
        done = state["done"].astype(bool)
        if len(done) != -(-num_files // int(state["chunk_size"])):
            raise ValueError("chunk count")
    except Exception as e:
        log.warning("statistics: ignoring the unusable partial sums %s (%s); starting over", path, e)
        return None
    sums = {k: state[k] for k in SUM_KEYS} if done.any() else None
    if sums is not None:
        sums["n_images"], sums["n_pixels"] = int(sums["n_images"]), int(sums["n_pixels"])
    return {
        "chunk_size": int(state["chunk_size"]),
        "done": done,
        "sums": sums,
        "skipped": json.loads(str(state["skipped"])),
    }


def _save_partial(path: Path, state: dict, num_files: int) -> None:
    arrays = {
        "num_files": np.int64(num_files),
        "chunk_size": np.int64(state["chunk_size"]),
        "done": state["done"],
        "skipped": np.asarray(json.dumps(state["skipped"])),
    }
    if state["sums"] is not None:
        arrays.update({k: np.asarray(state["sums"][k]) for k in SUM_KEYS})
    atomic_savez(path, arrays)


def default_chunk_size(n: int) -> int:
    """Images per job: about 64 jobs for a small set, 512 for a large one (independent of the workers,
    so a pass resumed with another worker count has the same chunks)."""
    return max(16, min(512, -(-n // 64)))


def compute_stats(
    files: layout.SplitFiles,
    size: int,
    *,
    workers: int | None = None,
    progress: bool = True,
    warp: bool = False,
    partial: str | os.PathLike | None = None,
    chunk_size: int | None = None,
) -> dict:
    """Mean image and RGB eigens of ``files`` decoded at ``size``, as preparation computes them.

    With ``partial`` (a file path) the pass resumes: the finished chunks' sums are saved there atomically
    (at most every ``SAVE_EVERY_S``, after the first chunk, and on stop) and a later call continues from
    them, to the very result of an uninterrupted pass. SIGTERM or Ctrl-C raises :class:`PassInterrupted`
    after saving.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    n = len(files)
    partial = Path(partial) if partial is not None else None
    state = _read_partial(partial, n) if partial is not None else None
    if state is not None:
        if chunk_size and chunk_size != state["chunk_size"]:
            log.warning("statistics: resuming with the chunk size the pass started with, %d", state["chunk_size"])
        chunk = state["chunk_size"]
    else:
        chunk = chunk_size or default_chunk_size(n)
        state = {"chunk_size": chunk, "done": np.zeros(-(-n // chunk), bool), "sums": None, "skipped": []}
    jobs = [
        {"index": k, "root": files.root, "rel_paths": files.rel_paths[i : i + chunk], "size": size, "warp": warp}
        for k, i in enumerate(range(0, n, chunk))
        if not state["done"][k]
    ]
    done_before = n - sum(len(j["rel_paths"]) for j in jobs)
    if done_before:
        log.warning("statistics: resuming: %d of %d images already summed (%s)", done_before, n, partial)
    saved = {"t": None}

    def save() -> None:
        if partial is not None:
            _save_partial(partial, state, n)
            saved["t"] = time.monotonic()

    def reduce(result):
        state["skipped"].extend(result["skipped"])
        if result["sums"] is not None:
            state["sums"] = add_sums(state["sums"], result["sums"])
        state["done"][result["index"]] = True
        if saved["t"] is None or time.monotonic() - saved["t"] >= SAVE_EVERY_S:
            save()

    if jobs:
        try:
            run_jobs(
                _sums_job,
                jobs,
                min(workers, len(jobs)),
                n - done_before,
                progress,
                "statistics",
                on_result=reduce,
                done_before=done_before,
            )
        except PassInterrupted as e:
            save()
            summed = int(sum(min(chunk, n - k * chunk) for k in np.flatnonzero(state["done"])))
            raise PassInterrupted(
                f"statistics pass stopped by {e.signal_name} at {summed:,}/{n:,} images; the sums so far are "
                f"saved in {str(partial)!r} and the same command continues from them."
                if partial is not None
                else f"statistics pass stopped by {e.signal_name}",
                e.signal_name,
                summed,
            ) from None
    if not state["done"].all():  # run_jobs returns only when every job is done; never finish on a part
        raise DatasetError(f"statistics: {int((~state['done']).sum())} chunk(s) of images were not summed")
    skipped = state["skipped"]
    if skipped:
        log.warning("statistics: skipped %d unreadable file(s), e.g. %s", len(skipped), skipped[:5])
    if state["sums"] is None:
        raise DatasetError(f"no readable training image under {files.root!r}")
    return finish_stats(state["sums"])


def ensure_stats(
    files: layout.SplitFiles,
    size: int,
    *,
    cache_dir=None,
    workers: int | None = None,
    progress: bool = True,
    warp: bool = False,
    chunk_size: int | None = None,
) -> Path:
    """The cached statistics file for ``files`` at ``size``, computed now if it is not there yet.

    The pass is resumable: a run stopped by SIGTERM or Ctrl-C (:class:`PassInterrupted`)
    leaves its sums in :func:`partial_file`, and the next call continues from them.
    """
    path = stats_file(files, size, cache_dir, warp)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115  entered by the with below
    except OSError as e:
        raise DatasetError(
            f"cannot write the statistics cache {str(path.parent)!r}: {e}. Set --config.data.cache_dir to a "
            "writable folder, or give a ready stats.npz with --config.data.stats_path."
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process that is computing %s", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():  # made by the process we waited for
            return path
        t0 = time.time()
        log.warning(
            "computing the mean image (%dx%d) and RGB eigens over %d training images into %s; "
            "done once, later runs reuse it",
            size,
            size,
            len(files),
            path,
        )
        for stale in path.parent.glob(f".{partial_file(path).name}.tmp*"):  # a save cut short by SIGKILL
            stale.unlink(missing_ok=True)
        stats = compute_stats(
            files,
            size,
            workers=workers,
            progress=progress,
            warp=warp,
            partial=partial_file(path),
            chunk_size=chunk_size,
        )
        atomic_savez(path, stats)
        atomic_write_json(
            path.with_suffix(".json"),
            {
                "root": str(Path(files.root).resolve()),
                "size": size,
                "num_images": int(stats["num_images"]),
                "seconds": round(time.time() - t0, 1),
            },
        )
        partial_file(path).unlink(missing_ok=True)
    return path

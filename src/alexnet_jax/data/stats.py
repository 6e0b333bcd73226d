"""The training set's statistics for a JPEG folder, computed on first use and cached.

Mean subtraction and PCA lighting (paper, Section 4.1) need the mean image at
the resize size and the eigenvectors/eigenvalues of the 3x3 RGB covariance.
The packed form carries them (``stats.npz`` from ``prepare``); for a raw
folder they are made here, once: every training image is decoded exactly as
training decodes it, in parallel processes, with a progress bar.

The result is cached under ``<cache>/stats/`` (``cache`` is ``data.cache_dir``,
else ``$ALEXNET_JAX_DATA``, else ``~/.cache/alexnet_jax``), keyed by the
folder's absolute path, the resize size and the list of training files, so a
changed folder gets new statistics. Several processes starting at once (two
runs, or the processes of one run on a shared disk) take a file lock: one
computes, the others wait and read its file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from alexnet_jax.data import layout, prepare, sources
from alexnet_jax.data.errors import DatasetError, DecodeError

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$ALEXNET_JAX_DATA``, else ``~/.cache/alexnet_jax``."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get('ALEXNET_JAX_DATA') or Path.home() / '.cache' / 'alexnet_jax')


def stats_file(files: layout.SplitFiles, size: int, cache_dir=None, warp: bool = False) -> Path:
    """Where the statistics of these training files at this size (and resize mode) live in the cache."""
    root = Path(files.root).resolve()
    what = {'root': str(root), 'size': size, 'files': files.rel_paths, **({'warp': True} if warp else {})}
    key = hashlib.sha256(json.dumps(what).encode())
    name = root.parent.name or 'data'  # the dataset folder (root is its train/ folder)
    return cache_root(cache_dir) / 'stats' / f'{name}-{size}px{"-warp" if warp else ""}-{key.hexdigest()[:16]}.npz'


def _sums_job(job: dict) -> dict:
    """Sums over one chunk of images (runs in a worker process)."""
    sums, skipped = None, []
    for rel in job['rel_paths']:
        path = os.path.join(job['root'], rel)
        try:
            with open(path, 'rb') as f:
                img = sources.decode_image(f.read(), job['size'], job.get('warp', False))
        except (OSError, DecodeError) as e:
            skipped.append([path, str(e)])
        else:
            sums = prepare.add_sums(sums, prepare.image_sums(img))
        prepare.tick()
    return {'sums': sums, 'skipped': skipped}


def compute_stats(files: layout.SplitFiles, size: int, *, workers: int | None = None,
                  progress: bool = True, warp: bool = False) -> dict:
    """Mean image and RGB eigens of ``files`` decoded at ``size``, as ``prepare`` computes them."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    n = len(files)
    chunk = max(16, min(512, -(-n // max(1, 8 * workers))))
    jobs = [{'root': files.root, 'rel_paths': files.rel_paths[i:i + chunk], 'size': size, 'warp': warp}
            for i in range(0, n, chunk)]
    total, skipped = {'sums': None}, []

    def reduce(result):
        skipped.extend(result['skipped'])
        if result['sums'] is not None:
            total['sums'] = prepare.add_sums(total['sums'], result['sums'])

    prepare.run_jobs(_sums_job, jobs, min(workers, len(jobs)), n, progress, 'mean image and RGB eigens',
                     on_result=reduce)
    if skipped:
        log.warning('statistics: skipped %d unreadable file(s), e.g. %s', len(skipped), skipped[:5])
    if total['sums'] is None:
        raise DatasetError(f'no readable training image under {files.root!r}')
    return prepare.finish_stats(total['sums'])


def ensure_stats(files: layout.SplitFiles, size: int, *, cache_dir=None, workers: int | None = None,
                 progress: bool = True, warp: bool = False) -> Path:
    """The cached statistics file for ``files`` at ``size``, computed now if it is not there yet."""
    path = stats_file(files, size, cache_dir, warp)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix('.lock'), 'w')
    except OSError as e:
        raise DatasetError(
            f'cannot write the statistics cache {str(path.parent)!r}: {e}. Set --config.data.cache_dir to a '
            'writable folder, or give a ready stats.npz with --config.data.stats_path.') from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning('waiting for another process that is computing %s', path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():  # made by the process we waited for
            return path
        t0 = time.time()
        log.warning('computing the mean image (%dx%d) and RGB eigens over %d training images into %s; '
                    'done once, later runs reuse it', size, size, len(files), path)
        stats = compute_stats(files, size, workers=workers, progress=progress, warp=warp)
        prepare.atomic_savez(path, stats)
        prepare.atomic_write_json(path.with_suffix('.json'), {
            'root': str(Path(files.root).resolve()), 'size': size, 'num_images': int(stats['num_images']),
            'seconds': round(time.time() - t0, 1)})
    return path

"""One-time conversion of an ImageNet-layout folder into fast ArrayRecord shards.

    python -m alexnet_jax.data.prepare --src DIR --dst DIR [--size 256] [--workers N] [--records jpeg|raw]
    python -m alexnet_jax.data.prepare --src DIR --stats-only [--size 256]   # statistics only, into the cache

Every image is decoded once, rescaled to shorter side ``size``, centre-cropped
to ``size x size`` and stored, so training only decodes a small JPEG (or
nothing) and crops. Two record formats (``--records``):

* ``jpeg`` (default): JPEG bytes. A small RGB JPEG (shorter side <= ``size``)
  keeps its own bytes; a larger image is stored rescaled and re-encoded
  (quality ``--quality``, ``--subsampling``), which changes its pixels a little.
  Training decodes a 256x256 JPEG per image.
* ``raw``: the ``size x size x 3`` uint8 pixels themselves, exactly what
  :func:`~alexnet_jax.data.sources.decode_image` gives for the file: nothing
  to decode in training. A kept-original image has the very pixels its
  ``jpeg`` record decodes to; an image the ``jpeg`` format re-encodes has its
  first decode, without the re-encoding loss (so raw is the more faithful of
  the two). The price is disk: ``size * size * 3`` bytes an image, 196,608 at
  256 px, so full ILSVRC-2012 (1,281,167 train + 50,000 val = 1,331,167
  images) holds 261.7 GB (243.7 GiB) of pixels; with the record headers and
  ArrayRecord's framing a shard measured 197,045 bytes an image, ~262.3 GB
  (244.3 GiB) in all, several times the JPEG records (~30 KB an image for
  the sample photos measured). Raw shards are written uncompressed:
  ArrayRecord's default zstd:3 saved ~20% on photos but took ~0.5 ms a record
  to decompress, as long as decoding the JPEG record. Uncompressed, reading a raw record took ~0.11 ms
  against ~0.6 ms to read and decode a JPEG record (page-cached, one core), so
  the disk's read rate (197 KB an image) becomes what limits the loader.

Training reads either: the format is recorded in ``metadata.json`` (folders
prepared before the option existed are ``jpeg``). The same pass computes the
paper's training-set statistics from the decoded images (so they are the same
for both formats): the ``size x size x 3`` mean image and the
eigen-decomposition of the 3x3 RGB covariance (``stats.npz``). Shards are
processed in parallel, each written to a temporary file and renamed, followed
by a done marker, so an interrupted run resumes where it stopped.
``metadata.json`` is written last: its presence means the folder is complete.

Progress is a bar on a terminal and a plain line every 30 s otherwise (SLURM,
``nohup``, ``> log``; ``$ALEXNET_JAX_PROGRESS_EVERY_S`` sets the interval).
SIGTERM or Ctrl-C stops either pass cleanly: the workers are killed, what is
finished is kept (shards; for ``--stats-only`` the sums so far), one line says
so on stderr, and the exit status is 75 (EX_TEMPFAIL): run the same command
again to continue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from alexnet_jax.data import layout, sources
from alexnet_jax.data.errors import DatasetError, DecodeError, PassInterrupted
from alexnet_jax.data.labels import read_class_names
from alexnet_jax.data.passprogress import PassProgress

log = logging.getLogger(__name__)

FORMAT = 'alexnet_jax.packed/1'  # the metadata 'format' of jpeg records (as before --records existed)
# Raw records get their own format string, so code older than --records refuses such a folder
# ('unknown format') instead of failing to decode every record.
FORMAT_RAW = 'alexnet_jax.packed-raw/1'
RECORD_FORMATS = sources.RECORD_FORMATS
FORMATS = {'jpeg': FORMAT, 'raw': FORMAT_RAW}
METADATA = 'metadata.json'
STATS = 'stats.npz'
PLAN = 'plan.json'


# ---------------------------------------------------------------------------
# Statistics: sums per shard, combined at the end (exact, order-independent).


def image_sums(img_HWC: np.ndarray) -> dict:
    """The sufficient statistics one uint8 image contributes."""
    x = img_HWC.astype(np.float64)
    px = x.reshape(-1, 3)
    return {'sum_image': x, 'sum_rgb': px.sum(0), 'sum_outer': px.T @ px,
            'n_images': 1, 'n_pixels': px.shape[0]}


def add_sums(a: dict | None, b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in a}


def finish_stats(sums: dict) -> dict:
    """Sums -> mean image (0..255) and RGB covariance/eigens (on [0, 1] pixels), eigenvalues descending."""
    n_img, n_px = sums['n_images'], sums['n_pixels']
    mean_image = sums['sum_image'] / n_img
    mu = sums['sum_rgb'] / n_px
    cov = (sums['sum_outer'] / n_px - np.outer(mu, mu)) / 255.0 ** 2
    cov = (cov + cov.T) / 2
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    # A fixed sign per eigenvector (largest component positive) keeps runs comparable.
    eigvec = eigvec * np.sign(eigvec[np.abs(eigvec).argmax(0), np.arange(3)])
    return {'mean_image': mean_image.astype(np.float32), 'rgb_mean': (mu / 255.0).astype(np.float32),
            'rgb_cov': cov.astype(np.float32), 'eigval': eigval.astype(np.float32),
            'eigvec': eigvec.astype(np.float32), 'num_images': np.int64(n_img)}


def load_stats(path: str | os.PathLike) -> dict:
    """stats.npz -> dict of arrays (``mean_image`` HWC float32, ``eigval`` (3,), ``eigvec`` (3, 3) columns)."""
    if not Path(path).is_file():
        raise DatasetError(f'no statistics file {str(path)!r}; run `python -m alexnet_jax.data.prepare`')
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def atomic_savez(path: Path, arrays: dict) -> None:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------
# One shard (runs in a worker process)

_counter = None  # (per-worker counts, this worker's slot), or a one-slot list inline
_inline_stop = None  # inline (workers=0): the pass's _StopRequest, checked between images by tick()


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def tick() -> None:
    """One image done (called by a job function, outside its per-image error handling). Inline, a
    pending SIGTERM/Ctrl-C is raised here, between two images: the job is abandoned, its result unused."""
    if _counter is not None:
        counts, i = _counter
        counts[i] += 1  # this process's own slot: no lock, nothing a killed worker could leave held
    if _inline_stop is not None:
        _inline_stop.check()


def keeps_original(data: bytes, size: int) -> bool:
    """Store a file's own bytes when it is an RGB JPEG no larger than needed (shorter side <= ``size``).

    Re-encoding such an image saves no decoding time, and keeping it means
    training decodes exactly the pixels the folder form gives. Larger images
    are stored rescaled to ``size`` and re-encoded (JPEG q95), which changes
    pixels by a little (benchmarks/bench_data.py measures how much).
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format == 'JPEG' and im.mode == 'RGB' and min(im.size) <= size
    except Exception:  # unreadable headers were already reported by decode_image
        return False


def prepare_shard(job: dict) -> dict:
    """Decode, resize and store one shard's images (``'jpeg'``: re-encoded, small JPEGs kept as they
    are; ``'raw'``: the decoded pixels); write the shard, its sums, then its done marker."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out = Path(job['out'])
    size, quality, with_stats = job['size'], job['quality'], job['with_stats']
    subsampling, records = job['subsampling'], job.get('records', 'jpeg')
    sums, skipped, labels = None, [], []
    tmp = out.with_name(f'.{out.name}.tmp{os.getpid()}')
    # Raw shards uncompressed: ArrayRecord's default zstd:3 saved ~20% of a photo's pixels but took
    # ~0.5 ms a record to decompress, as long as decoding its JPEG record (module docstring).
    writer = ArrayRecordWriter(str(tmp), 'group_size:1,uncompressed' if records == 'raw' else 'group_size:1')
    try:
        for rel, label in zip(job['rel_paths'], job['labels']):
            path = os.path.join(job['root'], rel)
            try:
                with open(path, 'rb') as f:
                    data = f.read()
                img = sources.decode_image(data, size)
            except (OSError, DecodeError) as e:
                skipped.append([path, str(e)])
                tick()
                continue
            if records == 'raw':
                data = sources.encode_raw(img)
            elif not keeps_original(data, size):
                data = sources.encode_jpeg(img, quality, subsampling)
            writer.write(sources.pack_record(rel, int(label), data))
            labels.append(int(label))
            if with_stats:
                sums = add_sums(sums, image_sums(img))
            tick()
    finally:
        writer.close()
    os.replace(tmp, out)
    if with_stats and sums is not None:
        atomic_savez(out.with_name(out.name + '.sums.npz'), sums)
    done = {'num_examples': len(labels), 'labels': labels, 'skipped': skipped}
    atomic_write_json(out.with_name(out.name + '.done.json'), done)
    return done


# ---------------------------------------------------------------------------
# Whole folder


def _plan(src: Path, size: int, quality: int, subsampling: str, shard_size: int, val_labels,
          records: str = 'jpeg') -> dict:
    classes = layout.list_classes(src)
    splits = {}
    for split in ('train', 'val'):
        if split == 'val' and not (src / 'val').is_dir():
            log.warning('%s has no val folder; preparing train only', src)
            continue
        files = layout.scan_split(src, split, classes, val_labels if split == 'val' else None)
        n = len(files)
        num_shards = max(1, -(-n // shard_size))
        bounds = np.linspace(0, n, num_shards + 1).astype(int)
        shards = []
        for i in range(num_shards):
            sl = slice(bounds[i], bounds[i + 1])
            shards.append({'name': f'{split}-{i:05d}-of-{num_shards:05d}.array_record',
                           'rel_paths': files.rel_paths[sl],
                           'labels': files.labels[sl].tolist()})
        splits[split] = {'root': files.root, 'shards': shards, 'scan_skipped': files.skipped}
    plan = {'format': FORMATS[records], 'src': str(src), 'size': size, 'quality': quality,
            'subsampling': subsampling, 'classes': classes, 'class_names': read_class_names(src, classes),
            'splits': splits}
    # The digest covers the record format through 'format'; a jpeg plan's digest is what it was
    # before 'records' existed, so an interrupted older preparation still resumes.
    plan['digest'] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    plan['records'] = records
    return plan


def plan_records(plan_or_meta: dict) -> str:
    """The record format a plan or metadata describes ('jpeg' for those written before the key existed)."""
    return plan_or_meta.get('records', 'raw' if plan_or_meta.get('format') == FORMAT_RAW else 'jpeg')


def _other_format_message(dst: Path, theirs: str, ours: str, finished: bool) -> str:
    state = 'a finished' if finished else 'an unfinished'
    return (f'{str(dst)!r} holds {state} preparation with --records {theirs} ({theirs} records), not --records '
            f'{ours}; ' + ('train on it as it is (training reads either format), or ' if finished else
                           f'resume it with --records {theirs}, or ') +
            f'prepare --records {ours} into another --dst (or delete {str(dst)!r}).')


def prepare(src: str | os.PathLike, dst: str | os.PathLike, *, size: int = 256, quality: int = 95,
            subsampling: str = '420', shard_size: int = 1024, workers: int | None = None, val_labels=None,
            progress: bool = True, records: str = 'jpeg') -> Path:
    """Convert ``src`` (ImageNet layout) into shards, ``stats.npz`` and ``metadata.json`` under ``dst``.

    ``records``: ``'jpeg'`` (JPEG bytes) or ``'raw'`` (the ``size x size x 3``
    uint8 pixels; see the module docstring). The statistics are the same for
    both. Idempotent and resumable: finished shards (those with a done marker)
    are kept; a folder holding the other format is refused (:class:`DatasetError`).
    Returns ``dst``.
    """
    if records not in RECORD_FORMATS:
        raise DatasetError(f'records must be one of {", ".join(RECORD_FORMATS)}, got {records!r}')
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / METADATA).is_file():
        meta = read_metadata(dst)
        if meta['records'] != records:
            raise DatasetError(_other_format_message(dst, meta['records'], records, finished=True))
        if meta['size'] != size:
            raise DatasetError(f'{str(dst)!r} was prepared with size {meta["size"]}, not {size}')
        return dst
    plan = _plan(src, size, quality, subsampling, shard_size, val_labels, records)
    plan_path = dst / PLAN
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if plan_records(old) != records:
            raise DatasetError(_other_format_message(dst, plan_records(old), records, finished=False))
        if old.get('digest') != plan['digest']:
            raise DatasetError(
                f'{str(dst)!r} holds an unfinished preparation of different data or settings '
                f'(src={old.get("src")}, size={old.get("size")}); use another --dst or delete it.')
    else:
        atomic_write_json(plan_path, plan)

    jobs = []
    for split, info in plan['splits'].items():
        for shard in info['shards']:
            if not (dst / (shard['name'] + '.done.json')).is_file():
                jobs.append({'root': info['root'], 'rel_paths': shard['rel_paths'], 'labels': shard['labels'],
                             'out': str(dst / shard['name']), 'size': size, 'quality': quality,
                             'subsampling': subsampling, 'records': records,
                             'with_stats': split == 'train'})
    total = sum(len(j['rel_paths']) for j in jobs)
    workers = min(os.cpu_count() or 1, len(jobs)) if workers is None else min(workers, len(jobs))
    t0 = time.time()
    if jobs:
        done_before = sum(len(s['rel_paths']) for info in plan['splits'].values() for s in info['shards']) - total
        try:
            run_jobs(prepare_shard, jobs, workers, total, progress, 'prepare', done_before=done_before)
        except PassInterrupted as e:
            left = sum(not Path(j['out'] + '.done.json').is_file() for j in jobs)
            raise PassInterrupted(
                f'preparation stopped by {e.signal_name}: {left} of {len(plan_shards(plan))} shards left to do; '
                f'the finished ones are kept in {str(dst)!r}, and the same command continues from them.',
                e.signal_name, e.done) from None
    log.info('prepared %d images in %.1fs with %d workers', total, time.time() - t0, workers)
    _finish(dst, plan)
    for stale in dst.glob('.*.tmp*'):  # left by an interrupted earlier run; every shard is done now
        stale.unlink(missing_ok=True)
    return dst


def plan_shards(plan: dict) -> list:
    return [s for info in plan['splits'].values() for s in info['shards']]


def run_jobs(fn, jobs: list, workers: int, total: int, progress: bool, label: str = 'preparing',
             on_result=None, done_before: int = 0) -> None:
    """``on_result(fn(job))`` for every job, on ``workers`` processes, with progress over ``total`` images.

    ``fn`` calls :func:`tick` once per image; ``done_before`` images were done by
    an earlier run (resumed). Progress is a bar on a terminal and a plain line
    every 30 s in a log (:mod:`alexnet_jax.data.passprogress`). Each worker has
    one job at a time, so results are reduced as they come (memory stays flat);
    their order is not the jobs' order. A worker's exception is raised here.

    SIGTERM or Ctrl-C (handled in the main thread while this runs) stops the
    pass at a clean point: results already received have gone through
    ``on_result``, the workers are killed (they ignore both signals, so a
    signal sent to the whole process group does not kill them half-way), and
    :class:`PassInterrupted` is raised: no traceback from the workers and
    nothing left for the resource tracker to report.
    """
    global _inline_stop
    on_result = on_result or (lambda result: None)
    bar = PassProgress(label, done_before + total, enabled=progress, start=done_before)
    stop = _StopRequest()
    finished = False
    try:
        with stop:
            if workers <= 0:
                counts = [0]
                _init_worker((counts, 0))
                try:
                    for job in jobs:
                        stop.check()
                        _inline_stop = stop
                        result = fn(job)
                        _inline_stop = None
                        on_result(result)
                        bar.update(done_before + counts[0])
                    stop.check()
                finally:
                    _inline_stop = None
                    _init_worker(None)
            else:
                _run_in_workers(fn, jobs, workers, on_result, lambda n: bar.update(done_before + n), stop)
        finished = True
    except PassInterrupted as e:
        e.done = bar.done
        raise
    finally:
        bar.close(finished)


class _StopRequest:
    """While entered (main thread only): SIGTERM and SIGINT set ``name`` instead of ending the process;
    :meth:`check` raises :class:`PassInterrupted` at safe points (the loops here, and :func:`tick`
    inline). Never raised from the handler itself: a job's ``except`` could take it for a bad image.
    """

    def __init__(self):
        self.name, self._previous = None, {}

    def _on_signal(self, signum, frame) -> None:
        import signal

        if self.name is None:
            self.name = signal.Signals(signum).name

    def check(self) -> None:
        if self.name:
            raise PassInterrupted(f'stopped by {self.name}', self.name)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def _worker_main(fn, conn, counts, index: int) -> None:
    """A worker process: jobs from ``conn`` until None; each answered with ('ok', result) or ('error', exc)."""
    import signal
    import threading
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides; it kills us when it stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def end_with_parent():  # a main process killed outright (SIGKILL) leaves no orphan working on
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=end_with_parent, daemon=True).start()
    _init_worker((counts, index))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            conn.send(('ok', fn(job)))
        except BaseException as e:  # noqa: BLE001 - handed to the main process, which raises it
            try:
                conn.send(('error', e))
            except Exception:
                conn.send(('error', RuntimeError(traceback.format_exc())))


def _run_in_workers(fn, jobs: list, workers: int, on_result, report, stop: _StopRequest) -> None:
    """The jobs on ``workers`` spawned processes, one job each at a time; stops when ``stop.name`` is set."""
    import signal
    import threading
    from multiprocessing.connection import wait

    # spawn: safe even when the caller already runs JAX threads.
    ctx = mp.get_context('spawn')
    workers = max(1, min(workers, len(jobs)))
    counts = ctx.RawArray('q', workers)  # images done, one slot per worker (no lock to be left held)
    procs, conns, clean = [], [], False
    # The workers are started with SIGINT and SIGTERM ignored (an ignored signal stays ignored across the
    # exec, and Python keeps it so), so a signal sent to the whole process group while one is still
    # importing can neither kill it nor print its traceback. The price: one that reaches this process in
    # those few milliseconds (about 20 ms a worker) is lost.
    handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if (
        threading.current_thread() is threading.main_thread()) else {}
    try:
        try:
            for i in range(workers):
                here, there = ctx.Pipe()
                p = ctx.Process(target=_worker_main, args=(fn, there, counts, i), daemon=True,
                                name=f'alexnet_jax-pass-{i}')
                p.start()
                there.close()
                procs.append(p)
                conns.append(here)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        todo = list(reversed(jobs))
        busy = [False] * workers
        for i in range(workers):
            if todo:
                conns[i].send(todo.pop())
                busy[i] = True
        while any(busy):
            stop.check()
            ready = wait([conns[i] for i in range(workers) if busy[i]] +
                         [procs[i].sentinel for i in range(workers) if busy[i]], timeout=0.25)
            for i in range(workers):
                if not busy[i]:
                    continue
                if conns[i] in ready or conns[i].poll():
                    try:
                        kind, value = conns[i].recv()
                    except EOFError:
                        kind, value = 'died', None
                    if kind == 'ok':
                        busy[i] = False
                        on_result(value)
                        if todo and not stop.name:
                            conns[i].send(todo.pop())
                            busy[i] = True
                        continue
                    if kind == 'error':
                        raise value
                if not procs[i].is_alive():
                    time.sleep(0.2)  # killed along with us by a signal to the group: that is a stop
                    stop.check()
                    raise DatasetError(f'a worker process died (exit code {procs[i].exitcode}), e.g. killed '
                                       'for lack of memory; run again with fewer workers')
            report(sum(counts))
        stop.check()  # asked while the last jobs ran: the jobs not started are not done
        report(sum(counts))
        for c in conns:
            c.send(None)
        clean = True
    finally:
        for p in procs:
            if clean:
                p.join(timeout=5)
            if p.is_alive():
                p.kill()  # SIGKILL: the workers ignore SIGTERM and SIGINT
            p.join()
        for c in conns:
            c.close()


def _finish(dst: Path, plan: dict) -> Path:
    meta = {k: plan[k] for k in ('format', 'src', 'size', 'quality', 'subsampling', 'classes', 'class_names')}
    meta['records'] = plan_records(plan)
    meta['splits'] = {}
    num_classes = len(plan['classes'])
    sums = None
    for split, info in plan['splits'].items():
        shards, skipped, per_class = [], list(info['scan_skipped']), np.zeros(num_classes, np.int64)
        for shard in info['shards']:
            done = json.loads((dst / (shard['name'] + '.done.json')).read_text())
            skipped.extend(done['skipped'])
            per_class += np.bincount(np.asarray(done['labels'], np.int64), minlength=num_classes)
            if done['num_examples']:
                shards.append({'file': shard['name'], 'num_examples': done['num_examples']})
            if split == 'train' and (dst / (shard['name'] + '.sums.npz')).is_file():
                with np.load(dst / (shard['name'] + '.sums.npz')) as z:
                    sums = add_sums(sums, {k: z[k] for k in z.files})
        meta['splits'][split] = {'shards': shards, 'num_examples': int(per_class.sum()),
                                 'per_class': per_class.tolist(), 'skipped': skipped}
        if skipped:
            log.warning('%s: skipped %d file(s), e.g. %s', split, len(skipped), skipped[:5])
    if sums is None:
        raise DatasetError('no readable training image; nothing to compute statistics from')
    atomic_savez(dst / STATS, finish_stats(sums))
    atomic_write_json(dst / METADATA, meta)
    return dst


def read_metadata(dst: str | os.PathLike) -> dict:
    path = Path(dst) / METADATA
    if not path.is_file():
        raise DatasetError(
            f'{str(dst)!r} is not a finished packed dataset (no {METADATA}); '
            f'run `python -m alexnet_jax.data.prepare --src IMAGENET_DIR --dst {dst}`')
    meta = json.loads(path.read_text())
    if meta.get('format') not in FORMATS.values():
        raise DatasetError(f'{str(path)!r}: unknown format {meta.get("format")!r}, expected one of '
                           f'{sorted(FORMATS.values())}')
    records = meta.setdefault('records', plan_records(meta))  # absent in folders older than --records: jpeg
    if records not in RECORD_FORMATS or FORMATS[records] != meta['format']:
        raise DatasetError(f'{str(path)!r}: records {records!r} do not go with format {meta["format"]!r}')
    return meta


def shard_paths(dst: str | os.PathLike, split: str) -> list[str]:
    meta = read_metadata(dst)
    if split not in meta['splits']:
        raise DatasetError(f'{str(dst)!r} has no {split!r} split')
    return [str(Path(dst) / s['file']) for s in meta['splits'][split]['shards']]


def packed_records(dst: str | os.PathLike, split: str) -> sources.PackedRecords:
    """One split of a finished packed folder as a record source, in the record format its metadata names."""
    return sources.PackedRecords(shard_paths(dst, split), records=read_metadata(dst)['records'])


def _stats_only(a) -> int:
    from alexnet_jax.data import stats

    try:
        files = layout.scan_split(a.src, 'train')
        path = stats.ensure_stats(files, a.size, cache_dir=a.cache_dir, workers=a.workers, progress=not a.quiet,
                                  chunk_size=a.chunk_size)
    except PassInterrupted as e:
        print(f'stopped: {e}', file=sys.stderr)
        return e.exit_code
    except DatasetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'statistics of {len(files)} training images at {a.size}px: {path}')
    return 0


_PROG = 'python -m alexnet_jax.data.prepare'


def _flags():
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string('src', None, 'ImageNet-layout folder with train/ and val/', flag_values=fv)
    flags.DEFINE_string('dst', None, 'output folder (created; an unfinished one is resumed)', flag_values=fv)
    flags.DEFINE_boolean('stats_only', False,
                         'only compute the training-set statistics of the folder into the cache that training '
                         'on the folder reads (no shards; --dst not needed)', flag_values=fv)
    flags.DEFINE_string('cache_dir', None, 'statistics cache (default $ALEXNET_JAX_DATA or ~/.cache/alexnet_jax; '
                        'training: --config.data.cache_dir)', flag_values=fv)
    flags.DEFINE_integer('size', 256, 'shorter side and square crop size (paper: 256)', lower_bound=1, flag_values=fv)
    flags.DEFINE_integer('workers', None, 'processes (default: all cores; 0 = inline)', lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer('shard_size', 1024, 'images per ArrayRecord shard', lower_bound=1, flag_values=fv)
    flags.DEFINE_integer('quality', 95, 'JPEG quality of the stored images', lower_bound=1, upper_bound=100,
                         flag_values=fv)
    flags.DEFINE_enum('subsampling', '420', ['420', '422', '444'],
                      'JPEG chroma subsampling of the stored images (420: fastest to decode; 444: full colour)',
                      flag_values=fv)
    flags.DEFINE_enum('records', 'jpeg', list(RECORD_FORMATS),
                      "what each record stores: 'jpeg' (JPEG bytes, small RGB JPEGs kept as they are; "
                      "the default) or 'raw' (the decoded size x size x 3 uint8 pixels: "
                      "no decoding in training, and no re-encoding loss; 196,608 bytes an image at 256 px, "
                      "so full ILSVRC-2012 train+val, 1,331,167 images, holds 261.7 GB = 243.7 GiB of pixels, "
                      "~262.3 GB on disk with the record framing)", flag_values=fv)
    flags.DEFINE_string('val_labels', None, "labels file for a flat val/ folder ('<file> <wnid>' lines)",
                        flag_values=fv)
    flags.DEFINE_integer('chunk_size', None,
                         '--stats_only: images per job of the statistics pass (default: up to 512); the sums so '
                         'far are saved as jobs finish, so a stopped pass continues where it was (a resumed pass '
                         'keeps the chunk size it started with)', lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean('quiet', False, 'no progress (default: a bar on a terminal, else a line every 30 s, '
                         '$ALEXNET_JAX_PROGRESS_EVERY_S)', flag_values=fv)
    return fv


def main(argv=None) -> int:
    """``python -m alexnet_jax.data.prepare ARGS`` (and ``alexnet-prepare``); ``argv`` defaults to ``sys.argv[1:]``."""
    from alexnet_jax import cli

    argv = [_PROG, *(sys.argv[1:] if argv is None else argv)]
    return cli.run_main(_PROG, lambda: _main(argv, cli))


def _main(argv, cli) -> int:
    a = _flags()
    if cli.wants_help(argv):
        cli.print_help(_PROG, __doc__, a)
    cli.parse_flags(_PROG, a, argv)
    cli.require(_PROG, a, 'src')
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    if a.stats_only:
        return _stats_only(a)
    if a.dst is None:
        cli.usage_error(_PROG, 'give --dst (unless --stats-only)')
    try:
        dst = prepare(a.src, a.dst, size=a.size, quality=a.quality, subsampling=a.subsampling, shard_size=a.shard_size,
                      workers=a.workers, val_labels=a.val_labels, progress=not a.quiet, records=a.records)
    except PassInterrupted as e:
        print(f'stopped: {e}', file=sys.stderr)
        return e.exit_code
    except DatasetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    meta = read_metadata(dst)
    for split, info in meta['splits'].items():
        print(f'{split}: {info["num_examples"]} images in {len(info["shards"])} shard(s), '
              f'{len(info["skipped"])} skipped')
    print(f'records: {meta["records"]}')
    print(f'wrote {dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

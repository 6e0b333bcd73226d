"""Images/s of the training input pipeline: JPEG folder vs packed ArrayRecord, per worker count.

    PYTHONPATH=src python benchmarks/bench_data.py [--num-images 512] [--batch-size 32] [--batches 30]

Builds an ImageNet-like folder (500x375 JPEGs, ImageNet's typical size and
quality, with texture so they cost what photos cost to decode), prepares it
into the packed form, then measures in one run:

* a plain PIL loop (decode, shorter side 256, centre 256, random 224 crop,
  mirror, float32 minus mean) in this process: the baseline;
* the grain training pipeline (all of the paper's augmentation) from the
  folder form and from the packed form, with 0, 1 and 2 worker processes
  (one decoding thread per process, so "per core" is comparable), once with
  float32 output normalised on the host and once with uint8 output (the
  normalisation then runs on the accelerator, ``alexnet_jax.data.device``).

Numbers depend on whatever else runs on the machine; run it on an idle one.
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src'))

from alexnet_jax.data import embedded, pipeline, prepare, sources  # noqa: E402


def make_folder(root: Path, num_images: int, num_classes: int = 10) -> Path:
    """500x375 q90 JPEGs in the ImageNet layout: embedded drawings upscaled, plus fine texture."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        c = i % num_classes
        small = embedded.draw_example(c, np.random.default_rng([1, c, i]), 96)
        big = np.asarray(Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC), np.float32)
        big += rng.normal(0, 10, big.shape)
        d = root / 'train' / f'n{c:08d}'
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(d / f'img_{i:05d}.JPEG', quality=90)
    return root


def pil_loop(paths: list[Path], mean_HWC: np.ndarray, crop: int = 224, size: int = 256) -> tuple[float, float]:
    """The baseline: everything in one Python loop, one image at a time."""
    rng = np.random.default_rng(0)
    t, c = time.perf_counter(), time.process_time()
    for p in paths:
        with Image.open(p) as im:
            im = im.convert('RGB')
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BILINEAR)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            img = np.asarray(im.crop((left, top, left + size, top + size)))
        y, x = rng.integers(0, size - crop + 1, 2)
        out = img[y:y + crop, x:x + crop].astype(np.float32) - mean_HWC[y:y + crop, x:x + crop]
        if rng.integers(2):
            out = out[:, ::-1]
    return len(paths) / (time.perf_counter() - t), len(paths) / (time.process_time() - c)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its live children (grain's workers).

    Images per CPU-second is the per-core cost, and unlike wall time it does not
    change when other programs share the machine.
    """
    total = time.process_time()
    tick = os.sysconf('SC_CLK_TCK')
    for child in multiprocessing.active_children():
        try:
            with open(f'/proc/{child.pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except OSError:
            pass
    return total


def pipeline_rate(cfg, data, *, batch_size: int, batches: int, workers: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) after start-up."""
    it = pipeline.build_train_iter(cfg, batch_size=batch_size, seed=0, num_workers=workers, data=data)
    for _ in range(1 + workers):  # start-up (worker processes, first batches) is not throughput
        next(it)
    t, c = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        b = next(it)
    n = batches * batch_size
    rate, cpu_rate = n / (time.perf_counter() - t), n / (cpu_seconds() - c)
    assert b['image'].shape == (batch_size, cfg.crop_size, cfg.crop_size, 3)
    it.close()
    return rate, cpu_rate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--num-images', type=int, default=512)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--batches', type=int, default=30, help='timed batches per configuration (few batches overweight the ones in flight)')
    ap.add_argument('--workers', default='0,1,2')
    ap.add_argument('--dir', default=None, help='reuse/keep the benchmark data here')
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix='bench_data_'))
    src = work / 'folder'
    if not (src / 'train').is_dir():
        make_folder(src, a.num_images)
    files = sorted((src / 'train').rglob('*.JPEG'))
    avg_kb = np.mean([f.stat().st_size for f in files]) / 1024
    t = time.perf_counter()
    packed = prepare.prepare(src, work / 'packed', size=256, workers=os.cpu_count(), progress=False)
    prep_s = time.perf_counter() - t
    stats = prepare.load_stats(packed / 'stats.npz')
    packed_kb = np.mean([len(sources.PackedRecords(prepare.shard_paths(packed, 'train'))[i][2])
                         for i in range(min(64, len(files)))]) / 1024
    print(f'{len(files)} images, folder JPEGs {avg_kb:.0f} KiB avg (500x375), packed 256x256 JPEGs '
          f'{packed_kb:.0f} KiB avg; prepare took {prep_s:.1f}s on {os.cpu_count()} cores\n')

    base, base_cpu = pil_loop(files, stats['mean_image'])
    rows = [('PIL loop (baseline)', 'folder', 'float32', '-', base, base_cpu)]
    for output in ('float32', 'uint8'):
        for form in ('folder', 'packed'):
            cfg = pipeline.default_data_config()
            cfg.name, cfg.root, cfg.format, cfg.output = 'imagenet', str(src), form, output
            cfg.packed_dir = str(packed) if form == 'packed' else None
            cfg.stats_path = str(packed / 'stats.npz')
            cfg.num_threads = 1
            data = pipeline.resolve(cfg)
            for w in (int(x) for x in a.workers.split(',')):
                r = pipeline_rate(cfg, data, batch_size=a.batch_size, batches=a.batches, workers=w)
                rows.append(('grain pipeline', form, output, str(w)) + r)

    # The default run: the embedded dataset at the demo size (72 px images, 64 px crops).
    demo = pipeline.demo_data_config()
    demo.root, demo.num_threads = str(work / 'embedded'), 1
    demo_data = pipeline.resolve(demo)
    for w in (int(x) for x in a.workers.split(',')):
        r = pipeline_rate(demo, demo_data, batch_size=128, batches=a.batches, workers=w)
        rows.append(('embedded demo 72->64', 'packed', 'float32', str(w)) + r)

    print('| pipeline | form | output | workers | images/s (wall) | images per CPU-second | per core vs PIL loop |')
    print('|---|---|---|---|---|---|---|')
    for name, form, output, w, r, rc in rows:
        print(f'| {name} | {form} | {output} | {w} | {r:.0f} | {rc:.0f} | {rc / base_cpu:.2f}x |')
    by = {(f, o, w): (r, rc) for name, f, o, w, r, rc in rows if name == 'grain pipeline'}
    print('\npacked / folder, images per CPU-second (per core):')
    for output in ('float32', 'uint8'):
        for w in a.workers.split(','):
            if ('folder', output, w) in by and ('packed', output, w) in by:
                ratio = by[('packed', output, w)][1] / by[('folder', output, w)][1]
                print(f'  {output} output, {w} worker(s): {ratio:.2f}x')


if __name__ == '__main__':
    main()

"""Writing a packed folder: the plan, one shard per job, and ``metadata.json`` last.

Every shard is written to a temporary file, renamed, then given a done
marker, and the plan (with a digest of the data and settings) is saved
first, so a stopped preparation resumes where it was and never mixes two
different ones. The same pass sums the training images' statistics
(:mod:`stats`), so both record formats get the same ``stats.npz``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from alexnet_jax.data import layout, parquet, sources
from alexnet_jax.data.atomic import atomic_savez, atomic_write_json
from alexnet_jax.data.jobs import run_jobs, tick
from alexnet_jax.data.labels import read_class_names
from alexnet_jax.data.packed import FORMATS, METADATA, PLAN, RECORD_FORMATS, STATS, plan_records, read_metadata
from alexnet_jax.data.stats import add_sums, finish_stats, image_sums
from alexnet_jax.errors import DatasetError, DecodeError, PassInterrupted

log = logging.getLogger(__name__)


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
            return im.format == "JPEG" and im.mode == "RGB" and min(im.size) <= size
    except Exception:  # unreadable headers were already reported by decode_image
        return False


def prepare_shard(job: dict) -> dict:
    """Decode, resize and store one shard's images (``'jpeg'``: re-encoded, small JPEGs kept as they
    are; ``'raw'``: the decoded pixels); write the shard, its sums, then its done marker."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out = Path(job["out"])
    size, quality, with_stats = job["size"], job["quality"], job["with_stats"]
    subsampling, records = job["subsampling"], job.get("records", "jpeg")
    sums, skipped, labels = None, [], []
    items = _parquet_items(job) if "parquet" in job else _file_items(job)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    # Raw shards uncompressed: ArrayRecord's default zstd:3 saved ~20% of a photo's pixels but took
    # ~0.5 ms a record to decompress, as long as decoding its JPEG record (docs/gpu.md).
    writer = ArrayRecordWriter(str(tmp), "group_size:1,uncompressed" if records == "raw" else "group_size:1")
    try:
        for rel, label, read, path in items:
            try:
                data = read()
                if label is None:
                    raise DecodeError("no label: the test split's -1, or a class the training shards lack")
                img = sources.decode_image(data, size)
            except (OSError, DecodeError) as e:
                skipped.append([path, str(e)])
                tick()
                continue
            if records == "raw":
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
        atomic_savez(out.with_name(out.name + ".sums.npz"), sums)
    done = {"num_examples": len(labels), "labels": labels, "skipped": skipped}
    atomic_write_json(out.with_name(out.name + ".done.json"), done)
    return done


def _file_items(job: dict):
    """``(record name, label, read(), where)`` of a folder shard's files."""
    for rel, label in zip(job["rel_paths"], job["labels"]):
        path = os.path.join(job["root"], rel)
        yield rel, label, lambda path=path: Path(path).read_bytes(), path


def _parquet_items(job: dict):
    """The same for a parquet file's rows: labels mapped to class indices, a row at a time."""
    index = {int(k): v for k, v in job["label_index"].items()}
    for row, name, blob, label in parquet.rows(Path(job["parquet"])):
        where = f"{job['parquet']} row {row}" + (f" ({name})" if name else "")
        yield name or f"{Path(job['parquet']).name}:{row}", index.get(label), lambda blob=blob: blob, where


def _plan(
    src: Path, size: int, quality: int, subsampling: str, shard_size: int, val_labels, records: str = "jpeg"
) -> dict:
    folder = parquet.shard_folder(src) if not (src / "train").is_dir() else None
    if folder is not None:  # the Hugging Face hub's parquet shards
        from alexnet_jax.data.labels import imagenet_classes

        present, splits = parquet.plan_splits(folder, shard_size)
        wnids, names = imagenet_classes()
        if present[-1] >= len(wnids):
            raise DatasetError(f"{str(folder)!r}: label {present[-1]} is not one of the 1000 ILSVRC-2012 classes")
        plan = {
            "format": FORMATS[records],
            "src": str(src),
            "size": size,
            "quality": quality,
            "subsampling": subsampling,
            "classes": [wnids[i] for i in present],
            "class_names": [names[i] for i in present],
            "splits": splits,
            "label_index": {str(label): i for i, label in enumerate(present)},
        }
        plan["digest"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
        plan["records"] = records
        return plan
    classes = layout.list_classes(src)
    splits = {}
    for split in ("train", "val"):
        if split == "val" and not (src / "val").is_dir():
            log.warning("%s has no val folder; preparing train only", src)
            continue
        files = layout.scan_split(src, split, classes, val_labels if split == "val" else None)
        n = len(files)
        num_shards = max(1, -(-n // shard_size))
        bounds = np.linspace(0, n, num_shards + 1).astype(int)
        shards = []
        for i in range(num_shards):
            sl = slice(bounds[i], bounds[i + 1])
            shards.append(
                {
                    "name": f"{split}-{i:05d}-of-{num_shards:05d}.array_record",
                    "rel_paths": files.rel_paths[sl],
                    "labels": files.labels[sl].tolist(),
                }
            )
        splits[split] = {"root": files.root, "shards": shards, "scan_skipped": files.skipped}
    plan = {
        "format": FORMATS[records],
        "src": str(src),
        "size": size,
        "quality": quality,
        "subsampling": subsampling,
        "classes": classes,
        "class_names": read_class_names(src, classes),
        "splits": splits,
    }
    # The digest covers the record format through 'format'; a jpeg plan's digest is what it was
    # before 'records' existed, so an interrupted older preparation still resumes.
    plan["digest"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    plan["records"] = records
    return plan


def _other_format_message(dst: Path, theirs: str, ours: str, finished: bool) -> str:
    state = "a finished" if finished else "an unfinished"
    return (
        f"{str(dst)!r} holds {state} preparation with --records {theirs} ({theirs} records), not --records "
        f"{ours}; "
        + (
            "train on it as it is (training reads either format), or "
            if finished
            else f"resume it with --records {theirs}, or "
        )
        + f"prepare --records {ours} into another --dst (or delete {str(dst)!r})."
    )


def prepare(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    size: int = 256,
    quality: int = 95,
    subsampling: str = "420",
    shard_size: int = 1024,
    workers: int | None = None,
    val_labels=None,
    progress: bool = True,
    records: str = "jpeg",
) -> Path:
    """Convert ``src`` (ImageNet layout) into shards, ``stats.npz`` and ``metadata.json`` under ``dst``.

    ``records``: ``'jpeg'`` (JPEG bytes) or ``'raw'`` (the ``size x size x 3``
    uint8 pixels; docs/gpu.md compares them). The statistics are the same for
    both. Idempotent and resumable: finished shards (those with a done marker)
    are kept; a folder holding the other format is refused (:class:`DatasetError`).
    Returns ``dst``.
    """
    if records not in RECORD_FORMATS:
        raise DatasetError(f"records must be one of {', '.join(RECORD_FORMATS)}, got {records!r}")
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / METADATA).is_file():
        meta = read_metadata(dst)
        if meta["records"] != records:
            raise DatasetError(_other_format_message(dst, meta["records"], records, finished=True))
        if meta["size"] != size:
            raise DatasetError(f"{str(dst)!r} was prepared with size {meta['size']}, not {size}")
        return dst
    plan = _plan(src, size, quality, subsampling, shard_size, val_labels, records)
    plan_path = dst / PLAN
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if plan_records(old) != records:
            raise DatasetError(_other_format_message(dst, plan_records(old), records, finished=False))
        if old.get("digest") != plan["digest"]:
            raise DatasetError(
                f"{str(dst)!r} holds an unfinished preparation of different data or settings "
                f"(src={old.get('src')}, size={old.get('size')}); use another --dst or delete it."
            )
    else:
        atomic_write_json(plan_path, plan)

    todo = []
    for split, info in plan["splits"].items():
        for shard in info["shards"]:
            if not (dst / (shard["name"] + ".done.json")).is_file():
                source = (
                    {
                        "parquet": os.path.join(info["root"], shard["parquet"]),
                        "count": shard["rows"],
                        "label_index": plan["label_index"],
                    }
                    if "parquet" in shard
                    else {
                        "root": info["root"],
                        "rel_paths": shard["rel_paths"],
                        "labels": shard["labels"],
                        "count": len(shard["rel_paths"]),
                    }
                )
                todo.append(
                    {
                        **source,
                        "out": str(dst / shard["name"]),
                        "size": size,
                        "quality": quality,
                        "subsampling": subsampling,
                        "records": records,
                        "with_stats": split == "train",
                    }
                )
    total = sum(j["count"] for j in todo)
    workers = min(os.cpu_count() or 1, len(todo)) if workers is None else min(workers, len(todo))
    t0 = time.time()
    if todo:
        done_before = sum(s["rows"] if "rows" in s else len(s["rel_paths"]) for s in plan_shards(plan)) - total
        try:
            run_jobs(prepare_shard, todo, workers, total, progress, "prepare", done_before=done_before)
        except PassInterrupted as e:
            left = sum(not Path(j["out"] + ".done.json").is_file() for j in todo)
            raise PassInterrupted(
                f"preparation stopped by {e.signal_name}: {left} of {len(plan_shards(plan))} shards left to do; "
                f"the finished ones are kept in {str(dst)!r}, and the same command continues from them.",
                e.signal_name,
                e.done,
            ) from None
    log.info("prepared %d images in %.1fs with %d workers", total, time.time() - t0, workers)
    _write_metadata(dst, plan)
    for stale in dst.glob(".*.tmp*"):  # left by an interrupted earlier run; every shard is done now
        stale.unlink(missing_ok=True)
    return dst


def plan_shards(plan: dict) -> list:
    return [s for info in plan["splits"].values() for s in info["shards"]]


def _write_metadata(dst: Path, plan: dict) -> Path:
    """Every shard done: the splits' counts and skipped files, ``stats.npz``, then ``metadata.json``."""
    meta = {k: plan[k] for k in ("format", "src", "size", "quality", "subsampling", "classes", "class_names")}
    meta["records"] = plan_records(plan)
    meta["splits"] = {}
    num_classes = len(plan["classes"])
    sums = None
    for split, info in plan["splits"].items():
        shards, skipped, per_class = [], list(info["scan_skipped"]), np.zeros(num_classes, np.int64)
        for shard in info["shards"]:
            done = json.loads((dst / (shard["name"] + ".done.json")).read_text())
            skipped.extend(done["skipped"])
            per_class += np.bincount(np.asarray(done["labels"], np.int64), minlength=num_classes)
            if done["num_examples"]:
                shards.append({"file": shard["name"], "num_examples": done["num_examples"]})
            if split == "train" and (dst / (shard["name"] + ".sums.npz")).is_file():
                with np.load(dst / (shard["name"] + ".sums.npz")) as z:
                    sums = add_sums(sums, {k: z[k] for k in z.files})
        meta["splits"][split] = {
            "shards": shards,
            "num_examples": int(per_class.sum()),
            "per_class": per_class.tolist(),
            "skipped": skipped,
        }
        if skipped:
            log.warning("%s: skipped %d file(s), e.g. %s", split, len(skipped), skipped[:5])
    if sums is None:
        raise DatasetError("no readable training image; nothing to compute statistics from")
    atomic_savez(dst / STATS, finish_stats(sums))
    atomic_write_json(dst / METADATA, meta)
    return dst

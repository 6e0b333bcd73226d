"""A packed folder as training reads it: its format names, ``metadata.json``, and its record sources.

``metadata.json`` is written last (:mod:`packing`), so its presence means the
folder is complete; a folder in a format this code does not know is refused
rather than misread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alexnet_jax.data import sources
from alexnet_jax.errors import DatasetError

FORMAT = "alexnet_jax.packed/1"  # the metadata 'format' of jpeg records (as before --records existed)
# Raw records get their own format string, so code older than --records refuses such a folder
# ('unknown format') instead of failing to decode every record.
FORMAT_RAW = "alexnet_jax.packed-raw/1"
RECORD_FORMATS = sources.RECORD_FORMATS
FORMATS = {"jpeg": FORMAT, "raw": FORMAT_RAW}
METADATA = "metadata.json"
STATS = "stats.npz"
PLAN = "plan.json"


def plan_records(plan_or_meta: dict) -> str:
    """The record format a plan or metadata describes ('jpeg' for those written before the key existed)."""
    return plan_or_meta.get("records", "raw" if plan_or_meta.get("format") == FORMAT_RAW else "jpeg")


def read_metadata(dst: str | os.PathLike) -> dict:
    path = Path(dst) / METADATA
    if not path.is_file():
        raise DatasetError(
            f"{str(dst)!r} is not a finished packed dataset (no {METADATA}); "
            f"run `python -m alexnet_jax.data.prepare --src IMAGENET_DIR --dst {dst}`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") not in FORMATS.values():
        raise DatasetError(
            f"{str(path)!r}: unknown format {meta.get('format')!r}, expected one of {sorted(FORMATS.values())}"
        )
    records = meta.setdefault("records", plan_records(meta))  # absent in folders older than --records: jpeg
    if records not in RECORD_FORMATS or FORMATS[records] != meta["format"]:
        raise DatasetError(f"{str(path)!r}: records {records!r} do not go with format {meta['format']!r}")
    return meta


def shard_paths(dst: str | os.PathLike, split: str) -> list[str]:
    meta = read_metadata(dst)
    if split not in meta["splits"]:
        raise DatasetError(f"{str(dst)!r} has no {split!r} split")
    return [str(Path(dst) / s["file"]) for s in meta["splits"][split]["shards"]]


def packed_records(dst: str | os.PathLike, split: str) -> sources.PackedRecords:
    """One split of a finished packed folder as a record source, in the record format its metadata names."""
    return sources.PackedRecords(shard_paths(dst, split), records=read_metadata(dst)["records"])

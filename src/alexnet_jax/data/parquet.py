"""ImageNet as the Hugging Face hub gives it (``ILSVRC/imagenet-1k``): parquet shards, packed straight into records.

A folder (or its ``data/``) holds ``train-0000K-of-0NNNN.parquet``, ``validation-...`` and ``test-...``,
with columns ``image`` (a struct of the JPEG ``bytes`` and its ``path``) and ``label`` (int64, the
standard 1000-class order; -1 on the test split). ``python -m alexnet_jax.data.prepare --src DIR --dst
OUT`` reads them shard by shard (a few rows in memory at a time) into the project's packed records, one
output shard per parquet file, with the training set's statistics. The classes are the labels present in
the training shards, in label order, named by the ILSVRC-2012 wnid list the package ships; the test
split, which has no labels, is left out. Needs ``pyarrow`` (a dependency: nothing else installed here
reads parquet).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from alexnet_jax.errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "validation": "val"}  # the hub's split names -> ours; 'test' has no labels
_ROWS_PER_READ = 64  # rows decoded at a time: memory stays a few MB whatever the shard's size


def shard_folder(src: str | os.PathLike) -> Path | None:
    """``src`` or ``src/data`` when either holds ``*.parquet`` files, else None."""
    for folder in (Path(src), Path(src) / "data"):
        if folder.is_dir() and any(folder.glob("*.parquet")):
            return folder
    return None


def shards(folder: Path) -> dict[str, list[Path]]:
    """``{'train': [...], 'val': [...], 'test': [...]}``: the parquet files of each split, sorted."""
    out: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.parquet")):
        split = path.name.split("-", 1)[0]
        if split not in (*SPLITS, "test"):
            raise DatasetError(
                f"{str(path)!r}: a parquet file of no known split; expected names like "
                "train-00000-of-00294.parquet, validation-... or test-..."
            )
        out.setdefault(SPLITS.get(split, split), []).append(path)
    if "train" not in out:
        raise DatasetError(f"{str(folder)!r} holds parquet files but no train-*.parquet shards")
    return out


def check_schema(path: Path) -> None:
    """One clear line unless ``path`` has ``image`` (struct of binary ``bytes``, ``path``) and integer ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise DatasetError(f"{str(path)!r} is not a readable parquet file ({type(e).__name__}: {e})") from None
    image = schema.field("image").type if "image" in schema.names else None
    blob = (
        image.field("bytes").type
        if image is not None and pa.types.is_struct(image) and (image.get_field_index("bytes") >= 0)
        else None
    )
    label = schema.field("label").type if "label" in schema.names else None
    if (
        blob is None
        or not (pa.types.is_binary(blob) or pa.types.is_large_binary(blob))
        or label is None
        or (not pa.types.is_integer(label))
    ):
        found = ", ".join(f"{f.name}: {f.type}" for f in schema)
        raise DatasetError(
            f"{str(path)!r} is not an ImageNet parquet shard: expected the columns image "
            f"(struct of bytes, path) and label (integer), as ILSVRC/imagenet-1k has; found {found}"
        )


def num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def labels_of(path: Path) -> list[int]:
    """The ``label`` column alone (the images are not read)."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["label"]).column("label").to_pylist()


def rows(path: Path):
    """``(row index, image path, JPEG bytes, label)`` for every row, ``_ROWS_PER_READ`` rows in memory."""
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROWS_PER_READ, columns=["image", "label"]):
        images, labels = batch.column("image"), batch.column("label").to_pylist()
        data, names = (
            images.field("bytes").to_pylist(),
            images.field("path").to_pylist() if (images.type.get_field_index("path") >= 0) else [None] * len(labels),
        )
        for name, blob, label in zip(names, data, labels):
            yield i, name, blob, label
            i += 1


def plan_splits(folder: Path, shard_size: int) -> tuple[list[int], dict]:
    """``(labels present, in order; {split: {'root', 'shards', 'scan_skipped'}})`` for ``packing``'s plan.

    Each parquet file becomes one output shard (``shard_size`` does not apply); a shard's job reads its
    file and maps each label to its class index.
    """
    del shard_size
    files = shards(folder)
    for paths in files.values():
        for path in paths:
            check_schema(path)
    if "test" in files:
        log.warning(
            "parquet: left out the test split (%d file(s)): its images have no labels (label -1)", len(files["test"])
        )
    from alexnet_jax.data.jobs import stop_if_signalled

    present = set()
    for path in files["train"]:  # the label column only
        stop_if_signalled("parquet scan")
        present.update(label for label in labels_of(path) if label >= 0)
    present = sorted(present)
    if not present:
        raise DatasetError(f"the train shards in {str(folder)!r} hold no labelled image")
    splits = {}
    for split in ("train", "val"):
        if split not in files:
            continue
        n = len(files[split])
        splits[split] = {
            "root": str(folder),
            "scan_skipped": [],
            "shards": [
                {
                    "name": f"{split}-{i:05d}-of-{n:05d}.array_record",
                    "parquet": path.name,
                    "rows": num_rows(path),
                    "bytes": path.stat().st_size,
                }
                for i, path in enumerate(files[split])
            ],
        }
    return present, splits

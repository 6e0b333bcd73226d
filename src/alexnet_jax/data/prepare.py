"""One-time conversion of an ImageNet-layout folder into fast ArrayRecord shards.

    python -m alexnet_jax.data.prepare --src DIR --dst DIR [--size 256] [--workers N] [--records jpeg|raw]
    python -m alexnet_jax.data.prepare --src DIR --stats_only [--size 256]   # statistics only, into the cache

Every image is decoded once, rescaled to shorter side ``size`` and
centre-cropped to ``size x size``, so training only decodes a small JPEG
(``--records jpeg``, the default; small RGB JPEGs keep their own bytes) or
nothing (``--records raw``: the uint8 pixels, 196,608 bytes an image at 256 px;
docs/gpu.md compares the two). The same pass computes the training set's
mean image and RGB eigens (``stats.npz``), the same for both formats; the
format is recorded in ``metadata.json``, written last, and training reads
either.

Progress is a bar on a terminal and a plain line every 30 s otherwise
(``$ALEXNET_JAX_PROGRESS_EVERY_S`` sets the interval). SIGTERM or Ctrl-C stops
either pass cleanly: what is finished is kept (shards; for ``--stats_only``
the sums so far), one line says so on stderr, and the exit status is 75
(EX_TEMPFAIL): run the same command again to continue.
"""

from __future__ import annotations

import logging
import sys

from alexnet_jax import paths, preemption
from alexnet_jax.data import layout, stats

# This module is the command (run as __main__ by `python -m`, so nothing in the package imports it); the
# preparation API it has always offered lives in packed/packing/stats and is re-exported here for callers.
from alexnet_jax.data.packed import (  # noqa: F401  re-exported
    FORMAT,
    FORMAT_RAW,
    METADATA,
    RECORD_FORMATS,
    STATS,
    packed_records,
    read_metadata,
    shard_paths,
)
from alexnet_jax.data.packing import prepare
from alexnet_jax.data.stats import load_stats  # noqa: F401
from alexnet_jax.errors import DatasetError, PassInterrupted


def _stats_only(a) -> int:
    try:
        files = layout.scan_split(a.src, "train")
        path = stats.ensure_stats(
            files, a.size, cache_dir=a.cache_dir, workers=a.workers, progress=not a.quiet, chunk_size=a.chunk_size
        )
    except PassInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"statistics of {len(files)} training images at {a.size}px: {path}")
    return 0


_PROG = "python -m alexnet_jax.data.prepare"


def _flags():
    from absl import flags

    fv = flags.FlagValues()
    paths.DEFINE_path(
        "src",
        None,
        "ImageNet-layout folder with train/ and val/, or a folder of Hugging Face "
        "ILSVRC/imagenet-1k parquet shards (or its data/)",
        flag_values=fv,
    )
    paths.DEFINE_path("dst", None, "output folder (created; an unfinished one is resumed)", flag_values=fv)
    flags.DEFINE_boolean(
        "stats_only",
        False,
        "only compute the training-set statistics of the folder into the cache that training "
        "on the folder reads (no shards; --dst not needed)",
        flag_values=fv,
    )
    paths.DEFINE_path(
        "cache_dir",
        None,
        "statistics cache (default $ALEXNET_JAX_DATA or ~/.cache/alexnet_jax; training: --config.data.cache_dir)",
        flag_values=fv,
    )
    flags.DEFINE_integer("size", 256, "shorter side and square crop size (paper: 256)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("workers", None, "processes (default: all cores; 0 = inline)", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("shard_size", 1024, "images per ArrayRecord shard", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer(
        "quality", 95, "JPEG quality of the stored images", lower_bound=1, upper_bound=100, flag_values=fv
    )
    flags.DEFINE_enum(
        "subsampling",
        "420",
        ["420", "422", "444"],
        "JPEG chroma subsampling of the stored images (420: fastest to decode; 444: full colour)",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "records",
        "jpeg",
        list(RECORD_FORMATS),
        "what each record stores: 'jpeg' (JPEG bytes, small RGB JPEGs kept as they are; "
        "the default) or 'raw' (the decoded size x size x 3 uint8 pixels: "
        "no decoding in training, and no re-encoding loss; 196,608 bytes an image at 256 px, "
        "so full ILSVRC-2012 train+val, 1,331,167 images, holds 261.7 GB = 243.7 GiB of pixels, "
        "~262.3 GB on disk with the record framing)",
        flag_values=fv,
    )
    paths.DEFINE_path("val_labels", None, "labels file for a flat val/ folder ('<file> <wnid>' lines)", flag_values=fv)
    flags.DEFINE_integer(
        "chunk_size",
        None,
        "--stats_only: images per job of the statistics pass (default: up to 512); the sums so "
        "far are saved as jobs finish, so a stopped pass continues where it was (a resumed pass "
        "keeps the chunk size it started with)",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "quiet",
        False,
        "no progress (default: a bar on a terminal, else a line every 30 s, $ALEXNET_JAX_PROGRESS_EVERY_S)",
        flag_values=fv,
    )
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
    cli.require(_PROG, a, "src")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with preemption.SignalsHeld():  # a signal during the folder scan stops it as one during the pass does
        return _run(a, cli)


def _run(a, cli) -> int:
    if a.stats_only:
        return _stats_only(a)
    if a.dst is None:
        cli.usage_error(_PROG, "give --dst (unless --stats_only)")
    try:
        dst = prepare(
            a.src,
            a.dst,
            size=a.size,
            quality=a.quality,
            subsampling=a.subsampling,
            shard_size=a.shard_size,
            workers=a.workers,
            val_labels=a.val_labels,
            progress=not a.quiet,
            records=a.records,
        )
    except PassInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = read_metadata(dst)
    for split, info in meta["splits"].items():
        print(
            f"{split}: {info['num_examples']} images in {len(info['shards'])} shard(s), {len(info['skipped'])} skipped"
        )
    print(f"records: {meta['records']}")
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

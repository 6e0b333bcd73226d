"""Evaluate a checkpoint on a validation set: top-1 and top-5 error, centre crop and ten crops.

    python -m alexnet_jax.evaluate --checkpoint=runs/paper --data=/path/to/imagenet [--views=center|ten_crop]
    python -m alexnet_jax.evaluate --checkpoint=runs/bvlc_alexnet --data=/path/to/imagenet --json=val.json
    python -m alexnet_jax.evaluate --checkpoint=runs/demo --json=val.json       # the data it trained on

``--checkpoint`` is a training run's workdir, its ``checkpoints/<step>``
folder or a folder written by ``alexnet_jax.convert``; ``--data=DIR`` is an
ImageNet-layout folder (``val/`` inside it) or that ``val/`` folder itself, and stands for
``--config.data.name=imagenet --config.data.format=folder --config.data.root=DIR``.
Labels are mapped through the checkpoint's own class list, so a folder that
holds only some of the classes is scored correctly.

The run's saved config gives the preprocessing and the data; ``--config.X=...``
overrides any of its fields, as on ``launch.py`` (the same data on another
machine, another validation layout or labels file, more workers). The
validation images are read by the reader training-time evaluation uses
(:func:`alexnet_jax.data.split_records` and :class:`alexnet_jax.data.EvalPasses`),
so every layout training accepts works here: ``val/<wnid>/``, a flat folder
with ``val_labels.txt``, Kaggle's ``LOC_val_solution.csv`` or the devkit's
ground truth with ``meta.mat``, or the packed shards. The training set is not
read: the class list and the mean image come from the checkpoint.

One pass gives both protocols: the ten views (corners and centre, and their
mirror images) hold the centre crop, so the centre-crop error is that view's,
and the ten-crop error averages the softmax over the ten, as the paper did.
One process; all its devices.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import ml_collections
from absl import flags, logging

from alexnet_jax import cli, paths, preemption
from alexnet_jax.errors import DatasetError

_PROG = cli.program("evaluate")
_CONFIG_HELP = (
    "--config.FIELD=VALUE: any field of the config the run saved, e.g. "
    "--config.data.root=/path/to/imagenet,\n"
    "  --config.data.num_workers=4 (ml_collections syntax, as on launch.py)."
)


def _define_run_flags(fv: flags.FlagValues) -> None:
    paths.DEFINE_path(
        "checkpoint",
        None,
        "A training run's workdir, its checkpoints/<step> folder, or a folder written by alexnet_jax.convert.",
        flag_values=fv,
    )
    paths.DEFINE_path(
        "data",
        None,
        "ImageNet-layout folder to evaluate on: the dataset root (its val/ "
        "inside) or the val/ folder itself; --config.data.root as an image folder.",
        flag_values=fv,
    )
    flags.DEFINE_integer("step", None, "Which checkpoint step; default the newest finished one.", flag_values=fv)
    flags.DEFINE_enum(
        "views",
        "both",
        ["both", "ten_crop", "center"],
        "'both' (or 'ten_crop'): centre crop and ten crops from one pass; 'center': the centre "
        "crop only (a tenth of the device work).",
        flag_values=fv,
    )
    flags.DEFINE_string("split", "val", "Which split of the data to evaluate.", flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Images per batch; default the run's eval_batch_size.", flag_values=fv)
    paths.DEFINE_path("json", None, "Also write the results to this JSON file.", flag_values=fv)


def _is_split_folder(folder: Path, split: str) -> bool:
    """Whether ``--data=folder`` names the split itself rather than the dataset root: it has no
    ``<split>/`` inside, but image files, or class folders (none of them a split's name)."""
    from alexnet_jax.data.layout import IMAGE_EXTENSIONS

    if not folder.is_dir() or (folder / split).is_dir():
        return False
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS) for p in entries):
        return True
    dirs = [p.name for p in entries if p.is_dir()]
    return bool(dirs) and not {"train", "val", "test"} & set(dirs)


def data_root_and_split(data: str, split: str) -> tuple[str, str]:
    """``(root, split)`` for ``--data=DIR``: ``DIR`` itself when ``DIR/<split>`` is there (or nothing
    better is: the reader then says what is missing), or ``DIR``'s parent and ``DIR``'s name when
    ``DIR`` is the split folder (``--data=/path/to/imagenet/val``)."""
    folder = Path(data)
    if _is_split_folder(folder, split):
        folder = folder.absolute()
        return str(folder.parent), folder.name
    return data, split


def config_for_evaluation(saved: dict) -> ml_collections.ConfigDict:
    """The saved config with every data field typed as in a fresh config, so all of them can be overridden
    (fields saved as null become placeholders again)."""
    from alexnet_jax.data import default_data_config

    config = ml_collections.ConfigDict(saved)
    data = default_data_config()
    with data.unlocked():
        for key, value in saved.get("data", {}).items():
            if isinstance(value, dict) and key in data:
                data[key].update(value)
            else:
                data[key] = value
    config.data = data
    config.lock()
    return config


def parse_command_line(argv: list[str]):
    """``(config, options)``: the checkpoint's config with the command line's overrides, and the other flags."""
    from alexnet_jax.checkpoint import read
    from alexnet_jax.errors import CheckpointError
    from alexnet_jax.paths import find_step_dir

    argv = list(argv)
    if cli.wants_help(argv):
        fv = flags.FlagValues()
        _define_run_flags(fv)
        cli.print_help(_PROG, "\n\n".join(__doc__.split("\n\n")[:3]), fv, _CONFIG_HELP)
    first = flags.FlagValues()
    _define_run_flags(first)
    cli.parse_flags(_PROG, first, argv, positional=True, known_only=True)
    cli.require(
        _PROG,
        first,
        "checkpoint",
        what="=PATH: a training run's workdir, or a folder written by python -m alexnet_jax.convert",
    )
    path = first.checkpoint
    try:
        step_dir, _ = find_step_dir(path, first.step)
    except CheckpointError as e:
        sys.exit(f"{_PROG}: {e}")
    base = config_for_evaluation(read(step_dir, "config")["config"])

    fv = flags.FlagValues()
    _define_run_flags(fv)
    hint = "; config keys are those the run saved, e.g. --config.data.root=/path/to/imagenet"
    cli.parse_flags(_PROG, fv, argv, config=base, key_hint=hint)
    config, split = base, fv.split
    if fv.data is not None and (Path(fv.data) / "metadata.json").is_file():  # prepare's packed output
        config.data.name, config.data.format, config.data.packed_dir = "imagenet", "packed", fv.data
        config.data.root = None
    elif fv.data is not None:
        root, split = data_root_and_split(fv.data, fv.split)
        if split != fv.split and config.data.val_labels is not None:
            cli.usage_error(
                _PROG,
                f"--data={fv.data} is a split folder not named {fv.split}/, so "
                "--config.data.val_labels would not apply: give the folder above it",
            )
        config.data.name, config.data.format, config.data.root = "imagenet", "folder", root
    return config, {
        "workdir": path,
        "step": fv.step,
        "views": fv.views,
        "split": split,
        "batch_size": fv.batch_size,
        "json": fv.json,
    }


def evaluate_checkpoint(
    workdir,
    config: ml_collections.ConfigDict | None = None,
    *,
    step: int | None = None,
    views: str = "both",
    split: str = "val",
    batch_size: int | None = None,
) -> dict:
    """Error rates of a checkpoint on ``split``; ``config`` (default: the saved one) names the data."""
    from alexnet_jax import data as data_lib
    from alexnet_jax import parallel, steps
    from alexnet_jax.inference import load_checkpoint
    from alexnet_jax.metrics import error_rates

    ckpt = load_checkpoint(workdir, step)
    if config is None:
        config = config_for_evaluation(ckpt.config.to_dict())
    config = paths.absolute_config(config)  # a data root given relative to where the command runs
    model = ckpt.model
    mesh, note = parallel.mesh_for_config(model.towers, ml_collections.ConfigDict({"tower": -1, "data": -1}))
    if note:
        print(note)
    param_shardings = parallel.state_shardings(ckpt.params, mesh)
    params = jax.device_put(ckpt.params, param_shardings)

    cfg = config.data
    classes = ckpt.classes
    if classes is None:
        raise DatasetError(
            f"{ckpt.path!r} does not record its class list; evaluate it where its training data is, with launch.py."
        )
    records = data_lib.split_records(cfg, split, classes)
    if cfg.mean_subtraction and ckpt.stats is None:
        raise DatasetError(f"{ckpt.path!r} does not carry the mean image the run subtracted.")
    data = data_lib.ResolvedData({split: records}, ckpt.stats, list(classes), list(ckpt.class_names or classes))
    batch = batch_size or config.eval_batch_size
    if batch % mesh.shape[parallel.DATA_AXIS]:
        raise DatasetError(
            f"--batch_size={batch} must be a multiple of the {mesh.shape[parallel.DATA_AXIS]} devices it is split over."
        )
    mode = "center" if views == "center" else "whole"  # whole images to the device, cut into ten views there
    passes = data_lib.EvalPasses(cfg, batch_size=batch, mode=mode, split=split, image_size=model.image_size, data=data)
    try:
        with preemption.sigint_blocked_in_new_workers():
            eval_step = steps.make_eval_step(model, mesh, param_shardings, steps.make_input_fn(cfg, ckpt.stats))
            start = time.perf_counter()
            batches = _progress(passes(), len(records), batch)
            result = error_rates(eval_step, params, batches, mesh)
            seconds = time.perf_counter() - start
    finally:
        passes.close()
        data_lib.release_shared_memory()  # no 'leaked shared_memory' warning from the loader's workers at exit
    return {
        "checkpoint": ckpt.path,
        "step": ckpt.step,
        "split": split,
        "images": len(records),
        **result,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(records) / seconds, 1),
    }


def _progress(batches, num_images: int, batch_size: int):
    """``batches``, with a bar on a terminal and, in a log, a plain line every 30 s (count, rate, ETA)."""
    from alexnet_jax.data.passprogress import PassProgress

    with PassProgress("evaluating", num_images) as progress:
        for i, batch in enumerate(batches, 1):
            yield batch
            progress.update(min(i * batch_size, num_images))


def _table(r: dict) -> str:
    rows = [("centre crop", r["top1_error"], r["top5_error"])]
    if "top1_error_ten_crop" in r:
        rows.append(("ten crops", r["top1_error_ten_crop"], r["top5_error_ten_crop"]))
    lines = [
        f"{r['checkpoint']} (step {r['step']}) on {r['split']}: {r['n']:,} images in {r['seconds']:.1f} s "
        f"({r['images_per_s']:,.0f} images/s, start-up included)",
        f"{'protocol':<12} {'top-1 error':>11} {'top-5 error':>11}",
    ]
    lines += [f"{name:<12} {t1:>11.4f} {t5:>11.4f}" for name, t1, t5 in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m alexnet_jax.evaluate ARGS`` (and the ``alexnet-evaluate`` command); ``argv``: the
    arguments after the program's name, default those of ``sys.argv``."""
    argv = [_PROG, *(sys.argv[1:] if argv is None else argv)]
    cli.run_main(_PROG, lambda: _main(argv))


def _main(argv: list[str]) -> None:
    config, opts = parse_command_line(argv)
    out = Path(opts["json"]) if opts["json"] else None
    if out is not None:  # before the pass, not after: a long evaluation must not be lost to a bad path
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(out.parent, os.W_OK):
                raise PermissionError(f"{out.parent} is not writable")
        except OSError as e:
            sys.exit(f"{_PROG}: cannot write --json={out}: {e}")
    logging.set_verbosity(logging.WARNING)
    from alexnet_jax.errors import CheckpointError, ConfigError, DatasetError

    try:
        r = evaluate_checkpoint(
            opts["workdir"],
            config,
            step=opts["step"],
            views=opts["views"],
            split=opts["split"],
            batch_size=opts["batch_size"],
        )
    except (ConfigError, DatasetError, CheckpointError) as e:
        sys.exit(f"{_PROG}: {e}")
    print(_table(r))
    if out is not None:
        try:
            out.write_text(json.dumps(r, indent=2) + "\n")
        except OSError as e:
            sys.exit(f"{_PROG}: cannot write --json={out}: {e} (the results are printed above)")


if __name__ == "__main__":
    main()

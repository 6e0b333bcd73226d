"""Figures of what a trained network learned, as PNG files.

* ``conv1_kernels``: the first layer's kernels tower by tower, as the paper's
  Figure 3 draws them (its tower 1 learned mostly colour-agnostic kernels,
  tower 2 mostly colour-specific ones; each panel's title gives the share
  of kernel energy in colour).
* ``training_curves``: training loss and validation error against steps,
  learning-rate drops marked, from ``<workdir>/metrics.jsonl``.
* ``predictions_figure``: images with their top-5 classes.
* ``neighbours_figure``: the paper's Figure 4 idea, the training images whose
  fc7 features are nearest (Euclidean) to those of each query image.

Command line (headless; writes ``<out>/*.png``)::

    python -m alexnet_jax.viz --checkpoint=runs/demo --out=figures/
    python -m alexnet_jax.viz --checkpoint=runs/demo --out=figures/ cat.jpg dog.png   # or --images=cat.jpg ...

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never
``pyplot``: nothing depends on a display or changes a notebook's backend.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alexnet_jax import paths
from alexnet_jax.errors import DatasetError

# ---------------------------------------------------------------------------
# Pure helpers


def colour_fraction(kernels_KHWC: np.ndarray) -> np.ndarray:
    """Share of each kernel's energy that is colour, not brightness: 0 for grey kernels.

    Each pixel's RGB weights split into their mean (the grey component) and the
    rest; the result is ``|rest|^2 / |w|^2`` per kernel, in [0, 1].
    """
    w = np.asarray(kernels_KHWC, np.float64)
    grey = w.mean(axis=-1, keepdims=True)
    total = np.sum(w**2, axis=(1, 2, 3))
    colour = np.sum((w - grey) ** 2, axis=(1, 2, 3))
    return colour / np.maximum(total, 1e-30)


def kernel_mosaic(kernels_KHWC: np.ndarray, cols: int, gap: int = 1) -> np.ndarray:
    """Kernels side by side in a grid, each stretched to [0, 1] on its own (RGB float image)."""
    k, h, w, _ = kernels_KHWC.shape
    rows = math.ceil(k / cols)
    out = np.ones((rows * (h + gap) + gap, cols * (w + gap) + gap, 3))
    for i, ker in enumerate(np.asarray(kernels_KHWC, np.float64)):
        lo, hi = ker.min(), ker.max()
        img = (ker - lo) / (hi - lo) if hi > lo else np.full_like(ker, 0.5)
        r, c = divmod(i, cols)
        out[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = img
    return out


def nearest_neighbours(query_QF: np.ndarray, gallery_GF: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(Q, k)`` of the ``k`` gallery rows nearest each query (Euclidean), and their distances."""
    q = np.asarray(query_QF, np.float64)
    g = np.asarray(gallery_GF, np.float64)
    d2 = np.sum(q**2, 1)[:, None] + np.sum(g**2, 1)[None, :] - 2.0 * q @ g.T
    dist = np.sqrt(np.maximum(d2, 0.0))
    k = min(k, g.shape[0])
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(dist, idx, axis=1)


def read_metrics(workdir: str | os.PathLike) -> dict:
    """``metrics.jsonl`` -> ``{'series': {key: (steps, values)}, 'lr_drops': [row, ...]}``.

    A resumed run logs some steps twice; the later value wins.
    """
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"No metrics file {str(path)!r}: give the run's workdir (where launch.py wrote metrics.jsonl)."
        )
    values: dict[str, dict[int, float]] = {}
    drops: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        step = int(row.get("step", -1))
        if "lr_drop/to" in row:
            drops[step] = row
            continue
        for key, v in row.items():
            if key != "step" and isinstance(v, (int, float)):
                values.setdefault(key, {})[step] = float(v)
    series = {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for k, d in values.items()}
    return {"series": series, "lr_drops": [drops[s] for s in sorted(drops)]}


def save(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------------------
# Figures


def conv1_kernels(params, *, cols: int = 16) -> Figure:
    """The paper's Figure 3: conv1's kernels, one panel per tower (tower 1 = GPU 1)."""
    kernel_THWCK = np.asarray(params["towers"]["conv1"]["kernel"], np.float32)
    towers, _, _, _, per_tower = kernel_THWCK.shape
    cols = min(cols, per_tower)
    rows = math.ceil(per_tower / cols)
    size = (max(5.5, 0.55 * cols + 1), towers * (0.6 * rows + 0.7) + 0.5)
    fig = Figure(figsize=size, layout="constrained")
    for t in range(towers):
        kernels = np.moveaxis(kernel_THWCK[t], -1, 0)  # (K, 11, 11, 3)
        ax = fig.add_subplot(towers, 1, t + 1)
        ax.imshow(kernel_mosaic(kernels, cols), interpolation="nearest")
        ax.set_axis_off()
        share = colour_fraction(kernels).mean()
        ax.set_title(
            f"tower {t + 1} (GPU {t + 1}): {per_tower} kernels, {share:.0%} of their energy in colour", fontsize=9
        )
    fig.suptitle("conv1 kernels", fontsize=11)
    return fig


def training_curves(metrics: dict) -> Figure:
    """Training loss and validation errors against steps; dashed lines where the LR was divided."""
    series, drops = metrics["series"], metrics["lr_drops"]
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax_loss, ax_err = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if "train/loss" in series:
        steps, vals = series["train/loss"]
        ax_loss.plot(steps, vals, marker="o" if len(steps) < 30 else None, ms=3, lw=1, label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("training loss")
    styles = {
        "val/top1_error": "top-1, centre",
        "val/top5_error": "top-5, centre",
        "val/top1_error_ten_crop": "top-1, ten crops",
        "val/top5_error_ten_crop": "top-5, ten crops",
        "train/top1_error": "top-1, training batches",
    }
    for key, label in styles.items():
        if key in series:
            steps, vals = series[key]
            ax_err.plot(steps, vals, marker="o" if len(steps) < 30 else None, ms=3, lw=1, label=label)
    ax_err.set_xlabel("step")
    ax_err.set_ylabel("error")
    ax_err.set_ylim(0, 1.02)
    ax_err.set_title("error (validation, and training batches)")
    for ax in (ax_loss, ax_err):
        for d in drops:
            ax.axvline(d["step"], color="0.3", ls="--", lw=1)
            ax.annotate(
                f"LR {d['lr_drop/from']:.2g}→{d['lr_drop/to']:.2g}",
                (d["step"], 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color="0.3",
            )
        if ax.lines:  # below the panel, clear of the curves and the LR labels
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
        ax.grid(alpha=0.3)
    return fig


def predictions_figure(
    images_NHWC: np.ndarray, prediction, *, titles: list[str] | None = None, cols: int = 4
) -> Figure:
    """Each image above a bar chart of its top-5 classes."""
    n = len(images_NHWC)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.3 * cols, 4.6 * rows), layout="constrained")
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[2.2, 1.3] * rows)
    for i in range(n):
        r, c = divmod(i, cols)
        ax_img = fig.add_subplot(grid[2 * r, c])
        ax_img.imshow(images_NHWC[i])
        ax_img.set_axis_off()
        title = titles[i] if titles else Path(prediction.sources[i]).name
        ax_img.set_title(title[:40], fontsize=8)
        ax_bar = fig.add_subplot(grid[2 * r + 1, c])
        probs, names = prediction.top_probs[i], prediction.names[i]
        ypos = np.arange(len(probs))[::-1]
        ax_bar.barh(ypos, probs, color="tab:blue")
        ax_bar.set_yticks(ypos, [nm[:28] for nm in names], fontsize=7)
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=7)
    return fig


def neighbours_figure(
    query_NHWC: np.ndarray,
    gallery_GHWC: np.ndarray,
    indices_QK: np.ndarray,
    distances_QK: np.ndarray,
    *,
    query_titles: list[str] | None = None,
    gallery_titles: list[str] | None = None,
) -> Figure:
    """The paper's Figure 4: each query (first column) and its nearest gallery images by fc7 distance."""
    q, k = indices_QK.shape
    fig = Figure(figsize=(1.5 * (k + 1), 1.7 * q + 0.4), layout="constrained")
    for i in range(q):
        ax = fig.add_subplot(q, k + 1, i * (k + 1) + 1)
        ax.imshow(query_NHWC[i])
        ax.set_axis_off()
        ax.set_title((query_titles[i] if query_titles else "query")[:24], fontsize=7, color="tab:red")
        for j in range(k):
            g = int(indices_QK[i, j])
            ax = fig.add_subplot(q, k + 1, i * (k + 1) + j + 2)
            ax.imshow(gallery_GHWC[g])
            ax.set_axis_off()
            label = f"{gallery_titles[g][:24]}\n" if gallery_titles else ""
            ax.set_title(f"{label}d={distances_QK[i, j]:.3g}", fontsize=6)
    fig.suptitle(
        "queries (red, first column) and their nearest training images by Euclidean distance of fc7 features",
        fontsize=9,
    )
    return fig


# ---------------------------------------------------------------------------
# Images from the run's dataset (where it is available)


def layout_costs_figure(costs: list[dict]) -> Figure:
    """Bytes each device sends per training step, per layer, one bar per layout: the activations
    exchanged (forward and backward, hatched) under the gradients all-reduced.

    ``costs``: tables from ``alexnet_jax.costs.layer_costs`` (same net, any layouts and device counts).
    """
    from alexnet_jax.costs import rounded

    tables = [rounded(c) for c in costs]
    layers = [r["name"] for r in tables[0]["layers"]]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(tables)
    x = np.arange(len(layers))
    for i, t in enumerate(tables):
        ex = np.array([r["exchange_bytes_per_step"] for r in t["layers"]]) / 1e6
        gr = np.array([r["gradient_bytes_per_step"] for r in t["layers"]]) / 1e6
        label = f"{t['layout']} ({t['mesh']['data']}x{t['mesh']['tower']})"
        pos = x + (i - (len(tables) - 1) / 2) * width
        ax.bar(pos, ex, width, color=f"C{i}", hatch="//", edgecolor="white", label=f"{label}: activations")
        ax.bar(pos, gr, width, bottom=ex, color=f"C{i}", alpha=0.55, label=f"{label}: gradients")
    ax.set_xticks(x, layers)
    ax.set_ylabel("MB sent per device per step")
    t0 = tables[0]
    ax.set_title(f"What each layout sends: {t0['devices']} devices, batch {t0['batch_size']}")
    ax.legend(fontsize=8, ncol=len(tables))
    return fig


def dataset_images(config, split: str, count: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` images spread evenly over ``split`` of the run's data, as the pipeline decodes them.

    Returns (uint8 (N, resize, resize, 3), labels, names). Raises ``DatasetError``
    when the data is not on this machine.
    """
    from alexnet_jax import data as data_lib
    from alexnet_jax.data import sources

    data = data_lib.resolve(config.data)
    if split not in data.records:
        raise DatasetError(f"The run's data has no {split!r} split.")
    src = sources.DecodedSource(
        data.records[split],
        int(config.data.resize_size),
        on_error="mask",
        warp=config.data.get("resize_mode") == "warp",
    )
    picks = np.unique(np.linspace(0, len(src) - 1, min(count, len(src))).astype(int))
    images, labels = [], []
    for i in picks:
        ex = src[int(i)]
        if ex["mask"]:
            images.append(ex["image"])
            labels.append(int(ex["label"]))
    return np.stack(images), np.array(labels), [data.class_names[j] for j in labels]


def write_all(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    images: list[str] | None = None,
    num_images: int = 8,
    num_queries: int = 5,
    neighbours: int = 6,
    gallery_size: int = 1000,
    log=print,
) -> list[Path]:
    """Every figure for one run, as ``<out>/{conv1_kernels,curves,predictions,neighbours}.png``.

    Figures whose inputs are missing (no metrics file, no images and no
    dataset on this machine) are skipped with a note saying what to give.
    """
    from alexnet_jax.errors import DatasetError
    from alexnet_jax.inference import Classifier, load_checkpoint
    from alexnet_jax.paths import find_step_dir

    out = Path(out)
    ckpt = load_checkpoint(workdir, step)
    clf = Classifier(ckpt)
    written = [save(conv1_kernels(ckpt.params), out / "conv1_kernels.png")]

    step_dir, _ = find_step_dir(workdir, step)
    run_dir = Path(workdir) if (Path(workdir) / "metrics.jsonl").is_file() else Path(str(step_dir)).parent.parent
    try:
        written.append(save(training_curves(read_metrics(run_dir)), out / "curves.png"))
    except FileNotFoundError as e:
        log(f"skipped curves.png: {e}")

    val = gallery = None
    try:
        val = dataset_images(ckpt.config, "val", max(num_images, num_queries))
        gallery = dataset_images(ckpt.config, "train", gallery_size)
    except (DatasetError, OSError) as e:
        log(
            f"the run's dataset is not available here ({str(e).splitlines()[0]}); "
            "pass --images FILE... to classify your own"
        )

    if images:
        batch = clf.preprocess(images, "center")
        shown, titles = batch["resized"], [Path(s).name for s in batch["sources"]]
        inputs = list(images)
    elif val is not None:
        shown, titles = val[0][:num_images], [f"true: {n}" for n in val[2][:num_images]]
        inputs = list(shown)
    else:
        shown = None
    if shown is not None:
        pred = clf.predict(inputs)
        written.append(save(predictions_figure(shown, pred, titles=titles), out / "predictions.png"))
    else:
        log("skipped predictions.png: no images (give --images FILE...)")

    if gallery is not None and (images or val is not None):
        queries = shown[:num_queries] if images else val[0][:num_queries]
        q_titles = titles[:num_queries] if images else val[2][:num_queries]
        idx, dist = nearest_neighbours(clf.features(list(queries)), clf.features(list(gallery[0])), neighbours)
        written.append(
            save(
                neighbours_figure(queries, gallery[0], idx, dist, query_titles=q_titles, gallery_titles=gallery[2]),
                out / "neighbours.png",
            )
        )
    else:
        log("skipped neighbours.png: needs the run's training images as the gallery")
    for p in written:
        log(f"wrote {p}")
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m alexnet_jax.viz ARGS`` (and ``alexnet-viz``); ``argv`` defaults to ``sys.argv[1:]``.
    Returns the exit status: 0, or 1 when the checkpoint or an image cannot be read."""
    from alexnet_jax import cli

    prog = cli.program("viz")
    argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    return cli.run_main(prog, lambda: _main(prog, argv))


def _main(prog: str, argv: list[str]) -> int:
    from absl import flags

    from alexnet_jax import cli

    fv = flags.FlagValues()
    paths.DEFINE_path(
        "checkpoint", None, "A run's workdir, its checkpoints/ or a checkpoints/<step>/ folder.", flag_values=fv
    )
    paths.DEFINE_path("out", "figures", "The folder for the PNG files (created).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Which checkpoint step (default: the newest).", flag_values=fv)
    paths.DEFINE_multi_path(
        "images",
        None,
        "An image file to classify and use as a query (repeatable), as well as or instead of the files after the flags",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_images", 8, "Validation images to classify without --images.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer("num_queries", 5, "Query images in the neighbours figure.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("neighbours", 6, "Neighbours shown per query.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer(
        "gallery_size", 1000, "Training images searched for neighbours.", lower_bound=1, flag_values=fv
    )
    if cli.wants_help(argv):
        cli.print_help(prog, "\n\n".join(__doc__.split("\n\n")[:4]), fv)
    after = cli.parse_flags(prog, fv, argv, positional=True)
    images = [*(fv.images or []), *after] or None  # --images FILE first, then the files after the flags
    cli.require(prog, fv, "checkpoint", what="=PATH: a training run's workdir or one of its checkpoints")
    from alexnet_jax.errors import CheckpointError, ImageError

    try:
        write_all(
            fv.checkpoint,
            fv.out,
            step=fv.step,
            images=images,
            num_images=fv.num_images,
            num_queries=fv.num_queries,
            neighbours=fv.neighbours,
            gallery_size=fv.gallery_size,
        )
    except (CheckpointError, ImageError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

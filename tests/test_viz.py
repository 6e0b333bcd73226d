"""Figures: the pure helpers against NumPy loops, and every PNG the command line writes."""

import subprocess
import sys
from pathlib import Path

import _trained
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import viz

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("trained_runs")  # one worker trains _trained.runs for all


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _trained.runs(tmp_path_factory)


def assert_real_png(path, size):
    """Opens as a PNG of the expected size, and is a picture: many colours, not one flat field."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size, (path, im.size)
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.std() > 10, path
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50, path


def test_colour_fraction_of_grey_and_coloured_kernels():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.normal(size=(4, 11, 11, 1)), 3, axis=-1)
    np.testing.assert_allclose(viz.colour_fraction(grey), 0.0, atol=1e-12)
    red_minus_green = np.zeros((1, 11, 11, 3))
    red_minus_green[..., 0], red_minus_green[..., 1] = 1.0, -1.0  # no brightness at all
    np.testing.assert_allclose(viz.colour_fraction(red_minus_green), 1.0)
    red_only = np.zeros((1, 11, 11, 3))
    red_only[..., 0] = rng.normal(size=(11, 11))
    np.testing.assert_allclose(viz.colour_fraction(red_only), 2 / 3)  # (1,0,0) = grey 1/3 + colour (2/3,-1/3,-1/3)


def test_nearest_neighbours_match_a_brute_force_loop():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(5, 16)), rng.normal(size=(40, 16))
    idx, dist = viz.nearest_neighbours(q, g, k=4)
    for i in range(5):
        d = [np.sqrt(sum((q[i, f] - g[j, f]) ** 2 for f in range(16))) for j in range(40)]
        order = sorted(range(40), key=lambda j: d[j])[:4]
        assert list(idx[i]) == order
        np.testing.assert_allclose(dist[i], [d[j] for j in order], rtol=1e-9)


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.5}\n'
        '{"step": 2, "lr_drop/from": 0.01, "lr_drop/to": 0.001, "lr_drop/reason": "scheduled"}\n'
        '{"step": 2, "train/loss": 2.4}\n{"step": 3, "train/lo'
    )  # resumed at 2; cut short by a kill
    m = viz.read_metrics(tmp_path)
    steps, loss = m["series"]["train/loss"]
    assert list(steps) == [1, 2] and list(loss) == [3.0, 2.4]
    assert [d["step"] for d in m["lr_drops"]] == [2]
    with pytest.raises(FileNotFoundError, match="No metrics file"):
        viz.read_metrics(tmp_path / "elsewhere")


def test_command_line_writes_the_four_figures(runs, tmp_path, capsys):
    out = tmp_path / "figures"
    photos = _trained.photo_paths()
    # As typed (docs/inference.md), in a process of its own.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.viz",
            "--checkpoint",
            str(runs["2x2"]),
            "--out",
            str(out),
            "--gallery_size",
            "200",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "leaked" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "conv1_kernels.png",
        "curves.png",
        "neighbours.png",
        "predictions.png",
    ]
    assert_real_png(out / "conv1_kernels.png", (550, 310))  # 6 kernels per tower (width 1/8), two towers
    assert_real_png(out / "curves.png", (1100, 460))
    assert_real_png(out / "predictions.png", (1320, 920))  # 8 validation images, 2 rows of 4
    assert_real_png(out / "neighbours.png", (1050, 890))  # 5 queries x (1 + 6 neighbours)
    # Own images, from a checkpoint folder: classified and used as queries.
    mine = tmp_path / "mine"
    step_dir = runs["2x2"] / "checkpoints" / str(_trained.STEPS)
    assert (
        viz.main(
            [
                "--checkpoint",
                str(step_dir),
                "--out",
                str(mine),
                "--images",
                *photos,
                "--gallery_size",
                "50",
                "--neighbours",
                "3",
            ]
        )
        == 0
    )
    assert_real_png(mine / "predictions.png", (660, 460))
    assert_real_png(mine / "neighbours.png", (600, 380))
    assert (mine / "curves.png").is_file()  # found metrics.jsonl two levels up

    assert viz.main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_curves_mark_the_lr_drop(runs):
    m = viz.read_metrics(runs["1x2"])
    assert [d["step"] for d in m["lr_drops"]] == [3]  # optim.drop_epochs=(0.03,) at 93 steps/epoch
    assert list(m["series"]["val/top1_error"][0]) == [3, 6]
    fig = viz.training_curves(m)
    drawn = [ln for ax in fig.axes for ln in ax.lines if list(ln.get_xdata()) == [3, 3]]
    assert len(drawn) == 2  # one dashed line on each panel


def test_layout_costs_figure_draws_the_tables_bytes():
    """One bar per layer and layout: activations exchanged below, gradients all-reduced on top, in MB,
    as alexnet_jax.costs works them out (the notebook's figure)."""
    from alexnet_jax import AlexNet
    from alexnet_jax.costs import layer_costs, rounded

    costs = [layer_costs(AlexNet(), layout, 4, 128) for layout in ("towers", "data", "hybrid")]
    ax = viz.layout_costs_figure(costs).axes[0]
    bars = np.array([p.get_height() for p in ax.patches]).reshape(3, 2, 8)  # layout, (activations, gradients), layer
    for drawn, table in zip(bars, costs):
        rows = rounded(table)["layers"]
        np.testing.assert_allclose(drawn[0], [r["exchange_bytes_per_step"] / 1e6 for r in rows])
        np.testing.assert_allclose(drawn[1], [r["gradient_bytes_per_step"] / 1e6 for r in rows])
    assert bars[2, 1, 5:].sum() == 0 and bars[1, 0].sum() == 0  # hybrid: no FC gradients; data: no exchanges

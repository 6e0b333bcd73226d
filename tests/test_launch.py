"""The front door: launch.py and the config files, run as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_jax import default_config

ROOT = Path(__file__).resolve().parents[1]


def launch(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_paper_config_model_section_is_the_paper_net():
    sys.path.insert(0, str(ROOT))
    from configs import paper

    assert paper.get_config().model.to_dict() == default_config().to_dict()


def test_demo_main_job_trains_and_reports(tmp_path):
    r = launch(
        "--config=configs/demo.py", f"--workdir={tmp_path}", "--config.total_steps=3", "--config.data.num_workers=0"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1,279,082" in r.stdout  # the demo net's parameter count, in the summary table
    assert "Done at step 3: validation top-1 error" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr"} <= set(rows[0]) and "val/top1_error" in [r for r in rows if "epoch" in r][-1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# three runs; every override parses in test_configs, and each ablation's effect is in test_model_ablations
@pytest.mark.slow
@pytest.mark.parametrize(
    "ablation",
    [
        ["--config.model.lrn=False"],
        ["--config.model.pool_window=2", "--config.model.pool_stride=2"],
        ["--config.model.towers=1"],
    ],
)
def test_each_ablation_trains_from_the_command_line(tmp_path, ablation):
    r = launch(
        "--config=configs/demo.py",
        f"--workdir={tmp_path}",
        "--config.total_steps=2",
        "--config.data.num_workers=0",
        "--config.eval_ten_crop=False",
        *ablation,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Done at step 2" in r.stdout
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    for arg in ablation:
        key, value = arg.removeprefix("--config.model.").split("=")
        assert str(saved[key]) == value


def test_paper_config_without_imagenet_says_how_to_point_at_it(tmp_path):
    r = launch("--config=configs/paper.py", f"--workdir={tmp_path}")
    assert r.returncode != 0
    assert "--config.data.root" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.model.lrm=False"], "no such config key: 'lrm'"),
        (["--config.model.towers=two"], "invalid literal for int()"),
        (["--config.model.towers=3"], "must divide by model.towers=3"),
        (["--config.mesh.parallelism=hybrid"], "per tower {'fc8': 5} do not divide"),
        (["--config=configs/missing.py"], "configs/missing.py"),
        (["--workdir=launch.py"], f"Cannot use --workdir={ROOT / 'launch.py'}"),  # made absolute where typed
        (["--config=configs/paper.py", "--config.data.root=/nonexistent"], "data folder '/nonexistent' does not exist"),
    ],
)
def test_bad_command_lines_fail_with_one_clear_message(args, message):
    r = launch(*args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow  # two launch.py runs; the hybrid layout's training itself is in test_parallel_train_step
@pytest.mark.heavy  # over a minute on 2 cores: .ci/run runs it when time allows
def test_hybrid_layout_from_the_command_line(tmp_path):
    """The README's command, --config.mesh.parallelism=hybrid, on the 2 virtual CPU devices: its
    3 steps end at the parameters the data layout reaches from the same seed, the FC kernels
    stored split by units and read back whole."""
    import jax
    import numpy as np
    from test_train import TINY

    from alexnet_jax import load_checkpoint

    params = {}
    for layout in ("hybrid", "data"):
        r = launch(
            "--config=configs/demo.py",
            "--config.model.towers=1",
            f"--config.mesh.parallelism={layout}",
            f"--workdir={tmp_path / layout}",
            *TINY,
            "--config.total_steps=3",
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "mesh {'data': 2, 'tower': 1}" in r.stdout
        ckpt = load_checkpoint(tmp_path / layout, devices=jax.devices()[:1])
        assert ckpt.config.mesh.parallelism == layout
        params[layout] = jax.device_get(ckpt.params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params["hybrid"]), jax.tree.leaves(params["data"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_owt_net_is_a_one_line_override_and_a_config():
    """The README's overrides for "one weird trick"'s net, parsed as typed, and configs/owt.py: 61,100,840."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import count_params, from_config
    from alexnet_jax.cli import parse_command_line

    typed, _ = parse_command_line(
        [
            "launch.py",
            "--config=configs/paper.py",
            "--config.model.towers=1",
            "--config.model.conv_widths=(64,192,384,256,256)",
            "--config.model.lrn=False",
            "--config.model.conv1_pad=2",
        ]
    )
    owt, _ = parse_command_line(["launch.py", "--config=configs/owt.py"])
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = [jax.eval_shape(from_config(c.model).init, jax.random.key(0), x) for c in (typed, owt)]
    assert [count_params(s) for s in shapes] == [61_100_840] * 2
    assert jax.tree.map(lambda a: a.shape, shapes[0]) == jax.tree.map(lambda a: a.shape, shapes[1])
    assert (owt.model.lrn, owt.model.conv1_pad) == (False, 2)

"""Paths as users type them: relative, ``~``, ``./x/``, through a symlink, with spaces; URLs untouched.

``paths.absolute`` is checked against ``os.getcwd()`` joined by hand; then every entry point that reads
a checkpoint, and the Python API, is given each form of the same checkpoint from inside a working
directory (Orbax alone refuses all but the absolute one).
"""

import json
import os

import _trained
import ml_collections
import pytest

from alexnet_jax import load_checkpoint, paths
from alexnet_jax.data import embedded

pytestmark = pytest.mark.xdist_group("trained_runs")  # one worker trains _trained.runs for all


def test_absolute_joins_the_working_directory_by_hand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    here = str(tmp_path)
    assert str(paths.absolute("runs/demo")) == here + "/runs/demo"
    assert str(paths.absolute("./runs/demo/")) == here + "/runs/demo"
    assert str(paths.absolute("~/runs/demo")) == here + "/home/runs/demo"
    assert str(paths.absolute("../x/./y")) == os.path.dirname(here) + "/x/y"
    assert str(paths.absolute("drive/My Drive/alexnet run")) == here + "/drive/My Drive/alexnet run"
    assert str(paths.absolute("/abs/olute")) == "/abs/olute"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert str(paths.absolute("link")) == here + "/link"  # the name as given; the OS follows it
    assert str(paths.absolute("gs://bucket/runs/demo")) == "gs://bucket/runs/demo"
    for url in ("gs://bucket/runs/demo", "s3://b/k", "file:///x/y"):
        assert paths.absolute_str(url) == url and paths.is_url(url)
    assert paths.absolute_str(None) is None


def test_a_run_config_gets_absolute_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict(
        {
            "data": {"root": "data/img", "packed_dir": "~/packed", "stats_path": None, "cache_dir": "gs://b/cache"},
            "seed": 0,
        }
    )
    out = paths.absolute_config(config)
    assert out.data.root == f"{tmp_path}/data/img" and out.data.packed_dir == os.path.expanduser("~/packed")
    assert out.data.stats_path is None and out.data.cache_dir == "gs://b/cache"
    assert config.data.root == "data/img"  # the caller's config is left as it was


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _trained.runs(tmp_path_factory)["1x2"]


def forms(run, where, monkeypatch):
    """The same checkpoint spelled five ways, from ``where`` (made the working and the home directory)."""
    monkeypatch.setenv("ALEXNET_JAX_DATA", str(embedded.default_root().parent))  # the data stays where it is
    monkeypatch.chdir(where)
    monkeypatch.setenv("HOME", str(where))
    (where / "link to run").symlink_to(run)
    return {
        "relative": os.path.relpath(run, where),
        "dot-slash": "./" + os.path.relpath(run, where) + "/",
        "tilde": "~/link to run",
        "symlink": "link to run",
        "absolute": str(run),
    }


def test_load_checkpoint_takes_every_form(run, tmp_path, monkeypatch):
    for name, path in forms(run, tmp_path, monkeypatch).items():
        assert load_checkpoint(path).step == _trained.STEPS, name


def test_each_entry_point_takes_relative_paths(run, tmp_path, monkeypatch, capsys):
    """evaluate, predict, viz, export: checkpoint, image, output folder and --data all relative."""
    import importlib

    from alexnet_jax import evaluate, export, viz

    predict_command = importlib.import_module("alexnet_jax.predict")  # the package's `predict` is the function

    ckpt = forms(run, tmp_path, monkeypatch)
    image = os.path.relpath(_trained.photo_paths()[0], tmp_path)
    data = tmp_path / "my data"
    data.symlink_to(embedded.ensure_embedded_dataset())  # the demo's folder, under a name with a space
    export.main(["--checkpoint", ckpt["tilde"], "--out", "out dir/weights"])
    assert (tmp_path / "out dir" / "weights" / "checkpoints" / str(_trained.STEPS)).is_dir()
    predict_command.main(["--checkpoint", ckpt["dot-slash"], image, "--json", "pred.json"])
    assert list(json.loads((tmp_path / "pred.json").read_text())) == [os.path.abspath(image)]
    viz.main(["--checkpoint", ckpt["symlink"], "--out", "figures/", "--num_images=2", "--gallery_size=8"])
    assert (tmp_path / "figures" / "conv1_kernels.png").is_file()
    evaluate.main(["--checkpoint", ckpt["relative"], "--data", "my data", "--views=center", "--json=val.json"])
    result = json.loads((tmp_path / "val.json").read_text())
    assert result["images"] == 500 and result["checkpoint"] == f"{run}/checkpoints/{_trained.STEPS}", result

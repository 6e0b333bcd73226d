"""Every field of every file in configs/ can be set from the command line, through launch.py's own parser."""

import sys
from pathlib import Path

import ml_collections
import pytest

from alexnet_jax import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py"
)


def _leaves(cfg: ml_collections.ConfigDict, prefix=""):
    for key in cfg:
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", cfg.get_type(key), value


def _other_value(kind, value):
    """A command-line string for a value of ``kind`` different from ``value``, and the value it means."""
    if kind is bool:
        return str(not value), not value
    if kind is int:
        return str((value or 0) + 3), (value or 0) + 3
    if kind is float:
        return repr((value or 0.0) + 0.25), (value or 0.0) + 0.25
    if kind is str:
        return "/some/where else", "/some/where else"
    if kind is tuple:
        return "(7, 9)", (7, 9)
    raise AssertionError(f"no override value for type {kind}")


@pytest.fixture(autouse=True)
def _repo_root_importable(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/demo.py imports configs.paper, as under launch.py
    monkeypatch.syspath_prepend(str(ROOT))


def test_configs_exist():
    assert {"configs/paper.py", "configs/demo.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_field_overrides_from_the_command_line(config_file):
    base, _ = cli.parse_command_line(["launch.py", f"--config={config_file}"])
    fields = list(_leaves(base))
    assert len(fields) > 40
    for name, kind, value in fields:
        text, expected = _other_value(kind, value)
        config, workdir = cli.parse_command_line(
            ["launch.py", f"--config={config_file}", f"--config.{name}={text}", "--workdir=/tmp/w"]
        )
        got = config
        for part in name.split("."):
            got = got[part]
        assert got == expected and type(got) is type(expected), (name, kind, got)
        assert workdir == "/tmp/w"


@pytest.mark.parametrize("field", ["data.root", "data.packed_dir", "data.stats_path", "data.val_labels"])
def test_path_fields_are_typed_placeholders(field):
    config, _ = cli.parse_command_line(["launch.py", "--config=configs/paper.py"])
    section, key = field.split(".")
    if config[section][key] is None:
        assert config[section].get_type(key) is str


def test_a_wrong_type_is_refused_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_command_line(["launch.py", "--config=configs/paper.py", "--config.model.towers=two"])
    assert "invalid literal for int()" in _usage_line(capsys, e)


# A config file with a bug in its own code: get_config() misspells a field of the config it builds.
BROKEN_CONFIG = """
from configs import paper


def get_config():
    c = paper.get_config()
    c.modle.towers = 1
    return c
"""


def _usage_line(capsys, e) -> str:
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (e.value.code, err)
    return err


def _passes_through(error: BaseException, path: Path) -> bool:
    import traceback

    return any(Path(f.filename) == path for f in traceback.extract_tb(error.__traceback__))


@pytest.mark.parametrize(
    "bug, error",
    [
        ("c.modle.towers = 1", AttributeError),
        ("c.model.towers = int('two')", ValueError),
        ("c.model.towers = len(c.model.towers)", TypeError),
    ],
)
def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path, capsys, bug, error):
    """What get_config() itself raises is the config's bug: raised as it is, through the line that raised
    it, not reported as a bad command line; a misspelt override of the same field is."""
    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN_CONFIG.replace("c.modle.towers = 1", bug))
    with pytest.raises(error) as e:
        cli.parse_command_line(["launch.py", f"--config={broken}"])
    assert _passes_through(e.value, broken)
    assert "bad command line" not in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        cli.parse_command_line(["launch.py", "--config=configs/paper.py", "--config.modle.towers=1"])
    assert "launch.py: bad command line: no such config key: 'modle'" in _usage_line(capsys, e)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/paper.py", "--config.model.lrm=False"], "no such config key: 'lrm'"),
        (["--config=configs/paper.py", "--config.model.towers=two"], "--config.model.towers=two: invalid literal"),
        (["--config=configs/paper.py", "--nosuchflag=1"], "Unknown command line flag 'nosuchflag'"),
        (["--config=configs/missing.py"], "cannot read the config file: [Errno 2] No such file or directory"),
        (["--config=configs/missing.py", "--config.model.towers=1"], "No such file or directory: 'configs/missing.py'"),
        (["--config=configs/paper.py:extra"], "--config=configs/paper.py:extra: get_config() of configs/paper.py"),
        (
            ["--config=configs/paper.py", "--config.model.towers=1", "--config.model={}"],
            "Flag --config.model is provided after --config.model.towers",
        ),
    ],
)
def test_command_line_mistakes_are_one_line_and_status_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_command_line(["launch.py", *args])
    assert message in _usage_line(capsys, e)


def test_costs_and_evaluate_tell_a_config_bug_from_a_mistake(tmp_path, capsys):
    """costs' --config is launch.py's; evaluate's config is the one a checkpoint saved."""
    import numpy as np

    from alexnet_jax import checkpoint, costs, evaluate

    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN_CONFIG)
    with pytest.raises(AttributeError) as e:
        costs.main([f"--config={broken}"])
    assert _passes_through(e.value, broken)
    assert "bad command line" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        costs.main(["--config=configs/paper.py", "--config.modle.towers=1"])
    assert "bad command line: no such config key: 'modle'" in _usage_line(capsys, e)

    base, _ = cli.parse_command_line(["launch.py", "--config=configs/demo.py"])
    step_dir = checkpoint.write_weights_only(
        tmp_path / "ckpt",
        0,
        {"w": np.zeros(2, np.float32)},
        config=base.to_dict(),
        dataset={"classes": ["a", "b"], "class_names": ["a", "b"]},
    )
    with pytest.raises(SystemExit) as e:
        evaluate.main([f"--checkpoint={step_dir}", "--config.data.rooot=/x"])
    err = _usage_line(capsys, e)
    assert "bad command line: no such config key: 'rooot'" in err and "keys are those the run saved" in err


# ---------------------------------------------------------------------------
# Every entry point as a user types it: --help, the console scripts, evaluate's --data forms, clean ends.

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

# The command line of each program, and flags its --help must list (its own, under the names it takes).
PROGRAMS = {
    "launch.py": (["launch.py"], ["--config", "--workdir", "--config.FIELD=VALUE"]),
    "evaluate": (
        ["-m", "alexnet_jax.evaluate"],
        ["--checkpoint", "--data", "--step", "--json", "--views", "--batch_size", "--config.FIELD=VALUE"],
    ),
    "predict": (["-m", "alexnet_jax.predict"], ["--checkpoint", "--step", "--json", "--views", "--top_k", "--images"]),
    "convert": (["-m", "alexnet_jax.convert"], ["--caffemodel", "--npy", "--torchvision", "--out", "--mean"]),
    "export": (["-m", "alexnet_jax.export"], ["--checkpoint", "--out", "--step"]),
    "costs": (["-m", "alexnet_jax.costs"], ["--config", "--devices", "--json"]),
    "ablate": (["-m", "alexnet_jax.ablate"], ["--config", "--out", "--seeds", "--variants"]),
    "viz": (["-m", "alexnet_jax.viz"], ["--checkpoint", "--out", "--step", "--images", "--gallery_size"]),
}
SCRIPTS = {
    "alexnet-train": "launch.py",
    "alexnet-evaluate": "evaluate",
    "alexnet-predict": "predict",
    "alexnet-convert": "convert",
    "alexnet-export": "export",
    "alexnet-costs": "costs",
    "alexnet-ablate": "ablate",
    "alexnet-viz": "viz",
    "alexnet-prepare": None,
}
# Flags of other modules that absl's own --help would list (absl.logging's, JAX's): not this program's.
FOREIGN = ("--verbosity", "--logtostderr", "--jax_", "--flagfile", "Try --helpfull")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


SCRIPTS_RUN = ("alexnet-train", "alexnet-evaluate", "alexnet-prepare")  # one of each kind of main; -m slow: all


def _helps(commands: dict) -> dict:
    """``--help`` of each command, four at a time (each imports JAX: ~3 s)."""
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(commands, pool.map(_run, commands.values())))


@pytest.fixture(scope="module")
def helps() -> dict:
    bin_dir = Path(sys.executable).parent
    commands = {name: [sys.executable, *args, "--help"] for name, (args, _) in PROGRAMS.items()}
    commands |= {s: [str(bin_dir / s), "--help"] for s in SCRIPTS_RUN if (bin_dir / s).is_file()}
    return _helps(commands)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_lists_the_programs_own_flags(helps, program):
    r = helps[program]
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: ") and r.stderr == "", r.stderr[-2000:]
    for flag in PROGRAMS[program][1]:
        assert flag in r.stdout, (flag, r.stdout)
    assert not [f for f in FOREIGN if f in r.stdout], r.stdout


def _installed_scripts() -> Path:
    bin_dir = Path(sys.executable).parent
    missing = [s for s in SCRIPTS if not (bin_dir / s).is_file()]
    if missing:
        pytest.skip(
            f"console scripts not installed in {bin_dir} ({', '.join(missing)}): pip install -e '.[test]' makes them"
        )
    return bin_dir


def _check_script_help(script: str, r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0 and r.stderr == "", (script, r.stderr[-2000:])
    program = SCRIPTS[script]
    if program is None:  # alexnet-prepare: alexnet_jax.data.prepare's own parser
        assert "--src" in r.stdout, r.stdout
        return
    assert r.stdout.startswith(f"usage: {script} "), (script, r.stdout[:200])
    assert all(flag in r.stdout for flag in PROGRAMS[program][1]), (script, r.stdout)


def test_console_scripts_are_the_entry_points(helps):
    """Every script is in the venv's bin and names its program's main; three of them answer --help."""
    from importlib.metadata import entry_points

    _installed_scripts()
    mains = {e.name: e.value for e in entry_points(group="console_scripts") if e.name in SCRIPTS}
    assert mains == {
        "alexnet-train": "alexnet_jax.cli:main",
        "alexnet-prepare": "alexnet_jax.data.prepare:main",
        **{s: f"alexnet_jax.{p}:main" for s, p in SCRIPTS.items() if p not in (None, "launch.py")},
    }
    for script in SCRIPTS_RUN:
        _check_script_help(script, helps[script])


@pytest.mark.slow  # nine processes importing JAX
def test_every_console_script_answers_help():
    bin_dir = _installed_scripts()
    for script, r in _helps({s: [str(bin_dir / s), "--help"] for s in SCRIPTS}).items():
        _check_script_help(script, r)


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("predict", ["--checkpoint=x", "--views=sideways", "a.jpg"], "--views=sideways"),
        ("predict", ["--checkpoint=x"], "give image files"),
        ("export", ["--out=x"], "give --checkpoint"),
        (
            "convert",
            ["--npy=a.npy", "--caffemodel=b.caffemodel", "--out=x"],
            "give one of --caffemodel, --npy and --torchvision, not --caffemodel and --npy",
        ),
        ("costs", ["--devices=two"], "--devices=two"),
        ("ablate", ["--seeds=3"], "give --out"),
        ("viz", ["--out=x", "--gallery_size=0"], "--gallery_size=0"),
        (
            "viz",
            ["--out=x", "--gallery-size=0"],
            "Unknown command line flag 'gallery-size'. Did you mean: gallery_size",
        ),
        ("viz", ["--workdir=x"], "Unknown command line flag 'workdir'"),  # no longer a name for --checkpoint
        ("evaluate", ["--workdir=x"], "give --checkpoint=PATH"),
        ("evaluate", ["--views=all"], "--views=all"),
    ],
)
def test_bad_flags_are_one_line_and_status_2(module, args, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"alexnet_jax.{module}").main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, (e.value.code, err)
    assert len(err.strip().splitlines()) == 1, err


def test_flags_values_and_positional_arguments():
    """``--top_k 3`` is ``--top_k=3``; ``--images a b`` takes ``a``, ``b`` is positional; nothing after ``--``
    is a flag (nor a help flag)."""
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_integer("top_k", 5, "", flag_values=fv)
    flags.DEFINE_multi_string("images", None, "", flag_values=fv)
    argv = ["p", "--top_k", "3", "--images", "a.jpg", "b.jpg", "--", "--top_k=9"]
    rest = cli.parse_flags("p", fv, argv, positional=True)
    assert (fv.top_k, fv.images, rest) == (3, ["a.jpg"], ["b.jpg", "--top_k=9"])
    assert cli.wants_help(["p", "-h"]) and not cli.wants_help(["p", "--", "--help"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import _trained

    return _trained.runs(tmp_path_factory)["1x2"]


def _small_val_root(tmp_path: Path, per_class: int = 3) -> Path:
    """``per_class`` validation images of every class of the demo run's data, as ``<root>/val/<class>/``."""
    import _trained

    from alexnet_jax.data import embedded

    e = _trained.demo_config(2, 1).data.embedded
    folder = embedded.ensure_embedded_dataset(
        None,
        num_train_per_class=e.num_train_per_class,
        num_val_per_class=e.num_val_per_class,
        image_size=e.image_size,
        seed=e.seed,
    )
    root = tmp_path / "imagenet"
    for cls in sorted(p for p in (folder / "val").iterdir() if p.is_dir()):
        (root / "val" / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, root / "val" / cls.name / f.name)
    return root


def _quiet_end(r: subprocess.CompletedProcess) -> None:
    assert "leaked" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.xdist_group("trained_runs")  # the worker that trains _trained.runs for all
def test_evaluate_takes_the_root_or_the_val_folder_and_ends_quietly(demo_run, tmp_path):
    """``--data=ROOT`` and ``--data=ROOT/val``: the same results. With a loader worker process, neither
    evaluate nor predict ends with a 'leaked shared_memory' warning or a traceback (three runs)."""
    import _trained

    root = _small_val_root(tmp_path)
    common = [
        sys.executable,
        "-m",
        "alexnet_jax.evaluate",
        f"--checkpoint={demo_run}",
        "--views=center",
        "--batch_size=10",
        "--config.data.num_workers=1",
    ]
    forms = {"root": root, "val": root / "val"}
    commands = [common + [f"--data={d}", f"--json={tmp_path / name}.json"] for name, d in forms.items()]
    commands.append(
        [
            sys.executable,
            "-m",
            "alexnet_jax.predict",
            f"--checkpoint={demo_run}",
            "--top_k",
            "3",
            *_trained.photo_paths(),
        ]
    )
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(_run, commands))
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        _quiet_end(r)
    got = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in forms}
    for g in got.values():
        del g["seconds"], g["images_per_s"]
    assert got["root"] == got["val"] and got["val"]["images"] == 30 and got["val"]["split"] == "val", got
    assert "grace_hopper.jpg" in runs[2].stdout


@pytest.mark.slow  # an evaluation long enough to be interrupted
@pytest.mark.xdist_group("trained_runs")
def test_evaluate_ctrl_c_is_one_line_and_status_130(demo_run):
    env = _env() | {"PYTHONUNBUFFERED": "1"}
    """Also while the loader's workers are still starting (importing for seconds): none of them prints a
    KeyboardInterrupt of its own."""
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alexnet_jax.evaluate",
            f"--checkpoint={demo_run}",
            "--split=train",
            "--config.data.num_workers=2",
            "--batch_size=10",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    first = p.stdout.readline()  # the mesh note, printed before the loader starts
    assert "device" in first, first
    time.sleep(3)  # its workers starting (3,000 training images: a pass of a minute)
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, out[-2000:], err[-3000:])
    assert err.strip().splitlines()[-1].endswith("interrupted (Ctrl-C)"), err[-3000:]
    assert "leaked" not in err and "Traceback" not in err, err[-3000:]

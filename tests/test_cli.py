"""Every field of every file in configs/ can be set from the command line, through launch.py's own parser."""

import sys
from pathlib import Path

import ml_collections
import pytest

from alexnet_jax import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


def _leaves(cfg: ml_collections.ConfigDict, prefix=""):
    for key in cfg.keys():
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
            ["launch.py", f"--config={config_file}", f"--config.{name}={text}", "--workdir=/tmp/w"])
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
    assert "invalid literal for int()" in str(e.value)

"""Every config field is used: a field nothing reads is a knob that silently does nothing.

A short demo run records which fields of its config are read (validation, copying
into checkpoints and printing do not count). The few fields only other data
sources or several hosts read are named below with the reason, and must at
least be read somewhere in the package's source.

Every config field is documented too: a config file comments each value it sets,
and a section it takes from a defaults builder (``model.default_config``,
``data.default_data_config``) has each field commented where the builder defines it.
"""

import ast
import contextlib
import io
import re
import sys
import tokenize
from pathlib import Path

import ml_collections
import pytest
from ml_collections.config_dict import config_dict as cd

from alexnet_jax import config_check, model, train
from alexnet_jax.data import locate
from alexnet_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo, owt, paper  # noqa: E402

# Read only on paths this run does not take (an ImageNet folder, worker processes, several hosts).
OTHER_PATHS = {
    "data.val_labels": "a flat ImageNet val/ folder",
    "data.cache_dir": "statistics of a JPEG folder",
    "data.worker_buffer_size": "loader worker processes (this run decodes in-process)",
    "num_epochs": "a run not cut short by total_steps",
    "distributed.coordinator_address": "several hosts",
    "distributed.num_processes": "several hosts",
    "distributed.process_id": "several hosts",
    "distributed.auto": "several hosts",
    "distributed.timeout_s": "several hosts",
}


def leaf_paths(cfg, prefix=""):
    for k, v in cfg.items(preserve_field_references=True):
        if isinstance(v, ml_collections.ConfigDict):
            yield from leaf_paths(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


class ReadRecorder:
    """Records ``ConfigDict`` reads by field path, except inside bulk operations (to_json, str, ...)."""

    BULK = (
        "to_dict",
        "to_json",
        "to_json_best_effort",
        "__str__",
        "__repr__",
        "__eq__",
        "copy_and_resolve_references",
        "items",
        "values",
    )

    def __init__(self, config):
        self.paths = {id(config): ""}
        for k, v in config.items(preserve_field_references=True):
            if isinstance(v, ml_collections.ConfigDict):
                self.paths[id(v)] = f"{k}."
                for k2, v2 in v.items(preserve_field_references=True):
                    if isinstance(v2, ml_collections.ConfigDict):
                        self.paths[id(v2)] = f"{k}.{k2}."
        self.read, self.quiet = set(), 0

    @contextlib.contextmanager
    def silenced(self):
        self.quiet += 1
        try:
            yield
        finally:
            self.quiet -= 1

    def install(self, mp):
        getitem = cd.ConfigDict.__getitem__

        def recording_getitem(this, key):
            if not self.quiet and id(this) in self.paths and isinstance(key, str):
                self.read.add(self.paths[id(this)] + key)
            return getitem(this, key)

        mp.setattr(cd.ConfigDict, "__getitem__", recording_getitem)
        for name in self.BULK:
            mp.setattr(cd.ConfigDict, name, self.wrap(getattr(cd.ConfigDict, name)))
        for module, name in ((train, "validate_config"), (locate, "check_config")):
            mp.setattr(module, name, self.wrap(getattr(module, name)))

    def wrap(self, fn):
        def silent(*args, **kwargs):
            with self.silenced():
                return fn(*args, **kwargs)

        return silent


def test_every_config_field_is_read_by_a_run(tmp_path, monkeypatch):
    c = demo.get_config()
    c.model.width = 0.125
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 1, 2, 1
    c.data.num_workers = 0  # reads in worker processes would not be seen
    c.eval_ten_crop = False
    c.optim.plateau_patience, c.optim.plateau_min_delta = 1, 1.0  # the second evaluation asks every plateau field
    c.mesh.cpu_devices, c.mesh.data = 8, 2
    recorder = ReadRecorder(c)
    with monkeypatch.context() as mp:
        recorder.install(mp)
        train.train_and_evaluate(c, tmp_path / "run")

    fields = set(leaf_paths(c)) - {f"model.{f}" for f in model.CONFIG_FIELDS}
    unread = sorted(fields - recorder.read - set(OTHER_PATHS))
    assert not unread, f"config fields no code reads: {unread}"
    # The network's fields become AlexNet attributes; each must be used in the network's code.
    src = "\n".join(p.read_text() for p in (ROOT / "src/alexnet_jax").rglob("*.py") if p.name != "config_check.py")
    attrs = {n.attr for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Attribute)}
    assert not sorted(set(model.CONFIG_FIELDS) - attrs)
    for path, reason in OTHER_PATHS.items():
        assert path.split(".")[-1] in attrs | {
            n.value for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Constant)
        }, (path, reason)


@pytest.mark.parametrize("make", [paper.get_config, demo.get_config], ids=["paper", "demo"])
def test_configs_pass_validation_and_every_field_has_a_rule(make):
    c = make()
    with pytest.raises(AttributeError):  # locked: a misspelt field is refused, not added
        c.data.eval_ten_crop = True
    c.data.name = "embedded"  # no ImageNet folder here; the data section's checks have their own tests
    assert isinstance(config_check.validate_config(c), model.AlexNet)
    top = {k for k in c if k not in config_check.SECTIONS}
    assert top == set(config_check.RUN_FIELDS)
    assert set(c.optim.keys()) == set(config_check.OPTIM_FIELDS)
    assert set(c.mesh.keys()) == set(config_check.MESH_FIELDS)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eval_ten_crops", True, r"Unknown config key\(s\) \['eval_ten_crops'\]"),
        ("optim.momentum", 1.5, r"optim.momentum must be a number in \[0, 1\)"),
        ("optim.drop_epochs", (30, -1), r"optim.drop_epochs must be a tuple of epochs > 0"),
        ("mesh.tower", 3, r"mesh.tower=3: use -1 or 2 \(one tower per device\) or 1"),
        (
            "mesh.tower",
            0,
            r"mesh.tower must be -1 \(one tower per device\), 1 \(all towers on every device\)"
            r" or model.towers",
        ),
        ("mesh.parallelism", "model", r"mesh.parallelism must be .towers., .data. or .hybrid."),
        ("batch_size", 0, r"batch_size must be an integer >= 1"),
    ],
)
def test_a_bad_field_is_refused_by_name(field, value, message):
    c = paper.get_config()
    c.data.name = "embedded"
    *section, name = field.split(".")
    node = c[section[0]] if section else c
    with c.unlocked():
        node[name] = value
    with pytest.raises(ConfigError, match=message):
        config_check.validate_config(c)


# A section a config file takes whole from a defaults builder: where the builder's fields are written out.
DEFAULTS = {
    "default_config": ("src/alexnet_jax/model.py", "_Fields"),  # AlexNet's fields
    "default_data_config": ("src/alexnet_jax/data/pipeline.py", "default_data_config"),
    "demo_data_config": ("src/alexnet_jax/data/pipeline.py", "default_data_config"),  # those fields, two resized
}


def assignments(path: Path, scope: str) -> dict[str, tuple[bool, ast.expr]]:
    """``{field: (commented, value)}`` for each field set in function or class ``scope`` of ``path``.

    A field is ``c.a.b = ...`` in a function, ``name: type = ...`` in a class; it is commented when a
    comment is beside it or on the line above.
    """
    text = path.read_text()
    comments = {}  # line -> the comment is the whole line
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.line.strip().startswith("#")
    (node,) = [
        n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == scope
    ]

    def dotted(t):  # c.a.b -> 'a.b'; anything else -> None
        parts = []
        while isinstance(t, ast.Attribute):
            parts.append(t.attr)
            t = t.value
        return ".".join(reversed(parts)) if isinstance(t, ast.Name) and t.id == "c" and parts else None

    fields = {}
    for n in ast.walk(node):
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and isinstance(node, ast.ClassDef):
            names = [n.target.id]
        elif isinstance(n, ast.Assign):
            targets = [e for t in n.targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
            names = [d for d in map(dotted, targets) if d]
        else:
            continue
        commented = any(line in comments for line in range(n.lineno, n.end_lineno + 1)) or comments.get(n.lineno - 1)
        fields.update({name: (bool(commented), n.value) for name in names})
    return fields


def undocumented(config: ml_collections.ConfigDict, config_file: Path) -> list[str]:
    """The fields of ``config`` (built by ``config_file``) that a reader finds no comment for.

    A file that starts from another config file's ``get_config()`` answers only for what it sets;
    the other file's own test covers the rest.
    """
    own = assignments(config_file, "get_config")
    based = re.search(r"^\s+c = \w+\.get_config\(\)", config_file.read_text(), re.MULTILINE)  # c = paper.get_config()
    builders = {}  # section -> its builder's fields
    for path, (_, value) in own.items():
        node = config
        for part in path.split("."):
            node = node[part]
        if isinstance(node, ml_collections.ConfigDict) and isinstance(value, ast.Call):
            func = value.func.attr if isinstance(value.func, ast.Attribute) else value.func.id
            if func != "ConfigDict":
                assert func in DEFAULTS, f"{path} comes from {func}(): add where its fields are written to DEFAULTS"
                builders[path] = assignments(ROOT / DEFAULTS[func][0], DEFAULTS[func][1])
    empty = "ml_collections.ConfigDict()"  # a section filled field by field below needs no comment of its own
    missing = [path for path, (commented, v) in own.items() if not commented and ast.unparse(v) != empty]
    for leaf in leaf_paths(config):
        section = max((s for s in builders if leaf.startswith(s + ".")), key=len, default=None)
        if leaf in own or (section is None and based):
            continue
        if section is None or not builders[section].get(leaf[len(section) + 1 :], (False,))[0]:
            missing.append(leaf)
    return sorted(set(missing))


@pytest.mark.parametrize("module", [paper, demo, owt], ids=["paper", "demo", "owt"])
def test_every_config_field_is_commented_here_or_where_its_default_is(module):
    assert not undocumented(module.get_config(), Path(module.__file__)), "fields with no comment"

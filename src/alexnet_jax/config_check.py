"""The one place a run config is checked, section by section, before any device or data is touched.

Every field of a run config is listed here with what it may hold; a key that is
not (a typo in a config built in Python) is refused by name. The ``model`` and
``data`` sections are checked by the code that owns them (``model.from_config``,
``data.check_config``); the rest here.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from alexnet_jax import data as data_lib
from alexnet_jax.errors import ConfigError
from alexnet_jax.model import AlexNet, from_config
from alexnet_jax.parallel import LAYOUTS

_Rule = tuple[Callable[[object], bool], str]  # (accepts the value, what it must be)

_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_POSITIVE = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
_STEPS = (lambda v: isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1), "an integer >= 1, or -1")
_NON_NEGATIVE = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")


def _number_in(lo: float, hi: float, *, closed_hi: bool = False) -> _Rule:
    ok = (lambda v: _NUMBER[0](v) and lo <= v <= hi) if closed_hi else (lambda v: _NUMBER[0](v) and lo <= v < hi)
    return ok, f"a number in [{lo}, {hi}{']' if closed_hi else ')'}"


_EPOCHS = (
    lambda v: isinstance(v, (tuple, list)) and all(_NUMBER[0](e) and e > 0 for e in v),
    "a tuple of epochs > 0, e.g. (30, 60)",
)

RUN_FIELDS: dict[str, _Rule] = {
    "batch_size": _POSITIVE,
    "num_epochs": _number_in(0, float("inf")),
    "total_steps": (lambda v: _INT[0](v) and (v >= 1 or v == -1), "an integer >= 1, or -1 (num_epochs decides)"),
    "eval_batch_size": _POSITIVE,
    "eval_every": _STEPS,
    "eval_ten_crop": (lambda v: isinstance(v, bool), "True or False"),
    "checkpoint_every": _STEPS,
    "keep_checkpoints": _POSITIVE,
    "log_every": _POSITIVE,
    "seed": _INT,
    "max_bad_batches": _NON_NEGATIVE,
    "profile_steps": (
        lambda v: (
            isinstance(v, (tuple, list))
            and (
                len(v) == 0
                or (  # a list once saved as JSON
                    len(v) == 2 and all(isinstance(s, int) for s in v) and 1 <= v[0] <= v[1]
                )
            )
        ),
        "() or (A, B) with 1 <= A <= B",
    ),
}
OPTIM_FIELDS: dict[str, _Rule] = {
    "lr": (lambda v: _NUMBER[0](v) and v > 0, "a number > 0"),
    "momentum": _number_in(0, 1),
    "weight_decay": _number_in(0, float("inf")),
    "decay_biases": (lambda v: isinstance(v, bool), "True or False"),
    "drop_epochs": _EPOCHS,
    "plateau_patience": _NON_NEGATIVE,
    "plateau_min_delta": _number_in(0, float("inf")),
    "plateau_max_drops": _NON_NEGATIVE,
}
MESH_FIELDS: dict[str, _Rule] = {
    "data": _STEPS,
    "parallelism": (lambda v: v in LAYOUTS, f"{', '.join(map(repr, [*LAYOUTS][:-1]))} or {[*LAYOUTS][-1]!r}"),
    "tower": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v >= 1),
        "-1 (one tower per device), 1 (all towers on every device) or model.towers",
    ),
    "cpu_devices": _POSITIVE,
}
SECTIONS = ("model", "data", "optim", "mesh", "distributed")


def _check_section(cfg, rules: dict[str, _Rule], prefix: str) -> None:
    unknown = sorted(set(cfg.keys()) - set(rules))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {[prefix + k for k in unknown]}; known: {[prefix + k for k in rules]}."
        )
    missing = sorted(set(rules) - set(cfg.keys()))
    if missing:
        raise ConfigError(f"The config lacks {[prefix + k for k in missing]}; start from configs/paper.py.")
    for name, (ok, what) in rules.items():
        if not ok(cfg[name]):
            raise ConfigError(f"--config.{prefix}{name} must be {what}, got {cfg[name]!r}.")


def validate_config(config: ml_collections.ConfigDict) -> AlexNet:
    """Check every field of a run config; return the network it describes.

    Raises ``ConfigError`` (or ``DatasetError`` for the data section) naming the field.
    """
    top = {k: v for k, v in config.items() if k not in SECTIONS}
    _check_section(ml_collections.ConfigDict(top), RUN_FIELDS, "")
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ConfigError(f"The config lacks the section(s) {missing}; start from configs/paper.py.")
    _check_section(config.optim, OPTIM_FIELDS, "optim.")
    _check_section(config.mesh, MESH_FIELDS, "mesh.")
    if config.num_epochs <= 0 and config.total_steps == -1:
        raise ConfigError("Set --config.num_epochs > 0 or --config.total_steps > 0: the run has no length.")
    model = from_config(config.model)
    if config.mesh.tower not in (-1, 1, model.towers):
        raise ConfigError(
            f"mesh.tower={config.mesh.tower}: use -1 or {model.towers} (one tower per device) "
            "or 1 (all towers on every device)."
        )
    if config.mesh.parallelism != "towers" and config.mesh.tower not in (-1, 1):
        raise ConfigError(
            f"mesh.parallelism={config.mesh.parallelism!r} puts every device on the data axis; "
            f"mesh.tower={config.mesh.tower} must be -1 or 1."
        )
    data_lib.check_config(config.data)
    if config.data.crop_size != model.image_size:
        raise ConfigError(f"data.crop_size={config.data.crop_size} must equal model.image_size={model.image_size}.")
    return model

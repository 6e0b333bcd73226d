"""The paper's update rule as an Optax chain, and the learning-rate drops around it.

Section 5: ``v <- 0.9 v - 0.0005 eps w - eps g``, ``w <- w + v``. The learning rate
``eps`` multiplies the gradient *before* it enters the velocity, so dividing
``eps`` by 10 changes new steps only; momentum already accumulated keeps its
size. Hence the order below: decay, scale by ``-eps``, then accumulate. (The
common ``trace`` then ``scale`` order would rescale old momentum on a drop.)

The learning rate lives in the optimizer state (``inject_hyperparams``), so a
drop is a new scalar in the state: no recompilation, saved with checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def weights_only(params: Any) -> Any:
    """Decay mask: kernels yes, biases no (cuda-convnet's practice)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "bias", params
    )


def paper_sgd(learning_rate: float, momentum: float = 0.9, weight_decay: float = 5e-4,
              decay_biases: bool = False) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=None if decay_biases else weights_only),
        optax.scale_by_learning_rate(learning_rate),  # -eps * (g + wd * w)
        optax.trace(decay=momentum),  # v <- momentum * v - eps * (g + wd * w); the update is v
    )


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``cfg`` is the ``optim`` config section."""
    return optax.inject_hyperparams(paper_sgd, static_args=("decay_biases",))(
        learning_rate=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        decay_biases=cfg.decay_biases,
    )


def get_lr(opt_state) -> float:
    return float(opt_state.hyperparams["learning_rate"])


def set_lr(opt_state, lr: float):
    """A copy of ``opt_state`` with a new learning rate; everything else untouched."""
    old = opt_state.hyperparams["learning_rate"]
    new = jax.device_put(jnp.asarray(lr, old.dtype), old.sharding)
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": new})


# ---------------------------------------------------------------------------
# Learning-rate drops: the paper divided by 10 by hand when validation error
# stopped improving. Three ways to ask for it; all are logged and saved.

DROP_FILE = "DROP_LR"  # touch <workdir>/DROP_LR during a run to divide the LR once


@dataclasses.dataclass
class LRControl:
    """What decides drops, saved with every checkpoint so it survives restarts."""

    drops: list[dict] = dataclasses.field(default_factory=list)  # {step, epoch, from, to, reason}
    best_val: float | None = None  # best validation top-1 error seen
    evals_since_best: int = 0  # evaluations without an improvement of min_delta

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LRControl":
        return cls(**d)

    @property
    def num_plateau_drops(self) -> int:
        return sum(d["reason"].startswith("plateau") for d in self.drops)


def scheduled_drop(cfg: ml_collections.ConfigDict, epoch_before: float, epoch_after: float) -> bool:
    """Mode (a): a fixed list of epochs, ``optim.drop_epochs``; a drop when a step crosses one."""
    return any(epoch_before < e <= epoch_after for e in cfg.drop_epochs)


def plateau_drop(cfg: ml_collections.ConfigDict, ctl: LRControl, val_error: float) -> bool:
    """Mode (b): after ``patience`` evaluations without an improvement of ``min_delta``.

    Updates ``ctl`` in place. At most ``plateau_max_drops`` drops.
    """
    if ctl.best_val is None or val_error < ctl.best_val - cfg.plateau_min_delta:
        ctl.best_val, ctl.evals_since_best = val_error, 0
        return False
    ctl.evals_since_best += 1
    if (cfg.plateau_patience > 0 and ctl.evals_since_best >= cfg.plateau_patience
            and ctl.num_plateau_drops < cfg.plateau_max_drops):
        ctl.evals_since_best = 0
        return True
    return False


def requested_drop(workdir: str | os.PathLike) -> float | None:
    """Mode (c): the researcher creates ``<workdir>/DROP_LR`` (empty: divide by 10; or a factor).

    Returns the factor and removes the file, or None when there is no request.
    """
    path = Path(workdir) / DROP_FILE
    if not path.exists():
        return None
    text = path.read_text().strip()
    path.unlink()
    try:
        factor = float(text) if text else 10.0
    except ValueError:
        raise ValueError(f"{path} must be empty (divide by 10) or hold a number, got {text!r}") from None
    if factor <= 0:
        raise ValueError(f"{path}: the factor must be > 0, got {factor}")
    return factor


def record_drop(ctl: LRControl, *, step: int, epoch: float, old: float, new: float, reason: str) -> dict:
    entry = {"step": int(step), "epoch": round(float(epoch), 4), "from": old, "to": new, "reason": reason}
    ctl.drops.append(entry)
    return entry


MANUAL_LR_REASON = "resume with --config.optim.lr"


def manual_lr_to_apply(manual_lr: float | None, drops: list[dict]) -> float | None:
    """The LR to set on resume, or None. An LR asked for at resume is a manual drop, once: the same
    request again (a requeue script that keeps the flag) changes nothing, and no request (a requeue
    without the flag) changes nothing either."""
    if manual_lr is None:
        return None
    asked = [d["to"] for d in drops if d["reason"] == MANUAL_LR_REASON]
    if asked and math.isclose(asked[-1], manual_lr, rel_tol=1e-9):
        return None
    return float(manual_lr)


class LRPolicy:
    """Every way the learning rate changes, in one place; the loop asks it once per step.

    ``policy(step, val_error)`` (``step``: steps taken; ``val_error``: the validation
    top-1 error when the run evaluated at this step) returns the drop to apply, as
    the entry recorded in ``control.drops``, or None. In order of precedence: the
    LR given on the command line at resume (the first ask only), a request in the
    ``DROP_LR`` file (read every ``request_every`` steps), a scheduled epoch
    (``optim.drop_epochs``), a plateau of validation error. At most one per step.
    ``read_request`` is ``requested_drop`` (or its multi-process form) bound to the workdir.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, control: LRControl, *, lr: float, step: int,
                 steps_per_epoch: int, request_every: int, read_request: Callable[[], float | None],
                 manual_lr: float | None = None):
        self.cfg, self.control, self.lr = cfg, control, float(lr)
        self.steps_per_epoch, self.request_every, self.read_request = steps_per_epoch, request_every, read_request
        self._manual = manual_lr_to_apply(manual_lr, control.drops)
        self._last_step = step  # drops between here and the first ask were decided before the checkpoint

    def __call__(self, step: int, val_error: float | None = None) -> dict | None:
        last, self._last_step = self._last_step, step
        new, reason = None, None
        if self._manual is not None:
            new, reason, self._manual = self._manual, MANUAL_LR_REASON, None
        elif step > last and step % self.request_every == 0 and (factor := self.read_request()) is not None:
            new, reason = self.lr / factor, f"requested ({DROP_FILE})"
        elif scheduled_drop(self.cfg, last / self.steps_per_epoch, step / self.steps_per_epoch):
            new, reason = self.lr / 10, "scheduled (optim.drop_epochs)"
        plateau = val_error is not None and plateau_drop(self.cfg, self.control, val_error)
        if plateau and new is None:
            new, reason = self.lr / 10, "plateau (optim.plateau_*)"
        if new is None:
            return None
        entry = record_drop(self.control, step=step, epoch=step / self.steps_per_epoch, old=self.lr, new=new,
                            reason=reason)
        self.lr = new
        return entry

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
import ml_collections
import numpy as np
import optax


def weights_only(params: Any) -> Any:
    """Decay mask: kernels yes, biases no (cuda-convnet's practice)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "bias", params)


def paper_sgd(
    learning_rate: float, momentum: float = 0.9, weight_decay: float = 5e-4, decay_biases: bool = False
) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=None if decay_biases else weights_only),
        optax.scale_by_learning_rate(learning_rate),  # -eps * (g + wd * w)
        optax.trace(decay=momentum),  # v <- momentum * v - eps * (g + wd * w); the update is v
    )


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``cfg`` is the ``optim`` config section."""
    return optax.inject_hyperparams(paper_sgd, static_args=("decay_biases",))(
        learning_rate=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        decay_biases=cfg.decay_biases,
    )


def get_lr(opt_state) -> float:
    return float(jax.device_get(opt_state.hyperparams["learning_rate"]))


def set_lr(opt_state, lr: float):
    """A copy of ``opt_state`` with a new learning rate; everything else untouched."""
    old = opt_state.hyperparams["learning_rate"]
    new = jax.device_put(np.asarray(lr, old.dtype), old.sharding)  # explicit: the loop refuses implicit copies
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": new})


# ---------------------------------------------------------------------------
# Learning-rate drops: the paper divided by 10 by hand when validation error
# stopped improving. Four ways to ask for one; all are logged and saved.

DROP_FILE = "DROP_LR"  # touch <workdir>/DROP_LR during a run to divide the LR once
MANUAL_LR_REASON = "resume with --config.optim.lr"


@dataclasses.dataclass
class DropHistory:
    """The drops so far and the plateau counter: saved with every checkpoint, so decisions survive restarts."""

    drops: list[dict] = dataclasses.field(default_factory=list)  # {step, epoch, from, to, reason}
    best_val: float | None = None  # best validation top-1 error seen
    evals_since_best: int = 0  # evaluations without an improvement of min_delta

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> DropHistory:
        return cls(**d)

    @property
    def num_plateau_drops(self) -> int:
        return sum(d["reason"].startswith("plateau") for d in self.drops)

    def plateau(self, cfg: ml_collections.ConfigDict, val_error: float) -> bool:
        """After ``plateau_patience`` evaluations without an improvement of ``plateau_min_delta``
        (at most ``plateau_max_drops`` times); counts this evaluation."""
        if self.best_val is None or val_error < self.best_val - cfg.plateau_min_delta:
            self.best_val, self.evals_since_best = val_error, 0
            return False
        self.evals_since_best += 1
        if (
            cfg.plateau_patience > 0
            and self.evals_since_best >= cfg.plateau_patience
            and self.num_plateau_drops < cfg.plateau_max_drops
        ):
            self.evals_since_best = 0
            return True
        return False


def scheduled_drop(cfg: ml_collections.ConfigDict, epoch_before: float, epoch_after: float) -> bool:
    """A step crossed one of ``optim.drop_epochs``."""
    return any(epoch_before < e <= epoch_after for e in cfg.drop_epochs)


def requested_drop(workdir: str | os.PathLike) -> float | None:
    """The factor in ``<workdir>/DROP_LR`` (empty: 10), removing the file; None when there is none."""
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


class LearningRate:
    """The one owner of the learning rate: decides each drop, records it, applies it to the train state.

    ``lr(state, step, val_error)`` (``step``: steps taken; ``val_error``: the validation
    top-1 error if the run evaluated at this step) returns the state with the new
    rate, or the same state. At most one drop a step, in this order: the LR given on
    the command line at resume (first call only; the same value again is no new
    drop), a ``DROP_LR`` request (read every ``request_every`` steps through
    ``read_request``), a scheduled epoch, a plateau. ``on_drop(entry)`` reports each.
    """

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        history: DropHistory,
        *,
        lr: float,
        step: int,
        steps_per_epoch: int,
        request_every: int,
        read_request: Callable[[], float | None],
        manual_lr: float | None = None,
        on_drop: Callable[[dict], None] = lambda entry: None,
    ):
        self.cfg, self.history, self.value = cfg, history, float(lr)
        self.steps_per_epoch, self.request_every, self.read_request = steps_per_epoch, request_every, read_request
        self.on_drop = on_drop
        asked = [d["to"] for d in history.drops if d["reason"] == MANUAL_LR_REASON]
        repeated = manual_lr is not None and asked and math.isclose(asked[-1], manual_lr, rel_tol=1e-9)
        self._manual = None if manual_lr is None or repeated else float(manual_lr)
        self._last_step = step  # drops between here and the first call were decided before the checkpoint

    def __call__(self, state, step: int, val_error: float | None = None):
        new, reason = self._decide(step, val_error)
        if new is None:
            return state
        entry = {
            "step": int(step),
            "epoch": round(step / self.steps_per_epoch, 4),
            "from": self.value,
            "to": new,
            "reason": reason,
        }
        self.history.drops.append(entry)
        self.value = new
        self.on_drop(entry)
        return state.replace(opt_state=set_lr(state.opt_state, new))

    def _decide(self, step: int, val_error: float | None) -> tuple[float | None, str | None]:
        last, self._last_step = self._last_step, step
        new, reason = None, None
        if self._manual is not None:
            new, reason, self._manual = self._manual, MANUAL_LR_REASON, None
        elif step > last and step % self.request_every == 0 and (factor := self.read_request()) is not None:
            new, reason = self.value / factor, f"requested ({DROP_FILE})"
        elif scheduled_drop(self.cfg, last / self.steps_per_epoch, step / self.steps_per_epoch):
            new, reason = self.value / 10, "scheduled (optim.drop_epochs)"
        plateau = val_error is not None and self.history.plateau(self.cfg, val_error)  # counted even if not used
        if plateau and new is None:
            new, reason = self.value / 10, "plateau (optim.plateau_*)"
        return new, reason

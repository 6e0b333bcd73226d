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
import os
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

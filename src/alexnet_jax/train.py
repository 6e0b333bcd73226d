"""Training as the paper did it, read top to bottom in ``train_and_evaluate``.

Everything a resumed run needs is in the checkpoint: parameters, optimizer state
(with the learning rate), step, the dropout RNG, the data iterator's position,
the LR-drop history and the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from rich.console import Console
from rich.markup import escape

from alexnet_jax import data as data_lib
from alexnet_jax import distributed, optim, paths, steps
from alexnet_jax.checkpoint import Checkpointer
from alexnet_jax.config_check import validate_config
from alexnet_jax.data.prefetch import DevicePrefetch
from alexnet_jax.devices import devices_note, prepare_devices
from alexnet_jax.errors import CheckpointError, CheckpointWriteError, ConfigError, Diverged, TrainingError, WorkdirBusy
from alexnet_jax.metrics import DivergenceGuard, MetricWriter, PendingMetrics, error_rates
from alexnet_jax.model import AlexNet, count_params
from alexnet_jax.parallel import DATA_AXIS, check_layout, mesh_for_config
from alexnet_jax.preemption import StopOnSignal
from alexnet_jax.progress import TrainProgress
from alexnet_jax.workdir_lock import WorkdirLock, describe_holder

__all__ = ["Diverged", "TrainingError", "train_and_evaluate"]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    manual_lr: float | None = None,
    after_checkpoint: Callable[[int, Checkpointer], None] | None = None,
) -> dict:
    """Train (or resume) according to ``config``; returns the final metrics and the LR history.

    ``manual_lr``: on resume, set the LR to this (logged as a manual drop), once per distinct
    value; ``launch.py`` passes it when ``--config.optim.lr`` is on the command line. Without
    it the checkpoint's LR carries on. ``after_checkpoint(step, checkpointer)`` runs after
    each checkpoint is started (tests kill the process there).
    """
    config, workdir = paths.absolute_config(config), paths.absolute(workdir)  # what the user typed, made absolute
    with contextlib.ExitStack() as stack:
        stack.callback(data_lib.release_shared_memory)  # a notebook or a second run: the loader's batches freed
        run = _open_run(config, workdir, manual_lr, stack)
        state, step, stopped_by = run.state, run.start_step, None
        with jax.transfer_guard("disallow"):  # every host<->device copy in the loop is explicit and named
            while step < run.total_steps and stopped_by is None:
                batch, data_position = next(run.batches)
                run.profile.before(step + 1)
                state, metrics = run.train_step(state, batch)
                step += 1
                run.profile.after(step, state)
                run.metrics.add(step, metrics)  # fetches the earlier steps' rows every log_every steps
                stopped_by = run.stop.due(step)  # SIGTERM / Ctrl-C: save this step and stop
                evaluate, save = run.due(step, stopped_by)
                if evaluate or save:
                    run.metrics.fetch()  # the state is read next: a NaN loss stops the run before it is saved
                val = run.evaluate(step, state) if evaluate else None
                state = run.lr(state, step, val and val["val/top1_error"])
                if save:
                    run.save(step, state, data_position, val)
                    if after_checkpoint is not None:
                        after_checkpoint(step, run.ckpt)
                if evaluate or save:
                    run.metrics.restart_clock()  # images/s counts training only
        run.metrics.fetch()
        result = run.finish(step, state)
    return run.report(result, stopped_by)


@dataclasses.dataclass
class _Run:
    """One run's parts, opened by ``_open_run`` and closed by its ExitStack; the loop's named steps."""

    config: ml_collections.ConfigDict
    console: Console
    model: AlexNet
    ckpt: Checkpointer
    writer: MetricWriter
    progress: TrainProgress
    metrics: PendingMetrics
    lr: optim.LearningRate
    evaluator: _Evaluator
    train_step: Callable
    batches: DevicePrefetch
    stop: StopOnSignal
    state: steps.TrainState  # after an LR given at resume
    start_step: int
    steps_per_epoch: int
    total_steps: int
    dataset: dict  # the checkpoints' dataset item: class ids and names
    stats: dict | None  # and their dataset_stats: the mean image, the RGB eigens
    profile: _Profile
    last_val: dict = dataclasses.field(default_factory=dict)
    ckpt_error: CheckpointWriteError | None = None

    def due(self, step: int, stopped_by: str | None) -> tuple[bool, bool]:
        """(evaluate now, save now): every eval_every / checkpoint_every steps (<= 0: an epoch), at the end,
        and a save when a signal stops the run."""
        every = [n if n > 0 else self.steps_per_epoch for n in (self.config.eval_every, self.config.checkpoint_every)]
        last = step == self.total_steps
        return step % every[0] == 0 or last, step % every[1] == 0 or last or stopped_by is not None

    def evaluate(self, step: int, state) -> dict:
        start = time.perf_counter()
        val = self.last_val = self.evaluator(state.params)
        epoch = step / self.steps_per_epoch
        self.writer.write(step, {**val, "epoch": epoch, "perf/eval_s": time.perf_counter() - start})
        self.progress.note(
            f"step {step} (epoch {epoch:.2f}): val top-1 error {val['val/top1_error']:.4f}, "
            f"top-5 {val['val/top5_error']:.4f}"
        )
        return val

    def save(self, step: int, state, data_position: dict, val: dict | None) -> None:
        """Start writing a checkpoint; a full or read-only disk is reported and training goes on."""
        self.writer.flush()  # the curves are kept as far as the checkpoint is
        start = time.perf_counter()
        try:
            with jax.transfer_guard("allow"):  # the checkpoint: Orbax copies the state to the host
                self.ckpt.save(
                    step,
                    state,
                    data=data_position,
                    config=json.loads(self.config.to_json()),
                    control=self.lr.history.to_json(),
                    dataset=self.dataset,
                    stats=self.stats,
                    metrics={"val/top1_error": val["val/top1_error"]} if val else None,
                )
        except CheckpointWriteError as e:
            self.ckpt_error = e
            self.progress.note(escape(f"{e} Training goes on; the next checkpoint tries again."))
            self.writer.write(step, {"checkpoint/error": str(e)})
            return
        self.writer.write(step, {"perf/checkpoint_s": time.perf_counter() - start})  # until the write is started

    def finish(self, step: int, state) -> dict:
        """Success only once the final checkpoint is on disk; a run resumed at its end reports where it stands."""
        _final_checkpoint_written(self.ckpt, step, self.ckpt_error)
        if not self.last_val and self.start_step > 0 and step == self.total_steps:  # resumed at the end
            self.last_val = self.evaluator(state.params)
        return {"step": step, **self.last_val, "lr": optim.get_lr(state.opt_state), "lr_drops": self.lr.history.drops}

    def report(self, result: dict, stopped_by: str | None) -> dict:
        step, val = result["step"], self.last_val
        if stopped_by is not None:
            self.console.quiet = False  # every process says why it ends: each has its own log under a scheduler
            who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
            self.console.print(
                f"{who}[bold]Stopped by {stopped_by} at step {step}[/bold]; saved "
                f"{self.ckpt.directory / str(step)}. Run the same command to resume from there."
            )
            return {**result, "stopped_by": stopped_by}
        if jax.process_index() == 0 and val:
            self.console.print(
                f"[bold]Done at step {step}:[/bold] validation top-1 error "
                f"{val['val/top1_error']:.4f}, top-5 {val['val/top5_error']:.4f} "
                f"(chance: top-1 {1 - 1 / self.model.num_classes:.2f})."
            )
        return result


class _Profile:
    """``profile_steps=(A, B)``: a ``jax.profiler`` trace from step A's dispatch until step B has run, in
    ``<workdir>/profile/`` (TensorBoard's profile plugin, Perfetto or XProf read it). The exchanges between
    towers appear under their names (``exchange_to_conv3``, ...)."""

    def __init__(self, steps: tuple, folder: Path, console: Console):
        self.steps, self.folder, self.console, self.on = tuple(steps), folder, console, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and jax.process_index() == 0:
            jax.profiler.start_trace(str(self.folder))
            self.on = True

    def after(self, step: int, state) -> None:
        if self.on and step >= self.steps[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.on = False
            self.console.print(f"Profile of steps {self.steps[0]}-{self.steps[1]} written to {self.folder}")

    def close(self) -> None:
        if self.on:  # the run ended (or stopped) inside the window: keep what was traced
            jax.profiler.stop_trace()
            self.on = False


def _open_run(config, workdir, manual_lr, stack: contextlib.ExitStack) -> _Run:
    """Check the config, find the devices and the data, restore the newest checkpoint, build the steps."""
    console = Console(soft_wrap=True)  # logs keep whole lines; a terminal wraps them itself
    model, mesh, data, workdir = _start(config, workdir, console)
    is_main = jax.process_index() == 0
    host_shard = distributed.process_batch_shard(mesh)  # (block, blocks) of each global batch this process reads
    steps_per_epoch, total_steps = _schedule(config, len(data.records["train"]))
    tx = optim.make_optimizer(config.optim)
    state, shardings = steps.create_train_state(model, tx, config.seed, mesh, config.mesh.parallelism)
    _hold_workdir(workdir, stack, console)  # before anything touches the checkpoints
    ckpt = stack.enter_context(contextlib.closing(Checkpointer(workdir, keep=config.keep_checkpoints)))
    state, data_state, history = _restore(ckpt, state, shardings, config, console)
    step = int(state.step)
    writer = stack.enter_context(contextlib.closing(MetricWriter(workdir, enabled=is_main, resume_step=step)))
    if writer.note:
        console.print(writer.note)
    train_iter = data_lib.build_train_iter(
        config.data,
        batch_size=config.batch_size,
        seed=config.seed,
        image_size=model.image_size,
        shard_index=host_shard[0],
        shard_count=host_shard[1],
        data=data,
    )
    stack.callback(train_iter.close)
    if data_state is not None:
        train_iter.set_state(data_state)
    inputs = steps.make_input_fn(config.data, data.stats)
    train_step = steps.make_train_step(model, tx, mesh, shardings, inputs, config.mesh.parallelism)
    evaluator = stack.enter_context(
        contextlib.closing(_Evaluator(config, model, mesh, shardings.params, inputs, data, host_shard))
    )
    if is_main:
        _announce(console, config, model, mesh, state, data, (steps_per_epoch, total_steps), workdir)
    progress = stack.enter_context(
        contextlib.closing(TrainProgress(total_steps, step, config.batch_size, enabled=is_main, console=console))
    )
    guard = DivergenceGuard(writer, progress, max_bad=config.max_bad_batches, resume_hint=lambda: _last_good_text(ckpt))
    lr = optim.LearningRate(
        config.optim,
        history,
        lr=optim.get_lr(state.opt_state),
        step=step,
        steps_per_epoch=steps_per_epoch,
        request_every=config.log_every,
        manual_lr=manual_lr,
        on_drop=functools.partial(_log_drop, console, writer),
        read_request=lambda: distributed.requested_drop_everywhere(workdir),
    )
    batches = DevicePrefetch(train_iter, mesh, with_state=True)  # read and copied on a thread, two ahead
    stack.callback(batches.close)  # runs before train_iter.close: the thread stops reading first
    return _Run(
        config=config,
        console=console,
        model=model,
        ckpt=ckpt,
        writer=writer,
        progress=progress,
        metrics=PendingMetrics(
            writer,
            progress,
            guard,
            log_every=config.log_every,
            batch_size=config.batch_size,
            input_wait=lambda: batches.waited,
        ),
        lr=lr,
        evaluator=evaluator,
        train_step=train_step,
        batches=batches,
        stop=stack.enter_context(StopOnSignal(ckpt.manager.reached_preemption if jax.process_count() > 1 else None)),
        state=lr(state, step),
        start_step=step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        profile=stack.enter_context(contextlib.closing(_Profile(config.profile_steps, workdir / "profile", console))),
        dataset={"classes": data.classes, "class_names": data.class_names},
        stats=data.stats,
    )


def _log_drop(console: Console, writer: MetricWriter, drop: dict) -> None:
    console.print(
        f"[yellow]LR {drop['from']:.3g} -> {drop['to']:.3g} at step {drop['step']} "
        f"(epoch {drop['epoch']:.2f}): {drop['reason']}[/yellow]"
    )
    writer.write(
        drop["step"], {"lr_drop/from": drop["from"], "lr_drop/to": drop["to"], "lr_drop/reason": drop["reason"]}
    )


def _restore(ckpt: Checkpointer, state, shardings, config, console) -> tuple[Any, dict | None, optim.DropHistory]:
    """The newest good checkpoint's state, data position and drop history; the fresh state if there is none."""
    restored = ckpt.restore_latest(steps.abstract_state(state, shardings))
    if restored is None:
        return state, None, optim.DropHistory()
    _check_compatible(restored["config"], config)
    console.print(
        f"Resumed from {ckpt.directory / str(restored['step'])} (step {restored['step']}, "
        f"lr {optim.get_lr(restored['state'].opt_state):.3g})."
    )
    return restored["state"], restored["data"], optim.DropHistory.from_json(restored["control"])


def _start(config, workdir, console) -> tuple[AlexNet, jax.sharding.Mesh, data_lib.ResolvedData, Path]:
    """Config and path errors first, before any device or data scan; then the devices and the data."""
    model = validate_config(config)
    why_not = prepare_devices(config.mesh.cpu_devices)  # per process; an accelerator is left as it is
    distributed.initialize(config.get("distributed"))  # several hosts: join them before JAX starts
    mesh, layout_note = mesh_for_config(model.towers, config.mesh)
    check_layout(model, mesh, config.mesh.parallelism)  # e.g. hybrid: FC units that do not split over the devices
    notes = [n for n in (devices_note(config.mesh.cpu_devices, why_not), layout_note) if n]
    if notes and jax.process_index() == 0:
        console.print(" ".join(notes))  # one line: which devices, and how the towers sit on them
    if config.batch_size % mesh.shape[DATA_AXIS]:
        raise ConfigError(
            f"batch_size={config.batch_size} does not divide over the mesh's data axis "
            f"({mesh.shape[DATA_AXIS]}); set --config.batch_size to a multiple of it."
        )
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(
            f"Cannot use --workdir={workdir}: {e}. Give a folder that can be created or written."
        ) from None
    console.quiet = jax.process_index() != 0  # one voice: process 0's
    data = distributed.main_first(lambda: data_lib.resolve(config.data))  # the embedded set is made once
    if len(data.classes) != model.num_classes:
        raise ConfigError(
            f"The data has {len(data.classes)} classes but model.num_classes={model.num_classes}; "
            f"set --config.model.num_classes={len(data.classes)}."
        )
    return model, mesh, data, workdir


def _hold_workdir(workdir: Path, stack: contextlib.ExitStack, console) -> None:
    """One run per workdir: process 0 holds ``<workdir>/LOCK`` for the whole run; all stop if it cannot."""
    lock, busy = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            stack.callback(lock.acquire().release)
        except WorkdirBusy as e:
            busy = e
    if distributed.on_any_process(busy is not None):
        raise TrainingError(str(busy or "Process 0 could not lock the workdir; see its message."))
    if lock.stale:
        console.print(f"Took over the lock of a run that is no longer alive ({describe_holder(lock.stale)}).")


def _announce(console, config, model, mesh, state, data, schedule: tuple[int, int], workdir) -> None:
    from alexnet_jax.summary import summary_table

    steps_per_epoch, total_steps = schedule
    devices = jax.devices()
    console.print(
        f"[bold]alexnet_jax[/bold]: {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}), mesh {dict(mesh.shape)}, "
        f"{count_params(state.params):,} parameters, {len(data.records['train']):,} training images, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, workdir {workdir}"
    )
    console.print(summary_table(model))
    console.print(f"config:\n{config}")
    (workdir / "config.json").write_text(config.to_json(indent=2))


class _Evaluator:
    """``evaluator(params) -> {'val/top1_error', ...}``: one pass over the validation split.

    One pass gives both protocols: the ten views hold the centre crop. Each image
    travels once, whole, and the views are cut on the device. The loader's worker
    processes start at the first evaluation and live until ``close``.
    """

    def __init__(self, config, model, mesh, param_shardings, inputs, data, host_shard):
        self.config, self.model, self.mesh, self.data, self.host_shard = config, model, mesh, data, host_shard
        self.step = steps.make_eval_step(model, mesh, param_shardings, inputs, config.mesh.parallelism)
        self.passes = None

    def __call__(self, params) -> dict:
        if self.passes is None:
            c = self.config
            mode = "whole" if c.eval_ten_crop else "center"  # whole images: the ten views are cut on the device
            self.passes = data_lib.EvalPasses(
                c.data,
                batch_size=c.eval_batch_size,
                mode=mode,
                image_size=self.model.image_size,
                data=self.data,
                shard_index=self.host_shard[0],
                shard_count=self.host_shard[1],
            )
        r = error_rates(self.step, params, self.passes(), self.mesh)
        return {f"val/{k}": v for k, v in r.items() if k != "n"}

    def close(self) -> None:
        if self.passes is not None:
            self.passes.close()


# Data fields that change only speed, never which pixels a step sees: free to change on resume.
_DATA_SPEED_FIELDS = {
    "num_workers",
    "worker_buffer_size",
    "num_threads",
    "prefetch_buffer_size",
    "prepare_workers",
    "cache_dir",
}


def _check_compatible(saved: dict, config: ml_collections.ConfigDict) -> None:
    """A checkpoint can only continue the same network on the same data stream."""
    for section, free in (("model", {"dtype", "ops"}), ("data", _DATA_SPEED_FIELDS)):  # dtype, ops: speed only
        now = json.loads(config[section].to_json())
        then = saved.get(section, {}) if section == "model" else data_lib.drop_legacy_fields(saved.get(section, {}))
        if section == "data":  # a run saved before paths were stored absolute: relative to this folder
            then = {
                k: paths.absolute_str(v) if f"data.{k}" in paths.CONFIG_PATH_FIELDS and v else v
                for k, v in then.items()
            }
        diff = sorted(k for k in (set(now) | set(then)) - free if now.get(k) != then.get(k))
        if diff:
            raise TrainingError(
                f"The checkpoint in this workdir was made with a different {section} config "
                f"(fields {diff}). Use a new --workdir, or the checkpoint's own config."
            )


def _schedule(config, num_train: int) -> tuple[int, int]:
    steps_per_epoch = max(1, num_train // config.batch_size)
    total = config.total_steps if config.total_steps > 0 else int(config.num_epochs * steps_per_epoch)
    return steps_per_epoch, total


def _last_good_text(ckpt: Checkpointer) -> str:
    """Where a stopped run can resume from (after letting a running write finish)."""
    with contextlib.suppress(CheckpointError):
        ckpt.wait()
    if ckpt.last_good is None:
        return "No checkpoint had been written yet"
    return f"The last good checkpoint, step {ckpt.last_good}, is kept in {ckpt.directory}"


def _final_checkpoint_written(ckpt: Checkpointer, step: int, error: CheckpointWriteError | None) -> None:
    """The run reports success only once its final checkpoint is on disk."""
    try:
        ckpt.wait()
    except CheckpointWriteError as e:
        error = e
    if step > 0 and ckpt.last_good != step:
        raise CheckpointError(
            f"{error or 'The final checkpoint was not written.'} The run reached step {step} "
            "but could not save it; once the disk is fixed, run the same command again: it "
            "resumes from the newest good checkpoint."
        )

"""Training as the paper did it, read top to bottom in ``train_and_evaluate``: a jitted, sharded
``train_step`` (``alexnet_jax.steps``), evaluation, learning-rate drops (``optim.LRPolicy``),
Orbax checkpoints and exact resume.

Everything a resumed run needs is in the checkpoint: parameters, optimizer state
(with the learning rate), step, the dropout RNG, the data iterator's position,
the LR-drop history and the config.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from alexnet_jax import data as data_lib
from alexnet_jax import distributed, optim, steps
from alexnet_jax.checkpoint import Checkpointer, CheckpointError, CheckpointWriteError
from alexnet_jax.config_check import validate_config
from alexnet_jax.metrics import Diverged, MetricWriter, StepMetrics, TrainingError
from alexnet_jax.model import AlexNet, ConfigError, count_params
from alexnet_jax.parallel import DATA_AXIS, check_layout, devices_note, mesh_for_config, prepare_devices
from alexnet_jax.preemption import StopOnSignal
from alexnet_jax.workdir_lock import WorkdirBusy, WorkdirLock, describe

__all__ = ["Diverged", "TrainingError", "train_and_evaluate"]
EXIT_DIVERGED = 3  # launch.py's exit status when the loss became NaN/Inf


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       manual_lr: float | None = None,
                       after_checkpoint: Callable[[int, Checkpointer], None] | None = None) -> dict:
    """Train (or resume) according to ``config``; returns the final metrics and the LR history.

    ``manual_lr``: on resume, set the LR to this (logged as a manual drop), once per distinct
    value; ``launch.py`` passes it when ``--config.optim.lr`` is on the command line. Without
    it the checkpoint's LR carries on, whatever ``config.optim.lr`` says.
    ``after_checkpoint(step, checkpointer)`` runs after each checkpoint is started (tests use
    it to kill the process at a known point).
    """
    try:
        return _train_and_evaluate(config, workdir, manual_lr, after_checkpoint)
    finally:
        data_lib.release_shared_memory()  # a notebook or a second run: the loader's batches are freed now


def _train_and_evaluate(config, workdir, manual_lr, after_checkpoint) -> dict:
    from rich.console import Console
    from rich.markup import escape

    from alexnet_jax.progress import TrainProgress

    console = Console(soft_wrap=True)  # logs keep whole lines; a terminal wraps them itself
    model, mesh, data, workdir = _start(config, workdir, console)
    is_main = jax.process_index() == 0
    host_shard = distributed.process_batch_shard(mesh)  # (block, blocks) of each global batch this process reads
    steps_per_epoch, total_steps = _schedule(config, len(data.records["train"]))
    eval_every, ckpt_every = (_every(n, steps_per_epoch) for n in (config.eval_every, config.checkpoint_every))
    tx = optim.make_optimizer(config.optim)
    state, shardings = steps.create_train_state(model, tx, config.seed, mesh, config.mesh.parallelism)

    with contextlib.ExitStack() as stack:
        _hold_workdir(workdir, stack, console)  # before anything touches the checkpoints
        ckpt = stack.enter_context(contextlib.closing(Checkpointer(workdir, keep=config.keep_checkpoints)))
        restored = ckpt.restore_latest(steps.abstract_state(state, shardings))
        writer = stack.enter_context(contextlib.closing(
            MetricWriter(workdir, enabled=is_main, resume_step=restored["step"] if restored else 0)))
        if writer.note:
            console.print(writer.note)
        control, data_state = optim.LRControl(), None
        if restored is not None:
            _check_compatible(restored["config"], config)
            state, data_state = restored["state"], restored["data"]
            control = optim.LRControl.from_json(restored["control"])
            console.print(f"Resumed from {ckpt.directory / str(restored['step'])} (step {restored['step']}, "
                          f"lr {optim.get_lr(state.opt_state):.3g}).")
        policy = optim.LRPolicy(
            config.optim, control, lr=optim.get_lr(state.opt_state), step=int(state.step),
            steps_per_epoch=steps_per_epoch, request_every=config.log_every, manual_lr=manual_lr,
            read_request=lambda: distributed.requested_drop_everywhere(workdir))

        train_iter = data_lib.build_train_iter(
            config.data, batch_size=config.batch_size, seed=config.seed, image_size=model.image_size,
            shard_index=host_shard[0], shard_count=host_shard[1], data=data)
        stack.callback(train_iter.close)
        if data_state is not None:
            train_iter.set_state(data_state)
        inputs = steps.make_input_fn(config.data, data.stats)
        train_step = steps.make_train_step(model, tx, mesh, shardings, inputs, config.mesh.parallelism)
        evaluator = stack.enter_context(contextlib.closing(
            _Evaluator(config, model, mesh, shardings.params, inputs, data, host_shard)))
        if is_main:
            _announce(console, config, model, mesh, state, data, steps_per_epoch, total_steps, workdir)

        step, val, ckpt_error = int(state.step), {}, None
        dataset_item = {"classes": data.classes, "class_names": data.class_names, "stats": data.stats}
        progress = stack.enter_context(contextlib.closing(
            TrainProgress(total_steps, step, config.batch_size, enabled=is_main, console=console)))
        monitor = StepMetrics(writer, progress, log_every=config.log_every, max_bad=config.max_bad_batches,
                              resume_hint=lambda: _last_good_text(ckpt), batch_size=config.batch_size)

        def change_lr(state, drop):
            if drop is None:
                return state
            console.print(f"[yellow]LR {drop['from']:.3g} -> {drop['to']:.3g} at step {drop['step']} "
                          f"(epoch {drop['epoch']:.2f}): {drop['reason']}[/yellow]")
            writer.write(drop["step"], {"lr_drop/from": drop["from"], "lr_drop/to": drop["to"],
                                        "lr_drop/reason": drop["reason"]})
            return state.replace(opt_state=optim.set_lr(state.opt_state, drop["to"]))

        state = change_lr(state, policy(step))  # an LR given at resume
        batches = steps.device_batches(train_iter, mesh)  # read and copied on a thread, two batches ahead
        stack.callback(batches.close)  # runs before train_iter.close: the thread stops reading first
        stop = stack.enter_context(StopOnSignal(ckpt.manager.reached_preemption if jax.process_count() > 1 else None))
        stopped_by = None
        while step < total_steps and stopped_by is None:
            batch, data_position = next(batches)
            state, metrics = train_step(state, batch)
            step += 1
            if (step - 1) % config.log_every == 0:
                monitor.process()  # the earlier steps' metrics, fetched while this step runs
            monitor.add(step, metrics)
            stopped_by = stop.due(step)  # SIGTERM / Ctrl-C: save this step and stop
            do_eval = step % eval_every == 0 or step == total_steps
            do_ckpt = step % ckpt_every == 0 or step == total_steps or stopped_by is not None
            if do_eval or do_ckpt:
                monitor.process()  # the state is read next anyway: a NaN loss stops before it is saved

            evaluated = evaluator(state.params) if do_eval else None
            if evaluated is not None:
                val = evaluated
                writer.write(step, {**val, "epoch": step / steps_per_epoch})
                progress.note(f"step {step} (epoch {step / steps_per_epoch:.2f}): val top-1 error "
                              f"{val['val/top1_error']:.4f}, top-5 {val['val/top5_error']:.4f}")
            state = change_lr(state, policy(step, evaluated and evaluated["val/top1_error"]))
            if do_ckpt:
                writer.flush()  # the curves are kept as far as the checkpoint is
                try:  # a full or read-only disk: say so, keep training, try again next time
                    ckpt.save(step, state, data_state=data_position, config=json.loads(config.to_json()),
                              control=control.to_json(), dataset=dataset_item,
                              metrics={"val/top1_error": evaluated["val/top1_error"]} if evaluated else None)
                except CheckpointWriteError as e:
                    ckpt_error = e
                    progress.note(escape(f"{e} Training goes on; the next checkpoint tries again."))
                    writer.write(step, {"checkpoint/error": str(e)})
                if after_checkpoint is not None:
                    after_checkpoint(step, ckpt)
            if do_eval or do_ckpt:
                monitor.restart_clock()  # images/s counts training only
        monitor.process()
        _final_checkpoint_written(ckpt, step, ckpt_error)
        if not val and restored is not None and step == total_steps:
            val = evaluator(state.params)  # resumed at the very end: report where it stands

    result = {"step": step, **val, "lr": optim.get_lr(state.opt_state), "lr_drops": control.drops}
    if stopped_by is not None:
        console.quiet = False  # every process says why it ends: each has its own log under a scheduler
        who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        console.print(f"{who}[bold]Stopped by {stopped_by} at step {step}[/bold]; saved "
                      f"{ckpt.directory / str(step)}. Run the same command to resume from there.")
        return {**result, "stopped_by": stopped_by}
    if is_main and val:
        console.print(f"[bold]Done at step {step}:[/bold] validation top-1 error {val['val/top1_error']:.4f}, "
                      f"top-5 {val['val/top5_error']:.4f} (chance: top-1 {1 - 1 / model.num_classes:.2f}).")
    return result


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
            f"({mesh.shape[DATA_AXIS]}); set --config.batch_size to a multiple of it.")
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"Cannot use --workdir={workdir}: {e}. Give a folder that can be created "
                            "or written.") from None
    console.quiet = jax.process_index() != 0  # one voice: process 0's
    data = distributed.main_first(lambda: data_lib.resolve(config.data))  # the embedded set is made once
    if len(data.classes) != model.num_classes:
        raise ConfigError(
            f"The data has {len(data.classes)} classes but model.num_classes={model.num_classes}; "
            f"set --config.model.num_classes={len(data.classes)}.")
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
        console.print(f"Took over the lock of a run that is no longer alive ({describe(lock.stale)}).")


def _announce(console, config, model, mesh, state, data, steps_per_epoch, total_steps, workdir) -> None:
    from alexnet_jax.summary import summary_table

    devices = jax.devices()
    console.print(f"[bold]alexnet_jax[/bold]: {len(devices)} x {devices[0].device_kind} "
                  f"({devices[0].platform}), mesh {dict(mesh.shape)}, "
                  f"{count_params(state.params):,} parameters, {len(data.records['train']):,} training images, "
                  f"{steps_per_epoch} steps/epoch, {total_steps} steps, workdir {workdir}")
    console.print(summary_table(model))
    console.print(f"config:\n{config}")
    (workdir / "config.json").write_text(config.to_json(indent=2))


class _Evaluator:
    """``evaluator(params) -> {'val/top1_error', ...}``: one pass over the validation split.

    One pass gives both protocols: the ten views hold the centre crop. With uint8
    output each image travels once, whole, and the views are cut on the device. The
    loader's worker processes start at the first evaluation and live until ``close``.
    """

    def __init__(self, config, model, mesh, param_shardings, inputs, data, host_shard):
        self.config, self.model, self.mesh, self.data, self.host_shard = config, model, mesh, data, host_shard
        self.step = steps.make_eval_step(model, mesh, param_shardings, inputs, config.mesh.parallelism)
        self.passes = None

    def __call__(self, params) -> dict:
        if self.passes is None:
            c = self.config
            mode = ("whole" if c.data.output == "uint8" else "ten_crop") if c.eval_ten_crop else "center"
            self.passes = data_lib.EvalPasses(
                c.data, batch_size=c.eval_batch_size, mode=mode, image_size=self.model.image_size,
                data=self.data, shard_index=self.host_shard[0], shard_count=self.host_shard[1])
        r = steps.evaluate(self.step, params, self.passes(), self.mesh)
        return {f"val/{k}": v for k, v in r.items() if k != "n"}

    def close(self) -> None:
        if self.passes is not None:
            self.passes.close()


# Data fields that change only speed, never which pixels a step sees: free to change on resume.
_DATA_SPEED_FIELDS = {"num_workers", "worker_buffer_size", "num_threads", "prefetch_buffer_size",
                      "prepare_workers", "cache_dir"}


def _check_compatible(saved: dict, config: ml_collections.ConfigDict) -> None:
    """A checkpoint can only continue the same network on the same data stream."""
    for section, free in (("model", {"dtype", "ops"}), ("data", _DATA_SPEED_FIELDS)):  # dtype, ops: speed only
        now = json.loads(config[section].to_json())
        then = saved.get(section, {})
        diff = sorted(k for k in (set(now) | set(then)) - free if now.get(k) != then.get(k))
        if diff:
            raise TrainingError(
                f"The checkpoint in this workdir was made with a different {section} config "
                f"(fields {diff}). Use a new --workdir, or the checkpoint's own config.")


def _schedule(config, num_train: int) -> tuple[int, int]:
    steps_per_epoch = max(1, num_train // config.batch_size)
    total = config.total_steps if config.total_steps > 0 else int(config.num_epochs * steps_per_epoch)
    return steps_per_epoch, total


def _every(n: int, steps_per_epoch: int) -> int:
    return steps_per_epoch if n <= 0 else n


def _last_good_text(ckpt: Checkpointer) -> str:
    """Where a stopped run can resume from (after letting a running write finish)."""
    try:
        ckpt.wait()
    except CheckpointError:
        pass
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
        raise CheckpointError(f"{error or 'The final checkpoint was not written.'} The run reached step {step} "
                              "but could not save it; once the disk is fixed, run the same command again: it "
                              "resumes from the newest good checkpoint.")

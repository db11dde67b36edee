"""`train_and_evaluate(config, workdir)`: the one function launchers, notebooks and tests call.

One loop trains every task; `config.task` picks it ("image", the default for
configs without the field; "motion"; "prediction"), and the task supplies the
model, data, batches, loss and evaluations behind the small interface of
`rvm.train.task`. Reads top to bottom: data, task and state (fresh or resumed),
the loop with per-epoch evaluation and checkpoints, then the final numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rvm.errors import ConfigError, UserError
from rvm.models import sharing
from rvm.train import checkpoint, epoch, image_task, metrics, optim, thinking_task, video_task, xla
from rvm.train import sharding as shd
from rvm.train import workdir as guard
from rvm.train.config_check import check_resume, task_of, validate
from rvm.train.state import TrainState
from rvm.train.step import epoch_step, train_step
from rvm.train.task import Task

# Each module exposes load_data(config) and make_task(config, data, mesh).
TASK_MODULES: dict[str, ModuleType] = {
    "image": image_task,
    "motion": video_task,
    "prediction": video_task,
    "thinking": thinking_task,
}

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: schedulers read it as "requeue me"


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint of the step it stopped at is in the workdir."""


class _StopSignals:
    """Turns SIGTERM and a first SIGINT (Ctrl-C) into a flag the loop checks between steps;
    a second SIGINT stops at once (KeyboardInterrupt, nothing saved). Main thread only.

    In a multi-process run the processes must stop at one step, since saving is
    collective: there JAX's preemption service (started by `jax.distributed`) takes
    SIGTERM, tells every process, and they agree on the step to stop at; a first SIGINT
    is handed to it as a SIGTERM.
    """

    def __init__(self):
        self.received: str | None = None
        self.previous: dict[int, Any] = {}
        self.multiprocess = jax.process_count() > 1

    def __enter__(self) -> _StopSignals:
        # The preemption service's own SIGTERM handler stays in a multi-process run.
        signums = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
        for signum in signums:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook kernels)
                break
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if self.multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_at(self, step: int) -> bool:
        """Whether to stop (and save) at `step`; every process calls it before every step."""
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            # None: the previous handler was not installed from Python; SIG_DFL replaces it.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)


@dataclasses.dataclass
class Run:
    """Everything a run builds before its first step; tests build it on fake data."""

    task: Task
    tx: optax.GradientTransformation
    state: TrainState
    step_fn: Callable  # jitted (state, train_data) -> (state, metrics)
    # jitted (state, epoch sums, train_data) -> (state, epoch sums): the loop's step
    epoch_step: Callable
    epoch_sums: epoch.EpochSums  # empty, replicated
    steps_per_epoch: int
    total_steps: int
    mesh: Mesh

    @property
    def model(self) -> nn.Module:
        return self.task.model

    @property
    def train_data(self) -> Any:
        return self.task.train_data


def load_data(config: ml_collections.ConfigDict) -> Any:
    """The host-side data of the config's task (`ImageData`, `video_task.VideoData`)."""
    return TASK_MODULES[task_of(config)].load_data(config)


def _task_and_optimizer(
    config: ml_collections.ConfigDict, data: Any, mesh: Mesh
) -> tuple[Task, optax.GradientTransformation, int, int]:
    """The config's task on `mesh`, its optimiser, steps per epoch and in all."""
    shd.check_divisible(config.batch_size, mesh, "batch_size")
    shd.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
    task = TASK_MODULES[task_of(config)].make_task(config, data, mesh)
    steps_per_epoch = task.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {task.num_train} training {task.unit}"
        )
    total_steps = config.num_epochs * steps_per_epoch
    tx = optim.make_optimizer(config.optim, total_steps, task.relax_mask)
    return task, tx, steps_per_epoch, total_steps


def _fresh_state(task: Task, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    variables = task.model.init({"params": key, "dropout": key}, task.init_input)
    return TrainState.create(variables, tx, key)


def state_shapes(config: ml_collections.ConfigDict, data: Any) -> Any:
    """Shapes and dtypes of `build_run`'s fresh state, traced on one device.

    Nothing is compiled or allocated, so restoring a checkpoint into them needs
    neither the memory of a second state nor batch sizes that divide the devices.
    """

    def fresh():
        task, tx, _, _ = _task_and_optimizer(config, data, shd.data_mesh(jax.devices()[:1]))
        return _fresh_state(task, tx, jax.random.PRNGKey(config.seed))

    return jax.eval_shape(fresh)


def build_run(config: ml_collections.ConfigDict, data: Any, mesh: Mesh) -> Run:
    """Task, optimiser, fresh replicated state and the jitted, donated train step."""
    task, tx, steps_per_epoch, total_steps = _task_and_optimizer(config, data, mesh)
    replicated = shd.replicated(mesh)
    platform = mesh.devices.flat[0].platform
    init_fn = jax.jit(
        partial(_fresh_state, task, tx),
        out_shardings=replicated,
        compiler_options=xla.compiler_options(platform, once=True),
    )
    state = init_fn(jax.random.PRNGKey(config.seed))
    step_options = xla.compiler_options(platform)
    step_kwargs = dict(
        get_batch=task.get_batch,
        loss_fn=task.loss_fn,
        tx=tx,
        lr_schedule=optim.learning_rate(config.optim, total_steps),
        skip_nonfinite=config.skip_nonfinite,
    )
    step_fn = jax.jit(
        partial(train_step, **step_kwargs),
        in_shardings=(replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=step_options,
    )
    epoch_step_fn = jax.jit(
        partial(epoch_step, steps_per_epoch=steps_per_epoch, **step_kwargs),
        in_shardings=(replicated, replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0, 1),
        compiler_options=step_options,
    )
    step_metrics = jax.eval_shape(step_fn, state, task.train_data)[1]
    sums = jax.jit(partial(epoch.zeros, step_metrics), out_shardings=replicated)()
    return Run(task, tx, state, step_fn, epoch_step_fn, sums, steps_per_epoch, total_steps, mesh)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *, max_steps: int | None = None
) -> dict:
    """Trains (or resumes) the run of `config` in `workdir`; returns the final results.

    `max_steps` stops early (with a checkpoint) without changing the schedules,
    as an interrupted run would; calling again resumes.

    In a multi-process run (`jax.distributed`), every process calls this with the
    same arguments; they train together on the mesh of all their devices, write
    checkpoints together, and process 0 alone holds the workdir's lock and writes the
    run's records.
    """
    validate(config)
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    # Signals are caught before anything slow (data, compilation), so that none is lost.
    with _StopSignals() as signals, _undone_if_failed(workdir) as start:
        workdir.mkdir(parents=True, exist_ok=True)
        with guard.exclusive(workdir) if primary else contextlib.nullcontext():
            start.owner = primary  # only the lock's holder may undo what its start made
            return _train(config, workdir, max_steps, primary, signals)


def _train(
    config: ml_collections.ConfigDict,
    workdir: Path,
    max_steps: int | None,
    primary: bool,
    signals: _StopSignals,
) -> dict:
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    if ckpts.all_steps():  # before any data is read or anything compiled
        check_resume(config, workdir, saved=_checkpointed_config(workdir, ckpts, primary))
    run = build_run(config, load_data(config), shd.data_mesh())
    task, state, sums = run.task, run.state, run.epoch_sums
    steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps
    num_params = sharing.count_params(state.params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    # The checkpoints kept, and the one being written.
    if primary:
        guard.check_writable(workdir, needed_bytes=(config.keep_checkpoints + 1) * state_bytes)

    # --- Resume ------------------------------------------------------------------------
    records = []  # the lines of metrics.jsonl, which travel with each checkpoint
    resumed = ckpts.restore_latest_usable(state, sums)  # refuses a workdir of damaged ones only
    if resumed is not None:
        state, sums, records = resumed.state, resumed.epoch, resumed.records["records"]
        logging.info("Resumed %s from step %d", workdir, resumed.step)
    if primary:
        # Epochs logged after the checkpoint we start from (a kill before the save) are
        # redone; lines lost before it (a torn last line) are written again.
        lost = metrics.restore_jsonl(workdir / "metrics.jsonl", records)
        if lost:
            logging.warning(
                "%s: %d lost record(s) rewritten from checkpoint %d",
                workdir / "metrics.jsonl",
                lost,
                resumed.step,
            )
        metrics.write_json(workdir / "config.json", config.to_dict())
    writer = metrics.MetricWriter(
        workdir,
        total_steps,
        enabled=primary,
        steps_per_epoch=steps_per_epoch,
        batch_size=config.batch_size,
        unit=task.unit,
    )
    first_step = int(state.step)
    if first_step == 0:
        logging.info("Parameters: %d (%s)", num_params, task.summary)

    def save(step: int) -> None:
        ckpts.save(step, state, sums, {"config": config.to_dict(), "records": records})

    # --- Loop --------------------------------------------------------------------------
    # The host reads the device only at log points, epoch ends, saves and stops: between
    # them it queues steps without waiting for any.
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    epoch_start = time.time()
    for step in range(first_step, stop):
        if signals.stop_at(step):  # also before the first step: a signal during start-up
            if step != first_step:  # else nothing was trained since the checkpoint
                _fetched(sums)  # a non-finite state is never saved
                if step not in ckpts.all_steps():  # not already saved at an epoch's end
                    save(step)
            saved = step in ckpts.all_steps()
            ckpts.close()
            raise Preempted(
                f"{signals.received or 'SIGTERM'} at step {step}; "
                + (f"checkpoint of that step in {ckpts.directory}" if saved else "nothing to save")
            )
        state, sums = run.epoch_step(state, sums, task.train_data)
        done = step + 1
        if done % config.log_every_steps and done % steps_per_epoch:
            continue
        seen = _fetched(sums)  # waits for the step
        if done % config.log_every_steps == 0:
            writer.progress(done, first_step, epoch.means(seen))
        if done % steps_per_epoch == 0:
            record = epoch.record(seen, config.skip_nonfinite)
            eval_start = time.time()  # training is done: `seen` waited for its last step
            record.update(task.epoch_metrics(state))
            record["eval_sec"] = time.time() - eval_start
            # the epoch's wall time in this process, its evaluation (eval_sec of it) included
            ran = done - max(first_step, done - steps_per_epoch)
            record[f"{task.unit}_per_sec"] = ran * config.batch_size / (time.time() - epoch_start)
            record["epoch"] = done // steps_per_epoch
            record["step"] = done
            writer.write(done, first_step, record)
            records.append(metrics.plain(record))
            epoch_start = time.time()
            if record["epoch"] % config.checkpoint_every_epochs == 0:
                save(done)
    _fetched(sums)  # a non-finite state is never saved
    final_step = int(state.step)
    if final_step not in ckpts.all_steps():
        save(final_step)
    ckpts.close()
    writer.close()
    if final_step < total_steps:
        return {"step": final_step, "finished": False}

    # --- Final numbers -----------------------------------------------------------------
    results = {"step": final_step, "finished": True, "params": num_params}
    results.update(task.final_results(state))
    val = [r for r in records if "val_error" in r]
    if val:
        best = min(val, key=lambda r: r["val_error"])
        results.update(best_val_epoch=best["epoch"], test_error_at_best_val=best["test_error"])
    if primary:
        metrics.write_json(workdir / "results.json", results)
    return results


class NonFiniteError(UserError, FloatingPointError):
    """The loss went non-finite; the last checkpoint written is still a good one."""


def _fetched(sums: epoch.EpochSums) -> epoch.EpochSums:
    """The epoch's sums on the host; stops on a non-finite loss (unless such steps are
    being skipped and counted), naming the first step that had one."""
    host = jax.device_get(sums)
    if host.nonfinite_step:
        raise NonFiniteError(
            f"metric 'loss' is {float(host.nonfinite_loss)} at step {int(host.nonfinite_step)}; "
            "stopping without saving, so the newest checkpoint is the last good one "
            "(config.skip_nonfinite=True skips such steps)"
        )
    return host


def _checkpointed_config(
    workdir: Path, ckpts: checkpoint.Checkpoints, primary: bool
) -> dict | None:
    """The config stored with the newest checkpoint that has one readable; `config.json`
    is rebuilt from it when it is missing or not JSON (torn, or edited by hand)."""
    newest = ckpts.newest_records()
    if newest is None:
        return None
    step, saved = newest
    path = workdir / "config.json"
    try:
        json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        if primary:
            logging.warning("%s is missing or not JSON; rebuilt from checkpoint %d", path, step)
            metrics.write_json(path, saved["config"])
    return saved["config"]


# What a start creates in a workdir: a start that fails before its first checkpoint
# removes those of them that were not there before.
_START_FILES = (".lock", "checkpoints", "config.json", "metrics.jsonl", "tensorboard")


@dataclasses.dataclass
class _Start:
    owner: bool = False  # holds the workdir's lock: whatever it finds new is its own


@contextlib.contextmanager
def _undone_if_failed(workdir: Path) -> Iterator[_Start]:
    """Leaves the workdir as it was when the start fails (missing data, a refused resume,
    a non-finite loss, a signal) before writing a checkpoint: removes what it created,
    the workdir itself included, and nothing that was there before."""
    new_root = workdir.absolute()  # the top-most directory this start will create
    if new_root.exists():
        new_root = None
    else:
        while not new_root.parent.exists():
            new_root = new_root.parent
    found = {name for name in _START_FILES if (workdir / name).exists()}
    steps = _checkpoint_dirs(workdir)
    start = _Start()
    try:
        yield start
    except BaseException:
        if start.owner and _checkpoint_dirs(workdir) == steps:
            made = [new_root] if new_root else [workdir / n for n in _START_FILES if n not in found]
            for path in made:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def _checkpoint_dirs(workdir: Path) -> set[str]:
    """The complete checkpoints' directories (orbax renames a step's when it is written)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return set()
    return {p.name for p in directory.iterdir() if p.name.isdigit()}

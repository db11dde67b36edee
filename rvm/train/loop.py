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
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rvm.models import sharing
from rvm.train import checkpoint, image_task, metrics, optim, thinking_task, video_task, xla
from rvm.train import sharding as shd
from rvm.train import workdir as guard
from rvm.train.config_check import check_resume, task_of, validate
from rvm.train.state import TrainState
from rvm.train.step import train_step
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
    """SIGTERM arrived; a checkpoint of the current step was written."""


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (main thread only).

    In a multi-process run the processes must stop at one step, since saving is
    collective: there JAX's preemption service (started by `jax.distributed`) takes
    the signal, tells every process, and they agree on the step to stop after.
    """

    _NOT_INSTALLED = object()

    def __init__(self):
        self.raised = False
        self.previous = self._NOT_INSTALLED
        self.multiprocess = jax.process_count() > 1

    def __enter__(self):
        if self.multiprocess:  # the preemption service's handler stays
            return self
        try:
            # None: the previous handler was not installed from Python; SIG_DFL replaces it.
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook kernels)
            self.previous = self._NOT_INSTALLED
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def stop_after(self, step: int) -> bool:
        """Whether to stop (and save) after `step`; every process calls it every step."""
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.raised

    def __exit__(self, *exc):
        if self.previous is None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        elif self.previous is not self._NOT_INSTALLED:
            signal.signal(signal.SIGTERM, self.previous)


@dataclasses.dataclass
class Run:
    """Everything a run builds before its first step; tests build it on fake data."""

    task: Task
    tx: optax.GradientTransformation
    state: TrainState
    step_fn: Callable  # jitted (state, train_data) -> (state, metrics)
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
        raise ValueError(
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
    step_fn = jax.jit(
        partial(
            train_step,
            get_batch=task.get_batch,
            loss_fn=task.loss_fn,
            tx=tx,
            lr_schedule=optim.learning_rate(config.optim, total_steps),
            skip_nonfinite=config.skip_nonfinite,
        ),
        in_shardings=(replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=xla.compiler_options(platform),
    )
    return Run(task, tx, state, step_fn, steps_per_epoch, total_steps, mesh)


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
    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    with guard.exclusive(workdir) if primary else contextlib.nullcontext():
        return _train(config, workdir, max_steps, primary)


def _train(
    config: ml_collections.ConfigDict, workdir: Path, max_steps: int | None, primary: bool
) -> dict:
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    if ckpts.all_steps():
        check_resume(config, workdir)  # before any data is read or anything compiled
    run = build_run(config, load_data(config), shd.data_mesh())
    task, state = run.task, run.state
    steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps
    num_params = sharing.count_params(state.params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    # The checkpoints kept, and the one being written.
    if primary:
        guard.check_writable(workdir, needed_bytes=(config.keep_checkpoints + 1) * state_bytes)

    # --- Resume ------------------------------------------------------------------------
    resumed = ckpts.restore_latest_usable(state)  # refuses a workdir of damaged ones only
    if resumed is not None:
        state = resumed
        logging.info("Resumed %s from step %d", workdir, int(state.step))
    # Epochs logged after the checkpoint we start from (a kill before the save) are redone.
    if primary:
        metrics.truncate_jsonl(workdir / "metrics.jsonl", after_step=int(state.step))
        metrics.write_json(workdir / "config.json", config.to_dict())
    writer = metrics.MetricWriter(workdir, total_steps, enabled=primary)
    first_step = int(state.step)
    if first_step == 0:
        logging.info("Parameters: %d (%s)", num_params, task.summary)

    # --- Loop --------------------------------------------------------------------------
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    history = metrics.read_jsonl(workdir / "metrics.jsonl")
    step_metrics, epoch_start = [], time.time()
    with _SigtermFlag() as sigterm:
        for step in range(first_step, stop):
            state, m = run.step_fn(state, task.train_data)
            # The previous step (the `step`-th from 1): the host never waits on the device.
            if step_metrics:
                _check_finite(step_metrics[-1], step, config.skip_nonfinite)
            step_metrics.append(m)
            done = step + 1
            if done % config.log_every_steps == 0:
                writer.progress(done, first_step, jax.device_get(m))
            if done % steps_per_epoch == 0 or done == stop:
                _check_finite(m, done, config.skip_nonfinite)
            if done % steps_per_epoch == 0:
                record = _train_means(step_metrics)
                eval_start = time.time()  # training is done: _train_means fetched its metrics
                record.update(task.epoch_metrics(state))
                record["eval_sec"] = time.time() - eval_start
                # the epoch's wall time, its evaluation (eval_sec of it) included
                record[f"{task.unit}_per_sec"] = (
                    len(step_metrics) * config.batch_size / (time.time() - epoch_start)
                )
                record["epoch"] = done // steps_per_epoch
                record["step"] = done
                writer.write(done, first_step, record)
                history.append(metrics.plain(record))
                step_metrics, epoch_start = [], time.time()
                if record["epoch"] % config.checkpoint_every_epochs == 0:
                    ckpts.save(done, state)
            if sigterm.stop_after(done):
                _check_finite(m, done, config.skip_nonfinite)
                if done not in ckpts.all_steps():  # not already saved at an epoch's end
                    ckpts.save(done, state)
                ckpts.close()
                raise Preempted(f"SIGTERM at step {done}; checkpoint saved in {ckpts.directory}")
    final_step = int(state.step)
    if final_step not in ckpts.all_steps():
        ckpts.save(final_step, state)
    ckpts.close()
    writer.close()
    if final_step < total_steps:
        return {"step": final_step, "finished": False}

    # --- Final numbers -----------------------------------------------------------------
    results = {"step": final_step, "finished": True, "params": num_params}
    results.update(task.final_results(state))
    val = [r for r in history if "val_error" in r]
    if val:
        best = min(val, key=lambda r: r["val_error"])
        results.update(best_val_epoch=best["epoch"], test_error_at_best_val=best["test_error"])
    if primary:
        metrics.write_json(workdir / "results.json", results)
    logging.info("Results: %s", results)
    return results


class NonFiniteError(FloatingPointError):
    """The loss went non-finite; the last checkpoint written is still a good one."""


def _check_finite(step_metrics: dict, step: int, skipping: bool) -> None:
    """Stops on a non-finite loss (unless such steps are being skipped and counted)."""
    if skipping:
        return
    loss = float(jax.device_get(step_metrics["loss"]))
    if not np.isfinite(loss):
        raise NonFiniteError(
            f"metric 'loss' is {loss} at step {step}; stopping without saving, so the newest "
            "checkpoint is the last good one (config.skip_nonfinite=True skips such steps)"
        )


# Step metrics of the optimiser, recorded as their last value rather than a mean.
_LAST_VALUE = ("learning_rate", "pull", "penalty")


def _train_means(step_metrics: list[dict]) -> dict:
    """The epoch's step metrics: means named `train_*` (error in %) over the steps taken
    (skipped ones left out), the optimiser's last values, the count of skipped steps, and
    `train_steps`, the steps this process ran in the epoch (fewer after a resume)."""
    fetched = jax.device_get(step_metrics)
    taken = [m for m in fetched if not m.get("skipped", 0)]
    record = {"train_steps": len(fetched)}
    for k in fetched[0]:
        if k in _LAST_VALUE:
            record[k] = float(fetched[-1][k])
        elif k == "skipped":
            record[k] = len(fetched) - len(taken)
        else:
            record[f"train_{k}"] = float(np.mean([m[k] for m in taken])) if taken else float("nan")
    if "train_error" in record:
        record["train_error"] *= 100.0
    return record

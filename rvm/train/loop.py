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
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from rvm import tasks
from rvm.errors import ConfigError, UserError
from rvm.models import sharing
from rvm.train import checkpoint, epoch, metrics, optim, pack, provenance, xla
from rvm.train import sharding as shd
from rvm.train import workdir as guard
from rvm.train.config_check import ADDED_FIELDS, check_resume, task_of, validate
from rvm.train.signals import Preempted, StopSignals, too_late
from rvm.train.state import TrainState
from rvm.train.step import epoch_step, train_step
from rvm.train.task import Task


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
    init: Callable  # jitted PRNGKey(seed) -> fresh state, replicated
    epoch_fn: Callable  # `epoch_step` before jit, for a pack to vectorise (`rvm.train.pack`)

    @property
    def model(self) -> nn.Module:
        return self.task.model

    @property
    def train_data(self) -> Any:
        return self.task.train_data


def load_data(config: ml_collections.ConfigDict) -> Any:
    """The host-side data of the config's task (`ImageData`, `rvm.tasks.video.task.VideoData`)."""
    return tasks.MODULES[task_of(config)].load_data(config)


def _task_and_optimizer(
    config: ml_collections.ConfigDict, data: Any, mesh: Mesh
) -> tuple[Task, optax.GradientTransformation, int, int]:
    """The config's task on `mesh`, its optimiser, steps per epoch and in all."""
    shd.check_divisible(config.batch_size, mesh, "batch_size")
    shd.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
    task = tasks.MODULES[task_of(config)].make_task(config, data, mesh)
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


def restore_newest(config: ml_collections.ConfigDict, data: Any, workdir: str | Path):
    """(step, state) of the newest checkpoint in `workdir`, a run of `config` on `data`:
    for evaluating a run again; a workdir without a checkpoint is a FileNotFoundError."""
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint to evaluate")
        return step, ckpts.restore(state_shapes(config, data))
    finally:
        ckpts.close()


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
        rng_streams=config.get("rng_streams", ADDED_FIELDS["rng_streams"]),
        probes=task.probes,
    )
    step_fn = jax.jit(
        partial(train_step, **step_kwargs),
        in_shardings=(replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=step_options,
    )
    epoch_fn = partial(epoch_step, steps_per_epoch=steps_per_epoch, **step_kwargs)
    epoch_step_fn = jax.jit(
        epoch_fn,
        in_shardings=(replicated, replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0, 1),
        compiler_options=step_options,
    )
    step_metrics = jax.eval_shape(step_fn, state, task.train_data)[1]
    sums = jax.jit(partial(epoch.zeros, step_metrics), out_shardings=replicated)()
    return Run(
        task,
        tx,
        state,
        step_fn,
        epoch_step_fn,
        sums,
        steps_per_epoch,
        total_steps,
        mesh,
        init_fn,
        epoch_fn,
    )


def build_pack(
    config: ml_collections.ConfigDict, data: Any, devices: Sequence[jax.Device] | None = None
) -> pack.Pack:
    """The runs of `config.seeds` built to train together (`rvm.train.pack`) on `devices`
    (default: every device, as `pack.pack_mesh` groups them); without `seeds`, the one
    run of `config.seed` (`build_run` data-parallel over `devices`), as a pack of one."""
    seeds = pack.seeds_of(config)
    devices = jax.devices() if devices is None else devices
    if config.get("seeds") is None:
        return pack.build(build_run(config, data, shd.data_mesh(devices)), seeds, "loop")
    strategy = pack.strategy_of(config, devices[0].platform)
    mesh = pack.pack_mesh(len(seeds), strategy, devices)
    return pack.build(build_run(pack.run_config(config, seeds[0]), data, mesh), seeds, strategy)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    max_steps: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """Trains (or resumes) the run of `config` in `workdir`; returns the final results.

    With `config.seeds`, trains the run of every seed as one pack (`rvm.train.pack`),
    each in `WORKDIR/seed_<s>/` as a run of its own, and returns
    `{"step", "finished", "runs": {seed: results}}`.

    `max_steps` stops early (with a checkpoint) without changing the schedules,
    as an interrupted run would; calling again resumes. `devices` (default: all of
    them) are those the run trains on; a run may resume on other devices.

    In a multi-process run (`jax.distributed`), every process calls this with the
    same arguments; they train together on the mesh of all their devices, write
    checkpoints together, and process 0 alone holds the workdir's lock and writes the
    run's records.
    """
    validate(config)
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    # Signals are caught before anything slow (data, compilation), so that none is lost.
    with StopSignals() as signals, guard.undone_if_failed(workdir) as start:
        guard.create(workdir)
        with contextlib.ExitStack() as locks:
            if primary:  # the pack's workdir, and each run's: no lone run on one meanwhile
                for path in dict.fromkeys([workdir, *pack.run_dirs(config, workdir)]):
                    path.mkdir(exist_ok=True)
                    locks.enter_context(guard.exclusive(path))
            start.owner = primary  # only the lock's holder may undo what its start made
            results = _train(config, workdir, max_steps, primary, signals, devices)
            if signals.received:  # seen by no step: it came after the last one was queued
                logging.warning("%s", too_late(signals.received))
            return results


def _train(
    config: ml_collections.ConfigDict,
    workdir: Path,
    max_steps: int | None,
    primary: bool,
    signals: StopSignals,
    devices: Sequence[jax.Device] | None,
) -> dict:
    """`train_and_evaluate` under its signal handlers and workdir locks: refuse or resume,
    build, train with per-epoch evaluation and checkpoints, write the final numbers."""
    seeds, dirs = pack.seeds_of(config), pack.run_dirs(config, workdir)
    packed = config.get("seeds") is not None
    configs = [pack.run_config(config, s) for s in seeds] if packed else [config]
    ckpts = [checkpoint.Checkpoints(d, keep=config.keep_checkpoints) for d in dirs]
    pack.check_seeds(config, workdir)  # before any data is read or anything compiled
    for run_config, path, ck in zip(configs, dirs, ckpts):
        if ck.all_steps():
            check_resume(run_config, path, saved=_checkpointed_config(path, ck, primary))
    runs = build_pack(config, load_data(config), devices)
    run, task = runs.run, runs.run.task
    steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps
    num_params = sharing.count_params(run.state.params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state))
    # The checkpoints kept, and the one being written.
    if primary:
        for path in dirs:
            guard.check_writable(path, needed_bytes=(config.keep_checkpoints + 1) * state_bytes)

    state, sums, records = _resume(runs, ckpts, config, configs, workdir, primary)
    writers = [
        metrics.MetricWriter(
            path,
            total_steps,
            enabled=primary,
            steps_per_epoch=steps_per_epoch,
            batch_size=config.batch_size,
            unit=task.unit,
            label=f"seed {seed}" if packed else "",
        )
        for seed, path in zip(seeds, dirs)
    ]
    first_step = int(runs.runs(state)[0].step)
    if first_step == 0:
        logging.info("Parameters: %d (%s), seeds %s", num_params, task.summary, seeds)

    def save(step: int) -> None:
        each = zip(ckpts, runs.runs(state), runs.runs(sums), configs, records)
        for ck, run_state, run_sums, run_config, run_records in each:
            ck.save(
                step, run_state, run_sums, {"config": run_config.to_dict(), "records": run_records}
            )

    def fetched() -> list[epoch.EpochSums]:
        """Each run's sums on the host; a non-finite loss in any run stops the pack."""
        host = runs.runs(_fetched(sums))
        for seed, run_sums in zip(seeds, host):
            _check_finite(run_sums, f" in the run of seed {seed}" if packed else "")
        return host

    # --- Loop --------------------------------------------------------------------------
    # The host reads the device only at log points, epoch ends, saves and stops: between
    # them it queues steps without waiting for any.
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    epoch_start = time.time()
    for step in range(first_step, stop):
        if signals.stop_at(step):  # also before the first step: a signal during start-up
            if step != first_step:  # else nothing was trained since the checkpoint
                fetched()  # a non-finite state is never saved
                if step not in ckpts[0].all_steps():  # not already saved at an epoch's end
                    save(step)
            saved = step in ckpts[0].all_steps()
            where = workdir / "seed_*/checkpoints" if packed else ckpts[0].directory
            for ck in ckpts:
                ck.close()
            raise Preempted(
                f"{signals.received or 'SIGTERM'} at step {step}; "
                + (f"checkpoint of that step in {where}" if saved else "nothing to save")
            )
        state, sums = runs.epoch_step(state, sums, task.train_data)
        done = step + 1
        if done % config.log_every_steps and done % steps_per_epoch:
            continue
        seen = fetched()  # waits for the step
        if done % config.log_every_steps == 0:
            writers[0].progress(done, first_step, epoch.means(seen[0]))
        if done % steps_per_epoch == 0:
            # Each run's rate is its images over the epoch's wall time, every run's training
            # and evaluation included: the pack's rate is their sum.
            epoch_records = []
            for run_state, run_seen in zip(runs.runs(state), seen):
                record = epoch.record(run_seen, config.skip_nonfinite)
                eval_start = time.time()  # training is done: `seen` waited for its last step
                record.update(task.epoch_metrics(run_state))
                record["eval_sec"] = time.time() - eval_start
                epoch_records.append(record)
            # the epoch's wall time in this process, its evaluations included
            ran = done - max(first_step, done - steps_per_epoch)
            rate = ran * config.batch_size / (time.time() - epoch_start)
            for writer, run_records, record in zip(writers, records, epoch_records):
                record[f"{task.unit}_per_sec"] = rate
                record["epoch"] = done // steps_per_epoch
                record["step"] = done
                writer.write(done, first_step, record)
                run_records.append(metrics.plain(record))
            epoch_start = time.time()
            if done // steps_per_epoch % config.checkpoint_every_epochs == 0:
                save(done)
    fetched()  # a non-finite state is never saved
    final_step = int(runs.runs(state)[0].step)
    if final_step not in ckpts[0].all_steps():
        save(final_step)
    for ck, writer in zip(ckpts, writers):
        ck.close()
        writer.close()
    if final_step < total_steps:
        return {"step": final_step, "finished": False}

    states = runs.runs(state)
    finals = _write_results(task, seeds, dirs, states, records, final_step, num_params, primary)
    if not packed:
        return finals[config.seed]
    return {"step": final_step, "finished": True, "runs": finals}


def _resume(
    runs: pack.Pack,
    ckpts: list[checkpoint.Checkpoints],
    config: ml_collections.ConfigDict,
    configs: list[ml_collections.ConfigDict],
    workdir: Path,
    primary: bool,
) -> tuple[Any, Any, list[list[dict]]]:
    """The pack's state and epoch sums from each run's newest checkpoint (fresh where there
    is none), and each run's lines of metrics.jsonl, which travel with its checkpoints;
    each run's metrics.jsonl and config.json are made to match them, and its starts.jsonl
    gains this start (`rvm.train.provenance`)."""
    state, sums = runs.states, runs.sums
    records: list[list[dict]] = [[] for _ in configs]
    resumed = pack.restore(ckpts, runs.run_shapes(state), runs.run_shapes(sums))
    if resumed[0] is not None:
        state = runs.join([r.state for r in resumed])
        sums = runs.join([r.epoch for r in resumed])
        records = [r.records["records"] for r in resumed]
        logging.info("Resumed %s from step %d", workdir, resumed[0].step)
    if primary:
        step = resumed[0].step if resumed[0] is not None else 0
        started = provenance.start_record(step, list(runs.run.mesh.devices.flat))
        for ck, run_config, run_records, restored in zip(ckpts, configs, records, resumed):
            metrics.append_jsonl(ck.workdir / "starts.jsonl", started)
            # Epochs logged after the checkpoint we start from (a kill before the save) are
            # redone; lines lost before it (a torn last line) are written again.
            lost = metrics.restore_jsonl(ck.workdir / "metrics.jsonl", run_records)
            if lost:
                logging.warning(
                    "%s: %d lost record(s) rewritten from checkpoint %d",
                    ck.workdir / "metrics.jsonl",
                    lost,
                    restored.step,
                )
            metrics.write_json(ck.workdir / "config.json", run_config.to_dict())
        if config.get("seeds") is not None:
            metrics.write_json(workdir / "config.json", config.to_dict())
    return state, sums, records


def _write_results(
    task: Task,
    seeds: list[int],
    dirs: list[Path],
    states: list[TrainState],
    records: list[list[dict]],
    step: int,
    num_params: int,
    primary: bool,
) -> dict[int, dict]:
    """Each finished run's results.json: the task's final numbers, and where a validation
    split was held out, the test error at the epoch of the best validation error."""
    finals = {}
    for seed, path, run_state, run_records in zip(seeds, dirs, states, records):
        results = {"step": step, "finished": True, "params": num_params}
        results.update(task.final_results(run_state))
        val = [r for r in run_records if "val_error" in r]
        if val:
            best = min(val, key=lambda r: r["val_error"])
            results["best_val_epoch"] = best["epoch"]
            if "test_error" in best:  # tasks that read their test split after every epoch
                results["test_error_at_best_val"] = best["test_error"]
        if primary:
            metrics.write_json(path / "results.json", results)
        finals[seed] = results
    return finals


class NonFiniteError(UserError, FloatingPointError):
    """The loss went non-finite; the last checkpoint written is still a good one."""


def _fetched(sums: Any) -> Any:
    """The epoch's sums (of a run, or of a pack's runs) on the host: waits for the step."""
    return jax.device_get(sums)


def _check_finite(sums: epoch.EpochSums, run: str = "") -> None:
    """Stops on a non-finite loss in the epoch's sums (on the host), unless such steps are
    being skipped and counted, naming the first step that had one and `run`."""
    if sums.nonfinite_step:
        raise NonFiniteError(
            f"metric 'loss' is {float(sums.nonfinite_loss)} at step {int(sums.nonfinite_step)}"
            f"{run}; stopping without saving, so the newest checkpoint is the last good one "
            "(config.skip_nonfinite=True skips such steps)"
        )


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

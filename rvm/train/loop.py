"""`train_and_evaluate(config, workdir)`: the one function launchers, notebooks and tests call.

Reads top to bottom: data, model, optimiser, state (fresh or resumed), the
loop with per-epoch evaluation and checkpoints, then the final numbers
(consolidated ones too for relaxed sharing).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from rvm.data import ImageData, load_images, pipeline
from rvm.models import sharing
from rvm.train import checkpoint, image_task, metrics, optim
from rvm.train import sharding as shd
from rvm.train import workdir as guard
from rvm.train.config_check import check_resume, validate
from rvm.train.relaxation import max_angles
from rvm.train.state import TrainState
from rvm.train.step import train_step

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: schedulers read it as "requeue me"


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the current step was written."""


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook kernels)
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


@dataclasses.dataclass
class Run:
    """Everything a run builds before its first step; tests build it on fake data."""

    model: nn.Module
    tx: optax.GradientTransformation
    state: TrainState
    step_fn: Callable  # jitted (state, train_data) -> (state, metrics)
    train_data: image_task.DeviceImages
    stats: tuple
    steps_per_epoch: int
    total_steps: int
    mask_fn: Callable | None  # the relaxed kernel sets, or None
    mesh: Mesh


def build_run(config: ml_collections.ConfigDict, data: ImageData, mesh: Mesh) -> Run:
    """Model, optimiser, fresh replicated state and the jitted, donated train step."""
    shd.check_divisible(config.batch_size, mesh, "batch_size")
    shd.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
    stats = pipeline.normalization_stats(data.train_images, config.data.normalization)
    steps_per_epoch = len(data.train_labels) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {len(data.train_labels)} training images"
        )
    total_steps = config.num_epochs * steps_per_epoch
    train_data = image_task.put_train_split(data.train_images, data.train_labels, stats, mesh)

    model = sharing.build_model(config.model, data.num_classes)
    relaxed = config.model.sharing == "relaxed"
    mask_fn = partial(sharing.set_mask, scope=config.model.scope) if relaxed else None
    tx = optim.make_optimizer(config.optim, total_steps, mask_fn)

    def init_state(key):
        dummy = jnp.zeros((1, *data.train_images.shape[1:]), jnp.float32)
        variables = model.init({"params": key, "dropout": key}, dummy)
        return TrainState.create(variables, tx, key)

    replicated = shd.replicated(mesh)
    state = jax.jit(init_state, out_shardings=replicated)(jax.random.PRNGKey(config.seed))
    step_fn = jax.jit(
        partial(
            train_step,
            get_batch=image_task.make_get_batch(config, mesh),
            loss_fn=image_task.make_loss_fn(model),
            tx=tx,
            lr_schedule=optim.learning_rate(config.optim, total_steps),
            skip_nonfinite=config.skip_nonfinite,
        ),
        in_shardings=(replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    return Run(
        model, tx, state, step_fn, train_data, stats, steps_per_epoch, total_steps, mask_fn, mesh
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *, max_steps: int | None = None
) -> dict:
    """Trains (or resumes) the run of `config` in `workdir`; returns the final results.

    `max_steps` stops early (with a checkpoint) without changing the schedules,
    as an interrupted run would; calling again resumes.
    """
    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with guard.exclusive(workdir):
        return _train(config, workdir, max_steps)


def _train(config: ml_collections.ConfigDict, workdir: Path, max_steps: int | None) -> dict:
    data = load_images(config.data)
    run = build_run(config, data, shd.data_mesh())
    model, state, steps_per_epoch, total_steps = (
        run.model,
        run.state,
        run.steps_per_epoch,
        run.total_steps,
    )
    mask_fn = run.mask_fn
    num_params = sharing.count_params(state.params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    guard.check_writable(workdir, needed_bytes=2 * state_bytes)

    # --- Resume ------------------------------------------------------------------------
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    if ckpts.all_steps():
        check_resume(config, workdir)
        state = ckpts.restore_latest_usable(state)
        logging.info("Resumed %s from step %d", workdir, int(state.step))
    # Epochs logged after the checkpoint we start from (a kill before the save) are redone.
    metrics.truncate_jsonl(workdir / "metrics.jsonl", after_step=int(state.step))
    metrics.write_json(workdir / "config.json", config.to_dict())
    writer = metrics.MetricWriter(workdir, total_steps)
    first_step = int(state.step)
    if first_step == 0:
        logging.info(
            "Parameters: %d (%s sharing, scope %s)",
            num_params,
            config.model.sharing,
            config.model.scope,
        )
    evaluate = partial(
        image_task.evaluate, stats=run.stats, batch_size=config.eval_batch_size, mesh=run.mesh
    )

    # --- Loop --------------------------------------------------------------------------
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    history = metrics.read_jsonl(workdir / "metrics.jsonl")
    step_metrics, epoch_start = [], time.time()
    with _SigtermFlag() as sigterm:
        for step in range(first_step, stop):
            state, m = run.step_fn(state, run.train_data)
            if step_metrics:  # one step behind, so the host never waits on the device
                _check_finite(step_metrics[-1], step, config.skip_nonfinite)
            step_metrics.append(m)
            done = step + 1
            if done % config.log_every_steps == 0:
                writer.progress(done, first_step, jax.device_get(m))
            if done % steps_per_epoch == 0 or done == stop:
                _check_finite(m, done, config.skip_nonfinite)
            if done % steps_per_epoch == 0:
                record = _epoch_record(model, state, data, evaluate, step_metrics)
                record["images_per_sec"] = (
                    len(step_metrics) * config.batch_size / (time.time() - epoch_start)
                )
                record["epoch"] = done // steps_per_epoch
                record["step"] = done
                if mask_fn is not None:
                    record["max_angle"] = max_angles(state.params, mask_fn(state.params))
                writer.write(done, first_step, record)
                history.append(metrics.plain(record))
                step_metrics, epoch_start = [], time.time()
                if record["epoch"] % config.checkpoint_every_epochs == 0:
                    ckpts.save(done, state)
            if sigterm.raised:
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
    results = {
        "step": final_step,
        "finished": True,
        "params": num_params,
        "test_error": evaluate(model, state.variables, data.test_images, data.test_labels)["error"],
    }
    if mask_fn is not None:
        merged = {
            **state.variables,
            "params": sharing.consolidate(state.params, config.model.scope),
        }
        raw = sharing.build_model(config.model, data.num_classes, consolidated=True)
        results["params_consolidated"] = sharing.count_params(merged["params"])
        results["consolidated_test_error"] = evaluate(
            raw, merged, data.test_images, data.test_labels
        )["error"]
    val = [r for r in history if "val_error" in r]
    if val:
        best = min(val, key=lambda r: r["val_error"])
        results.update(best_val_epoch=best["epoch"], test_error_at_best_val=best["test_error"])
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


def _epoch_record(model, state, data, evaluate, step_metrics) -> dict:
    """Means of the epoch's step metrics plus test (and validation) error."""
    fetched = jax.device_get(step_metrics)
    record = {
        f"train_{k}" if k in ("loss", "error") else k: float(np.mean([m[k] for m in fetched]))
        for k in fetched[0]
    }
    record["train_error"] *= 100.0
    for k in ("learning_rate", "pull", "penalty"):
        if k in record:
            record[k] = float(fetched[-1][k])
    if "skipped" in record:
        record["skipped"] = int(sum(m["skipped"] for m in fetched))
    test = evaluate(model, state.variables, data.test_images, data.test_labels)
    record.update(test_error=test["error"], test_loss=test["loss"])
    if data.val_images is not None and len(data.val_labels):
        record["val_error"] = evaluate(model, state.variables, data.val_images, data.val_labels)[
            "error"
        ]
    return record

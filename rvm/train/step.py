"""The jitted train step, generic over tasks.

A task supplies `get_batch(data, step, rng, seed)` (data lives on device; the batch
is a pure function of the step, the step's key and the run's key `seed`, so a resumed
run sees the same batches) and `loss_fn(params, batch_stats, batch, rng, train)` returning
`(loss, (new_batch_stats, metrics))`. Under `jax.jit` with the batch sharded
over a `("data",)` mesh, BatchNorm statistics are those of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rvm.train import epoch
from rvm.train.optim import relaxation_state
from rvm.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]]


class Probes(NamedTuple):
    """Inputs of a loss that leave its value unchanged but whose gradients measure the
    backward pass (an equilibrium layer's adjoint solve, `rvm.models.equilibrium`): the
    loss takes `zeros` as a sixth argument, and `read` turns their gradients into step
    metrics."""

    zeros: Any
    read: Callable[[Any], dict[str, jax.Array]]


# How a run's key (`state.rng`, PRNGKey(seed)) becomes the keys of its uses
# (`config.rng_streams`). "tagged": each use folds in a tag of its own first, so no two
# uses share a key. "shared", that of runs recorded before the field existed: the step's
# key fold_in(rng, step) and the data order's fold_in(rng, epoch) coincide while
# step == epoch.
RNG_STREAMS = ("tagged", "shared")
STEP_TAG, ORDER_TAG = 1, 2


def stream_keys(rng: jax.Array, step: jax.Array, streams: str) -> tuple[jax.Array, jax.Array]:
    """The key of step `step` and the key of the run's data order (which folds in the
    epoch, `rvm.data.pipeline.batch_indices`), from the run's raw key `rng`."""
    if streams == "shared":
        return jax.random.fold_in(rng, step), rng
    if streams != "tagged":
        raise ValueError(f"rng_streams={streams!r} is not one of {', '.join(RNG_STREAMS)}")
    return jax.random.fold_in(jax.random.fold_in(rng, STEP_TAG), step), jax.random.fold_in(
        rng, ORDER_TAG
    )


def train_step(
    state: TrainState,
    data: Any,
    *,
    get_batch: Callable[[Any, jax.Array, jax.Array, jax.Array], Any],
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule | None = None,
    skip_nonfinite: bool = False,
    rng_streams: str = "tagged",
    probes: Probes | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step; returns the new state and this step's scalar metrics.

    With `skip_nonfinite`, a step whose loss or gradients are not finite leaves
    params, statistics and optimiser state as they were (metric `skipped` = 1),
    except the optimiser's step counts, so that its schedules (learning rate, pull)
    stay those of `state.step`. `rng_streams` is one of `RNG_STREAMS`. `probes`' readings
    join the metrics.
    """
    step_key, order_key = stream_keys(state.rng, state.step, rng_streams)
    data_rng, model_rng = jax.random.split(step_key)
    # The run's key, `PRNGKey(config.seed)`, orders its data: a traced value, so the runs
    # of a pack (`rvm.train.pack`) share one program and each keeps its own order.
    batch = get_batch(data, state.step, data_rng, jax.random.wrap_key_data(order_key))
    args = (state.params, state.batch_stats, batch, model_rng, True)
    if probes is None:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, metrics)), grads = grad_fn(*args)
    else:
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 5), has_aux=True)
        (loss, (batch_stats, metrics)), (grads, measured) = grad_fn(*args, probes.zeros)
        metrics = {**metrics, **probes.read(measured)}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **metrics}
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(state.step)
    relax = relaxation_state(opt_state)
    if relax is not None:
        metrics["pull"] = relax.pull
        metrics["penalty"] = relax.penalty
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        counts_on = lambda path, new, old: (
            new if getattr(path[-1], "name", None) == "count" else jnp.where(finite, new, old)
        )
        new_state = new_state.replace(
            params=keep(params, state.params),
            batch_stats=keep(batch_stats, state.batch_stats),
            opt_state=jax.tree_util.tree_map_with_path(counts_on, opt_state, state.opt_state),
        )
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics


def epoch_step(
    state: TrainState, sums: epoch.EpochSums, data: Any, *, steps_per_epoch: int, **step_kwargs
) -> tuple[TrainState, epoch.EpochSums]:
    """`train_step` (with `step_kwargs`) adding its metrics to the epoch's sums on device,
    so that the loop need not fetch anything per step."""
    step = state.step
    state, metrics = train_step(state, data, **step_kwargs)
    return state, epoch.add(sums, metrics, step, steps_per_epoch)

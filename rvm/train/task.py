"""The interface between the one training loop and a kind of training.

`rvm.train.loop` owns what every run shares (state, optimiser, the jitted step,
checkpoints, resume, metrics files, faults); a task supplies what differs: the
model, its data on device, how a batch is drawn and scored, and what is
evaluated after each epoch and at the end. A task module (`rvm.tasks`) exposes
`load_data(config)` (host data), `make_task(config, data, mesh) -> Task` and
`validate(config)`; the config field `task` picks the module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from rvm.data import pipeline
from rvm.train import sharding
from rvm.train.state import TrainState
from rvm.train.step import LossFn, Probes


@dataclasses.dataclass(frozen=True)
class Task:
    """What one kind of training contributes to `rvm.train.loop.train_and_evaluate`."""

    model: nn.Module
    train_data: Any  # pytree on device, replicated; the step's `data` argument
    num_train: int  # training examples, for the epoch length
    init_input: jax.Array  # a batch of one example, for `model.init`
    get_batch: Callable[[Any, jax.Array, jax.Array, jax.Array], Any]  # see `rvm.train.step`
    loss_fn: LossFn
    # Evaluation after each epoch: fields of the metrics.jsonl record ("test_error", ...).
    epoch_metrics: Callable[[TrainState], dict[str, Any]]
    # The task's entries of results.json once training has finished.
    final_results: Callable[[TrainState], dict[str, Any]]
    unit: str  # what one example is ("images", "sequences"): throughput is `{unit}_per_sec`
    summary: str  # the model in a few words, for the log
    relax_mask: Callable | None = None  # kernel sets the optimiser relaxes (relaxed sharing)
    probes: Probes | None = None  # gradients that measure the backward pass (`rvm.train.step`)


def sum_over_split(
    batch_sums: Callable[[jax.Array, jax.Array, jax.Array], Any],
    inputs: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    mesh=None,
) -> Any:
    """Sums `batch_sums(x, y, weight)` (a pytree of weighted sums) over a whole split.

    The batches come from `pipeline.eval_batches` (the last one padded, padding
    weighted 0) and are placed over `mesh`'s batch axis when given. Every batch is
    dispatched before any result is read, so the device never waits on the host (a
    test split is small enough to sit on the device whole, as the training split does);
    the per-batch sums are then fetched at once and added up on the host in float64,
    so a long split loses no precision.
    """
    placement = sharding.batch(mesh) if mesh is not None else None
    per_batch = []
    for batch in pipeline.eval_batches(inputs, labels, batch_size):
        if placement is not None:
            batch = jax.device_put(batch, placement)
        per_batch.append(batch_sums(*batch))
    as_float64 = lambda sums: jax.tree.map(lambda v: np.asarray(v, np.float64), sums)
    return functools.reduce(
        lambda total, sums: jax.tree.map(np.add, total, sums),
        map(as_float64, jax.device_get(per_batch)),
    )

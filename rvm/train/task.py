"""The interface between the one training loop and a kind of training.

`rvm.train.loop` owns what every run shares (state, optimiser, the jitted step,
checkpoints, resume, metrics files, faults); a task supplies what differs: the
model, its data on device, how a batch is drawn and scored, and what is
evaluated after each epoch and at the end. A task module (`image_task`,
`video_task`) exposes `load_data(config)` (host data) and
`make_task(config, data, mesh) -> Task`; the config field `task` picks the module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from rvm.train.state import TrainState
from rvm.train.step import LossFn


@dataclasses.dataclass(frozen=True)
class Task:
    """What one kind of training contributes to `rvm.train.loop.train_and_evaluate`."""

    model: nn.Module
    train_data: Any  # pytree on device, replicated; the step's `data` argument
    num_train: int  # training examples, for the epoch length
    init_input: jax.Array  # a batch of one example, for `model.init`
    get_batch: Callable[[Any, jax.Array, jax.Array], Any]  # see `rvm.train.step`
    loss_fn: LossFn
    # Evaluation after each epoch: fields of the metrics.jsonl record ("test_error", ...).
    epoch_metrics: Callable[[TrainState], dict[str, Any]]
    # The task's entries of results.json once training has finished.
    final_results: Callable[[TrainState], dict[str, Any]]
    unit: str  # what one example is ("images", "sequences"): throughput is `{unit}_per_sec`
    summary: str  # the model in a few words, for the log
    relax_mask: Callable | None = None  # kernel sets the optimiser relaxes (relaxed sharing)

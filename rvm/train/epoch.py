"""The epoch's step metrics, summed on device inside the jitted step.

The host reads them only where it must (log points, epoch ends, checkpoints,
stops), so between those it never waits on the device. They travel in the
checkpoint with the train state, so a run stopped mid-epoch and resumed writes
the epoch's record over all of its steps, bit for bit as an uninterrupted run.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Step metrics of the optimiser, recorded as their last value rather than a mean.
LAST_VALUE = ("learning_rate", "pull", "penalty")


@struct.dataclass
class EpochSums:
    # Each mean metric summed over the steps taken (skipped ones left out) in float32 with
    # Kahan's compensation (`carry`), so a long epoch's sum keeps about float64's accuracy.
    sums: dict[str, jax.Array]
    carry: dict[str, jax.Array]
    last: dict[str, jax.Array]  # LAST_VALUE metrics at the epoch's latest step
    steps: jax.Array  # steps of the epoch run so far
    skipped: jax.Array  # of them, steps skip_nonfinite left out
    # The run's first step (counted from 1) whose loss was not finite, 0 if none, and that
    # loss; kept across epochs, since the host may read them only after the epoch ended.
    nonfinite_step: jax.Array
    nonfinite_loss: jax.Array


def zeros(step_metrics: dict[str, Any]) -> EpochSums:
    """Empty sums for a step's metrics (arrays or their shapes)."""
    zero = lambda: jnp.zeros((), jnp.float32)
    summed = [k for k in step_metrics if k not in LAST_VALUE and k != "skipped"]
    count = lambda: jnp.zeros((), jnp.int32)
    return EpochSums(
        sums={k: zero() for k in summed},
        carry={k: zero() for k in summed},
        last={k: zero() for k in step_metrics if k in LAST_VALUE},
        steps=count(),
        skipped=count(),
        nonfinite_step=count(),
        nonfinite_loss=zero(),
    )


METRIC_FIELDS = ("sums", "carry", "last")  # the fields keyed by metric name


def as_saved(sums: EpochSums, saved: dict[str, Any]) -> EpochSums:
    """`sums` keyed by the metrics of `saved` (a checkpoint's tree of its epoch sums),
    which code that has since added or dropped a step metric names otherwise: the
    target to restore that checkpoint's sums into. Every entry is a float32 scalar."""
    like = sums.sums["loss"]  # always there, placed as every other entry
    return sums.replace(
        **{f: {k: getattr(sums, f).get(k, like) for k in saved[f]} for f in METRIC_FIELDS}
    )


def conform(restored: EpochSums, current: EpochSums) -> tuple[EpochSums, list[str]]:
    """Restored sums keyed by the `current` step metrics, and the metrics the checkpoint
    lacked: their means are NaN until the epoch ends (its first steps went unrecorded);
    metrics the code no longer produces are dropped."""
    lacking = sorted(set(current.sums) - set(restored.sums))
    # one new buffer per entry: the step donates them, and no buffer may go twice
    like = restored.sums["loss"]

    def fill(field: str, k: str, value: float) -> jax.Array:
        saved = getattr(restored, field)
        return saved[k] if k in saved else jnp.full_like(like, value)

    return restored.replace(
        sums={k: fill("sums", k, jnp.nan) for k in current.sums},
        carry={k: fill("carry", k, 0.0) for k in current.carry},
        last={k: fill("last", k, 0.0) for k in current.last},
    ), lacking


def add(
    sums: EpochSums, metrics: dict[str, jax.Array], step: jax.Array, steps_per_epoch: int
) -> EpochSums:
    """`sums` after step `step` (counted from 0) with `metrics`; the epoch's first step
    starts them anew. Runs inside the jitted step."""
    fresh = zeros(metrics).replace(
        nonfinite_step=sums.nonfinite_step, nonfinite_loss=sums.nonfinite_loss
    )
    new_epoch = step % steps_per_epoch == 0
    sums = jax.tree.map(lambda z, s: jnp.where(new_epoch, z, s), fresh, sums)
    skipped = metrics.get("skipped", jnp.zeros((), jnp.float32)) > 0
    totals, carry = {}, {}
    for k, s in sums.sums.items():
        y = jnp.where(skipped, 0.0, metrics[k].astype(jnp.float32)) - sums.carry[k]
        totals[k] = s + y
        carry[k] = (totals[k] - s) - y
    loss = metrics["loss"].astype(jnp.float32)
    first_bad = (sums.nonfinite_step == 0) & ~jnp.isfinite(loss) & ~skipped
    return EpochSums(
        sums=totals,
        carry=carry,
        last={k: metrics[k].astype(jnp.float32) for k in sums.last},
        steps=sums.steps + 1,
        skipped=sums.skipped + skipped.astype(jnp.int32),
        nonfinite_step=jnp.where(first_bad, step + 1, sums.nonfinite_step),
        nonfinite_loss=jnp.where(first_bad, loss, sums.nonfinite_loss),
    )


def means(sums: EpochSums) -> dict[str, float]:
    """The epoch so far, under the step metrics' names: means over the steps taken
    (NaN if none was), the optimiser's last values. `sums` is on the host."""
    taken = int(sums.steps) - int(sums.skipped)
    out = {k: float(np.float64(v) / taken) if taken else math.nan for k, v in sums.sums.items()}
    out.update({k: float(v) for k, v in sums.last.items()})
    return out


def record(sums: EpochSums, skipping: bool) -> dict[str, Any]:
    """The epoch's `metrics.jsonl` fields of training: means named `train_*` (error in %),
    the optimiser's last values, `train_steps` (the epoch's steps, however many processes
    ran them) and, when `skipping`, the count of `skipped` steps."""
    out = {}
    for k, v in means(sums).items():
        out[k if k in LAST_VALUE else f"train_{k}"] = v
    if "train_error" in out:
        out["train_error"] *= 100.0
    out["train_steps"] = int(sums.steps)
    if skipping:
        out["skipped"] = int(sums.skipped)
    return out

"""Parameter-sharing relaxation (Kaiser & Sutskever) as an optax transformation.

Instead of tying the kernels of a set, the loss gains
`pull(step) * sum_sets sum_i ||w_i - mean(w)||^2`, whose pull grows during
training until the set is practically one kernel; `consolidate` then replaces
every member by the mean. Because `sum_i (w_i - mean) = 0`, the gradient of the
penalty with respect to `w_i` is simply `2 * pull * (w_i - mean)`, added to the
updates like weight decay, before momentum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def exponential_pull(start: float, end: float, total_steps: int) -> optax.Schedule:
    """Exactly `start` at step 0 and `end` at step `total_steps - 1`, the run's last
    update (the schedule is read with the count of updates already made); exponential
    between, held at `end` after. A one-step run uses `start`."""
    if not (start > 0 and end > 0):
        raise ValueError(f"relaxation pull ends must be positive, got start={start}, end={end}")
    if total_steps < 1:
        raise ValueError(f"relaxation schedule needs total_steps >= 1, got {total_steps}")
    last = max(total_steps - 1, 1)

    def schedule(step):
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / last, 0.0, 1.0)
        # The ends exactly, not start * exp(log(end / start)) rounded in float32.
        value = start * jnp.exp(frac * jnp.log(end / start))
        return jnp.where(frac >= 1.0, end, jnp.where(frac <= 0.0, start, value))

    return schedule


class RelaxationState(NamedTuple):
    count: jax.Array  # steps taken, the schedule's argument
    pull: jax.Array  # the pull used at the last update
    penalty: jax.Array  # the (unscaled) penalty sum_sets sum_i ||w_i - mean||^2 at the last update


def _deviations(params: Any, mask: Any) -> Any:
    """w - mean(w) over the stacking axis at set leaves, None elsewhere."""
    return jax.tree.map(
        lambda w, m: (w - jnp.mean(w, axis=0, keepdims=True)) if m else None, params, mask
    )


def penalty(params: Any, mask: Any) -> jax.Array:
    """sum_sets sum_i ||w_i - mean(w)||^2 over the set leaves of `mask`."""
    devs = jax.tree.leaves(_deviations(params, mask))
    return sum((jnp.sum(jnp.square(d)) for d in devs), jnp.zeros((), jnp.float32))


def _set_members(params: Any, mask: Any):
    """(set name, members flattened to [n, size]) for every set leaf of `mask`."""
    for path, w in jax.tree_util.tree_leaves_with_path(
        jax.tree.map(lambda w, m: w if m else None, params, mask)
    ):
        yield "/".join(str(getattr(k, "key", k)) for k in path), w.reshape(w.shape[0], -1)


def max_angles(params: Any, mask: Any) -> dict[str, jax.Array]:
    """For each set, the largest angle (degrees) between a member and the set mean."""
    angles = {}
    for name, flat in _set_members(params, mask):
        unit = jnp.mean(flat, axis=0)
        unit = unit / (jnp.linalg.norm(unit) + 1e-30)
        along = flat @ unit
        across = jnp.linalg.norm(flat - along[:, None] * unit, axis=1)
        # atan2 of the two components stays accurate for tiny angles, where arccos of a
        # cosine near 1 loses most of its digits in float32.
        angles[name] = jnp.max(jnp.degrees(jnp.arctan2(across, along)))
    return angles


def max_pairwise_angles(params: Any, mask: Any) -> dict[str, jax.Array]:
    """For each set, the largest angle (degrees) between two of its members.

    Up to twice `max_angles` (two members on opposite sides of the mean): a criterion
    such as "the members are within 1 degree of each other" is read here.
    """
    angles = {}
    for name, flat in _set_members(params, mask):
        unit = flat / (jnp.linalg.norm(flat, axis=1, keepdims=True) + 1e-30)
        # 2 atan2(|u - v|, |u + v|) is the angle between unit vectors u and v, accurate
        # where arccos of their dot product is not (angles near 0).
        diff = jnp.linalg.norm(unit[:, None] - unit[None], axis=-1)
        total = jnp.linalg.norm(unit[:, None] + unit[None], axis=-1)
        angles[name] = jnp.max(jnp.degrees(2.0 * jnp.arctan2(diff, total)))
    return angles


def relaxation(pull: optax.ScalarOrSchedule, mask: Any | Callable[[Any], Any]):
    """Adds the gradient of `pull * penalty(params)` to the updates.

    Args:
      pull: a scalar or a schedule of the step.
      mask: a pytree of bools over the params (True at each stacked kernel set),
        or a function of the params returning one.
    """
    schedule = pull if callable(pull) else (lambda _: pull)

    def init_fn(params):
        del params
        zero = jnp.zeros((), jnp.float32)
        return RelaxationState(jnp.zeros((), jnp.int32), zero, zero)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("relaxation needs the params: call update(updates, state, params)")
        m = mask(params) if callable(mask) else mask
        strength = jnp.asarray(schedule(state.count), jnp.float32)
        devs = _deviations(params, m)
        updates = jax.tree.map(
            lambda u, d: u if d is None else u + 2.0 * strength * d.astype(u.dtype),
            updates,
            devs,
            is_leaf=lambda x: x is None,
        )
        new_state = RelaxationState(state.count + 1, strength, penalty(params, m))
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)

"""BatchNorm statistics re-estimated for the network as it is now, not as it was trained.

The running averages a network carries out of training describe the activations of
the weights that produced them. Anything that changes the weights or the depth
afterwards leaves them stale: averaging a relaxed set's kernels (consolidation)
changes every block's activations, and a shared level read out past its trained
depth feeds its last block's statistics inputs they never saw. As after SWA's
weight averaging, the cure is to estimate them again on training images.

`recalibrate` runs the evaluation network (stochastic depth's residual scaling,
no drops) with every BatchNorm normalising by the statistics of the batch at hand,
and replaces each layer's running mean and variance by the *exact* population
statistics of its inputs over all the images of the given batches: the mean and
the biased variance over every image, row and column, as a BatchNorm's batch
statistics are, pooled over the batches (not a moving average). Each batch is one
compiled pass that returns every layer's first and second moments; the host sums
them in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvm.models.norm import BatchNorm, _stats


def _batch_statistics(next_fun, args, kwargs, context):
    """Evaluation BatchNorm normalising by its batch: the batch statistics are written
    into its running-average variables, which its evaluation path then reads."""
    module = context.module
    if not (isinstance(module, BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    if not module.use_running_average:
        raise ValueError("recalibration runs the evaluation network (train=False)")
    mean, var = _stats(args[0])
    module.put_variable("batch_stats", "mean", mean)
    module.put_variable("batch_stats", "var", var)
    return next_fun(*args, **kwargs)


@partial(jax.jit, static_argnames=("model", "iterations"))
def _batch_moments(model: nn.Module, variables: dict, images: jax.Array, masks, iterations):
    """Every BatchNorm's (mean, mean of squares) over one batch, as a batch_stats tree."""
    with nn.intercept_methods(_batch_statistics):
        _, updates = model.apply(
            variables,
            images,
            train=False,
            masks=masks,
            iterations=iterations,
            mutable=["batch_stats"],
        )
    stats = updates["batch_stats"]
    return jax.tree.map(
        lambda m, v: (m, v + jnp.square(m)),
        _pairs(stats, "mean"),
        _pairs(stats, "var"),
    )


def _pairs(tree, name: str):
    """The `name` leaves of a batch_stats tree, keyed by the layer that holds them."""
    if isinstance(tree, dict) and "mean" in tree and "var" in tree:
        return tree[name]
    return {k: _pairs(v, name) for k, v in tree.items()}


def extend_levels(variables: dict, iterations: Sequence[int | None]) -> dict:
    """Stacks each level's per-block statistics to its readout length (`iterations`).

    Iterations past the stack repeat the last block's statistics (what `Level`
    would otherwise reuse), as the start that `recalibrate` then replaces.
    """
    stats = dict(variables["batch_stats"])
    for i, length in enumerate(iterations):
        name = f"level{i + 1}"
        if length is None or "blocks" not in stats.get(name, {}):
            continue  # no statistics per iteration (an equilibrium level's cell has none)
        level = dict(stats[name])
        blocks = level["blocks"]
        trained = jax.tree.leaves(blocks)[0].shape[0]
        if length > trained:
            index = np.minimum(np.arange(length), trained - 1)
            level["blocks"] = jax.tree.map(lambda v, i=index: v[i], blocks)
            stats[name] = level
    return {**variables, "batch_stats": stats}


def recalibrate(
    model: nn.Module,
    variables: dict,
    batches: Iterable[jax.Array],
    iterations: Sequence[int | None] | None = None,
    masks: Sequence | None = None,
) -> dict:
    """`variables` with every BatchNorm's statistics re-estimated on `batches`.

    `batches` are model inputs (normalised images, no augmentation). With
    `iterations`, levels read out past their trained depth get statistics of their
    own for every extra iteration (the stacked statistics grow to the readout
    length, which `Level` then uses instead of repeating its last block's); the
    returned variables are for evaluating at those `iterations`. With `masks`
    (blocks switched off, as in the readout ablations) the statistics are those of
    the ablated network; a switched-off block keeps the statistics it had.
    """
    iterations = None if iterations is None else tuple(iterations)
    if iterations is not None:
        variables = extend_levels(variables, iterations)
    total, count = None, 0
    for images in batches:
        moments = jax.device_get(_batch_moments(model, variables, images, masks, iterations))
        n = images.shape[0]  # every layer sees each image's rows and columns equally often
        moments = jax.tree.map(lambda m, n=n: np.asarray(m, np.float64) * n, moments)
        total = moments if total is None else jax.tree.map(np.add, total, moments)
        count += n
    if total is None:
        raise ValueError("recalibration needs at least one batch")
    fresh = jax.tree.map(
        lambda pair: _mean_var(pair, count), total, is_leaf=lambda x: isinstance(x, tuple)
    )
    return {**variables, "batch_stats": _replace(variables["batch_stats"], fresh)}


def _mean_var(sums: tuple, count: int) -> dict:
    mean = sums[0] / count
    return {"mean": mean, "var": np.maximum(sums[1] / count - np.square(mean), 0.0)}


def _replace(stats, fresh):
    """The batch_stats tree with each layer's mean and var taken from `fresh`."""
    if isinstance(stats, dict) and "mean" in stats and "var" in stats:
        return {
            "mean": jnp.asarray(fresh["mean"], stats["mean"].dtype),
            "var": jnp.asarray(fresh["var"], stats["var"].dtype),
        }
    return {k: _replace(v, fresh[k]) for k, v in stats.items()}

"""How training executes stochastic depth: the strategies of `ResNet.sd_impl`.

All run the same draws (one per block per mini-batch, drawn by the level) to the
same function, gradients and BatchNorm statistics; a dropped block's statistics
stay as they were:
  cond     each block under `nn.cond`: a dropped block costs no convolutions.
           XLA:GPU evaluates a conditional on the host (a device-to-host copy
           and a wait per block, forward and backward), which made the
           (18,18,18) step slower than without stochastic depth on an H200.
  masked   every block runs, its residual multiplied by the 0/1 draw: no
           branches, nothing skipped.
  compact  a level's surviving blocks, their stacked variables gathered in
           block order, run under one `nn.scan` whose length is the smallest of
           a few static buckets that holds them, chosen by one `nn.switch` per
           level (one host sync per level, not per block); the bucket's spare
           slots are masked. Padding blocks run masked.
  auto     `SD_AUTO` per platform.

Random iteration counts (`iteration_masks`) ride on the same keep-masks: a level
trained for r of its n iterations is the level with its last n - r blocks dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


SD_IMPLS = ("auto", "cond", "masked", "compact")
# What `sd_impl="auto"` runs per platform. The CPU has no host round trip per
# conditional, and skipping saves a sixth of the step (bench/results/cpu.md,
# section stochastic_depth). Elsewhere `masked` until a GPU run of the benchmark
# (section stochastic_depth, one run per strategy) says which is fastest.
SD_AUTO = {"cpu": "cond"}
SD_AUTO_DEFAULT = "masked"
SD_BUCKETS = 4  # scan lengths per level under `compact`: more compile, less padding


def sd_impl_for(sd_impl: str, platform: str | None = None) -> str:
    """The strategy `sd_impl` names on `platform` (default: JAX's default backend)."""
    if sd_impl not in SD_IMPLS:
        raise ValueError(f"model.sd_impl={sd_impl!r} is not one of {', '.join(SD_IMPLS)}")
    if sd_impl != "auto":
        return sd_impl
    return SD_AUTO.get(platform or jax.default_backend(), SD_AUTO_DEFAULT)


def sd_buckets(survival: np.ndarray, count: int = SD_BUCKETS) -> tuple[int, ...]:
    """At most `count` scan lengths, the last the level's length, that minimise the
    expected length run under `compact` (each draw runs the smallest that holds its
    survivors), for independent draws with these survival probabilities."""
    pmf = np.ones(1)
    for p in survival:  # the number of survivors: a Poisson binomial
        pmf = np.convolve(pmf, [1 - p, p])
    upto = np.concatenate([[0.0], np.cumsum(pmf)])  # upto[v + 1] = P(survivors <= v)
    n = len(survival)
    # cost[j][v]: expected length over draws of <= v survivors with j buckets topped by v.
    cost = [[v * upto[v + 1] for v in range(n + 1)]]
    pick = [[None] * (n + 1)]
    for _ in range(count - 1):
        row, back = [], []
        for v in range(n + 1):
            options = [(cost[-1][u] + v * (upto[v + 1] - upto[u + 1]), u) for u in range(v)]
            best = min(options, default=(cost[-1][v], None))
            row.append(best[0])
            back.append(best[1])
        cost.append(row)
        pick.append(back)
    j = min(range(count), key=lambda j: (round(cost[j][n], 9), j))
    lengths, v = [n], n
    while j > 0 and pick[j][v] is not None:
        v = pick[j][v]
        lengths.append(v)
        j -= 1
    return tuple(sorted(lengths))


def keep_stats(module: type[nn.Module], keep: Array) -> type[nn.Module]:
    """`module` whose BatchNorm statistics are written back only where `keep` holds,
    so a block that ran but was dropped leaves them as `nn.cond` would."""
    before = {}

    def remember(tree):
        before["stats"] = tree
        return tree

    def select(tree):
        return jax.tree.map(lambda old, new: jnp.where(keep, new, old), before["stats"], tree)

    return nn.map_variables(
        module, "batch_stats", trans_in_fn=remember, trans_out_fn=select, mutable=True
    )


def gathered(module: type[nn.Module], slots: Array) -> type[nn.Module]:
    """`module` seeing its stacked variables at `slots` (distinct indices), its updated
    BatchNorm statistics scattered back there; gradients reach the gathered blocks."""
    take = lambda tree: jax.tree.map(lambda v: v[slots], tree)
    module = nn.map_variables(module, "params", trans_in_fn=take)
    full = {}

    def gather(tree):
        full["stats"] = tree
        return take(tree)

    def scatter(tree):
        return jax.tree.map(lambda old, new: old.at[slots].set(new), full["stats"], tree)

    return nn.map_variables(
        module, "batch_stats", trans_in_fn=gather, trans_out_fn=scatter, mutable=True
    )


def draw_iterations(key: Array, num_blocks: int, mean: float, sigma: float) -> Array:
    """An iteration count for one level and mini-batch, in [1, `num_blocks`]: as Huginn's
    recurrent depth, r = Poisson(lambda) + 1 with lambda log-normal of mean `mean` - 1
    (so r has mean `mean` before clipping) and log-scale spread `sigma`. The level's
    trained depth is the maximum, so every iteration has its per-block variables."""
    k_rate, k_count = jax.random.split(key)
    rate = (mean - 1.0) * jnp.exp(sigma * jax.random.normal(k_rate) - sigma**2 / 2)
    return jnp.clip(jax.random.poisson(k_count, rate) + 1, 1, num_blocks)


def iteration_masks(
    key: Array, num_blocks: Sequence[int | None], mean: float, sigma: float
) -> list[Array | None]:
    """Per level, the keep-mask of its first r blocks, r drawn (`draw_iterations`) for
    each level given a block count, independently; None leaves a level whole. Blocks past
    r are the identity (as a dropped block), so this is the level run for r iterations."""
    masks = []
    for level, n in enumerate(num_blocks):
        if n is None:
            masks.append(None)
            continue
        r = draw_iterations(jax.random.fold_in(key, level), n, mean, sigma)
        masks.append((jnp.arange(n) < r).astype(jnp.float32))
    return masks

"""Losses for recurrent nets that should keep improving when iterated longer.

Three ways to train a `ThinkingNet` (config section `train`), each a switch:

* plain: cross-entropy after the trained count m (`train.iterations`), with
  back-propagation through all m iterations (`train.progressive_weight=0`).
* the progressive loss of Bansal et al. (2022): draw n, run n iterations without
  gradient, then k (`train.grad_iterations`) with it, and take the loss of the
  output after n + k. With weight a (`train.progressive_weight`),
  loss = (1 - a) CE(after m) + a CE(after n + k). As the net cannot know which
  iteration it is in, it learns an update that improves any state: this is what
  keeps it from "overthinking" (drifting away from the answer) after m.
* random counts with truncated back-propagation (Geiping et al. 2025,
  `train.counts="poisson"`): the count r = Poisson(lambda) + 1 with lambda
  log-normal around m, backprop through the last k only (n = max(r - k, 0)).
  `train.counts="uniform"` is Bansal's n ~ U{0, ..., m - k}.

`train.scheme="equilibrium"` replaces all of these by the loss at the net's fixed point
(`equilibrium_loss_fn`).

n is drawn on device every step, so the n iterations without gradient run in a
`lax.fori_loop` with a traced trip count: one compiled step serves every n. Its
carry and the parameters it reads are stop_gradient'ed, so autodiff sees a loop
with no tangents and keeps no residuals: its memory does not grow with n (the
test suite checks compiled temporaries for two n). The k iterations with
gradient are a static scan.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rvm.models.equilibrium import solver_metrics
from rvm.models.thinking import ThinkingNet
from rvm.train.step import LossFn

COUNTS = ("uniform", "poisson")
# A sampled count above MAX_FACTOR * m is clipped: the step's time stays bounded.
MAX_FACTOR = 4


def run_without_grad(
    model: ThinkingNet, params: Any, h: jax.Array, x: jax.Array, n: int | jax.Array
) -> jax.Array:
    """`n` iterations from `h`, through which no gradient flows (n may be traced)."""
    params, h = jax.lax.stop_gradient((params, h))
    step = lambda _, h: model.apply({"params": params}, h, x, method=ThinkingNet.step)
    return jax.lax.stop_gradient(jax.lax.fori_loop(0, n, step, h))


def truncated_logits(
    model: ThinkingNet, params: Any, x: jax.Array, n: int | jax.Array, k: int
) -> jax.Array:
    """Logits after n + k iterations, backpropagating through the last k only."""
    variables = {"params": params}
    h = model.apply(variables, x, method=ThinkingNet.encode)
    h = run_without_grad(model, params, h, x, n)
    h = model.apply(variables, h, x, k, method=ThinkingNet.think)
    return model.apply(variables, h, method=ThinkingNet.readout)


def sample_prefix(key: jax.Array, train: ml_collections.ConfigDict) -> jax.Array:
    """The iterations without gradient of one step, an int32 scalar drawn on device."""
    m, k = train.iterations, train.grad_iterations
    if train.counts == "uniform":
        return jax.random.randint(key, (), 0, m - k + 1)
    lam_key, count_key = jax.random.split(key)
    sigma = train.sigma
    # mean of the log-normal = m: its log has mean log(m) - sigma^2 / 2
    lam = jnp.exp(jnp.log(m) - sigma**2 / 2 + sigma * jax.random.normal(lam_key))
    r = jax.random.poisson(count_key, lam) + 1
    return jnp.clip(r - k, 0, MAX_FACTOR * m - k).astype(jnp.int32)


def per_position_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over positions (pixels, bits) and examples."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def exact_match_error(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples with at least one wrong position."""
    wrong = jnp.argmax(logits, -1) != labels
    return jnp.mean(jnp.any(wrong.reshape(wrong.shape[0], -1), axis=1))


def make_loss_fn(model: ThinkingNet, train: ml_collections.ConfigDict) -> LossFn:
    """`loss_fn(params, batch_stats, (x, labels), rng, train)` for `rvm.train.step`."""
    a, m, k = train.progressive_weight, train.iterations, train.grad_iterations
    if train.get("scheme", "progressive") == "equilibrium":
        return equilibrium_loss_fn(model)

    def loss_fn(params, batch_stats, batch, rng, is_training):
        del is_training  # the net has no dropout or batch statistics
        x, labels = batch
        loss, metrics = 0.0, {}
        if a < 1:
            logits = model.apply({"params": params}, x, m)
            full = per_position_loss(logits, labels)
            loss += (1 - a) * full
            metrics.update(loss_max=full, error=exact_match_error(logits, labels))
        if a > 0:
            n = sample_prefix(rng, train)
            logits = truncated_logits(model, params, x, n, k)
            part = per_position_loss(logits, labels)
            loss += a * part
            metrics.update(loss_truncated=part, prefix_iterations=n.astype(jnp.float32))
            metrics.setdefault("error", exact_match_error(logits, labels))
        return loss, (batch_stats, metrics)

    return loss_fn


def equilibrium_loss_fn(model: ThinkingNet) -> LossFn:
    """The loss at the fixed point (`ThinkingNet.solve`, `train.scheme="equilibrium"`),
    with the Jacobian penalty when the spec weights it, and the solver's statistics."""
    spec = model.equilibrium

    def loss_fn(params, batch_stats, batch, rng, is_training):
        x, labels = batch
        key = rng if spec.jacobian_weight > 0 and is_training else None
        logits, stats, penalty = model.apply({"params": params}, x, key, method=ThinkingNet.solve)
        loss = per_position_loss(logits, labels)
        metrics = {"error": exact_match_error(logits, labels), **solver_metrics(stats)}
        if penalty is not None:
            loss = loss + spec.jacobian_weight * penalty
            metrics["jacobian"] = penalty
        return loss, (batch_stats, metrics)

    return loss_fn

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
  `train.counts="uniform"` draws n uniformly, in one of two ways (`train.draw`):
  "fixed_k" (rvm's first runs) n ~ U{0, ..., m - k} with k fixed, or "reference"
  (the draw of Bansal et al.'s code) n ~ U{0, ..., m - 1}, then k ~ U{1, ..., m - n}.

`train.scheme="equilibrium"` replaces all of these by the loss at the net's fixed point
(`equilibrium_loss_fn`).

n is drawn on device every step, so the n iterations without gradient run in a
`lax.fori_loop` with a traced trip count: one compiled step serves every n. Its
carry and the parameters it reads are stop_gradient'ed, so autodiff sees a loop
with no tangents and keeps no residuals: its memory does not grow with n (the
test suite checks compiled temporaries for two n). The k iterations with
gradient are a static scan; a drawn k ("reference") runs in a scan of m steps whose
steps past k keep the state (a `lax.cond`, so they cost no convolutions).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rvm.models.equilibrium import PROBES, solver_metrics
from rvm.models.thinking import ThinkingNet
from rvm.train.step import LossFn

COUNTS = ("uniform", "poisson")
DRAWS = ("fixed_k", "reference")
# A sampled count above MAX_FACTOR * m is clipped: the step's time stays bounded.
MAX_FACTOR = 4


def run_without_grad(
    model: ThinkingNet, params: Any, h: jax.Array, x: jax.Array, n: int | jax.Array
) -> jax.Array:
    """`n` iterations from `h`, through which no gradient flows (n may be traced)."""
    params, h = jax.lax.stop_gradient((params, h))
    step = lambda _, h: model.apply({"params": params}, h, x, method=ThinkingNet.step)
    return jax.lax.stop_gradient(jax.lax.fori_loop(0, n, step, h))


def think_drawn(
    model: ThinkingNet, params: Any, h: jax.Array, x: jax.Array, k: jax.Array, most: int
) -> jax.Array:
    """`k` iterations from `h` with gradient, k traced and at most `most`."""
    step = lambda h: model.apply({"params": params}, h, x, method=ThinkingNet.step)

    def body(h, t):
        return jax.lax.cond(t < k, step, lambda h: h, h), None

    return jax.lax.scan(body, h, jnp.arange(most))[0]


def truncated_logits(
    model: ThinkingNet, params: Any, x: jax.Array, n: int | jax.Array, k: int | jax.Array, most=None
) -> jax.Array:
    """Logits after n + k iterations, backpropagating through the last k only (a traced
    k needs `most`, its largest value)."""
    variables = {"params": params}
    h = model.apply(variables, x, method=ThinkingNet.encode)
    h = run_without_grad(model, params, h, x, n)
    if isinstance(k, int):
        h = model.apply(variables, h, x, k, method=ThinkingNet.think)
    else:
        h = think_drawn(model, params, h, x, k, most)
    return model.apply(variables, h, method=ThinkingNet.readout)


def draw_name(train: ml_collections.ConfigDict) -> str:
    """How a run draws its counts, as the summaries name it."""
    if train.counts == "uniform" and train.get("draw", "fixed_k") == "reference":
        return "uniform (reference n, k)"
    return f"{train.counts}, k={train.grad_iterations}"


def sample_counts(
    key: jax.Array, train: ml_collections.ConfigDict
) -> tuple[jax.Array, int | jax.Array]:
    """(n, k) of one step: n iterations without gradient then k with; k is
    `train.grad_iterations` unless drawn (`train.draw="reference"`)."""
    m = train.iterations
    if train.counts == "uniform" and train.get("draw", "fixed_k") == "reference":
        n_key, k_key = jax.random.split(key)
        n = jax.random.randint(n_key, (), 0, m)
        return n, jax.random.randint(k_key, (), 1, m - n + 1)
    return sample_prefix(key, train), train.grad_iterations


def sample_prefix(key: jax.Array, train: ml_collections.ConfigDict) -> jax.Array:
    """The iterations without gradient of one step with k fixed, an int32 scalar drawn on
    device."""
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
    a, m = train.progressive_weight, train.iterations
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
            n, k_drawn = sample_counts(rng, train)
            logits = truncated_logits(model, params, x, n, k_drawn, most=m)
            part = per_position_loss(logits, labels)
            loss += a * part
            metrics.update(loss_truncated=part, prefix_iterations=n.astype(jnp.float32))
            if not isinstance(k_drawn, int):
                metrics.update(grad_iterations=k_drawn.astype(jnp.float32))
            metrics.setdefault("error", exact_match_error(logits, labels))
        return loss, (batch_stats, metrics)

    return loss_fn


def equilibrium_loss_fn(model: ThinkingNet) -> LossFn:
    """The loss at the fixed point (`ThinkingNet.solve`, `train.scheme="equilibrium"`),
    with the Jacobian penalty when the spec weights it, and the solver's statistics."""
    spec = model.equilibrium

    def loss_fn(params, batch_stats, batch, rng, is_training, probes=None):
        x, labels = batch
        key = rng if spec.jacobian_weight > 0 and is_training else None
        variables = {"params": params}
        if probes is not None:  # the adjoint solve's probe (`rvm.train.step.Probes`)
            variables[PROBES] = probes
        logits, stats, penalty = model.apply(variables, x, key, method=ThinkingNet.solve)
        loss = per_position_loss(logits, labels)
        metrics = {"error": exact_match_error(logits, labels), **solver_metrics(stats)}
        if penalty is not None:
            loss = loss + spec.jacobian_weight * penalty
            metrics["jacobian"] = penalty
        return loss, (batch_stats, metrics)

    return loss_fn
